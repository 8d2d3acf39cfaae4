"""Gateway operations shared by the REST and gRPC edges."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from services import metrics
from services.config import ServerConfig
from services.errors import DeadlineExceeded, InvalidArgument, Unavailable
from services.gateway.auth import Guard, parse_api_keys
from services.gateway.batcher import RecommendBatcher
from services.serving import Recommendation, Recommender, Request, ScoredItem
from trainer.eventlog.base import EventLog, LogUnavailable
from trainer.events import Event, InvalidEvent, parse_event

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EventResult:
    """Outcome of one event of a batch: accepted, or the field that was wrong and why."""

    index: int
    accepted: bool
    field: str = ""
    message: str = ""


@dataclass(frozen=True)
class IngestResult:
    accepted: int
    rejected: int
    results: list[EventResult]


class Gateway:
    """Validate and log events; answer recommendation calls from a serving replica or the
    remote stages (on one model thread that batches them, `services.gateway.batcher`);
    `close()` stops that thread.

    Args:
        config: limits and defaults.
        event_log: where accepted events go (acknowledged only once it holds them).
        recommender: what answers recommendation calls (`ServingReplica` or `RemoteStages`).
    """

    def __init__(self, config: ServerConfig, event_log: EventLog, recommender: Recommender) -> None:
        self.config = config
        self.log = event_log
        self.recommender = recommender
        self.guard = Guard(parse_api_keys(config.api_keys), config.rate_limit_per_s)
        self._batcher = RecommendBatcher(recommender.recommend_batch, config.recommend_batch, config.recommend_queue)

    def ingest(self, raw_events: list[Any], transport: str) -> IngestResult:
        """Validate each event; append the good ones; report per event.

        Raises:
            InvalidArgument: the batch is empty or too large, or no event in it is valid.
            Unavailable: the log did not take the events; none of them is acknowledged.
        """
        if not raw_events:
            raise InvalidArgument("events: must contain at least one event")
        if len(raw_events) > self.config.max_batch_events:
            raise InvalidArgument(
                f"events: at most {self.config.max_batch_events} events per call, got {len(raw_events)}"
            )
        now_ms = int(time.time() * 1000)
        good: list[Event] = []
        results: list[EventResult] = []
        for i, raw in enumerate(raw_events):
            try:
                good.append(parse_event(raw, now_ms=now_ms))
                results.append(EventResult(i, True))
            except InvalidEvent as e:
                metrics.EVENTS_REJECTED.labels(field=e.field or "event").inc()
                results.append(
                    EventResult(i, False, f"events[{i}].{e.field}" if e.field else f"events[{i}]", e.message)
                )
        if not good:
            first = results[0]
            raise InvalidArgument(f"no valid event in the batch; first error: {first.field}: {first.message}")
        try:
            self.log.append(good)
        except LogUnavailable as e:
            log.warning("event log unavailable: %s", e)
            raise Unavailable("event log unavailable; no event of this batch was accepted") from e
        metrics.EVENTS_ACCEPTED.labels(transport=transport).inc(len(good))
        return IngestResult(len(good), len(results) - len(good), results)

    def _k(self, k: int | None) -> int:
        if k is None or k == 0:
            return self.config.default_k
        if not 1 <= k <= self.config.max_k:
            raise InvalidArgument(f"k: must be in [1, {self.config.max_k}], got {k}")
        return k

    async def recommend(
        self, user_id: str, k: int | None, exclude_seen: bool, timeout_s: float | None = None
    ) -> Recommendation:
        """Queue the call for the model thread (`RecommendBatcher`) and await its answer; the
        REST and gRPC edges both call this from their event loops.

        Args:
            timeout_s: how long the caller waits (default and cap: `server.request_timeout_s`).

        Raises:
            InvalidArgument: empty or too long user_id, k out of range.
            Unavailable: too many calls are waiting already.
            DeadlineExceeded: no answer within the timeout.
        """
        if not user_id:
            raise InvalidArgument("user_id: is required")
        if len(user_id) > 256:
            raise InvalidArgument("user_id: must be at most 256 characters")
        timeout = min(timeout_s if timeout_s is not None else math.inf, self.config.request_timeout_s)
        future = self._batcher.submit(Request(user_id, self._k(k), exclude_seen), timeout)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"no recommendation within {timeout:.3g} s") from None

    def close(self) -> None:
        """Stop the model thread."""
        self._batcher.close()

    def similar_items(self, item_id: str, k: int | None) -> tuple[int, list[ScoredItem]]:
        """Raises InvalidArgument for an empty item_id or bad k; NotFound for an unknown item."""
        if not item_id:
            raise InvalidArgument("item_id: is required")
        return self.recommender.similar_items(item_id, self._k(k))
