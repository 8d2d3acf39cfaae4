"""The trainer's view of the item catalogue: names, interaction counts, negative sampling."""

from __future__ import annotations

import numpy as np

from embedding_store.hash_index import KeyIndex, grow_rows


class ItemCatalog:
    """Items the trainer has seen, with positive-interaction counts.

    Negatives for data without impressions are drawn from the popularity distribution
    (count ** 0.75, as word2vec), and the most popular items feed cold-start serving.

    Args:
        seed: seed of the negative sampler.

    Example:
        >>> catalog = ItemCatalog()
        >>> new = catalog.observe(np.array([5, 6], dtype=np.uint64), ["a", "b"], np.array([1.0, 0.0]))
        >>> catalog.sample(3).tolist()
        [5, 5, 5]
    """

    def __init__(self, seed: int = 0) -> None:
        self._index = KeyIndex()
        self._counts = np.zeros(0, dtype=np.float64)
        self._rng = np.random.default_rng(seed)
        self._new_names: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._index)

    def observe(self, keys: np.ndarray, names: list[str], positive_weights: np.ndarray) -> None:
        """Register items (keys [n] with their raw ids) and add `positive_weights` [n] to counts."""
        rows, created = self._index.insert(keys)
        self._counts = grow_rows(self._counts, self._index.row_capacity)
        for i in np.flatnonzero(created):  # only items never seen before
            self._new_names[int(keys[i])] = names[i]
        self._counts += np.bincount(rows, weights=positive_weights, minlength=len(self._counts))

    def sample(self, n: int, uniform_share: float = 0.0) -> np.ndarray:
        """Draw `n` item keys with probability proportional to count ** 0.75, mixed with
        `uniform_share` of draws uniform over all items seen (so rare items also meet negatives)."""
        weights = self._counts**0.75
        if uniform_share > 0 and weights.sum() > 0:
            live = self._counts > 0
            weights = (1 - uniform_share) * weights / weights.sum() + uniform_share * live / live.sum()
        cdf = np.cumsum(weights)
        if n == 0 or not len(cdf) or cdf[-1] <= 0:
            return np.zeros(0, dtype=np.uint64)
        picks = np.searchsorted(cdf, self._rng.random(n) * cdf[-1], side="right")
        return self._index.keys_of(np.minimum(picks, len(cdf) - 1))

    def share(self, keys: np.ndarray) -> np.ndarray:
        """Each item's share of all positive counts so far (its chance to be a batch's positive), >= 1e-6."""
        rows = self._index.find(keys)
        counts = np.where(rows >= 0, self._counts[np.maximum(rows, 0)], 0.0)
        return np.maximum(counts / max(float(self._counts.sum()), 1.0), 1e-6)

    def all_items(self) -> np.ndarray:
        """Keys of every item seen, in row order."""
        return self._index.items()[0]

    def popular(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The `n` most interacted-with items: (keys, counts), most popular first."""
        n = min(n, len(self._counts))
        if n == 0:
            return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.float32)
        top = np.argpartition(-self._counts, n - 1)[:n]
        top = top[np.argsort(-self._counts[top], kind="stable")]
        top = top[self._counts[top] > 0]
        return self._index.keys_of(top), self._counts[top].astype(np.float32)

    def drain_new_names(self) -> dict[int, str]:
        """Raw ids of items first seen since the previous drain, by key."""
        names, self._new_names = self._new_names, {}
        return names
