"""Rows addressed by 64-bit keys, without optimizer state: the serving-side twin of a table."""

from __future__ import annotations

import numpy as np

from embedding_store.hash_index import KeyIndex, grow_rows


class RowMap:
    """A dense array of rows behind a `KeyIndex`; batch upsert, get and delete.

    Args:
        dim: row width.
        dtype: storage dtype (serving keeps fp16 by default to halve memory and sync bytes).
            fp16 and fp32 rows are read back as float32; any other dtype (uint64 feature keys,
            float64 counts) as itself.

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
        # Serving lookups stay on the calling thread: a request must not queue for numba's
        # process-wide thread pool (or spin it up: ~0.4 s the first time) next to Faiss and torch.
        self._index = KeyIndex(parallel=False)
        self._rows = np.zeros((0, dim), dtype=self.dtype)

    def __len__(self) -> int:
        return len(self._index)

    def upsert(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Set rows [n, dim] for keys [n] (last write wins for repeated keys)."""
        keys = np.asarray(keys, dtype=np.uint64)
        if not len(keys):
            return
        rows = np.asarray(rows).reshape(len(keys), self.dim)
        ids, _ = self._index.insert(keys)
        self._rows = grow_rows(self._rows, self._index.row_capacity)
        self._rows[ids] = rows

    def get(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows [n, dim], found bool [n]); rows of absent keys are zero."""
        ids = self._index.find(np.asarray(keys, dtype=np.uint64))
        found = ids >= 0
        narrow_float = self.dtype.kind == "f" and self.dtype.itemsize <= 4
        out = np.zeros((len(ids), self.dim), dtype=np.float32 if narrow_float else self.dtype)
        out[found] = self._rows[ids[found]]
        return out, found

    def delete(self, keys: np.ndarray) -> None:
        self._index.delete(np.asarray(keys, dtype=np.uint64))

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """All (keys [n], rows [n, dim]) in storage dtype."""
        keys, ids = self._index.items()
        return keys, self._rows[ids]
