"""Dropping redelivered events: a client that retries a batch (its acknowledgement was lost),
or a producer retry, puts the same `event_id` on the log twice; the trainer trains on it once.

`RecentEvents` remembers the 64-bit keys of the last `window` distinct event ids in a
`KeyIndex` (collisionless by key; two ids share a key only if BLAKE2b-64 collides) and a ring
buffer that says which key to forget next. Events are keyed by user, so every copy of an event
reaches the same partition and the same trainer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from embedding_store.hash_index import KeyIndex
from embedding_store.keys import feature_keys


class RecentEvents:
    """The last `window` distinct event ids.

    Args:
        window: how many distinct ids are remembered (a copy arriving later than that many
            other events is trained on again).

    Example:
        >>> recent = RecentEvents(window=2)
        >>> recent.first_seen(["a", "b", "a"]).tolist()
        [True, True, False]
        >>> recent.first_seen(["c"]).tolist(), recent.first_seen(["a"]).tolist()  # "c" pushed "a" out
        ([True], [True])
    """

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"window: must be >= 1, got {window}")
        self.window = window
        # sized for the whole window at once: it fills within the first `window` events, and
        # the trainer's memory is then flat instead of stepping up as the index doubles
        self._index = KeyIndex(capacity=2 * window, parallel=False)
        self._index.reserve(window)
        self._ring = np.zeros(window, dtype=np.uint64)
        self._total = 0  # distinct ids remembered so far (the ring's write position, unwrapped)

    def first_seen(self, event_ids: Sequence[str]) -> np.ndarray:
        """bool [n]: True for an id not among the last `window` (nor earlier in `event_ids`);
        those are remembered from now on."""
        keys = feature_keys("event", event_ids)
        unknown = np.flatnonzero(self._index.find(keys) < 0)
        _, first = np.unique(keys[unknown], return_index=True)  # each new id's first occurrence
        created = np.zeros(len(keys), dtype=bool)
        created[unknown[np.sort(first)]] = True
        new = keys[created][-self.window :]  # more new ids than the window: only the last ones stay
        at = self._total + np.arange(len(new))
        positions = at % self.window
        # the oldest make room before the new are placed: the index never holds more than `window`
        self._index.delete(self._ring[positions[at >= self.window]])
        self._index.insert(new)
        self._ring[positions] = new
        self._total += len(new)
        return created
