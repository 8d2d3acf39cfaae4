"""Rows addressed by 64-bit keys, without optimizer state: the serving-side twin of a table."""

from __future__ import annotations

import numpy as np

from embedding_store.hash_index import KeyIndex


class RowMap:
    """A dense array of rows behind a `KeyIndex`; batch upsert, get and delete.

    Args:
        dim: row width.
        dtype: storage dtype (serving keeps fp16 by default to halve memory and sync bytes).

    Example:
        >>> m = RowMap(2)
        >>> m.upsert(np.array([1], dtype=np.uint64), np.array([[0.5, 1.0]]))
        >>> rows, found = m.get(np.array([1, 2], dtype=np.uint64))
        >>> found.tolist(), rows[0].tolist()
        ([True, False], [0.5, 1.0])
    """

    def __init__(self, dim: int, dtype: np.dtype | type = np.float32) -> None:
        self.dim = dim
        self.dtype = np.dtype(dtype)
        self._index = KeyIndex()
        self._rows = np.zeros((0, dim), dtype=self.dtype)
        self._keys = np.zeros(0, dtype=np.uint64)

    def __len__(self) -> int:
        return len(self._index)

    def upsert(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Set rows [n, dim] for keys [n] (last write wins for repeated keys)."""
        keys = np.asarray(keys, dtype=np.uint64)
        if not len(keys):
            return
        rows = np.asarray(rows).reshape(len(keys), self.dim)
        ids = self._index.insert(keys)
        if self._index.row_capacity > len(self._rows):
            size = max(self._index.row_capacity, 2 * len(self._rows))
            self._rows = np.concatenate([self._rows, np.zeros((size - len(self._rows), self.dim), self.dtype)])
            self._keys = np.concatenate([self._keys, np.zeros(size - len(self._keys), np.uint64)])
        self._rows[ids] = rows
        self._keys[ids] = keys

    def get(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows [n, dim] as float32, found bool [n]); rows of absent keys are zero."""
        ids = self._index.find(np.asarray(keys, dtype=np.uint64))
        found = ids >= 0
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        out[found] = self._rows[ids[found]]
        return out, found

    def delete(self, keys: np.ndarray) -> None:
        self._index.delete(np.asarray(keys, dtype=np.uint64))

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """All (keys [n], rows [n, dim]) in storage dtype."""
        _, ids = self._index.items()
        ids = np.sort(ids)
        return self._keys[ids].copy(), self._rows[ids].copy()
