"""Gateway operations shared by the REST and gRPC edges."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from services import metrics
from services.config import ServerConfig
from services.errors import DeadlineExceeded, InvalidArgument, Unavailable
from services.gateway.auth import Guard, parse_api_keys
from services.gateway.batcher import RecommendBatcher
from services.serving import Recommendation, Recommender, Request, ScoredItem
from trainer.eventlog.base import EventLog, LogUnavailable
from trainer.events import MAX_ID_LENGTH, Event, InvalidEvent, parse_event

log = logging.getLogger(__name__)
MAX_EXCLUDED = 1000  # items one request's filter may exclude
STALE_AFTER_S = 10.0  # /readyz says "stale" when the serving store has not answered for longer


@dataclass(frozen=True)
class EventResult:
    """Outcome of one event of a batch: accepted, or the field that was wrong and why."""

    index: int
    accepted: bool
    field: str = ""
    message: str = ""


@dataclass(frozen=True)
class ComponentHealth:
    """How one part of the process is doing, for /readyz.

    Args:
        problem: why the part is not doing its job ("" when it is): readiness is then false.
        detail: figures that /readyz shows for the part (JSON values).
    """

    problem: str
    detail: dict[str, Any]


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
        components: other parts of the process that readiness depends on, by name (the
            trainer and the sync publisher of an embedded node), each a health check.
    """

    def __init__(
        self,
        config: ServerConfig,
        event_log: EventLog,
        recommender: Recommender,
        components: Mapping[str, Callable[[], ComponentHealth]] | None = None,
    ) -> None:
        self.config = config
        self.log = event_log
        self.recommender = recommender
        self.components = dict(components or {})
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
        skew_ms = int(self.config.max_clock_skew_s * 1000)
        good: list[Event] = []
        results: list[EventResult] = []
        for i, raw in enumerate(raw_events):
            try:
                good.append(parse_event(raw, now_ms=now_ms, max_skew_ms=skew_ms))
                results.append(EventResult(i, True))
            except InvalidEvent as e:
                metrics.EVENTS_REJECTED.labels(field=e.field or "event").inc()
                results.append(
                    EventResult(i, False, f"events[{i}].{e.field}" if e.field else f"events[{i}]", e.message)
                )
            except Exception as e:  # a shape validation did not foresee: this event's error, not the batch's
                log.warning("event %d of a batch failed validation unexpectedly", i, exc_info=True)
                metrics.EVENTS_REJECTED.labels(field="event").inc()
                results.append(EventResult(i, False, f"events[{i}]", f"unreadable event ({type(e).__name__})"))
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

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, what /readyz shows): ready once a model version is served and every component
        is healthy; `reason` says why not."""
        status = self.recommender.status()
        age = None if math.isnan(status.store_age_s) else round(status.store_age_s, 3)
        body: dict[str, Any] = {
            "ready": False,
            "model_version": status.model_version,
            "store_age_s": age,
            "stale": age is None or age > STALE_AFTER_S,
        }
        reasons = []
        if not status.ready:
            reasons.append("serving: no model loaded from the serving store yet")
        elif status.model_version <= 0:
            reasons.append("serving: no model version published yet")
        for name, check in self.components.items():
            try:
                health = check()
            except Exception as e:  # a check that fails says so instead of failing /readyz
                health = ComponentHealth(f"health check failed: {type(e).__name__}", {})
            body[name] = {**health.detail, "ok": not health.problem}
            if health.problem:
                reasons.append(f"{name}: {health.problem}")
        body["ready"] = not reasons
        if reasons:
            body["reason"] = "; ".join(reasons)
        return not reasons, body

    def _k(self, k: int | None) -> int:
        if k is None or k == 0:
            return self.config.default_k
        if not 1 <= k <= self.config.max_k:
            raise InvalidArgument(f"k: must be in [1, {self.config.max_k}], got {k}")
        return k

    async def recommend(
        self,
        user_id: str,
        k: int | None,
        exclude_seen: bool,
        timeout_s: float | None = None,
        exclude_items: Sequence[str] = (),
    ) -> Recommendation:
        """Queue the call for the model thread (`RecommendBatcher`) and await its answer; the
        REST and gRPC edges both call this from their event loops.

        Args:
            timeout_s: how long the caller waits (default and cap: `server.request_timeout_s`).
            exclude_items: items the list must not hold (`filter.exclude_items`); the list
                still has k items when enough others are eligible.

        Raises:
            InvalidArgument: empty or too long user_id, k out of range, more than
                MAX_EXCLUDED excluded items or an empty or too long one (named by index).
            Unavailable: too many calls are waiting already.
            DeadlineExceeded: no answer within the timeout.
        """
        if not user_id:
            raise InvalidArgument("user_id: is required")
        if len(user_id) > 256:
            raise InvalidArgument("user_id: must be at most 256 characters")
        if len(exclude_items) > MAX_EXCLUDED:
            raise InvalidArgument(f"filter.exclude_items: at most {MAX_EXCLUDED} items, got {len(exclude_items)}")
        for n, item in enumerate(exclude_items):
            if not item or len(item) > MAX_ID_LENGTH:
                raise InvalidArgument(f"filter.exclude_items[{n}]: must be 1-{MAX_ID_LENGTH} characters")
        timeout = min(timeout_s if timeout_s is not None else math.inf, self.config.request_timeout_s)
        request = Request(user_id, self._k(k), exclude_seen, tuple(exclude_items))
        future = self._batcher.submit(request, timeout)
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
