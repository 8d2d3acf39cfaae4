"""The event-log interface: a partitioned, ordered, replayable log keyed by user.

Both backends (`memory://` in-process, `kafka://` on a Kafka-protocol broker) give the
same guarantees: events of one user land in one partition in order; a consumer group
resumes from the offsets it committed; `append` returns only once the log holds the events.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from embedding_store.keys import feature_key
from trainer.events import Event


class LogUnavailable(RuntimeError):
    """The log could not take or give events (broker down, timed out). Retry later."""


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One raw record read from the log.

    Args:
        partition: partition it was read from.
        offset: its offset in that partition.
        value: the encoded event (`Event.to_json`); decoding may fail for records that
            were written by something other than the gateway.
        timestamp_ms: when the log accepted it (wall clock, ms; Kafka's record timestamp) —
            the start of its freshness (event accepted -> first served version with it).
    """

    partition: int
    offset: int
    value: bytes
    timestamp_ms: int = 0


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record the trainer could not use, with why (the field and the problem)."""

    record: LogRecord
    reason: str


class LogConsumer(Protocol):
    """A member of a consumer group reading the log."""

    def poll(self, max_records: int, timeout_s: float) -> list[LogRecord]:
        """Return up to `max_records` records, waiting at most `timeout_s` for the first."""
        ...

    def commit(self, offsets: dict[int, int]) -> None:
        """Commit, per partition, the offset of the next record to read."""
        ...

    def lag(self) -> int:
        """Records in this member's partitions that it has not read yet (consumer lag)."""
        ...

    def assignment(self) -> list[int]:
        """The partitions this member is assigned now, sorted (they change at rebalances)."""
        ...

    def close(self) -> None: ...


class EventLog(Protocol):
    """A partitioned log of events keyed by user id."""

    @property
    def partitions(self) -> int: ...

    def append(self, events: Sequence[Event]) -> None:
        """Append events; returns once the log holds them (acknowledged).

        Raises:
            LogUnavailable: nothing can be guaranteed about these events; the caller must
                not acknowledge them.
        """
        ...

    def append_keyed(self, records: Sequence[tuple[str, bytes]]) -> None:
        """Append (key, value) records that are not events (catalogue records, `trainer.items`):
        the records of one key land in one partition, in order. Raises LogUnavailable as
        `append` does."""
        ...

    def consumer(self, group: str) -> LogConsumer:
        """Join consumer group `group`, starting from its committed offsets (or the start)."""
        ...

    def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        """Keep records nobody can train on, with their reasons, beside the log (Kafka: topic
        `<topic>.dead-letter`, the raw value with `reason` and `source` headers).

        Raises:
            LogUnavailable: they could not be written.
        """
        ...

    def close(self) -> None: ...


def partition_for(user_id: str, partitions: int) -> int:
    """The partition of a user's events: stable across processes (not Python's `hash`)."""
    return feature_key("partition", user_id) % partitions
