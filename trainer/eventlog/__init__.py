"""Event log backends, chosen by URL scheme: `memory://` or `kafka://host:port[/topic]`."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

from trainer.eventlog.base import DeadLetter, EventLog, LogConsumer, LogRecord, LogUnavailable, partition_for
from trainer.eventlog.memory import MemoryLog


def open_log(url: str, partitions: int = 4) -> EventLog:
    """Open the event log at `url`.

    - `memory://` — in-process log (embedded mode), lost with the process.
    - `file://DIR` — the in-process log written durably to DIR (`trainer.eventlog.file`):
      each append is fsync'd before it is acknowledged.
    - `kafka://HOST:PORT[/TOPIC][?partitions=N&timeout_s=S]` — topic on a Kafka-protocol broker
      (default topic "events"); `timeout_s` (default 10) bounds how long an append waits for
      the broker before the caller is told the log is unavailable (HTTP 503).

    Raises:
        ValueError: unknown scheme or malformed URL (the message names the URL).
        LogUnavailable: the broker cannot be reached.
    """
    parsed = urlparse(url)
    query = parse_qs(parsed.query)
    partitions = int(query.get("partitions", [partitions])[0])
    if parsed.scheme == "memory":
        return MemoryLog(partitions=partitions)
    if parsed.scheme == "file":
        from trainer.eventlog.file import FileLog

        directory = url[len("file://") :].split("?", 1)[0]
        if not directory:
            raise ValueError(f"event log URL {url!r}: expected file://DIRECTORY")
        return FileLog(directory, partitions=partitions)
    if parsed.scheme == "kafka":
        if not parsed.netloc:
            raise ValueError(f"event log URL {url!r}: expected kafka://HOST:PORT[/TOPIC]")
        from trainer.eventlog.kafka import KafkaLog

        topic = parsed.path.strip("/") or "events"
        try:
            timeout_s = float(query.get("timeout_s", ["10"])[0])
        except ValueError:
            timeout_s = -1.0
        if not timeout_s > 0:
            raise ValueError(f"event log URL {url!r}: timeout_s must be a positive number of seconds")
        return KafkaLog(parsed.netloc, topic=topic, partitions=partitions, request_timeout_s=timeout_s)
    raise ValueError(f"event log URL {url!r}: unknown scheme {parsed.scheme!r} (use memory://, file:// or kafka://)")


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
