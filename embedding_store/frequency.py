"""Frequency filter: a count-min sketch that admits a key once it has been seen `min_count` times.

Rare ids (a user seen once, a typo'd item id) would otherwise each take a row that never learns
anything. Until a key is admitted, its lookups get the table's default vector and its gradients
are dropped (Monolith's frequency filter).

The sketch has `depth` rows of `width` saturating 8-bit counters. A count-min sketch never
under-counts, so every key seen `min_count` times is admitted. It may over-count: a key seen
fewer times is admitted by mistake only if, in every sketch row, some other key shares its
counter. With `n` distinct keys that happens with probability at most `(n / width) ** depth`;
the width is chosen so this is `error` at `n = capacity`. Counters are updated conservatively
(only those at the key's current minimum grow), which only lowers the error. After
`10 * capacity` additions all counters are halved (TinyLFU's reset), so the sketch tracks recent
frequency and does not fill up over an endless stream.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from embedding_store.hash_index import mix64

DEPTH = 4


@numba.njit(cache=True)
def _add(counters: np.ndarray, seeds: np.ndarray, keys: np.ndarray, out: np.ndarray) -> None:
    """Count each key once (conservative update) and write its new estimate to `out`."""
    depth, width = counters.shape
    pos = np.empty(depth, dtype=np.int64)
    for i in range(len(keys)):
        low = 255
        for d in range(depth):
            pos[d] = np.int64(mix64(keys[i] ^ seeds[d]) % np.uint64(width))
            low = min(low, counters[d, pos[d]])
        if low < 255:
            for d in range(depth):
                if counters[d, pos[d]] == low:
                    counters[d, pos[d]] = low + 1
            low += 1
        out[i] = low


@numba.njit(cache=True)
def _estimate(counters: np.ndarray, seeds: np.ndarray, keys: np.ndarray, out: np.ndarray) -> None:
    depth, width = counters.shape
    for i in range(len(keys)):
        low = 255
        for d in range(depth):
            low = min(low, counters[d, np.int64(mix64(keys[i] ^ seeds[d]) % np.uint64(width))])
        out[i] = low


class CountMinSketch:
    """Approximate counts of uint64 keys in `DEPTH` x width saturating uint8 counters.

    Args:
        capacity: distinct keys the sketch is sized for.
        error: bound on the chance that a key is over-counted at all, with `capacity` distinct keys.
        seed: seed of the per-row hash salts.

    Example:
        >>> sketch = CountMinSketch(capacity=1000, error=0.01)
        >>> sketch.add(np.array([5, 5, 7], dtype=np.uint64)).tolist()
        [1, 2, 1]
        >>> sketch.estimate(np.array([5, 8], dtype=np.uint64)).tolist()
        [2, 0]
    """

    def __init__(self, capacity: int, error: float, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"capacity: must be >= 1, got {capacity}")
        if not 0 < error < 1:
            raise ValueError(f"error: must be in (0, 1), got {error}")
        self.capacity = capacity
        self.error = error
        width = math.ceil(capacity / error ** (1 / DEPTH))
        self.counters = np.zeros((DEPTH, width), dtype=np.uint8)
        self.seeds = np.random.default_rng(seed).integers(0, 2**63, DEPTH, dtype=np.int64).astype(np.uint64)
        self.additions = 0

    @property
    def nbytes(self) -> int:
        return int(self.counters.nbytes)

    def add(self, keys: np.ndarray) -> np.ndarray:
        """Count one occurrence of each key (in order) -> uint8 [n] estimates after each count."""
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        out = np.empty(len(keys), dtype=np.uint8)
        _add(self.counters, self.seeds, keys, out)
        self.additions += len(keys)
        if self.additions >= 10 * self.capacity:
            self.counters >>= 1
            self.additions = 0
        return out

    def estimate(self, keys: np.ndarray) -> np.ndarray:
        """Estimated count of each key (never below the true count since the last halving)."""
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        out = np.empty(len(keys), dtype=np.uint8)
        _estimate(self.counters, self.seeds, keys, out)
        return out
