"""One suite for the EventLog interface, run against the in-process log and real Kafka (and
the trainer's dead-lettering of records it cannot use, on both)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from tests.local_servers import wait_until
from trainer.config import TrainerConfig
from trainer.eventlog import EventLog, LogConsumer, LogRecord, LogUnavailable, MemoryLog, open_log
from trainer.eventlog.file import FileLog
from trainer.eventlog.kafka import KafkaConsumer, KafkaLog, KafkaProducer  # imported there without warnings
from trainer.events import Event
from trainer.loop import Trainer


def events(n: int, users: int = 5, start: int = 0) -> list[Event]:
    return [Event(f"e{i}", f"u{i % users}", f"i{i}", "click", 1_000 + i) for i in range(start, start + n)]


def drain(consumer: LogConsumer, expected: int, timeout_s: float = 20) -> list[LogRecord]:
    got: list[LogRecord] = []

    def more() -> bool:
        got.extend(consumer.poll(1000, 0.2))
        return len(got) >= expected

    wait_until(more, timeout_s, f"{expected} records")
    return got


def test_every_event_is_delivered_once_in_user_order(event_log: EventLog) -> None:
    event_log.append(events(60))
    consumer = event_log.consumer(f"g-{uuid.uuid4().hex}")
    try:
        records = drain(consumer, 60)
        decoded = [Event.from_json(r.value) for r in records]
        assert sorted(e.event_id for e in decoded) == sorted(f"e{i}" for i in range(60))
        by_user: dict[str, list[int]] = {}
        partition_of: dict[str, set[int]] = {}
        for r, e in zip(records, decoded, strict=True):
            by_user.setdefault(e.user_id, []).append(e.timestamp_ms)
            partition_of.setdefault(e.user_id, set()).add(r.partition)
        assert all(ts == sorted(ts) for ts in by_user.values()), "a user's events must stay in order"
        assert all(len(p) == 1 for p in partition_of.values()), "a user's events must share a partition"
    finally:
        consumer.close()


def test_group_resumes_from_committed_offsets(event_log: EventLog) -> None:
    group = f"g-{uuid.uuid4().hex}"
    event_log.append(events(30))
    first = event_log.consumer(group)
    records = drain(first, 30)
    # commit only the first record of each partition: the rest must come again
    committed: dict[int, int] = {}
    for r in records:
        committed.setdefault(r.partition, r.offset + 1)
    first.commit(committed)
    first.close()
    event_log.append(events(10, start=30))
    second = event_log.consumer(group)
    try:
        again = drain(second, 30 - len(committed) + 10)
        ids = {Event.from_json(r.value).event_id for r in again}
        assert len(again) == 30 - len(committed) + 10
        assert {f"e{i}" for i in range(30, 40)} <= ids
        assert all(r.offset >= committed.get(r.partition, 0) for r in again)
    finally:
        second.close()


def test_lag_counts_the_records_not_yet_read(event_log: EventLog) -> None:
    consumer = event_log.consumer(f"g-{uuid.uuid4().hex}")
    try:
        consumer.poll(10, 0.5)  # join the group and take the partitions
        event_log.append(events(40))
        got: list[LogRecord] = []

        def read_some() -> bool:
            got.extend(consumer.poll(7, 0.2))
            return len(got) >= 7

        wait_until(read_some, 30, "the first records")
        if isinstance(event_log, MemoryLog):
            assert consumer.lag() == 40 - len(got)
        else:  # Kafka: from the watermarks of the partitions fetched so far
            assert 0 < consumer.lag() <= 40 - len(got)
        got.extend(drain(consumer, 40 - len(got)))
        wait_until(lambda: consumer.lag() == 0, 10, "no lag once every record was read")
    finally:
        consumer.close()


def test_unknown_scheme_names_the_url() -> None:
    with pytest.raises(ValueError, match="nats://x"):
        open_log("nats://x")


def test_memory_group_members_split_partitions_and_take_over_on_leave() -> None:
    log = MemoryLog(partitions=4)
    log.append(events(40, users=10))
    a, b = log.consumer("g"), log.consumer("g")
    assert sorted(a.assignment() + b.assignment()) == [0, 1, 2, 3] and not set(a.assignment()) & set(b.assignment())
    got_a, got_b = a.poll(1000, 0.0), b.poll(1000, 0.0)
    assert {r.partition for r in got_a} <= set(a.assignment()) and {r.partition for r in got_b} <= set(b.assignment())
    assert len(got_a) + len(got_b) == 40
    b.commit({r.partition: r.offset + 1 for r in got_b[:1]})  # b commits only its first record
    b.close()
    assert a.assignment() == [0, 1, 2, 3]
    redelivered = a.poll(1000, 0.0)  # b's partitions come back from b's committed offsets
    assert len(redelivered) == len(got_b) - 1
    assert {(r.partition, r.offset) for r in redelivered} == {(r.partition, r.offset) for r in got_b[1:]}


def test_memory_polls_take_turns_across_partitions() -> None:
    log = MemoryLog(partitions=2)
    log.append(events(400, users=10))
    consumer = log.consumer("g")
    first, second = consumer.poll(50, 0.0), consumer.poll(50, 0.0)
    assert {r.partition for r in first} != {r.partition for r in second}, "a backlog in one partition starved the other"


BAD_RECORDS = {  # raw value -> the field (or problem) its dead-letter reason must name
    b"\xff\xfe not UTF-8": "not a JSON object",
    b"{not json": "not a JSON object",
    b"[" * 50_000: "RecursionError",  # nesting deep enough to exhaust the parser's stack
    b"[1, 2]": "event must be an object",
    b'{"event_id": "b1", "user_id": "u", "item_id": "i", "type": "rating", "timestamp_ms": 5, "value": NaN}': "value",
    b'{"event_id": "b2", "user_id": "u", "item_id": "i", "type": "click", "timestamp_ms": 1e400}': "timestamp_ms",
    b'{"event_id": "b3", "user_id": "u", "item_id": "i", "type": "click", "timestamp_ms": -5}': "timestamp_ms",
    b'{"event_id": "b4", "user_id": "", "item_id": "i", "type": "click", "timestamp_ms": 5}': "user_id",
    b'{"event_id": "b5", "user_id": "u", "item_id": "i", "type": "click", "timestamp_ms": 5, "x": 1}': "x",
    # stamped 2^53 - 1 ms (the year 285,000): past the allowed clock skew
    b'{"event_id": "b6", "user_id": "u", "item_id": "i", "type": "click", "timestamp_ms": 9007199254740991}': (
        "timestamp_ms: is"
    ),
    b'{"event_id": "b7", "user_id": "u", "item_id": "i", "type": ["click"], "timestamp_ms": 5}': "type: must be a str",
    b'{"event_id": "b8", "user_id": "u", "item_id": "i", "type": "rating", "timestamp_ms": 5, "value": 1e999999}': (
        "value"
    ),
}


def write_raw(event_log: EventLog, values: list[bytes]) -> None:
    """Records as a producer other than the gateway might write them."""
    if isinstance(event_log, MemoryLog):
        event_log.append_raw(values)
        return
    assert isinstance(event_log, KafkaLog)
    producer = KafkaProducer(bootstrap_servers=event_log.bootstrap, acks="all")
    for value in values:
        producer.send(event_log.topic, value=value)
    producer.flush(10)
    producer.close()


def dead_lettered(event_log: EventLog, expected: int) -> dict[bytes, str]:
    if isinstance(event_log, MemoryLog):
        return {d.record.value: d.reason for d in event_log.dead_letters}
    assert isinstance(event_log, KafkaLog)
    consumer = KafkaConsumer(
        event_log.dead_letter_topic,
        bootstrap_servers=event_log.bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=15_000,
    )
    found: dict[bytes, str] = {}
    for message in consumer:
        found[message.value] = dict(message.headers)["reason"].decode()
        if len(found) >= expected:
            break
    consumer.close()
    return found


def test_bad_records_are_dead_lettered_with_their_reason(event_log: EventLog) -> None:
    write_raw(event_log, list(BAD_RECORDS))
    event_log.append(events(10))
    trainer = Trainer(TrainerConfig(), event_log.consumer("dlq"), dead_letter=event_log.dead_letter)
    wait_until(lambda: trainer.poll_and_train() is not None and trainer.events_trained >= 10, 30, "the good events")
    assert trainer.events_trained == 10 and trainer.invalid_records == len(BAD_RECORDS)
    letters = dead_lettered(event_log, len(BAD_RECORDS))
    assert set(letters) == set(BAD_RECORDS)
    for value, needle in BAD_RECORDS.items():
        assert needle in letters[value], (value[:40], letters[value])


def test_file_log_keeps_records_and_offsets_across_a_restart(tmp_path: Path) -> None:
    log = FileLog(tmp_path, partitions=2)
    log.append(events(50))
    consumer = log.consumer("g")
    assert len(drain(consumer, 50)) == 50
    consumer.commit({0: 10, 1: 5})
    log.close()
    with open(tmp_path / "p0.log", "ab") as f:  # the process died while writing a record
        f.write(b"\x40\x00\x00\x00half a rec")
    reopened = FileLog(tmp_path, partitions=7)  # an existing log keeps its partition count
    assert reopened.partitions == 2
    assert sum(len(p) for p in reopened._partitions) == 50  # the torn record is cut off
    resumed = drain(reopened.consumer("g"), 35)
    assert sorted((r.partition, r.offset) for r in resumed)[0] in ((0, 10), (1, 5))
    assert len(resumed) == 35 and {r.offset for r in resumed if r.partition == 0} >= {10}
    reopened.append(events(1, start=50))  # appends go after the cut
    assert sum(len(p) for p in FileLog(tmp_path)._partitions) == 51


def test_file_log_failed_write_leaves_no_torn_record_before_later_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = FileLog(tmp_path, partitions=1)
    log.append(events(5))
    real_fsync, calls = os.fsync, []

    def failing_fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(LogUnavailable, match="write failed"):
        log.append(events(3, start=5))  # written, not fsync'd: not acknowledged
    monkeypatch.setattr(os, "fsync", real_fsync)
    log.append(events(4, start=8))  # acknowledged after the failed one
    log.close()
    reopened = FileLog(tmp_path)
    ids = [json.loads(value)["event_id"] for value, _ in reopened._partitions[0]]
    assert ids == [f"e{i}" for i in (*range(5), *range(8, 12))]  # every acknowledged record, nothing else
