"""In-process event log with the same semantics as the Kafka backend."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from trainer.eventlog.base import DeadLetter, LogRecord, partition_for
from trainer.events import Event


class MemoryLog:
    """Partitions as in-memory lists, consumer groups with committed offsets, blocking polls.

    As in Kafka, the partitions are split among the live members of a group (round-robin,
    reassigned whenever a member joins or leaves), and a member that is handed a partition
    starts reading it at the group's committed offset — so uncommitted records are read
    again after a rebalance (at-least-once).

    Args:
        partitions: number of partitions; a user's events always land in the same one.

    Example:
        >>> log = MemoryLog(partitions=2)
        >>> log.append([Event("e1", "u1", "i1", "click", 1)])
        >>> consumer = log.consumer("g")
        >>> [r.offset for r in consumer.poll(10, 0.0)]
        [0]
    """

    def __init__(self, partitions: int = 4) -> None:
        if partitions < 1:
            raise ValueError(f"partitions: must be >= 1, got {partitions}")
        self._partitions: list[list[tuple[bytes, int]]] = [[] for _ in range(partitions)]  # (value, append ms)
        self._committed: dict[str, dict[int, int]] = {}
        self.dead_letters: list[DeadLetter] = []
        self._members: dict[str, list[MemoryConsumer]] = {}
        self._cond = threading.Condition()

    @property
    def partitions(self) -> int:
        return len(self._partitions)

    def append(self, events: Sequence[Event]) -> None:
        self._store([(partition_for(e.user_id, self.partitions), e.to_json()) for e in events])

    def append_keyed(self, records: Sequence[tuple[str, bytes]]) -> None:
        self._store([(partition_for(key, self.partitions), value) for key, value in records])

    def append_raw(self, values: Sequence[bytes], partition: int = 0) -> None:
        """Append records as they are, as a producer other than the gateway might."""
        self._store([(partition, v) for v in values])

    def _store(self, records: Sequence[tuple[int, bytes]]) -> None:
        """Append (partition, value) records, stamped with the time of acceptance."""
        with self._cond:
            now_ms = int(time.time() * 1000)
            self._persist(records, now_ms)
            for partition, value in records:
                self._partitions[partition].append((value, now_ms))
            self._cond.notify_all()

    def _persist(self, records: Sequence[tuple[int, bytes]], now_ms: int) -> None:
        """Make records durable before they are visible (lock held); in memory: nothing to do."""

    def _persist_offsets(self) -> None:
        """Make the committed offsets durable (lock held); in memory: nothing to do."""

    def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        with self._cond:
            self.dead_letters.extend(letters)

    def consumer(self, group: str) -> MemoryConsumer:
        member = MemoryConsumer(self, group)
        with self._cond:
            self._members.setdefault(group, []).append(member)
            self._rebalance(group)
        return member

    def _leave(self, member: MemoryConsumer) -> None:
        with self._cond:
            members = self._members.get(member.group, [])
            if member in members:
                members.remove(member)
                self._rebalance(member.group)

    def _rebalance(self, group: str) -> None:
        """Hand partition p to member p mod n; new owners resume at the committed offset (lock held)."""
        members = self._members[group]
        committed = self._committed.setdefault(group, {})
        for i, member in enumerate(members):
            owned = range(i, self.partitions, len(members))
            member._positions = {p: member._positions.get(p, committed.get(p, 0)) for p in owned}
        self._cond.notify_all()

    def close(self) -> None:
        pass


class MemoryConsumer:
    """A member of a consumer group of a `MemoryLog`; reads the partitions it is assigned."""

    def __init__(self, log: MemoryLog, group: str) -> None:
        self._log = log
        self.group = group
        self._positions: dict[int, int] = {}
        self._turn = 0

    def assignment(self) -> list[int]:
        with self._log._cond:
            return sorted(self._positions)

    def poll(self, max_records: int, timeout_s: float) -> list[LogRecord]:
        deadline = time.monotonic() + timeout_s
        log = self._log
        with log._cond:
            while True:
                out: list[LogRecord] = []
                # Start each poll at the next partition, so one partition's backlog cannot starve the rest.
                owned = sorted(self._positions)
                self._turn = (self._turn + 1) % max(1, len(owned))
                for p in owned[self._turn :] + owned[: self._turn]:
                    start = self._positions[p]
                    take = log._partitions[p][start : start + max_records - len(out)]
                    out.extend(LogRecord(p, start + i, v, ts) for i, (v, ts) in enumerate(take))
                    self._positions[p] = start + len(take)
                    if len(out) >= max_records:
                        break
                remaining = deadline - time.monotonic()
                if out or remaining <= 0:
                    return out
                log._cond.wait(remaining)

    def lag(self) -> int:
        with self._log._cond:
            return sum(len(self._log._partitions[p]) - pos for p, pos in self._positions.items())

    def commit(self, offsets: dict[int, int]) -> None:
        with self._log._cond:
            committed = self._log._committed.setdefault(self.group, {})
            for p, off in offsets.items():
                committed[p] = max(committed.get(p, 0), off)
            self._log._persist_offsets()

    def close(self) -> None:
        self._log._leave(self)
