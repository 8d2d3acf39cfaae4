"""The trainer's taste profiles: each user's attribute counts and the population's
(`ranking.profile` says what they are for and how a candidate is scored from them).

Per user, a fixed number of slots (`slots`) of (attribute key, count) in arrays indexed by a
`KeyIndex`: an attribute not in a full profile takes the slot of the least counted one and
counts from 1 again, so the attributes a user picks most stay and rare ones take turns (the
counts are since each attribute last entered the profile). At most `max_users` profiles; past
it, the least recently updated tenth are forgotten. Each profile also holds the model time of
the user's last positive (which of the blend's weights serve them, `ranking.blend`). The
population's counts are one float per attribute key seen, plus the count of all positives.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from embedding_store import TableDelta
from embedding_store.hash_index import KeyIndex, grow_rows
from ranking.profile import (
    ATTRIBUTE_COUNTS,
    POPULATION_KEY,
    USER_PROFILE,
    USER_PROFILE_COUNTS,
    Profiles,
    attribute_shares,
)


@numba.njit(cache=True)
def _add(keys: np.ndarray, counts: np.ndarray, totals: np.ndarray, rows: np.ndarray, attrs: np.ndarray) -> None:
    """Count each event's attributes `attrs` [n, b] (0 = padding) in profile row `rows[e]`."""
    slots = keys.shape[1]
    for e in range(len(rows)):
        r = rows[e]
        totals[r] += 1.0
        for j in range(attrs.shape[1]):
            a = attrs[e, j]
            if a == 0:
                continue
            found, empty, weakest = -1, -1, -1
            for s in range(slots):
                if keys[r, s] == a:
                    found = s
                    break
                if keys[r, s] == 0:
                    if empty < 0:
                        empty = s
                elif weakest < 0 or counts[r, s] < counts[r, weakest]:
                    weakest = s
            if found >= 0:
                counts[r, found] += 1.0
            else:
                at = empty if empty >= 0 else weakest
                keys[r, at] = a
                counts[r, at] = 1.0


class TasteProfiles:
    """Users' and the population's attribute counts; see the module docstring.

    Args:
        slots: attribute keys kept per user.
        max_users: profiles kept (the least recently updated go first).

    Example:
        >>> p = TasteProfiles(slots=4)
        >>> users = np.array([1, 1, 2], np.uint64)
        >>> p.observe(users, np.array([[10, 11], [10, 0], [12, 0]], np.uint64), np.array([5.0, 7.0, 6.0]))
        >>> got = p.profiles(np.array([1, 3], np.uint64))
        >>> got.keys[0].tolist(), got.counts[0].tolist(), got.totals.tolist(), got.last_s.tolist()
        ([10, 11, 0, 0], [2.0, 1.0, 0.0, 0.0], [2.0, 0.0], [7.0, nan])
        >>> p.population(np.array([10, 12, 99], np.uint64)).tolist(), p.positives
        ([2.0, 1.0, 0.0], 3.0)
    """

    def __init__(self, slots: int = 32, max_users: int = 1_000_000) -> None:
        if slots < 1 or max_users < 1:
            raise ValueError(f"slots and max_users must be positive, got {slots}, {max_users}")
        self.slots, self.max_users = slots, max_users
        self._reset()

    def _reset(self) -> None:
        slots = self.slots
        self._users = KeyIndex()
        self._keys = np.zeros((0, slots), np.uint64)
        self._counts = np.zeros((0, slots), np.float32)
        self._totals = np.zeros(0, np.float64)
        self._last = np.zeros(0, np.float64)  # model time of each user's last positive
        self._touched = np.zeros(0, np.int64)  # the `observe` call that last updated each row
        self._calls = 0
        self._attrs = KeyIndex()
        self._attr_counts = np.zeros(0, np.float64)
        self.positives = 0.0  # every positive counted, the population's denominator
        self._changed_users: set[int] = set()
        self._forgotten: set[int] = set()
        self._changed_attrs: set[int] = set()

    def __len__(self) -> int:
        return len(self._users)

    def observe(self, user_keys: np.ndarray, item_attrs: np.ndarray, times_s: np.ndarray) -> None:
        """Count positives: users [n], their items' attribute keys [n, b] (0 = padding) and their
        model times [n], in order."""
        if not len(user_keys):
            return
        self._calls += 1
        rows, _ = self._users.insert(np.asarray(user_keys, np.uint64))
        self._grow()
        attrs = np.ascontiguousarray(item_attrs, np.uint64)
        _add(self._keys, self._counts, self._totals, rows, attrs)
        self._touched[rows] = self._calls
        np.maximum.at(self._last, rows, np.asarray(times_s, np.float64))
        self._changed_users.update(np.asarray(user_keys, np.uint64).tolist())
        self._forgotten.difference_update(self._changed_users)
        present = attrs[attrs != 0]
        attr_rows, _ = self._attrs.insert(present)
        self._attr_counts = grow_rows(self._attr_counts, self._attrs.row_capacity)
        self._attr_counts += np.bincount(attr_rows, minlength=len(self._attr_counts))
        self.positives += len(user_keys)
        self._changed_attrs.update(present.tolist())
        if len(self._users) > self.max_users:
            self._shrink()

    def _grow(self) -> None:
        """Row arrays sized for every row id the user index has handed out."""
        capacity = self._users.row_capacity
        self._keys, self._counts = grow_rows(self._keys, capacity), grow_rows(self._counts, capacity)
        self._totals, self._touched = grow_rows(self._totals, capacity), grow_rows(self._touched, capacity)
        self._last = grow_rows(self._last, capacity)

    def _shrink(self) -> None:
        """Forget the least recently updated profiles, down to 90% of `max_users`."""
        keys, rows = self._users.items()
        oldest = np.argsort(self._touched[rows], kind="stable")[: len(rows) - int(self.max_users * 0.9)]
        self.forget_users(keys[oldest])

    def forget_users(self, user_keys: np.ndarray) -> None:
        """Drop users' profiles (erasure; what they added to the population's counts stays, as
        it holds no user). The next drain names them as evicted."""
        freed = self._users.delete(np.asarray(user_keys, np.uint64))
        self._keys[freed], self._counts[freed], self._totals[freed], self._last[freed] = 0, 0.0, 0.0, 0.0
        gone = set(np.asarray(user_keys, np.uint64).tolist())
        self._changed_users -= gone
        self._forgotten |= gone

    def _rows(self, user_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(keys uint64 [n, slots], counts float64 [n, slots], positives float64 [n], model
        time of the last positive float64 [n]) of each user; zeros (and NaN for the time) for
        a user without a profile."""
        rows = self._users.find(np.asarray(user_keys, np.uint64))
        known, at = rows >= 0, np.maximum(rows, 0)
        if not len(self._totals):
            n = len(rows)
            return np.zeros((n, self.slots), np.uint64), np.zeros((n, self.slots)), np.zeros(n), np.full(n, np.nan)
        keys = np.where(known[:, None], self._keys[at], np.uint64(0))
        counts = np.where(known[:, None], self._counts[at], 0.0).astype(np.float64)
        return keys, counts, np.where(known, self._totals[at], 0.0), np.where(known, self._last[at], np.nan)

    def profiles(self, user_keys: np.ndarray) -> Profiles:
        """The users' profiles, as serving reads them from the synced tables."""
        return Profiles(*self._rows(user_keys), self.shares)

    def population(self, attr_keys: np.ndarray) -> np.ndarray:
        """float64 [n]: the population's count of each attribute key (0 for one never counted)."""
        rows = self._attrs.find(np.asarray(attr_keys, np.uint64))
        if not len(self._attr_counts):
            return np.zeros(len(rows))
        return np.where(rows >= 0, self._attr_counts[np.maximum(rows, 0)], 0.0)

    def shares(self, attr_keys: np.ndarray) -> np.ndarray:
        """`ranking.profile.attribute_shares` of attribute keys [n]."""
        counted = self.population(attr_keys)
        return attribute_shares(counted, counted > 0, self.positives)

    def drain(self) -> list[TableDelta]:
        """What changed since the previous drain, as the three synced tables of `ranking.profile`
        (with the population's denominator row whenever a count changed)."""
        users = np.fromiter(self._changed_users, np.uint64, len(self._changed_users))
        forgotten = np.fromiter(self._forgotten, np.uint64, len(self._forgotten))
        attrs = np.fromiter(self._changed_attrs, np.uint64, len(self._changed_attrs))
        self._changed_users, self._forgotten, self._changed_attrs = set(), set(), set()
        keys, counts, totals, last = self._rows(users)
        counted = len(users) > 0 or len(attrs) > 0
        attr_keys = np.concatenate([attrs, [POPULATION_KEY] if counted else []]).astype(np.uint64)
        attr_rows = np.concatenate([self.population(attrs), [self.positives] if counted else []])[:, None]
        return [
            TableDelta(USER_PROFILE, users, keys, forgotten),
            TableDelta(USER_PROFILE_COUNTS, users, np.column_stack([counts, totals, last]), forgotten),
            TableDelta(ATTRIBUTE_COUNTS, attr_keys, attr_rows),
        ]

    def state_dict(self) -> dict[str, Any]:
        """Every profile and count as arrays (checkpoints); the next drain after a load sends everything."""
        users, rows = self._users.items()
        attrs, attr_rows = self._attrs.items()
        return {
            "users": users,
            "keys": self._keys[rows],
            "counts": self._counts[rows],
            "totals": self._totals[rows],
            "last": self._last[rows],
            "attrs": attrs,
            "attr_counts": self._attr_counts[attr_rows],
            "positives": self.positives,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._reset()
        users = np.asarray(state["users"], np.uint64)
        rows, _ = self._users.insert(users)
        self._grow()
        self._keys[rows], self._counts[rows], self._totals[rows] = state["keys"], state["counts"], state["totals"]
        self._last[rows] = state["last"]
        attr_rows, _ = self._attrs.insert(np.asarray(state["attrs"], np.uint64))
        self._attr_counts = grow_rows(self._attr_counts, self._attrs.row_capacity)
        self._attr_counts[attr_rows] = state["attr_counts"]
        self.positives = float(state["positives"])
        self._changed_users = set(users.tolist())
        self._changed_attrs = set(np.asarray(state["attrs"], np.uint64).tolist())
