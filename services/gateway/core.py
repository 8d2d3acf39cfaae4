"""Gateway operations shared by the REST and gRPC edges."""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hashlib
import json
import logging
import math
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from services import metrics
from services.config import ServerConfig
from services.errors import DeadlineExceeded, InvalidArgument, NotFound, Unavailable
from services.experiments import Experiments
from services.gateway.auth import Guard, parse_api_keys
from services.gateway.batcher import RecommendBatcher
from services.gateway.impressions import ImpressionWriter
from services.serving import Recommendation, Recommender, Request, ScoredItem
from trainer.eventlog.base import EventLog, LogUnavailable
from trainer.events import MAX_ID_LENGTH, Event, InvalidEvent, parse_event
from trainer.items import (
    InvalidItem,
    ItemRecord,
    UserRecord,
    erase_record,
    parse_item,
    parse_user,
    validate_item_id,
)

log = logging.getLogger(__name__)
MAX_EXCLUDED = 1000  # items one request's filter may exclude
MAX_FILTER_TERMS = 64  # categories, excluded categories or attributes one filter may name
MAX_ITEMS_PER_CALL = 1000  # item records one `items:batch` call may hold
MAX_PAGE = 1000  # items one catalogue page may list
MAX_PAGED = 1000  # items the pages of one recommendation list may hold in all
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
        self._batcher = RecommendBatcher(
            recommender.recommend_batch, config.recommend_batch, config.recommend_queue, config.torch_threads
        )
        self.impressions = ImpressionWriter(event_log)
        self.experiments = Experiments(config.experiments)

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

    def put_items(self, raw_items: list[Any]) -> list[EventResult]:
        """Validate catalogue records (each `{"item_id", "attributes", "categories", "hidden",
        "available_until_ms"}`) and log the good ones (keyed by item: one item's changes stay
        in order); per item, accepted or the field at fault. Served from the next sync.

        Raises:
            InvalidArgument: no items, too many, or none valid.
            Unavailable: the log did not take them; none is acknowledged.
        """
        if not raw_items:
            raise InvalidArgument("items: must contain at least one item")
        if len(raw_items) > MAX_ITEMS_PER_CALL:
            raise InvalidArgument(f"items: at most {MAX_ITEMS_PER_CALL} items per call, got {len(raw_items)}")
        now_ms = int(time.time() * 1000)
        good: list[ItemRecord] = []
        results: list[EventResult] = []
        for i, raw in enumerate(raw_items):
            try:
                if not isinstance(raw, dict):
                    raise InvalidItem("", f"item must be an object, got {type(raw).__name__}")
                body = {k: v for k, v in raw.items() if k != "item_id"}
                good.append(parse_item(validate_item_id(raw.get("item_id")), body, now_ms))
                results.append(EventResult(i, True))
            except InvalidEvent as e:
                results.append(EventResult(i, False, f"items[{i}].{e.field}" if e.field else f"items[{i}]", e.message))
        if not good:
            first = results[0]
            raise InvalidArgument(f"no valid item in the call; first error: {first.field}: {first.message}")
        self._log_items(good)
        return results

    def put_item(self, item_id: str, body: Any) -> ItemRecord:
        """Validate and log one item record; raises InvalidArgument naming the field."""
        try:
            record = parse_item(validate_item_id(item_id), body, int(time.time() * 1000))
        except InvalidEvent as e:
            raise InvalidArgument(f"{e.field}: {e.message}" if e.field else e.message) from None
        self._log_items([record])
        return record

    def delete_item(self, item_id: str) -> ItemRecord:
        """Log the deletion of an item (a tombstone): from the next sync no list holds it and
        `get_item` answers NotFound; a later `put_item` brings it back."""
        try:
            record = ItemRecord(validate_item_id(item_id), updated_ms=int(time.time() * 1000), deleted=True)
        except InvalidEvent as e:
            raise InvalidArgument(f"{e.field}: {e.message}") from None
        self._log_items([record])
        return record

    def put_user(self, user_id: str, body: Any) -> UserRecord:
        """Validate and log a user's attributes (keyed by the user, after their events): the
        trainer uses them as the user's features at once, serving holds them from the next sync."""
        try:
            record = parse_user(user_id, body, int(time.time() * 1000))
        except InvalidEvent as e:
            raise InvalidArgument(f"{e.field}: {e.message}" if e.field else e.message) from None
        try:
            self.log.append_keyed([(record.user_id, record.to_log())])
        except LogUnavailable as e:
            raise Unavailable("event log unavailable; the user was not accepted") from e
        return record

    def get_user(self, user_id: str) -> tuple[int, UserRecord]:
        """(model version, the user's record) as serving holds it; NotFound without one."""
        version, record = self.recommender.user_record(user_id)
        if record is None:
            raise NotFound(f"user {user_id!r} has no record")
        return version, record

    def delete_user(self, user_id: str) -> None:
        """Log the erasure of a user, after their earlier events (same key, same partition):
        the trainer forgets them and the next sync drops them from serving (see
        `Trainer.erase_user`); their next recommendation is a cold user's."""
        try:
            record = erase_record(user_id)
        except InvalidEvent as e:
            raise InvalidArgument(f"{e.field}: {e.message}") from None
        try:
            self.log.append_keyed([(user_id, record)])
        except LogUnavailable as e:
            raise Unavailable("event log unavailable; the erasure was not accepted") from e

    def _log_items(self, records: list[ItemRecord]) -> None:
        try:
            self.log.append_keyed([(r.item_id, r.to_log()) for r in records])
        except LogUnavailable as e:
            log.warning("event log unavailable: %s", e)
            raise Unavailable("event log unavailable; no item of this call was accepted") from e
        metrics.CATALOGUE_CHANGES.inc(len(records))

    def get_item(self, item_id: str) -> tuple[int, ItemRecord]:
        """(model version, the item's record) as serving holds it; NotFound when it has none
        (never put, deleted, or put after the latest sync)."""
        version, record = self.recommender.catalogue_item(item_id)
        if record is None or record.deleted:
            raise NotFound(f"item {item_id!r} is not in the catalogue")
        return version, record

    def list_items(self, cursor: str, limit: int | None) -> tuple[list[ItemRecord], str]:
        """A page of the catalogue in item-id order after `cursor` (an item id; "" for the
        first page) and the cursor of the next page ("" after the last)."""
        limit = limit or 100
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidArgument(f"limit: must be in [1, {MAX_PAGE}], got {limit}")
        if len(cursor) > MAX_ID_LENGTH:
            raise InvalidArgument("cursor: too long")
        records = self.recommender.catalogue_page(cursor, limit + 1)
        more = len(records) > limit
        return records[:limit], records[limit - 1].item_id if more else ""

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
        categories: Sequence[str] = (),
        exclude_categories: Sequence[str] = (),
        attributes: Mapping[str, str] | None = None,
        page_token: str = "",
        diversity: float = 0.0,
        write_back: bool = True,
        experiment: str = "",
        exploration: float = 0.0,
    ) -> Recommendation:
        """Queue the call for the model thread (`RecommendBatcher`) and await its answer; the
        REST and gRPC edges both call this from their event loops.

        Args:
            timeout_s: how long the caller waits (default and cap: `server.request_timeout_s`).
            exclude_items: items the list must not hold (`filter.exclude_items`); the list
                still has k items when enough others are eligible.
            categories: only items in one of these (`filter.categories`).
            exclude_categories: no item in any of these (`filter.exclude_categories`).
            attributes: only items whose attributes have these values (`filter.attributes`).
            page_token: the `next_page_token` of the previous page of this list: the next k
                items, none of them on an earlier page (the answer's `next_page_token` is ""
                once the pages hold MAX_PAGED items, or a page came back short).
            diversity: 0 (rank by score) to 1 (each item as unlike the ones above it as can
                be): maximal marginal relevance over the item vectors.
            write_back: record the list's items as impressions on the log (the default), so
                the joiner learns from what was shown.
            exploration: the share of the k slots (at least one when > 0) for items with
                little data — catalogued items, items seldom shown — by Thompson sampling on
                their labelled impressions (`ranking.explore`); reason "exploration".
            experiment: answer as the user's arm of this experiment (`services.experiments`)
                says; the answer names the arm, its impressions carry both.

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
        for name, terms in (("categories", categories), ("exclude_categories", exclude_categories)):
            _check_terms(f"filter.{name}", terms)
        pairs = tuple(sorted((attributes or {}).items()))
        _check_terms("filter.attributes", [a for a, _ in pairs])
        for a, v in pairs:
            if not isinstance(v, str) or len(v) > MAX_ID_LENGTH:
                raise InvalidArgument(f"filter.attributes.{a}: must be a string of at most {MAX_ID_LENGTH} characters")
        if not 0.0 <= diversity <= 1.0 or math.isnan(diversity):
            raise InvalidArgument(f"diversity: must be in [0, 1], got {diversity}")
        if not 0.0 <= exploration <= 1.0 or math.isnan(exploration):
            raise InvalidArgument(f"exploration: must be in [0, 1], got {exploration}")
        arm = None
        if experiment:
            if experiment not in self.experiments:
                raise InvalidArgument(
                    f"experiment: no experiment {experiment[:64]!r} (have {self.experiments.names()})"
                )
            arm = self.experiments.arm(experiment, user_id)
            diversity = arm.diversity if arm.diversity is not None else diversity
        timeout = min(timeout_s if timeout_s is not None else math.inf, self.config.request_timeout_s)
        request = Request(
            user_id,
            self._k(k),
            exclude_seen,
            tuple(exclude_items),
            tuple(categories),
            tuple(exclude_categories),
            pairs,
            diversity,
            arm is not None and arm.ranking == "trending",
            exploration,
        )
        fingerprint = _fingerprint(request)
        earlier = _read_page_token(page_token, fingerprint) if page_token else []
        if earlier:
            request = dataclasses.replace(request, exclude_items=request.exclude_items + tuple(earlier))
        future = self._batcher.submit(request, timeout)
        try:
            rec: Recommendation = await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"no recommendation within {timeout:.3g} s") from None
        served = earlier + [i.item_id for i in rec.items]
        if len(rec.items) == request.k and len(served) + request.k <= MAX_PAGED:
            rec = dataclasses.replace(rec, next_page_token=_page_token(fingerprint, served))
        if arm is not None:
            rec = dataclasses.replace(rec, arm=arm.name)
        if write_back:
            self.impressions.add(user_id, rec, experiment)
        return rec

    def close(self) -> None:
        """Stop the model thread; write the impressions still queued."""
        self._batcher.close()
        self.impressions.close()

    def similar_items(self, item_id: str, k: int | None) -> tuple[int, list[ScoredItem]]:
        """Raises InvalidArgument for an empty item_id or bad k; NotFound for an unknown item."""
        if not item_id:
            raise InvalidArgument("item_id: is required")
        return self.recommender.similar_items(item_id, self._k(k))


def _check_terms(name: str, terms: Sequence[str]) -> None:
    """A filter's list of names: at most MAX_FILTER_TERMS, each 1-MAX_ID_LENGTH characters."""
    if len(terms) > MAX_FILTER_TERMS:
        raise InvalidArgument(f"{name}: at most {MAX_FILTER_TERMS} entries, got {len(terms)}")
    for n, term in enumerate(terms):
        if not isinstance(term, str) or not term or len(term) > MAX_ID_LENGTH:
            raise InvalidArgument(f"{name}[{n}]: must be 1-{MAX_ID_LENGTH} characters")


def _fingerprint(request: Request) -> str:
    """What a page token belongs to: the user and every setting that shapes the list."""
    shape = (
        request.user_id,
        request.k,
        request.exclude_seen,
        request.exclude_items,
        request.categories,
        request.exclude_categories,
        request.attributes,
        request.diversity,
        request.exploration,
    )
    return hashlib.blake2b(json.dumps(shape).encode(), digest_size=8).hexdigest()


def _page_token(fingerprint: str, served: list[str]) -> str:
    """An opaque token that carries the items of the pages so far (they are left out of the
    next one, so no item repeats whatever the model learned in between)."""
    raw = json.dumps({"f": fingerprint, "s": served}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(zlib.compress(raw)).decode()


def _read_page_token(token: str, fingerprint: str) -> list[str]:
    if len(token) > 200_000:
        raise InvalidArgument("page_token: too long")
    try:
        body = json.loads(zlib.decompress(base64.urlsafe_b64decode(token.encode()), bufsize=1 << 16))
        served = body["s"]
        ok = body["f"] == fingerprint and isinstance(served, list) and all(isinstance(i, str) for i in served)
    except (ValueError, TypeError, KeyError, zlib.error, binascii.Error):
        raise InvalidArgument("page_token: not a token this server gave") from None
    if not ok:
        raise InvalidArgument("page_token: belongs to another list (user, k, filter and diversity must not change)")
    return list(served[:MAX_PAGED])
