"""In-process event log with the same semantics as the Kafka backend."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from trainer.eventlog.base import LogRecord, partition_for
from trainer.events import Event


class MemoryLog:
    """Partitions as in-memory lists, committed offsets per group, blocking polls.

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
        self._partitions: list[list[bytes]] = [[] for _ in range(partitions)]
        self._committed: dict[str, dict[int, int]] = {}
        self._cond = threading.Condition()

    @property
    def partitions(self) -> int:
        return len(self._partitions)

    def append(self, events: Sequence[Event]) -> None:
        encoded = [(partition_for(e.user_id, self.partitions), e.to_json()) for e in events]
        with self._cond:
            for partition, value in encoded:
                self._partitions[partition].append(value)
            self._cond.notify_all()

    def consumer(self, group: str) -> MemoryConsumer:
        with self._cond:
            committed = self._committed.setdefault(group, {})
        return MemoryConsumer(self, group, dict(committed))

    def end_offsets(self) -> dict[int, int]:
        with self._cond:
            return {p: len(records) for p, records in enumerate(self._partitions)}

    def close(self) -> None:
        pass


class MemoryConsumer:
    """A consumer of a `MemoryLog`; one group member owns all partitions."""

    def __init__(self, log: MemoryLog, group: str, positions: dict[int, int]) -> None:
        self._log = log
        self._group = group
        self._positions = {p: positions.get(p, 0) for p in range(log.partitions)}

    def poll(self, max_records: int, timeout_s: float) -> list[LogRecord]:
        deadline = time.monotonic() + timeout_s
        log = self._log
        with log._cond:
            while True:
                out: list[LogRecord] = []
                for p, records in enumerate(log._partitions):
                    start = self._positions[p]
                    take = records[start : start + max_records - len(out)]
                    out.extend(LogRecord(p, start + i, v) for i, v in enumerate(take))
                    self._positions[p] = start + len(take)
                    if len(out) >= max_records:
                        break
                remaining = deadline - time.monotonic()
                if out or remaining <= 0:
                    return out
                log._cond.wait(remaining)

    def commit(self, offsets: dict[int, int]) -> None:
        with self._log._cond:
            committed = self._log._committed.setdefault(self._group, {})
            for p, off in offsets.items():
                committed[p] = max(committed.get(p, 0), off)

    def close(self) -> None:
        pass
