"""Streaming item-to-item co-visitation: which items users pick close together, counted per
event, decayed in time, served as neighbour lists.

Trainer side, `CoVisitation.observe` takes positive (user, item) events in order. Each item is
paired with the user's last `window` positives; a pair at distance d (1 = the item just
before) adds 1/d, scaled by 2^(t / half-life) so that older pairs weigh less (kept anchored:
no value is touched as time passes; a rebase every 64 half-lives keeps them finite). The
neighbours of an item are scored by cosine, pairs / sqrt(count_i * count_j), which is free of
the anchor. Each item keeps at most `4 * neighbours` counted partners (the weakest go first,
as in a heavy-hitter sketch); `neighbour_rows` gives the top `neighbours` of each.

Serving side (and the trainer's blend, so both score alike), a user's recent items [h] are a
query: `HistoryScores` sums the neighbour lists of the history items, the most recent weighing
most (`RECENCY ** position`), and normalises by the user's best score. Its top items are a
candidate source; its score of any candidate is a feature of the final blend.

The neighbour rows travel to serving as two synced feature tables, `COVISIT_ITEMS` (uint64
[neighbours], 0-padded) and `COVISIT_SCORES` (float64 [neighbours]).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import numpy as np

COVISIT_ITEMS = "covisit_items"
COVISIT_SCORES = "covisit_scores"
RECENCY = 0.9  # weight of a history item per position back from the most recent
_MAX_EXPONENT = 64.0  # rebase the anchored weights beyond 2^64

NeighbourLookup = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""keys [n] -> (neighbour keys uint64 [n, m], scores float [n, m]); zeros for unknown keys."""


class CoVisitation:
    """Decayed co-visitation counts and their neighbour lists; see the module docstring.

    Args:
        window: earlier positives of the same user each event is paired with.
        neighbours: neighbours kept per item in the served lists.
        half_life_s: model time after which a pair counts half.
        max_users: users whose recent items are remembered (least recently active go first).
        max_items: items with counts (those with the smallest decayed counts go first).
        refresh_every: how many `observe` calls (trainer steps) `neighbour_rows` may serve a
            changed item's list from its cache before computing it again (a drain always
            computes every changed one). Counted in steps, not wall time, so that a trainer
            resumed from a checkpoint computes exactly what the one that wrote it does.

    Example:
        >>> co = CoVisitation(window=5, neighbours=2)
        >>> users = np.array([1, 1, 2, 2, 3, 3], np.uint64)
        >>> co.observe(users, np.array([10, 20, 10, 20, 10, 30], np.uint64), now_s=0.0)
        >>> keys, scores = co.neighbour_rows(np.array([10, 99], np.uint64))
        >>> keys.tolist(), bool(scores[0, 0] > scores[0, 1] > 0)
        ([[20, 30], [0, 0]], True)
    """

    def __init__(
        self,
        window: int = 20,
        neighbours: int = 50,
        half_life_s: float = 7 * 86400.0,
        max_users: int = 1_000_000,
        max_items: int = 1_000_000,
        refresh_every: int = 8,
    ) -> None:
        for name, value in (
            ("window", window),
            ("neighbours", neighbours),
            ("max_users", max_users),
            ("refresh_every", refresh_every),
        ):
            if value < 1:
                raise ValueError(f"{name}: must be >= 1, got {value}")
        if not half_life_s > 0 or max_items < 1:
            raise ValueError(f"half_life_s and max_items must be positive, got {half_life_s}, {max_items}")
        self.window, self.neighbours, self.half_life_s = window, neighbours, half_life_s
        self.max_users, self.max_items, self.refresh_every = max_users, max_items, refresh_every
        self._observed = 0  # observe calls so far: the cache's clock
        self._recent: OrderedDict[int, deque[int]] = OrderedDict()
        self._pairs: dict[int, dict[int, float]] = {}  # item -> partner -> anchored weight
        self._counts: dict[int, float] = {}  # item -> anchored count
        self._ref_s: float | None = None  # the anchor: weights are relative to 2^(ref / half-life)
        self._changed: set[int] = set()  # items whose neighbour list may differ since the last drain
        self._evicted: set[int] = set()
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}  # item -> top neighbours, when

    def __len__(self) -> int:
        return len(self._counts)

    def _scale(self, now_s: float) -> float:
        """The anchored weight of one event at `now_s` (rebasing every weight when it grows large)."""
        if self._ref_s is None:
            self._ref_s = now_s
        exponent = (now_s - self._ref_s) / self.half_life_s
        if exponent > _MAX_EXPONENT:
            shrink = 2.0**-exponent
            for partners in self._pairs.values():
                for j in partners:
                    partners[j] *= shrink
            for i in self._counts:
                self._counts[i] *= shrink
            self._ref_s, exponent = now_s, 0.0  # cosines are unchanged: every weight shrank alike
        return 2.0 ** max(exponent, -_MAX_EXPONENT)

    def observe(self, user_keys: np.ndarray, item_keys: np.ndarray, now_s: float) -> None:
        """Count positive events (aligned uint64 keys, in order) at model time `now_s`."""
        if not len(item_keys):
            return
        self._observed += 1
        scale = self._scale(now_s)
        pairs, counts, changed, limit = self._pairs, self._counts, self._changed, 4 * self.neighbours
        for user, item in zip(user_keys.tolist(), item_keys.tolist(), strict=True):
            recent = self._recent.get(user)
            if recent is None:
                recent = self._recent[user] = deque(maxlen=self.window)
                if len(self._recent) > self.max_users:
                    self._recent.popitem(last=False)
            else:
                self._recent.move_to_end(user)
            counts[item] = counts.get(item, 0.0) + scale
            mine = pairs.setdefault(item, {})
            changed.add(item)
            for distance, other in enumerate(reversed(recent), start=1):
                if other == item:
                    continue
                weight = scale / distance
                mine[other] = mine.get(other, 0.0) + weight
                theirs = pairs.setdefault(other, {})
                theirs[item] = theirs.get(item, 0.0) + weight
                changed.add(other)
                if len(theirs) > limit:
                    _prune(theirs, self.neighbours)
            if len(mine) > limit:
                _prune(mine, self.neighbours)
            recent.append(item)
        if len(counts) > self.max_items:
            self._shrink()

    def forget_users(self, user_keys: np.ndarray) -> None:
        """Drop users' recent-item windows (erasure; the decayed item-pair counts they added
        stay, as they hold no user)."""
        for user in np.asarray(user_keys, dtype=np.uint64).tolist():
            self._recent.pop(user, None)

    def _shrink(self) -> None:
        """Forget the items with the smallest counts, down to 90% of `max_items`."""
        keep = int(self.max_items * 0.9)
        order = sorted(self._counts, key=self._counts.__getitem__, reverse=True)
        for item in order[keep:]:
            del self._counts[item]
            self._pairs.pop(item, None)
            self._cache.pop(item, None)
            self._changed.discard(item)
            self._evicted.add(item)

    def neighbour_rows(self, item_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(neighbour keys uint64 [n, neighbours], cosine scores float64 [n, neighbours]) of
        each item, best first, 0-padded (all zeros for an item without counts); a list is
        served from a cache for at most `refresh_every` observe calls."""
        keys, scores = self._matrices(len(item_keys))
        now = self._observed
        for row, item in enumerate(item_keys.tolist()):
            cached = self._cache.get(item)
            if cached is None or now - cached[2] >= self.refresh_every:
                cached = self._cache[item] = (*self._top(item), now)
            k, s = cached[0], cached[1]
            keys[row, : len(k)], scores[row, : len(s)] = k, s
        return keys, scores

    def _matrices(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((n, self.neighbours), np.uint64), np.zeros((n, self.neighbours), np.float64)

    def _top(self, item: int) -> tuple[np.ndarray, np.ndarray]:
        partners = self._pairs.get(item)
        if not partners:
            return np.zeros(0, np.uint64), np.zeros(0, np.float64)
        others = np.fromiter(partners.keys(), dtype=np.uint64, count=len(partners))
        weights = np.fromiter(partners.values(), dtype=np.float64, count=len(partners))
        norms = np.fromiter((self._counts.get(j, 0.0) for j in others.tolist()), dtype=np.float64, count=len(others))
        live = norms > 0  # a partner forgotten by the item cap is no neighbour
        others, weights, norms = others[live], weights[live], norms[live]
        cosine = weights / np.sqrt(norms * self._counts[item])
        best = np.argsort(-cosine, kind="stable")[: self.neighbours]
        return others[best], cosine[best]

    def drain(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(changed item keys [n], their neighbour keys [n, m] and scores [n, m], items forgotten
        [e]) since the previous drain: what the next sync carries. Computed afresh, and apart
        from the cache, so that when syncs happen does not change what training sees."""
        items = np.fromiter(self._changed, dtype=np.uint64, count=len(self._changed))
        self._changed = set()
        keys, scores = self._matrices(len(items))
        for row, item in enumerate(items.tolist()):
            k, s = self._top(item)
            keys[row, : len(k)], scores[row, : len(s)] = k, s
        evicted = np.fromiter(self._evicted, dtype=np.uint64, count=len(self._evicted))
        self._evicted = set()
        return items, keys, scores, evicted

    def state_dict(self) -> dict[str, Any]:
        """Everything `load_state_dict` needs (plain containers, for checkpoints). The cache of
        neighbour lists is not in it: it is emptied here instead, so this object goes on to
        compute exactly what one loaded from the state does (the lists are computed again)."""
        self._cache = {}
        return {
            "recent": [(u, list(r)) for u, r in self._recent.items()],
            "pairs": self._pairs,
            "counts": self._counts,
            "ref_s": self._ref_s,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._recent = OrderedDict((u, deque(r, maxlen=self.window)) for u, r in state["recent"])
        self._pairs, self._counts, self._ref_s = state["pairs"], state["counts"], state["ref_s"]
        self._changed, self._cache = set(self._counts), {}


def _prune(partners: dict[int, float], keep: int) -> None:
    """Keep the `2 * keep` heaviest partners of a row."""
    heaviest = sorted(partners.items(), key=lambda kv: kv[1], reverse=True)[: 2 * keep]
    partners.clear()
    partners.update(heaviest)


class HistoryScores:
    """Co-visitation scores of users' recent items as queries; see the module docstring.

    Args:
        lookup: neighbour rows of item keys (`CoVisitation.neighbour_rows`, or serving's
            synced tables).
        history: uint64 [u, h] each user's recent positive items, most recent last, 0-padded.

    Example:
        >>> rows = {1: ([5, 6], [1.0, 0.5]), 2: ([6, 7], [1.0, 1.0])}
        >>> def lookup(keys):
        ...     got = [rows.get(k, ([0, 0], [0.0, 0.0])) for k in keys.tolist()]
        ...     return np.array([g[0] for g in got], np.uint64), np.array([g[1] for g in got])
        >>> s = HistoryScores(lookup, np.array([[1, 2]], np.uint64))
        >>> s.top(0, 2)[0].tolist(), s.of(0, np.array([6, 9], np.uint64)).round(3).tolist()
        ([6, 7], [1.0, 0.0])
    """

    def __init__(self, lookup: NeighbourLookup, history: np.ndarray) -> None:
        u, h = history.shape
        self._users: list[tuple[np.ndarray, np.ndarray]] = []
        if not u or not h:
            self._users = [(np.zeros(0, np.uint64), np.zeros(0))] * u
            return
        keys, scores = lookup(history.ravel())
        m = keys.shape[1] if keys.ndim == 2 else 0
        # most recent last in `history`: position back from the end of each row's valid items
        valid = history != 0
        back = np.cumsum(valid[:, ::-1], axis=1)[:, ::-1] - 1
        weight = np.where(valid, RECENCY ** back.astype(np.float64), 0.0)  # [u, h]
        keys, scores = keys.reshape(u, h * m), (scores.reshape(u, h, m) * weight[:, :, None]).reshape(u, h * m)
        for r in range(u):
            present = (keys[r] != 0) & (scores[r] > 0)
            if not present.any():
                self._users.append((np.zeros(0, np.uint64), np.zeros(0)))
                continue
            found, inverse = np.unique(keys[r][present], return_inverse=True)
            total = np.bincount(inverse, weights=scores[r][present])
            mine = np.isin(found, history[r][history[r] != 0])  # a user's own items are no neighbours
            found, total = found[~mine], total[~mine]
            best = total.max() if len(total) else 1.0
            self._users.append((found, total / best))

    def top(self, user: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The `n` best-scored items of row `user` (not in its own history), with scores in [0, 1]."""
        found, total = self._users[user]
        best = np.argsort(-total, kind="stable")[:n]
        return found[best], total[best]

    def of(self, user: int, items: np.ndarray) -> np.ndarray:
        """Scores [len(items)] of row `user` for these items (0 for items it does not reach)."""
        found, total = self._users[user]
        if not len(found) or not len(items):
            return np.zeros(len(items))
        at = np.minimum(np.searchsorted(found, items), len(found) - 1)
        return np.where(found[at] == items, total[at], 0.0)

    def matrix(self, items: np.ndarray) -> np.ndarray:
        """Scores [u, c] of each row for its own candidates `items` [u, c]."""
        return (
            np.stack([self.of(r, items[r]) for r in range(len(self._users))]) if len(self._users) else np.zeros((0, 0))
        )


def covisit_lookup(items_table: Any, scores_table: Any) -> NeighbourLookup:
    """A `NeighbourLookup` over two synced row sources (`get(keys) -> (rows, found)`)."""

    def lookup(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return items_table.get(keys)[0], scores_table.get(keys)[0]

    return lookup
