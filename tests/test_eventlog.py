"""One suite for the EventLog interface, run against the in-process log and real Kafka."""

from __future__ import annotations

import uuid

import pytest

from services.local_servers import wait_until
from trainer.eventlog import EventLog, LogConsumer, LogRecord, MemoryLog, open_log
from trainer.events import Event


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
    assert sorted(a.assignment + b.assignment) == [0, 1, 2, 3] and not set(a.assignment) & set(b.assignment)
    got_a, got_b = a.poll(1000, 0.0), b.poll(1000, 0.0)
    assert {r.partition for r in got_a} <= set(a.assignment) and {r.partition for r in got_b} <= set(b.assignment)
    assert len(got_a) + len(got_b) == 40
    b.commit({r.partition: r.offset + 1 for r in got_b[:1]})  # b commits only its first record
    b.close()
    assert a.assignment == [0, 1, 2, 3]
    redelivered = a.poll(1000, 0.0)  # b's partitions come back from b's committed offsets
    assert len(redelivered) == len(got_b) - 1
    assert {(r.partition, r.offset) for r in redelivered} == {(r.partition, r.offset) for r in got_b[1:]}


def test_memory_polls_take_turns_across_partitions() -> None:
    log = MemoryLog(partitions=2)
    log.append(events(400, users=10))
    consumer = log.consumer("g")
    first, second = consumer.poll(50, 0.0), consumer.poll(50, 0.0)
    assert {r.partition for r in first} != {r.partition for r in second}, "a backlog in one partition starved the other"
