"""Features the trainer keeps between events: user and item attributes, and each user's history.

Attributes arrive in event contexts: a key `user.<name>` describes the event's user and
`item.<name>` its item (MovieLens: `user.age`, `user.gender`, `user.occupation`, `item.genres`,
`item.year`); a value may hold several tokens separated by "|" (genres). The latest values are
kept per user and per item. A user's history is the last `history_length` items they acted on
positively. Everything becomes 64-bit feature keys (slot = attribute name), padded into
fixed-width arrays with 0 as padding, ready for embedding lookups.

Memory is bounded: at most `max_entities` users and items each are remembered (least recently
seen are forgotten first).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from embedding_store import feature_key, feature_keys
from trainer.events import Event

TOKEN_CACHE = 50_000  # attribute values whose feature keys FeatureState keeps (then starts afresh)
PAD = np.uint64(0)


@dataclass(frozen=True)
class FeatureConfig:
    """Args:
    history_length: items kept per user (the ranker's behaviour sequence).
    max_entities: users (and, separately, items) whose attributes and history are kept.
    max_attributes: attribute keys kept per user or item (further tokens are dropped).
    """

    history_length: int = 20
    max_entities: int = 1_000_000
    max_attributes: int = 16

    def __post_init__(self) -> None:
        if not 1 <= self.history_length <= 1000:
            raise ValueError(f"history_length: must be in [1, 1000], got {self.history_length}")
        if self.max_entities < 1:
            raise ValueError(f"max_entities: must be >= 1, got {self.max_entities}")
        if not 1 <= self.max_attributes <= 1000:
            raise ValueError(f"max_attributes: must be in [1, 1000], got {self.max_attributes}")


@dataclass(frozen=True)
class Features:
    """Padded feature keys of a batch of n (user, item) pairs (0 = padding).

    Args:
        user_attrs: uint64 [n, a] attribute keys of each user.
        item_attrs: uint64 [n, b] attribute keys of each item.
        history: uint64 [n, h] item keys of each user's recent positives, most recent last.
    """

    user_attrs: np.ndarray
    item_attrs: np.ndarray
    history: np.ndarray


def _pad(rows: list[list[int]], width: int | None = None) -> np.ndarray:
    """Rows as uint64 [n, width] (default: the longest row's length), 0-padded; a row longer
    than `width` keeps its first `width` keys.

    Example:
        >>> _pad([[1, 2], [], [3]]).tolist(), _pad([[1, 2, 3]], 2).tolist()
        ([[1, 2], [0, 0], [3, 0]], [[1, 2]])
    """
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    width = int(lengths.max(initial=0)) if width is None else width
    if int(lengths.max(initial=0)) > width:  # cut the long rows first (rare)
        rows = [r[:width] for r in rows]
        lengths = np.minimum(lengths, width)
    out = np.zeros((len(rows), max(width, 1)), dtype=np.uint64)
    total = int(lengths.sum())
    if total:
        flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.uint64, count=total)
        out[np.arange(out.shape[1]) < lengths[:, None]] = flat  # row-major: each row's keys in order
    return out


class _Bounded(OrderedDict[int, list[int]]):
    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __reduce__(self) -> tuple[object, ...]:  # pickling (checkpoints): keep the limit and the order
        return type(self), (self.limit,), None, None, iter(self.items())

    def put(self, key: int, value: list[int]) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


class FeatureState:
    """Attributes and histories, updated from events; see the module docstring.

    Args:
        config: history length and memory bound.

    Example:
        >>> state = FeatureState(FeatureConfig(history_length=2))
        >>> u, m = feature_keys("user", ["u1"]), feature_keys("item", ["m1", "m2", "m3"])
        >>> ctx = {"user.gender": "F", "item.genres": "A|B"}
        >>> state.observe([Event("e", "u1", "m1", "click", 1, context=ctx)], u, m[:1])
        >>> state.add_history(u.repeat(3), m)
        >>> f = state.batch(u, m[:1])
        >>> f.user_attrs.shape, f.item_attrs.shape, f.history.tolist() == [m[1:].tolist()]
        ((1, 1), (1, 2), True)
    """

    def __init__(self, config: FeatureConfig | None = None) -> None:
        self.config = config or FeatureConfig()
        self._user_attrs = _Bounded(self.config.max_entities)
        self._item_attrs = _Bounded(self.config.max_entities)
        self._history: OrderedDict[int, deque[int]] = OrderedDict()
        self._changed_users: set[int] = set()  # since the last `drain_changed`
        self._changed_items: set[int] = set()
        self._token_keys: dict[tuple[str, str], int] = {}  # (slot, value) -> key, `_token_key`

    def __getstate__(self) -> dict[str, object]:  # checkpoints: the token cache is not state
        return {k: v for k, v in vars(self).items() if k != "_token_keys"}

    def __setstate__(self, state: dict[str, object]) -> None:
        vars(self).update(state)
        self._token_keys = {}

    def observe(self, events: list[Event], user_keys: np.ndarray, item_keys: np.ndarray) -> None:
        """Take the attributes carried by the events' contexts (`user_keys`/`item_keys`: their feature keys)."""
        for e, user, item in zip(events, user_keys.tolist(), item_keys.tolist(), strict=True):
            if not e.context:
                continue
            for prefix, store, owner, changed in (
                ("user.", self._user_attrs, user, self._changed_users),
                ("item.", self._item_attrs, item, self._changed_items),
            ):
                tokens = [(k, t) for k, v in e.context.items() if k.startswith(prefix) for t in v.split("|") if t]
                if tokens:
                    keys = [self._token_key(k, t) for k, t in tokens[: self.config.max_attributes]]
                    if store.get(owner) != keys:
                        changed.add(owner)
                    store.put(owner, keys)

    def _token_key(self, slot: str, value: str) -> int:
        """The feature key of one attribute value, from a bounded cache: the same few values
        (genres, ages, ...) come with event after event, and each hash costs a BLAKE2b."""
        key = self._token_keys.get((slot, value))
        if key is None:
            if len(self._token_keys) >= TOKEN_CACHE:
                self._token_keys.clear()
            key = self._token_keys[(slot, value)] = feature_key(slot, value)
        return key

    def batch(self, user_keys: np.ndarray, item_keys: np.ndarray) -> Features:
        """Feature keys of aligned (user, item) pairs, as they stand now (before this batch's history)."""
        return Features(self.user_attributes(user_keys), self.item_attributes(item_keys), self.histories(user_keys))

    def user_attributes(self, user_keys: np.ndarray, width: int | None = None) -> np.ndarray:
        """uint64 [n, a] attribute keys of each user (0-padded; a = `width` or the longest)."""
        return _pad([self._user_attrs.get(u, []) for u in user_keys.tolist()], width)

    def item_attributes(self, item_keys: np.ndarray, width: int | None = None) -> np.ndarray:
        """uint64 [n, b] attribute keys of each item (0-padded; b = `width` or the longest)."""
        return _pad([self._item_attrs.get(i, []) for i in item_keys.tolist()], width)

    def item_attribute_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """Every (item, attribute key) pair of the items with attributes: uint64 [n] each."""
        lengths = np.fromiter(map(len, self._item_attrs.values()), np.int64, len(self._item_attrs))
        items = np.repeat(np.fromiter(self._item_attrs.keys(), np.uint64, len(self._item_attrs)), lengths)
        attrs = np.fromiter(itertools.chain.from_iterable(self._item_attrs.values()), np.uint64, int(lengths.sum()))
        return items, attrs

    def histories(self, user_keys: np.ndarray, width: int | None = None) -> np.ndarray:
        """uint64 [n, h] item keys of each user's recent positives, most recent last (0-padded)."""
        return _pad([list(self._history.get(u, ())) for u in user_keys.tolist()], width)

    def drain_changed(self) -> tuple[np.ndarray, np.ndarray]:
        """(users, items) whose attributes or history changed since the previous drain (uint64 each)."""
        users = np.fromiter(self._changed_users, dtype=np.uint64, count=len(self._changed_users))
        items = np.fromiter(self._changed_items, dtype=np.uint64, count=len(self._changed_items))
        self._changed_users, self._changed_items = set(), set()
        return users, items

    def set_user_attributes(self, user_key: int, attributes: dict[str, str]) -> None:
        """A user's attributes as a client put them (`PUT /v1/users`): the same feature keys
        as `user.<name>` context entries of their events would give."""
        self._set(self._user_attrs, self._changed_users, user_key, "user.", attributes)

    def set_item_attributes(self, item_key: int, attributes: dict[str, str]) -> None:
        """An item's catalogue attributes (`PUT /v1/items`; its categories as `category`): the
        same feature keys as `item.<name>` context entries would give, so the ranker scores a
        new item by what it is before anyone acted on it."""
        self._set(self._item_attrs, self._changed_items, item_key, "item.", attributes)

    def _set(self, store: _Bounded, changed: set[int], owner: int, prefix: str, attributes: dict[str, str]) -> None:
        tokens = [(f"{prefix}{k}", t) for k, v in attributes.items() for t in v.split("|") if t]
        store.put(int(owner), [int(feature_keys(k, [t])[0]) for k, t in tokens[: self.config.max_attributes]])
        changed.add(int(owner))

    def forget_users(self, user_keys: np.ndarray) -> None:
        """Erase users' attributes and histories (their next drain does not name them)."""
        for user in np.asarray(user_keys, dtype=np.uint64).tolist():
            self._user_attrs.pop(user, None)
            self._history.pop(user, None)
            self._changed_users.discard(user)

    def add_history(self, user_keys: np.ndarray, item_keys: np.ndarray) -> None:
        """Append positives (in order) to their users' histories."""
        for user, key in zip(user_keys.tolist(), item_keys.tolist(), strict=True):
            history = self._history.get(user)
            if history is None:
                history = self._history[user] = deque(maxlen=self.config.history_length)
            history.append(key)
            self._history.move_to_end(user)
            self._changed_users.add(user)
        while len(self._history) > self.config.max_entities:
            self._history.popitem(last=False)
