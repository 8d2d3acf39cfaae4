"""The trainer's view of the item catalogue: names, interaction counts, negative sampling."""

from __future__ import annotations

import numpy as np

from embedding_store.hash_index import KeyIndex, grow_rows

_MAX_EXPONENT = 256.0  # trending counts are stored x 2^(at most this): far from float64's 2^1024


class ItemCatalog:
    """Items the trainer has seen, with positive-interaction counts, all-time and trending.

    Negatives for data without impressions are drawn from the all-time popularity distribution
    (count ** 0.75, as word2vec), which is also the logQ correction of retrieval. The trending
    score is the count with exponential decay in event time (half-life `half_life_s`): what is
    popular *now*, which is what cold users get. It is stored scaled by 2^((t - t0) / half-life), so an
    update touches only the batch's items; the exponent is computed first (log domain) and t0
    moved up before it passes 256, so no time gap overflows. `now_s` is the model clock
    (`trainer.clock`), on which a silence in traffic decays counts by a bounded amount only.

    Args:
        seed: seed of the negative sampler.
        half_life_s: half-life of the trending score, in seconds of event time.
        traffic_share: the share of all events this catalogue sees (1 / the number of trainer
            workers, each of which sees its partitions' users): `counts` and `drain_counts`
            extrapolate to the whole stream, so the count features the ranker trains and serves
            on keep their scale however many workers there are. Sampling and shares are
            relative and do not change.

    Example:
        >>> catalog = ItemCatalog()
        >>> new = catalog.observe(np.array([5, 6], dtype=np.uint64), ["a", "b"], np.array([1.0, 0.0]))
        >>> catalog.sample(3).tolist()
        [5, 5, 5]
    """

    def __init__(self, seed: int = 0, half_life_s: float = 7 * 86400.0, traffic_share: float = 1.0) -> None:
        if not 0 < traffic_share <= 1:
            raise ValueError(f"traffic_share: must be in (0, 1], got {traffic_share}")
        self.traffic_share = traffic_share
        self._index = KeyIndex()
        self._counts = np.zeros(0, dtype=np.float64)
        self._trending = np.zeros(0, dtype=np.float64)  # decayed counts x 2^((t - t0) / half-life)
        self._half_life_s = half_life_s
        self._t0: float | None = None
        self._scale = 1.0  # 2^((latest time - t0) / half-life)
        self._rng = np.random.default_rng(seed)
        self._new_names: dict[int, str] = {}
        self._names: dict[int, str] = {}  # raw id of every item, by key
        self._changed = np.zeros(0, dtype=bool)  # rows whose counts changed since `drain_counts`
        self.clock_s = 0.0  # latest event time observed

    def __len__(self) -> int:
        return len(self._index)

    def observe(
        self, keys: np.ndarray, names: list[str], positive_weights: np.ndarray, now_s: float | np.ndarray = 0.0
    ) -> None:
        """Register items (keys [n], raw ids `names`); add `positive_weights` [n] to counts at
        event time `now_s` (one time for all, or each event's own [n]: a batch that mixes
        partitions holds events of several times, and each decays from its own)."""
        rows, created = self._index.insert(keys)
        self._counts = grow_rows(self._counts, self._index.row_capacity)
        self._trending = grow_rows(self._trending, self._index.row_capacity)
        self._changed = grow_rows(self._changed, self._index.row_capacity)
        self._changed[rows] = True
        for i in np.flatnonzero(created):  # only items never seen before
            self._new_names[int(keys[i])] = self._names[int(keys[i])] = names[i]
        self._counts += np.bincount(rows, weights=positive_weights, minlength=len(self._counts))
        times = np.broadcast_to(np.asarray(now_s, dtype=np.float64), np.shape(keys))
        if not len(times):
            return
        newest = float(times.max())
        if self._t0 is None:
            self._t0 = newest
        self.clock_s = max(self.clock_s, newest)
        exponent = (max(self.clock_s, self._t0) - self._t0) / self._half_life_s  # log2 of the scale
        if exponent > _MAX_EXPONENT:  # move t0 to now before the stored values overflow
            with np.errstate(under="ignore"):
                self._trending *= np.exp2(-exponent)  # tiny counts go to 0: never an overflow
            self._t0, exponent = max(self.clock_s, self._t0), 0.0
        self._scale = float(np.exp2(exponent))
        with np.errstate(under="ignore"):  # an event far older than t0 adds ~0
            scales = np.exp2(np.minimum(times - self._t0, self.clock_s - self._t0) / self._half_life_s)
        self._trending += np.bincount(rows, weights=positive_weights * scales, minlength=len(self._trending))

    def _negative_weights(self, uniform_share: float) -> np.ndarray:
        weights = self._counts**0.75
        if uniform_share > 0 and weights.sum() > 0:
            live = self._counts > 0
            weights = (1 - uniform_share) * weights / weights.sum() + uniform_share * live / live.sum()
        return weights

    def sample(self, n: int, uniform_share: float = 0.0) -> np.ndarray:
        """Draw `n` item keys with probability proportional to count ** 0.75, mixed with
        `uniform_share` of draws uniform over all items seen (so rare items also meet negatives)."""
        cdf = np.cumsum(self._negative_weights(uniform_share))
        if n == 0 or not len(cdf) or cdf[-1] <= 0:
            return np.zeros(0, dtype=np.uint64)
        picks = np.searchsorted(cdf, self._rng.random(n) * cdf[-1], side="right")
        return self._index.keys_of(np.minimum(picks, len(cdf) - 1))

    def share(self, keys: np.ndarray) -> np.ndarray:
        """Each item's share of all positive counts so far (its chance to be a batch's positive), >= 1e-6."""
        rows = self._index.find(keys)
        counts = np.where(rows >= 0, self._counts[np.maximum(rows, 0)], 0.0)
        return np.maximum(counts / max(float(self._counts.sum()), 1.0), 1e-6)

    def counts(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(trending, all-time) positive counts of items over the whole stream (this catalogue's
        counts / `traffic_share`): float64 [n] each, 0 for unknown items."""
        rows = self._index.find(keys)
        known, at = rows >= 0, np.maximum(rows, 0)
        per_share = self._scale * self.traffic_share
        trending = np.where(known, self._trending[at] / per_share, 0.0) if len(self._trending) else np.zeros(len(rows))
        counts = np.where(known, self._counts[at], 0.0) if len(self._counts) else np.zeros(len(rows))
        return trending, counts / self.traffic_share

    def drain_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Items whose counts changed since the previous drain: (keys [n], float64 [n, 2]).

        Columns: the trending count as log2(count) + t / half-life at any time t (constant
        until the item is counted again: `trending_at` turns it back into a count), and the
        all-time count; both over the whole stream, as `counts`.
        """
        rows = np.flatnonzero(self._changed)
        self._changed[:] = False
        trending = np.maximum(self._trending[rows] / self.traffic_share, 1e-300)
        anchored = np.log2(trending) + (self._t0 or 0.0) / self._half_life_s
        return self._index.keys_of(rows), np.stack([anchored, self._counts[rows] / self.traffic_share], axis=1)

    @staticmethod
    def trending_at(anchored: np.ndarray, clock_s: float, half_life_s: float) -> np.ndarray:
        """Trending counts at event time `clock_s` from `drain_counts`' anchored column."""
        return np.exp2(np.minimum(anchored - clock_s / half_life_s, 1000.0))

    @property
    def half_life_s(self) -> float:
        return self._half_life_s

    def all_items(self) -> np.ndarray:
        """Keys of every item seen, in row order."""
        return self._index.items()[0]

    def popular(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The `n` trending items: (keys, relative scores, the top one 1.0), most trending first."""
        n = min(n, len(self._trending))
        if n == 0:
            return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.float32)
        top = np.argpartition(-self._trending, n - 1)[:n]
        top = top[np.argsort(-self._trending[top], kind="stable")]
        top = top[self._trending[top] > 0]
        scores = self._trending[top] / self._trending[top[0]] if len(top) else self._trending[top]
        return self._index.keys_of(top), scores.astype(np.float32)

    def names(self, keys: np.ndarray) -> dict[int, str]:
        """Raw ids of the known items among `keys`, by key."""
        return {key: self._names[key] for key in keys.tolist() if key in self._names}

    def drain_new_names(self) -> dict[int, str]:
        """Raw ids of items first seen since the previous drain, by key."""
        names, self._new_names = self._new_names, {}
        return names
