"""Current serving state built by applying sync messages in order (shared by store backends)."""

from __future__ import annotations

import time

import numpy as np

from embedding_store.base import TableDelta
from embedding_store.keys import feature_key
from embedding_store.row_map import RowMap
from retrieval.candidates import distinct
from trainer.items import ItemRecord, UserRecord
from trainer.sync import SyncMessage

MAX_SEEN = 5000
"""Items kept per user for `exclude_seen` (distinct; the oldest fall off past it)."""


class ServingState:
    """User rows, item rows, item names, recent items per user, the popular list, what the
    ranking service reads (its tables, dense parameters and the trending clock), and the
    catalogue: each item's record (`trainer.items`) and the items no list may hold now.

    Args:
        max_seen: distinct items kept per user, the most recent (older ones fall off).
        dtype: row storage dtype.
    """

    def __init__(self, max_seen: int = MAX_SEEN, dtype: np.dtype | type = np.float16) -> None:
        self.max_seen = max_seen
        self.dtype = np.dtype(dtype)
        self.reset()

    def reset(self) -> None:
        """Forget everything (before applying a full snapshot)."""
        self.version = 0
        self.users: RowMap | None = None
        self.items: RowMap | None = None
        self.names: dict[int, str] = {}
        # per user, distinct item keys oldest first: a uint64 array (8 bytes an item, where a
        # dict of Python ints took ~100 and grew the process under steady load)
        self.seen: dict[int, np.ndarray] = {}
        self.popular_keys = np.zeros(0, dtype=np.uint64)
        self.popular_scores = np.zeros(0, dtype=np.float32)
        self.tables: dict[str, RowMap] = {}
        self.dense: dict[str, np.ndarray] = {}
        self.dense_version = 0  # the version that brought `dense`
        self.clock_s = 0.0
        self.trending_half_life_s = 0.0
        self.catalogue: dict[str, ItemRecord] = {}  # by item id, tombstones of deleted items included
        self.records: dict[int, ItemRecord] = {}  # the same by item key
        self.by_category: dict[str, set[int]] = {}  # category -> keys of the items in it (not deleted)
        self.blocked = np.zeros(0, np.uint64)  # sorted keys of items hidden, deleted or expired
        self._blocked_until_ms = 0  # `blocked` holds until then (the next expiry); 0: recompute
        self.user_records: dict[int, UserRecord] = {}  # by user key: attributes as clients put them
        # counts catalogue changes, resets included (what caches of filters key on)
        self.catalogue_version = getattr(self, "catalogue_version", 0) + 1
        self._ids: list[str] | None = None  # the catalogue's item ids sorted (None: sort again)
        self._catalogued: np.ndarray | None = None  # keys of the items not deleted (None: again)

    def apply(self, message: SyncMessage) -> None:
        """Apply one version (or a full snapshot, which first clears everything)."""
        if message.full:
            self.reset()
        if len(message.erased_users):
            self._erase(message.erased_users)
        self.users = self._apply_table(self.users, message.users)
        self.items = self._apply_table(self.items, message.items)
        if len(message.items.evicted):
            for key in message.items.evicted.tolist():
                record = self.records.get(key)
                if record is None or record.deleted:  # a catalogued item keeps its name without a row
                    self.names.pop(key, None)
        self.names.update(message.item_names)
        self._apply_catalogue(message.catalogue)
        for user_id, user_record in message.user_records.items():
            self.user_records[feature_key("user", user_id)] = user_record
        for user, items in message.seen_by_user():
            self.seen[user] = _append_distinct(self.seen.get(user), items, self.max_seen)
        if len(message.popular_keys) or message.full:
            self.popular_keys = message.popular_keys
            self.popular_scores = message.popular_scores
        for name, delta in message.tables.items():
            table = self._apply_table(self.tables.get(name), delta)
            if table is not None:
                self.tables[name] = table
        if message.dense:
            self.dense = message.dense
            self.dense_version = message.version
        if message.clock_s or message.trending_half_life_s:
            self.clock_s, self.trending_half_life_s = message.clock_s, message.trending_half_life_s
        self.version = message.version

    def _erase(self, users: np.ndarray) -> None:
        """Drop erased users' rows, seen lists and every feature row keyed by them."""
        for table in (self.users, *self.tables.values()):
            if table is not None:
                table.delete(users)
        for user in users.tolist():
            self.seen.pop(user, None)
            self.user_records.pop(user, None)

    def _apply_catalogue(self, records: dict[str, ItemRecord]) -> None:
        for item_id, record in records.items():
            key = feature_key("item", item_id)
            old = self.records.get(key)
            if old is not None:
                for category in old.categories:
                    members = self.by_category.get(category)
                    if members is not None:
                        members.discard(key)
                        if not members:
                            del self.by_category[category]
            self.catalogue[item_id] = self.records[key] = record
            if not record.deleted:
                self.names[key] = item_id  # an item is servable from its record, before any event
                for category in record.categories:
                    self.by_category.setdefault(category, set()).add(key)
        if records:
            self._blocked_until_ms = 0
            self._ids = self._catalogued = None
            self.catalogue_version += 1

    def catalogued(self) -> np.ndarray:
        """Sorted keys of the catalogue's items that are not deleted."""
        if self._catalogued is None:
            keys = [key for key, record in self.records.items() if not record.deleted]
            self._catalogued = np.sort(np.array(keys, dtype=np.uint64))
        return self._catalogued

    def catalogue_ids(self) -> list[str]:
        """The catalogue's item ids (tombstones included) in order, sorted once per change."""
        if self._ids is None:
            self._ids = sorted(self.catalogue)
        return self._ids

    def blocked_now(self, now_ms: int | None = None) -> np.ndarray:
        """Sorted keys of the items no list may hold at `now_ms` (default: now): hidden, deleted,
        or past their `available_until_ms`. Recomputed only when the catalogue changed or the
        next expiry came."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        if not self._blocked_until_ms or now > self._blocked_until_ms:
            blocked = [key for key, r in self.records.items() if not r.servable(now)]
            until = [r.available_until_ms for r in self.records.values() if r.available_until_ms and r.servable(now)]
            self._blocked_until_ms = min(until) if until else 1 << 62
            self.blocked = np.sort(np.array(blocked, dtype=np.uint64))
        return self.blocked

    def _apply_table(self, table: RowMap | None, delta: TableDelta) -> RowMap | None:
        if table is None:
            if not len(delta.keys):
                return None
            # float32 rows (embeddings) are kept in the serving dtype; feature keys and counts exactly
            table = RowMap(delta.rows.shape[1], self.dtype if delta.rows.dtype == np.float32 else delta.rows.dtype)
        table.delete(delta.evicted)
        table.upsert(delta.keys, delta.rows)
        return table

    def to_message(self) -> SyncMessage:
        """The whole state as a `full` message at the current version."""

        def table(name: str, rows: RowMap | None) -> TableDelta:
            if rows is None:
                return TableDelta.empty(name)
            keys, values = rows.items()
            return TableDelta(
                name,
                keys,
                values.astype(np.float32) if values.dtype.kind == "f" and values.dtype.itemsize <= 4 else values,
            )

        seen_users = [np.full(len(h), u, dtype=np.uint64) for u, h in self.seen.items()]
        seen_items = list(self.seen.values())
        return SyncMessage(
            users=table("user", self.users),
            items=table("item", self.items),
            item_names=dict(self.names),
            seen_users=np.concatenate(seen_users) if seen_users else np.zeros(0, np.uint64),
            seen_items=np.concatenate(seen_items) if seen_items else np.zeros(0, np.uint64),
            popular_keys=self.popular_keys,
            popular_scores=self.popular_scores,
            tables={name: table(name, rows) for name, rows in self.tables.items()},
            dense=dict(self.dense),
            catalogue=dict(self.catalogue),
            user_records={r.user_id: r for r in self.user_records.values()},
            clock_s=self.clock_s,
            trending_half_life_s=self.trending_half_life_s,
            version=self.version,
            full=True,
        )


def _append_distinct(history: np.ndarray | None, items: np.ndarray, limit: int) -> np.ndarray:
    """`history` (distinct keys, oldest first) followed by `items`: an item seen again moves to
    the newest place; only the newest `limit` stay."""
    newest = distinct(np.asarray(items, dtype=np.uint64)[::-1])[::-1]  # each item at its last place
    if history is not None and len(history):
        newest = np.concatenate([history[~np.isin(history, newest)], newest])
    return newest[-limit:].copy() if len(newest) > limit else newest
