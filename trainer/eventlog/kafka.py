"""Kafka event log through kafka-python: keyed producer with acks=all, manual-commit consumer."""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Sequence
from typing import Any

from trainer.eventlog.base import DeadLetter, LogRecord, LogUnavailable
from trainer.events import Event

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.admin import NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError
    from kafka.structs import OffsetAndMetadata

log = logging.getLogger(__name__)


class KafkaLog:
    """Events in one Kafka topic, keyed by user id so a user's events stay in order.

    Args:
        bootstrap: "host:port" of a broker.
        topic: topic name; created with `partitions` partitions if missing.
        partitions: partitions for a topic this log creates.
        request_timeout_s: how long `append` waits for the broker's acknowledgement.

    Raises:
        LogUnavailable: the broker cannot be reached when the log is opened.
    """

    def __init__(
        self, bootstrap: str, topic: str = "events", partitions: int = 4, request_timeout_s: float = 10.0
    ) -> None:
        self._bootstrap = bootstrap
        self._topic = topic
        self._partitions = partitions
        self._timeout_s = request_timeout_s
        try:
            self._ensure_topic()
            self._producer = KafkaProducer(
                bootstrap_servers=bootstrap,
                acks="all",
                linger_ms=2,
                retries=3,
                request_timeout_ms=int(request_timeout_s * 1000),
                max_block_ms=int(request_timeout_s * 1000),
            )
        except KafkaError as e:
            raise LogUnavailable(f"kafka://{bootstrap}: {e}") from e

    def _ensure_topic(self) -> None:
        admin = KafkaAdminClient(bootstrap_servers=self._bootstrap, request_timeout_ms=10000)
        try:
            for topic, partitions in ((self._topic, self._partitions), (self.dead_letter_topic, 1)):
                with contextlib.suppress(TopicAlreadyExistsError):
                    admin.create_topics([NewTopic(topic, partitions, 1)])
        finally:
            admin.close()

    @property
    def bootstrap(self) -> str:
        return self._bootstrap

    @property
    def topic(self) -> str:
        return self._topic

    @property
    def dead_letter_topic(self) -> str:
        return f"{self._topic}.dead-letter"

    def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        self._send(
            self.dead_letter_topic,
            [
                {
                    "value": d.record.value,
                    "headers": [
                        ("reason", d.reason.encode("utf-8")),
                        ("source", f"{self._topic}/{d.record.partition}@{d.record.offset}".encode()),
                    ],
                }
                for d in letters
            ],
        )

    def _send(self, topic: str, records: list[dict[str, Any]]) -> None:
        """Produce `records` (keyword arguments of `KafkaProducer.send`) and wait for every ack."""
        try:
            futures = [self._producer.send(topic, **record) for record in records]
            self._producer.flush(timeout=self._timeout_s)
            for f in futures:
                f.get(timeout=self._timeout_s)
        except KafkaError as e:
            raise LogUnavailable(f"kafka://{self._bootstrap}/{topic}: {e}") from e

    @property
    def partitions(self) -> int:
        return self._partitions

    def append(self, events: Sequence[Event]) -> None:
        now_ms = int(time.time() * 1000)  # the record timestamp: when freshrec accepted the event
        records = [{"key": e.user_id.encode("utf-8"), "value": e.to_json(), "timestamp_ms": now_ms} for e in events]
        self._send(self._topic, records)

    def append_keyed(self, records: Sequence[tuple[str, bytes]]) -> None:
        now_ms = int(time.time() * 1000)
        self._send(
            self._topic,
            [{"key": key.encode("utf-8"), "value": value, "timestamp_ms": now_ms} for key, value in records],
        )

    def consumer(self, group: str) -> KafkaLogConsumer:
        return KafkaLogConsumer(self._bootstrap, self._topic, group)

    def close(self) -> None:
        self._producer.close(timeout=self._timeout_s)


class KafkaLogConsumer:
    """A consumer-group member; offsets are committed only when `commit` is called."""

    def __init__(self, bootstrap: str, topic: str, group: str) -> None:
        self._topic = topic
        self._next: dict[TopicPartition, int] = {}  # per partition: the offset after the last record returned
        self._consumer = KafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=6000,
            heartbeat_interval_ms=1000,
            max_poll_interval_ms=60000,
        )

    def poll(self, max_records: int, timeout_s: float) -> list[LogRecord]:
        try:
            batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        except KafkaError as e:
            raise LogUnavailable(f"poll {self._topic}: {e}") from e
        for tp, messages in batches.items():
            if messages:
                self._next[tp] = messages[-1].offset + 1
        return [
            LogRecord(tp.partition, msg.offset, msg.value, msg.timestamp)
            for tp, messages in batches.items()
            for msg in messages
        ]

    def commit(self, offsets: dict[int, int]) -> None:
        if not offsets:
            return
        try:
            self._consumer.commit(
                {TopicPartition(self._topic, p): OffsetAndMetadata(o, "", -1) for p, o in offsets.items()}
            )
        except KafkaError as e:
            raise LogUnavailable(f"commit {self._topic}: {e}") from e

    def lag(self) -> int:
        """Per assigned partition, its high watermark minus the next offset poll would return
        (after the last record returned, else the group's committed offset). The watermark is
        the one the consumer's last fetch of that partition reported; partitions not fetched
        yet ask the broker for their end offset."""
        try:
            assigned = list(self._consumer.assignment())
            if not assigned:
                return 0
            self._next = {tp: o for tp, o in self._next.items() if tp in assigned}
            ends = {tp: self._consumer.highwater(tp) for tp in assigned}
            unknown = [tp for tp, end in ends.items() if end is None]
            if unknown:
                ends.update(self._consumer.end_offsets(unknown))
            total = 0
            for tp in assigned:
                start = self._next.get(tp)
                if start is None:
                    start = self._consumer.committed(tp) or 0
                total += max(0, int(ends[tp] or 0) - start)
            return total
        except KafkaError as e:
            raise LogUnavailable(f"lag of {self._topic}: {e}") from e

    def assignment(self) -> list[int]:
        return sorted(tp.partition for tp in self._consumer.assignment())

    def close(self) -> None:
        self._consumer.close()
