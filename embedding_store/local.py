"""In-process collisionless table: hash index + dense row arrays + row-wise Adagrad."""

from __future__ import annotations

import threading

import numpy as np

from embedding_store.base import TableConfig, TableDelta
from embedding_store.hash_index import KeyIndex, fit_rows


class LocalTable:
    """A collisionless embedding table held in this process.

    Rows live densely in one float32 array indexed by the row ids of a `KeyIndex`, so two
    distinct keys never share a row. The optimizer is row-wise Adagrad (one accumulator per
    row, as TorchRec's ROWWISE_ADAGRAD), and every updated row is marked for the next
    `drain_delta`. All methods are thread-safe.

    Args:
        config: the table's settings.

    Example:
        >>> table = LocalTable(TableConfig(name="item", dim=4))
        >>> keys = np.array([11, 12], dtype=np.uint64)
        >>> table.lookup(keys).shape
        (2, 4)
        >>> table.apply_gradients(keys, np.ones((2, 4), dtype=np.float32))
        >>> sorted(table.drain_delta().keys.tolist())
        [11, 12]
    """

    def __init__(self, config: TableConfig) -> None:
        self._config = config
        self._index = KeyIndex(capacity=2 * config.initial_rows)
        self._rows = np.zeros((config.initial_rows, config.dim), dtype=np.float32)
        self._accum = np.zeros(config.initial_rows, dtype=np.float32)
        self._dirty = np.zeros(config.initial_rows, dtype=bool)
        self._rng = np.random.default_rng(config.seed)
        self._lock = threading.Lock()

    @property
    def config(self) -> TableConfig:
        return self._config

    def __len__(self) -> int:
        return len(self._index)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        with self._lock:
            rows = self._rows_for(np.asarray(keys, dtype=np.uint64))
            return self._rows[rows]  # [n] -> [n, dim], a copy

    def get(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows for keys without creating any: (float32 [n, dim], bool [n] found)."""
        with self._lock:
            rows = self._index.find(np.asarray(keys, dtype=np.uint64))
            found = rows >= 0
            out = np.zeros((len(rows), self._config.dim), dtype=np.float32)
            out[found] = self._rows[rows[found]]
            return out, found

    def apply_gradients(self, keys: np.ndarray, grads: np.ndarray) -> None:
        keys = np.asarray(keys, dtype=np.uint64)
        grads = np.asarray(grads, dtype=np.float32).reshape(len(keys), self._config.dim)
        if not len(keys):
            return
        with self._lock:
            rows = self._rows_for(keys)
            # Sum the gradients of repeated rows: sort once, add contiguous runs ([n, dim] -> [unique, dim]);
            # np.add.at does the same several times slower.
            order = np.argsort(rows, kind="stable")
            sorted_rows = rows[order]
            starts = np.flatnonzero(np.r_[True, sorted_rows[1:] != sorted_rows[:-1]])
            uniq = sorted_rows[starts]
            summed = np.add.reduceat(grads[order], starts, axis=0)
            self._accum[uniq] += np.mean(summed * summed, axis=1)
            step = self._config.learning_rate / (np.sqrt(self._accum[uniq]) + 1e-8)
            self._rows[uniq] -= step[:, None] * summed
            self._dirty[uniq] = True

    def drain_delta(self) -> TableDelta:
        with self._lock:
            rows = np.flatnonzero(self._dirty)
            self._dirty[rows] = False
            return TableDelta(table=self._config.name, keys=self._index.keys_of(rows), rows=self._rows[rows])

    def _rows_for(self, keys: np.ndarray) -> np.ndarray:
        """Row ids for keys, creating and initialising rows for new keys (lock held)."""
        rows, created = self._index.insert(keys)
        if created.any():
            new_rows = np.unique(rows[created])
            n = self._index.row_capacity
            self._rows, self._accum, self._dirty = (fit_rows(a, n) for a in (self._rows, self._accum, self._dirty))
            self._rows[new_rows] = self._rng.normal(0.0, self._config.init_std, (new_rows.size, self._config.dim))
            self._accum[new_rows] = self._config.initial_accumulator
        return rows
