"""Trainer workers as processes in one consumer group on the real broker, with two store-shard
processes: the partitions are split between the workers, every event is trained on (and
published: its (user, item) pair reaches the serving store's seen lists), the shards hold
disjoint key sets whose union is exactly the keys the frequency filter admits, and a worker
leaving or joining mid-stream loses no event and replays at most an uncommitted batch."""

from __future__ import annotations

import contextlib
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from subprocess import Popen

import numpy as np
import pytest

from embedding_store import ShardedStore, feature_keys, open_store
from services.serving_store import open_serving_store
from tests.local_servers import free_port, freshrec_process, metric, store_shards, wait_until
from trainer.config import TrainerConfig
from trainer.eventlog import open_log
from trainer.events import Event
from trainer.models import table_configs

BATCH = 200
MIN_COUNT = 2


def clicks(n: int, seed: int) -> list[Event]:
    """Clicks of 1,000 users on 1,000 items, 3 per user and item on average: many are seen once
    (not admitted); none more often than a seen list keeps."""
    rng = np.random.default_rng(seed)
    users, items = rng.integers(0, 1000, n), rng.integers(0, 1000, n)
    return [
        Event(f"e{seed}-{k}", f"u{u}", f"i{i}", "click", 1_700_000_000_000 + 1000 * k)
        for k, (u, i) in enumerate(zip(users.tolist(), items.tolist(), strict=True))
    ]


def pairs(events: list[Event]) -> set[tuple[int, int]]:
    users = feature_keys("user", [e.user_id for e in events]).tolist()
    items = feature_keys("item", [e.item_id for e in events]).tolist()
    return set(zip(users, items, strict=True))


class Cluster:
    """Two store shards, the broker topic and the serving store that the workers share."""

    def __init__(self, stack: ExitStack, kafka_broker: str, redis_url: str, tmp_path: Path) -> None:
        self.shards = stack.enter_context(store_shards(2, tmp_path))
        self.store_url = "grpc://" + ",".join(s.address for s in self.shards)
        self.topic = f"{kafka_broker}/events-workers-{uuid.uuid4().hex[:8]}"
        self.log = open_log(f"kafka://{self.topic}", partitions=4)
        stack.callback(self.log.close)
        self.redis_url = redis_url
        self.group = f"workers-{uuid.uuid4().hex[:8]}"
        self.tmp_path = tmp_path
        self.workers: dict[str, tuple[Popen[bytes], int]] = {}
        self.stopped_trained = 0.0  # events the stopped workers had trained
        stack.callback(self.stop_all)

    def start(self, name: str) -> None:
        port = free_port()
        env = {
            "FRESHREC_STORE_URL": self.store_url,
            "FRESHREC_TRAINER_WORKERS": "2",
            "FRESHREC_MIN_COUNT": str(MIN_COUNT),
            "FRESHREC_GROUP_ID": self.group,
            "FRESHREC_METRICS_PORT": str(port),
            "FRESHREC_BATCH_SIZE": str(BATCH),
            "FRESHREC_SPARSE_SYNC_INTERVAL_S": "0.5",
        }
        args = ["trainer", "--kafka", self.topic, "--redis", self.redis_url]
        self.workers[name] = (freshrec_process(args, env, self.tmp_path / f"{name}.log"), port)

    def value(self, name: str, metric_name: str) -> float:
        return metric(self.workers[name][1], metric_name)

    def partitions(self, name: str) -> float:
        return self.value(name, "freshrec_trainer_partitions")

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        with contextlib.suppress(Exception):  # its count just before it stops (it may train one more batch)
            self.stopped_trained += self.value(name, "freshrec_trainer_events_total")
        proc = self.workers.pop(name)[0]
        proc.send_signal(sig)
        proc.wait(60)

    def stop_all(self) -> None:
        for name in list(self.workers):
            self.stop(name)

    def seen(self) -> set[tuple[int, int]]:
        """(user key, item key) pairs of every published seen list (each user's a set)."""
        store = open_serving_store(self.redis_url)
        try:
            snapshot = store.snapshot()
        finally:
            store.close()
        return set(zip(snapshot.seen_users.tolist(), snapshot.seen_items.tolist(), strict=True))

    def trained(self) -> float:
        """Events trained by every worker so far, those stopped included."""
        return self.stopped_trained + sum(self.value(w, "freshrec_trainer_events_total") for w in self.workers)

    def produce(self, events: list[Event], pause_s: float = 0.0, midway: Callable[[], None] | None = None) -> None:
        for start in range(0, len(events), 300):
            self.log.append(events[start : start + 300])
            if midway is not None and start >= len(events) // 3:
                midway()
                midway = None
            threading.Event().wait(pause_s)


@contextmanager
def cluster(kafka_broker: str, redis_url: str, tmp_path: Path) -> Iterator[Cluster]:
    with ExitStack() as stack:
        yield Cluster(stack, kafka_broker, redis_url, tmp_path)


def wait_published(c: Cluster, expected: set[tuple[int, int]], min_trained: int, what: str) -> float:
    """Wait until every expected pair was published and at least `min_trained` events counted
    as trained; return the events counted then. A stopped worker's count is read just before
    it stops and may miss its last batches, so after a stop the count is only an upper bound
    check on replays."""
    try:
        done = lambda: not (expected - c.seen()) and c.trained() >= min_trained  # noqa: E731
        wait_until(done, 120, what, interval_s=0.5)
    except AssertionError as e:
        raise AssertionError(f"{e}: {len(expected - c.seen())} of {len(expected)} pairs missing") from e
    return c.trained()


@pytest.mark.timeout(420)
def test_two_workers_share_the_partitions_and_the_shards_and_survive_leave_and_join(
    kafka_broker: str, redis_url: str, tmp_path: Path
) -> None:
    with cluster(kafka_broker, redis_url, tmp_path) as c:
        c.start("a")
        c.start("b")

        def split() -> bool:  # each worker's gauge follows its own poll: wait for both to agree
            a, b = c.partitions("a"), c.partitions("b")
            return a >= 1 and b >= 1 and a + b == 4

        wait_until(split, 120, "both workers to be assigned partitions")

        # 1. Steady: every event trained exactly once, split between the workers.
        first = clicks(3000, seed=1)
        c.produce(first)
        expected = pairs(first)
        wait_published(c, expected, len(first), "the first events to be trained and published")
        assert c.seen() == expected, "published pairs are the events' pairs"
        trained = {w: c.value(w, "freshrec_trainer_events_total") for w in ("a", "b")}
        assert sum(trained.values()) == len(first) and min(trained.values()) > 0, trained

        # The shards hold disjoint key sets; their union is exactly the admitted keys (seen at
        # least MIN_COUNT times over both workers: the filter counts on the shard that owns a key).
        config = TrainerConfig(store_url=c.store_url, min_count=MIN_COUNT, workers=2)
        store = open_store(c.store_url, table_configs(config))
        assert isinstance(store, ShardedStore)
        try:
            for table, ids in (("user", [e.user_id for e in first]), ("item", [e.item_id for e in first])):
                keys, counts = np.unique(feature_keys(table, ids), return_counts=True)
                found = [shard.table(table).get(keys)[1] for shard in store.shards]
                assert not (found[0] & found[1]).any(), f"{table}: a key has rows on both shards"
                assert np.array_equal(found[0] | found[1], counts >= MIN_COUNT), f"{table}: admitted keys differ"
                assert found[0].any() and found[1].any()
        finally:
            store.close()

        # 2. A worker leaves mid-stream: the other takes its partitions from the committed offsets.
        second = clicks(3000, seed=2)
        c.produce(second, pause_s=0.2, midway=lambda: c.stop("b"))
        wait_until(lambda: c.partitions("a") == 4, 60, "worker a to take every partition")
        expected |= pairs(second)
        replayed = wait_published(c, expected, 0, "the events around the leave to be trained") - 6000
        # b's count was read just before it stopped: it may have trained one batch more (slack)
        assert replayed <= 3 * BATCH, f"{replayed} events trained twice"

        # 3. A worker joins mid-stream: the partitions are split again.
        third = clicks(3000, seed=3)

        def join() -> None:  # the rest of the stream comes after the rebalance
            c.start("c")
            wait_until(lambda: c.partitions("c") >= 1, 120, "worker c to be assigned partitions")

        c.produce(third, pause_s=0.2, midway=join)
        # a reports its share after its next poll, the one that completes its side of the rebalance
        wait_until(lambda: c.partitions("a") + c.partitions("c") == 4, 30, "a and c to split the partitions")
        expected |= pairs(third)
        again = wait_published(c, expected, 0, "the events around the join to be trained") - 9000
        assert again - max(replayed, 0) <= 2 * BATCH, f"{again} events trained twice in all"
        assert c.value("c", "freshrec_trainer_events_total") > 0
