"""Open-addressing hash index from 64-bit keys to dense row ids, vectorised with numpy.

Each distinct key maps to its own row id, so tables built on it are collisionless. All
operations take batches: the Python loop runs over probe rounds (a handful at load <= 0.5),
never over keys.
"""

from __future__ import annotations

import numpy as np

_EMPTY = -1
_TOMBSTONE = -2
_MAX_LOAD = 0.5


def _mix(keys: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads sequential or clustered keys over all slots."""
    with np.errstate(over="ignore"):
        z = keys.astype(np.uint64, copy=True)
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z


def fit_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """`array` with its first axis grown (zero-filled, at least doubling) to hold `rows` rows.

    Arrays indexed by `KeyIndex` row ids grow with this as the index hands out new ids.
    """
    if rows <= len(array):
        return array
    size = max(rows, 2 * len(array))
    return np.concatenate([array, np.zeros((size - len(array), *array.shape[1:]), dtype=array.dtype)])


class KeyIndex:
    """Map uint64 keys to dense int64 row ids; freed ids are reused.

    Args:
        capacity: initial number of slots (rounded up to a power of two); the index doubles
            whenever live keys plus tombstones would pass half the slots.

    Example:
        >>> index = KeyIndex()
        >>> rows, created = index.insert(np.array([7, 9, 7], dtype=np.uint64))
        >>> bool(rows[0] == rows[2] and rows[0] != rows[1]), created.tolist()
        (True, [True, True, True])
        >>> index.find(np.array([9, 8], dtype=np.uint64))[1]
        np.int64(-1)
        >>> index.keys_of(rows).tolist()
        [7, 9, 7]
    """

    def __init__(self, capacity: int = 1024) -> None:
        cap = 1 << max(4, int(capacity - 1).bit_length())
        self._slot_keys = np.zeros(cap, dtype=np.uint64)
        self._slot_rows = np.full(cap, _EMPTY, dtype=np.int64)
        self._size = 0
        self._tombstones = 0
        self._next_row = 0
        self._free_rows = np.empty(0, dtype=np.int64)
        self._row_keys = np.zeros(0, dtype=np.uint64)  # key owning each row id

    def __len__(self) -> int:
        return self._size

    @property
    def row_capacity(self) -> int:
        """One past the largest row id handed out so far (size of arrays indexed by row)."""
        return self._next_row

    def _probe(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (slot, row) for each key; slot and row are -1 where the key is absent."""
        mask = np.uint64(len(self._slot_keys) - 1)
        n = len(keys)
        slots = np.full(n, -1, dtype=np.int64)
        rows = np.full(n, -1, dtype=np.int64)
        active = np.arange(n)
        pos = (_mix(keys) & mask).astype(np.int64)
        while active.size:
            r = self._slot_rows[pos]
            hit = (r >= 0) & (self._slot_keys[pos] == keys[active])
            slots[active[hit]] = pos[hit]
            rows[active[hit]] = r[hit]
            go_on = ~hit & (r != _EMPTY)
            active = active[go_on]
            pos = (pos[go_on] + 1) & int(mask)
        return slots, rows

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Row id of each key, -1 where absent. `keys`: uint64 [n] -> int64 [n]."""
        return self._probe(np.asarray(keys, dtype=np.uint64))[1]

    def insert(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row id of each key, giving absent keys fresh rows.

        Returns:
            (rows int64 [n], created bool [n]): `created` marks the keys that had no row
            before this call (every occurrence of a repeated new key).
        """
        keys = np.asarray(keys, dtype=np.uint64)
        uniq, inverse = np.unique(keys, return_inverse=True)
        _, rows = self._probe(uniq)
        missing = rows < 0
        if missing.any():
            new_keys = uniq[missing]
            self._reserve(new_keys.size)
            new_rows = self._allocate_rows(new_keys.size)
            self._place(new_keys, new_rows)
            self._row_keys = fit_rows(self._row_keys, self._next_row)
            self._row_keys[new_rows] = new_keys
            rows[missing] = new_rows
        return rows[inverse], missing[inverse]

    def keys_of(self, rows: np.ndarray) -> np.ndarray:
        """The key that owns each (live) row id: int64 [n] -> uint64 [n]."""
        return self._row_keys[rows]

    def delete(self, keys: np.ndarray) -> np.ndarray:
        """Remove keys; return the row ids that were freed (absent keys are ignored)."""
        uniq = np.unique(np.asarray(keys, dtype=np.uint64))
        slots, rows = self._probe(uniq)
        present = slots >= 0
        self._slot_rows[slots[present]] = _TOMBSTONE
        freed = rows[present]
        self._size -= int(freed.size)
        self._tombstones += int(freed.size)
        self._free_rows = np.concatenate([self._free_rows, freed])
        return freed

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """All live (keys, rows), in row order."""
        rows = np.sort(self._slot_rows[self._slot_rows >= 0])
        return self._row_keys[rows], rows

    def _allocate_rows(self, n: int) -> np.ndarray:
        reused = self._free_rows[:n]
        self._free_rows = self._free_rows[n:]
        fresh = np.arange(self._next_row, self._next_row + n - reused.size, dtype=np.int64)
        self._next_row += fresh.size
        return np.concatenate([reused, fresh])

    def _reserve(self, extra: int) -> None:
        cap = len(self._slot_keys)
        if self._size + self._tombstones + extra <= _MAX_LOAD * cap:
            return
        new_cap = cap
        while self._size + extra > _MAX_LOAD * new_cap:
            new_cap *= 2
        live = self._slot_rows >= 0
        keys, rows = self._slot_keys[live], self._slot_rows[live]
        self._slot_keys = np.zeros(new_cap, dtype=np.uint64)
        self._slot_rows = np.full(new_cap, _EMPTY, dtype=np.int64)
        self._size = 0
        self._tombstones = 0
        self._place(keys, rows)

    def _place(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Write distinct keys known to be absent into free slots."""
        mask = len(self._slot_keys) - 1
        pos = (_mix(keys) & np.uint64(mask)).astype(np.int64)
        pending = np.arange(len(keys))
        while pending.size:
            free = self._slot_rows[pos] < 0
            # Of several pending keys probing the same free slot, the first one wins it.
            cand = np.flatnonzero(free)
            _, first = np.unique(pos[cand], return_index=True)
            winners = cand[first]
            reused = int((self._slot_rows[pos[winners]] == _TOMBSTONE).sum())
            self._slot_keys[pos[winners]] = keys[pending[winners]]
            self._slot_rows[pos[winners]] = rows[pending[winners]]
            self._size += winners.size
            self._tombstones -= reused
            lose = np.ones(pending.size, dtype=bool)
            lose[winners] = False
            pending = pending[lose]
            pos = (pos[lose] + 1) & mask
