"""Event log backends, chosen by URL scheme: `memory://` or `kafka://host:port[/topic]`."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

from trainer.eventlog.base import DeadLetter, EventLog, LogConsumer, LogRecord, LogUnavailable, partition_for
from trainer.eventlog.memory import MemoryLog


def open_log(url: str, partitions: int = 4) -> EventLog:
    """Open the event log at `url`.

    - `memory://` — in-process log (embedded mode).
    - `kafka://HOST:PORT[/TOPIC][?partitions=N]` — topic on a Kafka-protocol broker
      (default topic "events").

    Raises:
        ValueError: unknown scheme or malformed URL (the message names the URL).
        LogUnavailable: the broker cannot be reached.
    """
    parsed = urlparse(url)
    query = parse_qs(parsed.query)
    partitions = int(query.get("partitions", [partitions])[0])
    if parsed.scheme == "memory":
        return MemoryLog(partitions=partitions)
    if parsed.scheme == "kafka":
        if not parsed.netloc:
            raise ValueError(f"event log URL {url!r}: expected kafka://HOST:PORT[/TOPIC]")
        from trainer.eventlog.kafka import KafkaLog

        topic = parsed.path.strip("/") or "events"
        return KafkaLog(parsed.netloc, topic=topic, partitions=partitions)
    raise ValueError(f"event log URL {url!r}: unknown scheme {parsed.scheme!r} (use memory:// or kafka://)")


__all__ = [
    "DeadLetter",
    "EventLog",
    "LogConsumer",
    "LogRecord",
    "LogUnavailable",
    "MemoryLog",
    "open_log",
    "partition_for",
]
