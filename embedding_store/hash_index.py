"""Open-addressing hash index from 64-bit keys to dense row ids, compiled with numba.

Each distinct key maps to its own row id, so tables built on it are collisionless. Keys sit in
a power-of-two slot array probed linearly from a splitmix64 hash; the slot holds the key and
its row id, and the rows themselves live densely elsewhere (indexed by row id), so a table
pays 16 bytes per slot plus its rows, not a full row per slot. Batch `find` runs in parallel
(batches under 4,096 keys on the calling thread);
`insert` and `delete` run one key after another inside one compiled call (no Python loop per
key). Freed row ids go on a free list and are handed out again before new ones.
"""

from __future__ import annotations

import threading

import numba
import numpy as np

_EMPTY = -1
_TOMBSTONE = -2
_MAX_LOAD = 0.5
ROW_GROWTH = 1.5

# Numba's default thread pool (workqueue) must not run two parallel kernels at once; tables are
# used from several threads (trainer, sync, gRPC workers), so parallel kernels take this lock.
PARALLEL_LOCK = threading.Lock()
PARALLEL_MIN_KEYS = 4096  # smaller batches run on the calling thread, without the lock


@numba.njit(cache=True, inline="always")
def mix64(z: np.uint64) -> np.uint64:
    """splitmix64 finaliser: spreads sequential or clustered keys over all slots."""
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


@numba.njit(cache=True, inline="always")
def _find_one(slot_keys: np.ndarray, slot_rows: np.ndarray, key: np.uint64) -> np.int64:
    mask = np.uint64(len(slot_keys) - 1)
    pos = mix64(key) & mask
    while True:
        row = slot_rows[pos]
        if row == _EMPTY:
            return np.int64(-1)
        if row >= 0 and slot_keys[pos] == key:
            return np.int64(row)
        pos = (pos + np.uint64(1)) & mask


@numba.njit(cache=True, parallel=True)
def _find(slot_keys: np.ndarray, slot_rows: np.ndarray, keys: np.ndarray, out: np.ndarray) -> None:
    for i in numba.prange(len(keys)):
        out[i] = _find_one(slot_keys, slot_rows, keys[i])


@numba.njit(cache=True)
def _find_serial(slot_keys: np.ndarray, slot_rows: np.ndarray, keys: np.ndarray, out: np.ndarray) -> None:
    for i in range(len(keys)):
        out[i] = _find_one(slot_keys, slot_rows, keys[i])


@numba.njit(cache=True)
def _insert(
    slot_keys: np.ndarray,
    slot_rows: np.ndarray,
    row_keys: np.ndarray,
    row_live: np.ndarray,
    free: np.ndarray,
    counts: np.ndarray,
    keys: np.ndarray,
    out: np.ndarray,
    created: np.ndarray,
) -> None:
    """Find or place each key in order; `counts` = [size, tombstones, next_row, n_free]."""
    mask = np.uint64(len(slot_keys) - 1)
    for i in range(len(keys)):
        key = keys[i]
        pos = mix64(key) & mask
        grave = np.int64(-1)
        while True:
            row = slot_rows[pos]
            if row == _EMPTY:
                break
            if row == _TOMBSTONE:
                if grave < 0:
                    grave = np.int64(pos)
            elif slot_keys[pos] == key:
                break
            pos = (pos + np.uint64(1)) & mask
        if slot_rows[pos] >= 0:
            out[i] = slot_rows[pos]
            created[i] = False
            continue
        if grave >= 0:
            pos = np.uint64(grave)
            counts[1] -= 1
        if counts[3] > 0:
            counts[3] -= 1
            row = free[counts[3]]
        else:
            row = counts[2]
            counts[2] += 1
        slot_keys[pos] = key
        slot_rows[pos] = row
        row_keys[row] = key
        row_live[row] = True
        counts[0] += 1
        out[i] = row
        created[i] = True


@numba.njit(cache=True)
def _delete(
    slot_keys: np.ndarray,
    slot_rows: np.ndarray,
    row_live: np.ndarray,
    free: np.ndarray,
    counts: np.ndarray,
    keys: np.ndarray,
    freed: np.ndarray,
) -> int:
    mask = np.uint64(len(slot_keys) - 1)
    n = 0
    for i in range(len(keys)):
        key = keys[i]
        pos = mix64(key) & mask
        while True:
            row = slot_rows[pos]
            if row == _EMPTY:
                break
            if row >= 0 and slot_keys[pos] == key:
                slot_rows[pos] = _TOMBSTONE
                row_live[row] = False
                free[counts[3]] = row
                counts[3] += 1
                counts[0] -= 1
                counts[1] += 1
                freed[n] = row
                n += 1
                break
            pos = (pos + np.uint64(1)) & mask
    return n


@numba.njit(cache=True)
def _place_all(slot_keys: np.ndarray, slot_rows: np.ndarray, keys: np.ndarray, rows: np.ndarray) -> None:
    """Place distinct keys, known absent, into an index without tombstones (rehash)."""
    mask = np.uint64(len(slot_keys) - 1)
    for i in range(len(keys)):
        pos = mix64(keys[i]) & mask
        while slot_rows[pos] != _EMPTY:
            pos = (pos + np.uint64(1)) & mask
        slot_keys[pos] = keys[i]
        slot_rows[pos] = rows[i]


def grow_rows(array: np.ndarray, rows: int, limit: int | None = None) -> np.ndarray:
    """`array` with its first axis grown (zero-filled) to hold `rows` rows.

    Arrays indexed by `KeyIndex` row ids grow with this as the index hands out new ids: by at
    least `ROW_GROWTH`x (1.5x rather than 2x keeps the unused tail, and so the bytes per id,
    small), but not past `limit` rows when the caller knows it will never need more.
    """
    if rows <= len(array):
        return array
    size = max(rows, int(len(array) * ROW_GROWTH) + 1)
    if limit is not None:
        size = max(rows, min(size, limit))
    out = np.zeros((size, *array.shape[1:]), dtype=array.dtype)
    out[: len(array)] = array
    return out


class KeyIndex:
    """Map uint64 keys to dense int64 row ids; freed ids are reused.

    Not thread-safe: the table that owns an index serialises calls.

    Args:
        capacity: initial number of slots (rounded up to a power of two); the index doubles
            whenever live keys plus tombstones would pass half the slots.
        max_rows: the most rows the owner will keep; row arrays are not grown past it.
        parallel: let `find` run batches of `PARALLEL_MIN_KEYS` or more on numba's thread pool
            (False: always on the calling thread).

    Example:
        >>> index = KeyIndex()
        >>> rows, created = index.insert(np.array([7, 9, 7], dtype=np.uint64))
        >>> bool(rows[0] == rows[2] and rows[0] != rows[1]), created.tolist()
        (True, [True, True, False])
        >>> index.find(np.array([9, 8], dtype=np.uint64))[1]
        np.int64(-1)
        >>> index.keys_of(rows).tolist()
        [7, 9, 7]
    """

    def __init__(self, capacity: int = 1024, max_rows: int | None = None, parallel: bool = True) -> None:
        self._max_rows = max_rows
        self._parallel = parallel
        cap = 1 << max(4, int(capacity - 1).bit_length())
        self._slot_keys = np.zeros(cap, dtype=np.uint64)
        self._slot_rows = np.full(cap, _EMPTY, dtype=np.int64)
        self._row_keys = np.zeros(16, dtype=np.uint64)  # key owning each row id
        self._row_live = np.zeros(16, dtype=bool)
        self._free = np.zeros(16, dtype=np.int64)  # stack of freed row ids
        self._counts = np.zeros(4, dtype=np.int64)  # size, tombstones, next_row, n_free

    def __len__(self) -> int:
        return int(self._counts[0])

    @property
    def row_capacity(self) -> int:
        """One past the largest row id handed out so far (size of arrays indexed by row)."""
        return int(self._counts[2])

    @property
    def nbytes(self) -> int:
        """Bytes held by the index (slots, row owners, free list)."""
        arrays = (self._slot_keys, self._slot_rows, self._row_keys, self._row_live, self._free)
        return sum(a.nbytes for a in arrays)

    @property
    def live(self) -> np.ndarray:
        """bool [row_capacity]: which row ids are in use."""
        return self._row_live[: self.row_capacity]

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Row id of each key, -1 where absent. `keys`: uint64 [n] -> int64 [n]."""
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        out = np.empty(len(keys), dtype=np.int64)
        if not self._parallel or len(keys) < PARALLEL_MIN_KEYS:  # few keys: waking threads costs more
            _find_serial(self._slot_keys, self._slot_rows, keys, out)
            return out
        with PARALLEL_LOCK:
            _find(self._slot_keys, self._slot_rows, keys, out)
        return out

    def insert(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row id of each key, giving absent keys fresh rows.

        Returns:
            (rows int64 [n], created bool [n]): `created` marks the first occurrence of each
            key that had no row before this call.
        """
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        rows = self.find(keys)
        created = np.zeros(len(keys), dtype=bool)
        missing = np.flatnonzero(rows < 0)
        if missing.size:
            # Only keys without a row count against the load factor and row capacity.
            self._reserve(missing.size)
            out = np.empty(missing.size, dtype=np.int64)
            made = np.empty(missing.size, dtype=bool)
            counts, slots = self._counts, (self._slot_keys, self._slot_rows, self._row_keys, self._row_live)
            _insert(*slots, self._free, counts, keys[missing], out, made)
            rows[missing], created[missing] = out, made
        return rows, created

    def keys_of(self, rows: np.ndarray) -> np.ndarray:
        """The key that owns each (live) row id: int64 [n] -> uint64 [n]."""
        return self._row_keys[rows]

    def delete(self, keys: np.ndarray) -> np.ndarray:
        """Remove keys; return the row ids that were freed (absent keys are ignored)."""
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        # room for every id this call could free: no more than have been handed out
        self._free = grow_rows(self._free, min(int(self._counts[3]) + len(keys), int(self._counts[2])))
        freed = np.empty(len(keys), dtype=np.int64)
        n = _delete(self._slot_keys, self._slot_rows, self._row_live, self._free, self._counts, keys, freed)
        return freed[:n]

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """All live (keys, rows), in row order."""
        rows = np.flatnonzero(self.live)
        return self._row_keys[rows], rows

    def reserve(self, extra: int) -> None:
        """Make room for `extra` more keys now (row arrays sized for them, slots grown), so that
        inserting them never grows the index: for an owner that knows how many keys it will hold."""
        self._reserve(extra)
        self._free = grow_rows(self._free, len(self._row_keys))  # every row id could be freed at once

    def _reserve(self, extra: int) -> None:
        """Make room for `extra` more keys: row arrays sized for them, slots rehashed if too full."""
        size, tombstones, next_row, n_free = (int(c) for c in self._counts)
        rows_needed = next_row + max(0, extra - n_free)  # freed ids are reused first
        self._row_keys = grow_rows(self._row_keys, rows_needed, self._max_rows)
        self._row_live = grow_rows(self._row_live, rows_needed, self._max_rows)
        cap = len(self._slot_keys)
        if size + tombstones + extra <= _MAX_LOAD * cap:
            return
        new_cap = cap
        while size + extra > _MAX_LOAD * new_cap:
            new_cap *= 2
        keys, rows = self.items()
        self._slot_keys = np.zeros(new_cap, dtype=np.uint64)
        self._slot_rows = np.full(new_cap, _EMPTY, dtype=np.int64)
        self._counts[1] = 0
        _place_all(self._slot_keys, self._slot_rows, keys, rows)
