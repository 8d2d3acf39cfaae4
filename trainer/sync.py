"""Parameter sync: the versioned message the trainer publishes and the thread that sends it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from embedding_store.base import TableDelta
from embedding_store.keys import feature_key
from trainer.items import ItemRecord, UserRecord

log = logging.getLogger(__name__)


def _empty_keys() -> np.ndarray:
    return np.zeros(0, dtype=np.uint64)


@dataclass
class SyncMessage:
    """Everything serving needs to move from one model version to the next.

    Args:
        version: position in the ordered stream of versions (assigned by the sink).
        created_ms: when the trainer built it.
        users, items: changed rows of the user and item tables.
        item_names: raw item ids of keys first seen in this version, {key: item_id}.
        seen_users, seen_items: aligned uint64 arrays of new (user, item) interactions.
        popular_keys, popular_scores: the current most popular items, for cold users.
        tables: what the ranking service reads, by name (`ranking.scorer`): the ranker's
            embedding rows (float32, served as fp16 like the user and item rows) and the
            features of changed users and items (uint64 attribute keys and histories, float64
            item counts; served exactly).
        dense: the ranker's and blend's dense parameters (`CandidateScorer.dense_state`);
            empty in versions that do not change them.
        accepted_ms: when the log accepted (a sample of) the events first trained on in this
            version, int64 ms: a replica that applies the version observes its freshness.
        clock_s: the trainer's event time when the version was built (trending counts decay by it).
        trending_half_life_s: the half-life of the anchored trending counts in `tables`.
        catalogue: catalogue changes (`trainer.items`) by item id, the newest of each; in a
            full snapshot, every record serving holds (tombstones of deleted items included).
        erased_users: keys of users erased since the previous version: serving drops their
            rows, seen lists and features (before it applies the rest of the message).
        user_records: users' attributes as clients put them, by user id (the newest of each).
        full: True for a bootstrap snapshot that replaces all state instead of updating it.
        encoded_bytes: the size the serving store stored it at (set by `publish`, as `version` is).
    """

    users: TableDelta
    items: TableDelta
    item_names: dict[int, str] = field(default_factory=dict)
    seen_users: np.ndarray = field(default_factory=_empty_keys)
    seen_items: np.ndarray = field(default_factory=_empty_keys)
    popular_keys: np.ndarray = field(default_factory=_empty_keys)
    popular_scores: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    tables: dict[str, TableDelta] = field(default_factory=dict)
    dense: dict[str, np.ndarray] = field(default_factory=dict)
    accepted_ms: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    catalogue: dict[str, ItemRecord] = field(default_factory=dict)
    erased_users: np.ndarray = field(default_factory=_empty_keys)
    user_records: dict[str, UserRecord] = field(default_factory=dict)
    clock_s: float = 0.0
    trending_half_life_s: float = 0.0
    version: int = 0
    created_ms: int = 0
    full: bool = False
    encoded_bytes: int = 0

    def seen_by_user(self) -> Iterator[tuple[int, np.ndarray]]:
        """(user key, that user's new item keys in order) for each user with new interactions."""
        if not len(self.seen_users):
            return
        order = np.argsort(self.seen_users, kind="stable")
        users, items = self.seen_users[order], self.seen_items[order]
        bounds = np.flatnonzero(np.diff(users)) + 1
        yield from zip(users[np.r_[0, bounds]].tolist(), np.split(items, bounds), strict=True)

    def then(self, newer: SyncMessage) -> SyncMessage:
        """This message followed by `newer`, as one (the newest row of each key, every seen
        pair, the newest popular list, dense parameters and clock): what a publisher that fell
        behind sends instead of both."""

        def tables(a: dict[str, TableDelta], b: dict[str, TableDelta]) -> dict[str, TableDelta]:
            both = {name: a[name].then(b[name]) for name in a.keys() & b.keys()}
            return {**a, **b, **both}

        has_popular = len(newer.popular_keys) > 0
        erased_users = set(newer.erased_users.tolist())  # a record the newer message erases goes
        evicted = set(newer.items.evicted.tolist())
        return SyncMessage(
            users=self.users.then(newer.users),
            items=self.items.then(newer.items),
            # a name the newer message evicts goes, as applying both one by one would drop it
            item_names={
                **{k: v for k, v in self.item_names.items() if k not in evicted},
                **newer.item_names,
            },
            seen_users=np.concatenate([self.seen_users, newer.seen_users]),
            seen_items=np.concatenate([self.seen_items, newer.seen_items]),
            popular_keys=newer.popular_keys if has_popular else self.popular_keys,
            popular_scores=newer.popular_scores if has_popular else self.popular_scores,
            tables=tables(self.tables, newer.tables),
            dense=newer.dense or self.dense,
            accepted_ms=np.concatenate([self.accepted_ms, newer.accepted_ms]),
            catalogue={**self.catalogue, **newer.catalogue},
            user_records={
                **{u: r for u, r in self.user_records.items() if feature_key("user", u) not in erased_users},
                **newer.user_records,
            },
            erased_users=np.unique(np.concatenate([self.erased_users, newer.erased_users])),
            clock_s=newer.clock_s or self.clock_s,
            trending_half_life_s=newer.trending_half_life_s or self.trending_half_life_s,
            created_ms=newer.created_ms,
        )

    def is_empty(self) -> bool:
        return not (
            len(self.users)
            or len(self.items)
            or self.item_names
            or self.catalogue
            or len(self.erased_users)
            or self.user_records
            or len(self.seen_users)
            or any(len(t) for t in self.tables.values())
            or self.dense
        )


class SyncSink(Protocol):
    """Where versions go (the serving store)."""

    def publish(self, message: SyncMessage) -> int:
        """Store `message` as the next version and return that version."""
        ...


class SyncPublisher:
    """Publish the trainer's changes in order, never dropping one: as soon as a training step
    has new rows (`nudge`) once `min_interval_s` has passed since the previous publish, and
    every `interval_s` anyway.

    An event then waits for its step and at most `min_interval_s`, not for a fixed timer:
    under steady traffic publishes follow one another `min_interval_s` apart; when traffic is
    sparse a step's rows go out at once.

    A message whose publish fails is kept and sent again before anything newer, so the
    serving side sees every change exactly in training order.

    Args:
        collect: returns the changes since the previous call (None when nothing changed).
        sink: the serving store.
        interval_s: the most time between publishes.
        min_interval_s: the least time between publishes (a nudge waits for it; at most `interval_s`).
        on_publish: called with each published message (metrics).
        max_pending: most messages kept while the sink is down; past it each new message is
            merged into the newest pending one (`SyncMessage.then`), so an outage holds at
            most one message's worth of rows per key, not one message per interval.
        stall_after_s: `health()` reports a problem when messages have waited this long.
    """

    def __init__(
        self,
        collect: Callable[[], SyncMessage | None],
        sink: SyncSink,
        interval_s: float,
        on_publish: Callable[[SyncMessage], None] | None = None,
        max_pending: int = 8,
        stall_after_s: float = 60.0,
        min_interval_s: float | None = None,
    ) -> None:
        self._collect = collect
        self._sink = sink
        self._interval_s = interval_s
        self._min_interval_s = interval_s if min_interval_s is None else min(min_interval_s, interval_s)
        self._on_publish = on_publish
        self._max_pending = max_pending
        self._stall_after_s = stall_after_s
        self._pending: list[SyncMessage] = []
        self._lock = threading.Lock()
        self._caught_up_at = time.monotonic()  # when a publish last went through
        self._failing = False  # the last attempt raised
        self._nudged = threading.Event()  # a step has trained rows since the last publish
        self._last_attempt = 0.0  # monotonic time of the last publish attempt

    def nudge(self) -> None:
        """A training step has new rows: publish them once the interval allows."""
        self._nudged.set()

    @property
    def pending(self) -> int:
        """Messages waiting for the sink."""
        return len(self._pending)

    def publish_now(self) -> int:
        """Collect and publish once; returns how many messages went out."""
        with self._lock:
            message = self._collect()
            if message is not None:
                if len(self._pending) >= self._max_pending:
                    self._pending[-1] = self._pending[-1].then(message)
                else:
                    self._pending.append(message)
            sent = 0
            while self._pending:
                msg = self._pending[0]
                msg.version = self._sink.publish(msg)
                self._pending.pop(0)
                sent += 1
                if self._on_publish:
                    self._on_publish(msg)
            self._caught_up_at = time.monotonic()
            return sent

    def health(self) -> str:
        """Why syncing is not keeping up ("" when it is): it has failed for `stall_after_s`."""
        waited = time.monotonic() - self._caught_up_at
        if self._failing and waited > self._stall_after_s:
            return f"parameter sync failing for {waited:.0f} s ({len(self._pending)} messages waiting)"
        return ""

    def run(self, stop: threading.Event) -> None:
        self._last_attempt = time.monotonic()
        while not stop.is_set():
            due = self._last_attempt + self._interval_s
            earliest = due  # after a failure: retry once per interval, nudged or not
            if not self._failing:
                while not stop.is_set() and not self._nudged.wait(min(0.05, max(0.0, due - time.monotonic()))):
                    if time.monotonic() >= due:
                        break
                earliest = self._last_attempt + self._min_interval_s
            if stop.wait(max(0.0, earliest - time.monotonic())):
                break
            self._nudged.clear()
            self._last_attempt = time.monotonic()
            try:
                self.publish_now()
                self._failing = False
            except Exception:  # keep syncing after a store outage; the message stays pending
                self._failing = True
                log.exception("parameter sync failed; retrying in %.1fs", self._interval_s)
        try:
            self.publish_now()
        except Exception:
            log.exception("final parameter sync failed")


def now_ms() -> int:
    return int(time.time() * 1000)
