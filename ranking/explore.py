"""Exploration: a share of a list's slots for items with little data, by Thompson sampling.

The trainer counts, per item, the impressions the joiner labelled and the clicks among them
(`ItemFeedback`, synced as the `item_feedback` table). Serving draws, for each candidate with
fewer than `max_impressions` labelled impressions, a click-through rate from its posterior
Beta(clicks + 1, impressions - clicks + 1) and gives the exploration slots to the highest
draws: an item never shown draws from the uniform prior, and one shown often without a click
draws low and soon stops being explored.
"""

from __future__ import annotations

import numpy as np

ITEM_FEEDBACK = "item_feedback"  # float64 [2]: labelled impressions, clicks among them
MAX_IMPRESSIONS = 200
"""Items with at least this many labelled impressions have data enough: no more exploration."""


class ItemFeedback:
    """Labelled impressions and clicks per item key, bounded (the least shown go first).

    Example:
        >>> f = ItemFeedback()
        >>> f.observe(np.array([7, 7, 9], np.uint64), np.array([1.0, 0.0, 0.0]))
        >>> keys, rows = f.drain()
        >>> sorted(zip(keys.tolist(), rows.tolist()))
        [(7, [2.0, 1.0]), (9, [1.0, 0.0])]
    """

    def __init__(self, max_items: int = 1_000_000) -> None:
        self.max_items = max_items
        self._counts: dict[int, list[float]] = {}
        self._changed: set[int] = set()

    def __len__(self) -> int:
        return len(self._counts)

    def observe(self, item_keys: np.ndarray, labels: np.ndarray) -> None:
        """Count labelled impressions (`labels` > 0: clicked)."""
        for key, label in zip(np.asarray(item_keys, np.uint64).tolist(), np.asarray(labels).tolist(), strict=True):
            row = self._counts.setdefault(key, [0.0, 0.0])
            row[0] += 1.0
            row[1] += float(label > 0)
            self._changed.add(key)
        if len(self._counts) > self.max_items:
            keep = sorted(self._counts, key=lambda k: self._counts[k][0], reverse=True)[: int(self.max_items * 0.9)]
            self._counts = {k: self._counts[k] for k in keep}
            self._changed &= set(keep)

    def drain(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys [n], float64 [n, 2] impressions and clicks) of the items counted since the last drain."""
        keys = np.fromiter(self._changed, dtype=np.uint64, count=len(self._changed))
        self._changed = set()
        rows = np.array([self._counts[k] for k in keys.tolist()], dtype=np.float64).reshape(len(keys), 2)
        return keys, rows


def thompson(feedback: np.ndarray, slots: int, rng: np.random.Generator) -> np.ndarray:
    """Positions (into `feedback` [n, 2]: impressions, clicks) of the `slots` candidates with
    the highest posterior draws, among those with fewer than MAX_IMPRESSIONS impressions."""
    shown, clicked = feedback[:, 0], np.minimum(feedback[:, 1], feedback[:, 0])
    open_ = np.flatnonzero(shown < MAX_IMPRESSIONS)
    if not len(open_) or slots < 1:
        return np.zeros(0, np.int64)
    draws = rng.beta(clicked[open_] + 1.0, shown[open_] - clicked[open_] + 1.0)
    return open_[np.argsort(-draws, kind="stable")[:slots]]
