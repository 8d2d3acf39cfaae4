"""The trainer against the event log: at-least-once commits, bad records, sync contents."""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Callable

import numpy as np

from embedding_store import feature_keys, open_store
from embedding_store.dense import LocalDense
from tests.local_servers import wait_until
from trainer.config import TrainerConfig
from trainer.eventlog import EventLog, MemoryLog, open_log
from trainer.eventlog.base import partition_for
from trainer.events import Event
from trainer.loop import Trainer
from trainer.models import table_configs

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka import KafkaProducer


def clicks(n: int, start: int = 0) -> list[Event]:
    return [Event(f"c{i}", f"u{i % 7}", f"i{i % 11}", "click", 1_000 + i) for i in range(start, start + n)]


def train_until(trainer: Trainer, done: Callable[[], bool], timeout_s: float = 30) -> None:
    def step() -> bool:
        trainer.poll_and_train()
        return done()

    wait_until(step, timeout_s, "the trainer to get through the log")


def test_offsets_are_committed_after_training_so_a_restart_resumes(event_log: EventLog) -> None:
    group = f"g-{uuid.uuid4().hex[:8]}"
    event_log.append(clicks(50))
    first = Trainer(TrainerConfig(poll_timeout_s=0.2), event_log.consumer(group))
    train_until(first, lambda: first.events_trained >= 50)
    first.close()
    event_log.append(clicks(20, start=50))
    second = Trainer(TrainerConfig(poll_timeout_s=0.2), event_log.consumer(group))
    train_until(second, lambda: second.events_trained >= 20)
    for _ in range(3):
        second.poll_and_train()
    assert second.events_trained == 20, "a restarted trainer must not see already-trained events again"
    second.close()


def test_records_that_are_not_events_are_skipped_and_counted(kafka_url: str) -> None:
    log = open_log(kafka_url, partitions=1)
    bootstrap, topic = kafka_url.removeprefix("kafka://").split("/")
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for value in (b"\xff\xfe not json", b'{"event_id": "x"}', b"[1, 2]", clicks(1)[0].to_json()):
        producer.send(topic, value=value)
    producer.flush()
    producer.close()
    trainer = Trainer(TrainerConfig(poll_timeout_s=0.2), log.consumer(f"g-{uuid.uuid4().hex[:8]}"))
    train_until(trainer, lambda: trainer.invalid_records + trainer.events_trained >= 4)
    assert (trainer.invalid_records, trainer.events_trained) == (3, 1)
    log.close()


def test_sync_message_holds_exactly_what_changed() -> None:
    log = open_log("memory://")
    log.append([Event("e1", "alice", "book", "click", 1), Event("e2", "bob", "film", "skip", 2)])
    trainer = Trainer(TrainerConfig(negatives=0), log.consumer("g"))
    trainer.poll_and_train()
    message = trainer.collect_sync()
    assert message is not None
    alice, bob = feature_keys("user", ["alice", "bob"]).tolist()
    book, film = feature_keys("item", ["book", "film"]).tolist()
    assert set(message.users.keys.tolist()) == {alice, bob}
    assert set(message.items.keys.tolist()) == {book, film}
    assert message.users.rows.shape == (2, trainer.config.dim)
    assert message.items.rows.shape == (2, trainer.config.dim + 1)  # + item bias
    assert message.item_names == {book: "book", film: "film"}
    assert set(zip(message.seen_users.tolist(), message.seen_items.tolist(), strict=True)) == {
        (alice, book),
        (bob, film),
    }
    assert message.popular_keys.tolist() == [book]  # only positives count towards popularity
    assert trainer.collect_sync() is None  # nothing changed since
    # serving gets the user tower's output: alice's id row plus the mean of her history (book)
    expected = (
        trainer.users.get(np.array([alice], np.uint64))[0][0]
        + trainer.items.get(np.array([book], np.uint64))[0][0, : trainer.config.dim]
    )
    np.testing.assert_allclose(message.users.rows[message.users.keys.tolist().index(alice)], expected, rtol=1e-6)


def test_trainer_expires_rows_by_event_time_and_syncs_the_evictions() -> None:
    log = open_log("memory://")
    day = 86_400_000
    log.append([Event("e1", "old-user", "old-item", "click", 1 * day), Event("e2", "u", "i", "click", 1 * day)])
    # gaps of 4 days here are traffic, not silence: the model clock follows them (`trainer.clock`)
    config = TrainerConfig(negatives=0, ttl_s=7 * 86400.0, max_clock_jump_s=4 * 86400.0)
    trainer = Trainer(config, log.consumer("g"))
    trainer.poll_and_train()
    trainer.collect_sync()
    log.append([Event("e3", "u", "i", "click", 5 * day)])  # u and i stay fresh
    trainer.poll_and_train()
    assert trainer.expire() == 0  # day 5: nothing is 7 days old yet
    log.append([Event("e4", "u", "i", "click", 9 * day)])
    trainer.poll_and_train()
    assert trainer.expire() == 4  # day 9: old-user and old-item (last used on day 1), in retrieval and ranking tables
    message = trainer.collect_sync()
    assert message is not None
    assert message.users.evicted.tolist() == feature_keys("user", ["old-user"]).tolist()
    assert message.items.evicted.tolist() == feature_keys("item", ["old-item"]).tolist()
    assert trainer.users.get(feature_keys("user", ["old-user", "u"]))[1].tolist() == [False, True]


def test_frequency_filter_counts_events_not_examples() -> None:
    log = open_log("memory://")
    trainer = Trainer(TrainerConfig(negatives=4, min_count=2), log.consumer("g"))
    log.append([Event("a", "warm", "x", "click", 1), Event("b", "cold", "x", "click", 2)])
    trainer.poll_and_train()
    # "cold" appeared in 1 event (and 4 negatives of it): not admitted; "x" in 2 events: admitted
    assert trainer.users.get(feature_keys("user", ["warm", "cold"]))[1].tolist() == [False, False]
    assert trainer.items.get(feature_keys("item", ["x"]))[1].tolist() == [True]
    log.append([Event("c", "warm", "y", "click", 3)])
    trainer.poll_and_train()
    assert trainer.users.get(feature_keys("user", ["warm", "cold"]))[1].tolist() == [True, False]


def test_workers_sharing_a_store_each_publish_the_users_they_trained() -> None:
    """A user's serving vector needs the user's history, which only the worker of the user's
    partition has: a worker that drains another's user rows from the shared store leaves them
    to that worker, and each publishes its own users' vectors, history included."""
    log = MemoryLog(partitions=2)
    config = TrainerConfig(poll_timeout_s=0.0)
    store = open_store("local://", table_configs(config))
    dense = LocalDense()
    a, b = (Trainer(config, log.consumer("g"), store=store, dense=dense) for _ in range(2))
    events = clicks(200)
    log.append(events)
    train_until(a, lambda: b.poll_and_train() is not None and b.events_trained + a.events_trained >= 200)
    assert a.events_trained and b.events_trained
    owned = {
        w: set(
            feature_keys("user", [e.user_id for e in events if partition_for(e.user_id, 2) in w.partitions]).tolist()
        )
        for w in (a, b)
    }
    from_b = b.collect_sync()  # drains every changed user row of the shared table first
    from_a = a.collect_sync()
    assert from_a is not None and from_b is not None
    for worker, message in ((a, from_a), (b, from_b)):
        assert set(message.users.keys.tolist()) == owned[worker]
        history = worker.features.histories(message.users.keys)
        assert (history != 0).any(), "the users have histories"
        expected = worker.models.user_vectors(message.users.keys, history)[:, : config.dim]
        np.testing.assert_allclose(message.users.rows, expected.numpy(), rtol=1e-6)
