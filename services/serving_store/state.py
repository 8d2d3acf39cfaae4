"""Current serving state built by applying sync messages in order (shared by store backends)."""

from __future__ import annotations

import numpy as np

from embedding_store.base import TableDelta
from embedding_store.row_map import RowMap
from retrieval.candidates import distinct
from trainer.sync import SyncMessage

MAX_SEEN = 5000
"""Items kept per user for `exclude_seen` (distinct; the oldest fall off past it)."""


class ServingState:
    """User rows, item rows, item names, recent items per user, the popular list, and what the
    ranking service reads (its tables, dense parameters and the trending clock).

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

    def apply(self, message: SyncMessage) -> None:
        """Apply one version (or a full snapshot, which first clears everything)."""
        if message.full:
            self.reset()
        self.users = self._apply_table(self.users, message.users)
        self.items = self._apply_table(self.items, message.items)
        if len(message.items.evicted):
            for key in message.items.evicted.tolist():
                self.names.pop(key, None)
        self.names.update(message.item_names)
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
