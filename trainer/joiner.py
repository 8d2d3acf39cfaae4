"""The joiner: impressions and the actions on them become labelled examples.

An impression (an item shown to a user, reported with the `request_id` of the recommendation
that showed it) waits in a window. A positive action on the same (user, item) inside the window
makes it a positive example at once; an explicit skip makes it a negative at once; an
impression nobody acted on becomes a negative when its window closes. Time is event time: the
window of an impression shown at t closes once an event later than t + window has been seen.

Late actions — a click that arrives after its impression's window closed and its negative was
emitted — still become positives (marked late): the negative was trained on and cannot be taken
back, but the positive is not lost. Actions on items never impressed (ratings, or clients that do
not report impressions) become positives marked unjoined; the trainer pairs those with sampled
negatives.

Memory is bounded and reserved at start: at most `max_pending` open impressions (the oldest are
closed early, as negatives, when more arrive) and `max_closed` closed ones remembered for late
actions. Both are fixed-size tables of 64-bit (user, item) pair keys (BLAKE2b), open addressing
with linear probing and backward-shift deletion (no tombstones, so never a rehash), rows linked
oldest to newest; an open impression keeps its numbers in arrays and its strings as references
to the event's own (interned) ids — not the `Event` — and an impression written back by the
gateway keeps no event id of its own (it is `<request_id>:<position>`, rebuilt when it closes).
About 110 bytes an open impression and 45 a closed one, all allocated and touched when the
joiner is made, so the trainer's memory does not step up while the window fills (it used to:
~360 bytes an impression, growing for the first `window_s` of traffic). One batch is joined by a
compiled kernel (`_join`) that writes a log of what to store and what to emit, replayed in order.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numba
import numpy as np

from embedding_store.keys import feature_keys
from trainer.events import Event

SOURCES = ("joined", "window_closed", "late", "unjoined", "forced_close")
_JOINED, _WINDOW_CLOSED, _LATE, _UNJOINED, _FORCED = range(5)
_IMPRESSION, _POSITIVE, _SKIP, _OTHER = range(4)  # what an event is to the joiner
_STORE, _EMIT_ROW, _EMIT_EVENT = range(3)  # operations of the kernel's log
# meta: [count, oldest row, newest row, free rows]; -1: none
_COUNT, _OLDEST, _NEWEST, _FREE = range(4)


@dataclass(frozen=True)
class JoinerConfig:
    """Settings of the joiner.

    Args:
        window_s: how long an impression waits for an action (event time).
        max_pending: most impressions waiting at once (about 110 bytes each, reserved at start).
        max_closed: most closed impressions remembered to recognise late actions (about 45
            bytes each, reserved at start).

    Raises:
        ValueError: a value is out of range; the message names the field.
    """

    window_s: float = 300.0
    max_pending: int = 262_144
    max_closed: int = 262_144

    def __post_init__(self) -> None:
        for name in ("window_s", "max_pending", "max_closed"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Example:
    """One labelled (user, item) pair.

    Args:
        event: the event the example stands for: the impression for joined and closed ones,
            the action for late and unjoined ones.
        label: 1.0 positive, 0.0 negative.
        source: how it was labelled, one of `SOURCES`.
    """

    event: Event
    label: float
    source: str


@dataclass
class JoinerStats:
    """Counts of examples by source, and actions that labelled nothing new."""

    examples: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))
    duplicate_actions: int = 0
    duplicate_impressions: int = 0


class _PairTable:
    """A fixed-size set of pair keys with a row each, rows linked oldest to newest.

    Slots: open addressing (a key's home slot is its low bits: the keys are hashes), linear
    probing, backward-shift deletion. Rows: `capacity` of them, free ones on a stack; `prev` /
    `nxt` link the live ones in insertion order. Every array is allocated and touched here.
    """

    def __init__(self, capacity: int) -> None:
        slots = 1 << max(4, (2 * capacity - 1).bit_length())  # load <= 1/2
        self.slot_key = np.zeros(slots, dtype=np.uint64)
        self.slot_row = np.full(slots, -1, dtype=np.int32)
        self.row_key = np.ones(capacity, dtype=np.uint64)  # ones, not zeros: pages touched now
        self.prev = np.full(capacity, -1, dtype=np.int32)
        self.nxt = np.full(capacity, -1, dtype=np.int32)
        self.free = np.arange(capacity - 1, -1, -1, dtype=np.int32)  # row 0 on top
        self.meta = np.array([0, -1, -1, capacity], dtype=np.int64)
        self.slot_key.fill(0)

    @property
    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.slot_key, self.slot_row, self.row_key, self.prev, self.nxt, self.free, self.meta

    def __len__(self) -> int:
        return int(self.meta[_COUNT])

    def rows_oldest_first(self) -> np.ndarray:
        """Live rows, oldest first."""
        return _walk(self.nxt, self.meta)


@numba.njit(cache=True, inline="always")
def _home(key: np.uint64, mask: int) -> np.int64:
    """A key's home slot: its low bits (pair keys are BLAKE2b hashes, already uniform)."""
    return np.int64(key & np.uint64(mask))


@numba.njit(cache=True)
def _find(slot_key: np.ndarray, slot_row: np.ndarray, key: np.uint64) -> int:
    mask = len(slot_key) - 1
    s = _home(key, mask)
    while slot_row[s] != -1:
        if slot_key[s] == key:
            return slot_row[s]
        s = (s + 1) & mask
    return -1


@numba.njit(cache=True)
def _add(table: tuple[np.ndarray, ...], key: np.uint64) -> int:
    """Insert an absent key as the newest row (there must be a free row); its row."""
    slot_key, slot_row, row_key, prev, nxt, free, meta = table
    meta[_FREE] -= 1
    row = free[meta[_FREE]]
    mask = len(slot_key) - 1
    s = _home(key, mask)
    while slot_row[s] != -1:
        s = (s + 1) & mask
    slot_key[s], slot_row[s], row_key[row] = key, row, key
    prev[row], nxt[row] = meta[_NEWEST], -1
    if meta[_NEWEST] >= 0:
        nxt[meta[_NEWEST]] = row
    else:
        meta[_OLDEST] = row
    meta[_NEWEST] = row
    meta[_COUNT] += 1
    return row


@numba.njit(cache=True)
def _remove(table: tuple[np.ndarray, ...], row: int) -> None:
    """Remove a live row: its slot (shifting the probe run after it back), its links."""
    slot_key, slot_row, row_key, prev, nxt, free, meta = table
    mask = len(slot_key) - 1
    i = _home(row_key[row], mask)
    while slot_row[i] != row:
        i = (i + 1) & mask
    j = i
    while True:  # backward-shift deletion: no key is left behind an empty slot on its probe path
        j = (j + 1) & mask
        if slot_row[j] == -1:
            break
        home = _home(slot_key[j], mask)
        if (j > i and (home <= i or home > j)) or (j < i and home <= i and home > j):
            slot_key[i], slot_row[i] = slot_key[j], slot_row[j]
            i = j
    slot_row[i] = -1
    before, after = prev[row], nxt[row]
    if before >= 0:
        nxt[before] = after
    else:
        meta[_OLDEST] = after
    if after >= 0:
        prev[after] = before
    else:
        meta[_NEWEST] = before
    free[meta[_FREE]] = row
    meta[_FREE] += 1
    meta[_COUNT] -= 1


@numba.njit(cache=True)
def _walk(nxt: np.ndarray, meta: np.ndarray) -> np.ndarray:
    out = np.empty(meta[_COUNT], dtype=np.int32)
    row, n = meta[_OLDEST], 0
    while row >= 0:
        out[n] = row
        n += 1
        row = nxt[row]
    return out


@numba.njit(cache=True)
def _join(
    start: int,
    batch: tuple[np.ndarray, ...],
    window_ms: int,
    state: np.ndarray,
    table: tuple[np.ndarray, ...],
    numbers: tuple[np.ndarray, np.ndarray, np.ndarray],
    closed: tuple[np.ndarray, ...],
    positive: np.ndarray,
    log: tuple[np.ndarray, ...],
) -> tuple[int, int]:
    """Join events `start`... of the batch; return (events done, log entries written).

    batch: pair keys, times, kinds, positions, values of the events. state: int64 [4]:
    watermark, duplicate actions, duplicate impressions, an expiry pass under way. table /
    closed: the arrays of the open / closed `_PairTable`; numbers: time, position and value of
    each open row; positive: whether each closed row ended positive. log: kind, event index,
    row, source, and for an emitted row its time, position and value (a later impression of the
    same call may reuse the row). Stops early when the log is full: the caller replays it and
    calls again from where it stopped (the expiry pass resumes where it was).
    """
    pairs, times, kinds, positions, values = batch
    p_time, p_position, p_value = numbers
    meta = table[6]
    n, cap = 0, len(log[0])
    max_pending, max_closed = len(p_time), len(positive)
    i = start
    while i < len(pairs):
        if times[i] > state[0]:  # event time moved on: windows that closed since
            state[0], state[3] = times[i], 1
        horizon = state[0] - window_ms
        while state[3] and meta[_OLDEST] >= 0 and p_time[meta[_OLDEST]] < horizon:
            if n == cap:
                return i, n  # resumed here: state[3] says the pass is not over
            n = _close(log, n, i, meta[_OLDEST], _WINDOW_CLOSED, table, numbers, closed, positive, max_closed)
        state[3] = 0
        if n + 2 > cap:
            return i, n
        key, kind = pairs[i], kinds[i]
        if kind == _IMPRESSION:
            if _find(table[0], table[1], key) >= 0:
                state[2] += 1
            else:
                row = _find(closed[0], closed[1], key)
                if row >= 0:  # shown again: a new chance
                    _remove(closed, row)
                if meta[_COUNT] == max_pending:  # full: the oldest closes early
                    n = _close(log, n, i, meta[_OLDEST], _FORCED, table, numbers, closed, positive, max_closed)
                row = _add(table, key)
                p_time[row], p_position[row], p_value[row] = times[i], positions[i], values[i]
                log[0][n], log[1][n], log[2][n], log[3][n] = _STORE, i, row, 0
                n += 1
        elif kind in (_POSITIVE, _SKIP):
            is_positive = kind == _POSITIVE
            row = _find(table[0], table[1], key)
            if row >= 0:
                n = _close(log, n, i, row, _JOINED, table, numbers, closed, positive, max_closed, is_positive)
            else:
                row = _find(closed[0], closed[1], key)
                if row < 0:
                    log[0][n], log[1][n], log[2][n], log[3][n] = _EMIT_EVENT, i, -1, _UNJOINED
                    n += 1
                elif is_positive and not positive[row]:  # the window closed with a negative
                    log[0][n], log[1][n], log[2][n], log[3][n] = _EMIT_EVENT, i, -1, _LATE
                    n += 1
                    _remember(closed, positive, key, True, max_closed)
                else:
                    state[1] += 1  # that impression already has its label
        i += 1  # other types (dwell without a join rule) carry no label
    return i, n


@numba.njit(cache=True)
def _close(
    log: tuple[np.ndarray, ...],
    n: int,
    i: int,
    row: int,
    source: int,
    table: tuple[np.ndarray, ...],
    numbers: tuple[np.ndarray, np.ndarray, np.ndarray],
    closed: tuple[np.ndarray, ...],
    positive: np.ndarray,
    max_closed: int,
    is_positive: bool = False,
) -> int:
    """Emit the open impression in `row` (log entry n), remember it closed, free the row."""
    log[0][n], log[1][n], log[2][n], log[3][n] = _EMIT_ROW, i, row, source
    log[4][n], log[5][n], log[6][n] = numbers[0][row], numbers[1][row], numbers[2][row]
    _remember(closed, positive, table[2][row], is_positive, max_closed)
    _remove(table, row)
    return n + 1


@numba.njit(cache=True)
def _remember(
    closed: tuple[np.ndarray, ...], positive: np.ndarray, key: np.uint64, is_positive: bool, max_closed: int
) -> None:
    """Remember a closed impression as the newest, forgetting the oldest when full."""
    row = _find(closed[0], closed[1], key)
    if row >= 0:  # remembered again: now the newest
        _remove(closed, row)
    elif closed[6][_COUNT] == max_closed:
        _remove(closed, closed[6][_OLDEST])
    positive[_add(closed, key)] = is_positive


class Joiner:
    """Turns a stream of events into labelled examples (see the module docstring).

    Args:
        config: window and memory bounds.

    Example:
        >>> j = Joiner(JoinerConfig(window_s=60))
        >>> shown = [Event(f"s{i}", "u", f"i{i}", "impression", 0, request_id="r") for i in (1, 2)]
        >>> [(e.event.item_id, e.label) for e in j.push(shown + [Event("c", "u", "i1", "click", 5_000)])]
        [('i1', 1.0)]
        >>> [(e.event.item_id, e.label, e.source) for e in j.push([Event("x", "v", "i9", "impression", 61_000)])]
        [('i2', 0.0, 'window_closed')]
    """

    def __init__(self, config: JoinerConfig | None = None) -> None:
        self.config = config or JoinerConfig()
        self.stats = JoinerStats()
        self._reserve()
        _compiled()

    def _reserve(self) -> None:
        n = self.config.max_pending
        self._open = _PairTable(n)
        self._time = np.ones(n, dtype=np.int64)
        self._position = np.full(n, -1, dtype=np.int32)
        self._value = np.full(n, np.nan)
        # the strings of an open impression: the event's own objects (ids are interned)
        self._users: list[str | None] = [None] * n
        self._items: list[str | None] = [None] * n
        self._requests: list[str | None] = [None] * n
        self._event_ids: list[str | None] = [None] * n  # None: "<request_id>:<position>"
        self._contexts: list[Mapping[str, str] | None] = [None] * n
        self._closed = _PairTable(self.config.max_closed)
        self._positive = np.zeros(self.config.max_closed, dtype=np.bool_)
        self._state = np.zeros(4, dtype=np.int64)  # watermark, duplicate actions, duplicate impressions, expiring

    @property
    def watermark_ms(self) -> int:
        """The latest event time seen."""
        return int(self._state[0])

    @property
    def pending(self) -> int:
        """Impressions waiting for an action."""
        return len(self._open)

    @property
    def closed(self) -> int:
        """Closed impressions remembered to recognise late actions."""
        return len(self._closed)

    def push(self, events: list[Event]) -> list[Example]:
        """Add events (in log order); return the examples they complete, in order."""
        out: list[Example] = []
        if not events:
            return out
        pairs = _pair_keys((e.user_id, e.item_id) for e in events)
        times = np.fromiter((e.timestamp_ms for e in events), dtype=np.int64, count=len(events))
        kinds = np.fromiter((_kind(e) for e in events), dtype=np.int8, count=len(events))
        shown = kinds == _IMPRESSION
        positions = np.full(len(events), -1, dtype=np.int32)
        values = np.full(len(events), np.nan)
        for at in np.flatnonzero(shown).tolist():
            event = events[at]
            if event.position is not None:
                positions[at] = event.position
            if event.value is not None:
                values[at] = event.value
        kinds_of_log = (np.int8, np.int32, np.int32, np.int8, np.int64, np.int32, np.float64)
        log = tuple(np.empty(2 * len(events) + 256, dtype=t) for t in kinds_of_log)
        batch, numbers = (pairs, times, kinds, positions, values), (self._time, self._position, self._value)
        window_ms = int(self.config.window_s * 1000)
        done, o, c = 0, self._open, self._closed
        before = self._state[1:3].copy()
        while done < len(events):
            done, n_ops = _join(done, batch, window_ms, self._state, o.arrays, numbers, c.arrays, self._positive, log)
            kind, index, rows, sources, times_ms, at_positions, at_values = (a[:n_ops].tolist() for a in log)
            self._replay(events, kind, index, rows, sources, times_ms, at_positions, at_values, out)
        self.stats.duplicate_actions += int(self._state[1] - before[0])
        self.stats.duplicate_impressions += int(self._state[2] - before[1])
        return out

    def _replay(
        self,
        events: list[Event],
        kinds: list[int],
        index: list[int],
        rows: list[int],
        sources: list[int],
        times: list[int],
        positions: list[int],
        values: list[float],
        out: list[Example],
    ) -> None:
        """Carry out the kernel's log in order: an impression's strings stored in its row, or
        an example emitted (of a row's impression, or of the event itself)."""
        counts = self.stats.examples
        for kind, at, row, source, time_ms, position, value in zip(
            kinds, index, rows, sources, times, positions, values, strict=True
        ):
            event = events[at]
            if kind == _STORE:
                self._store_strings(row, event)
                continue
            if kind == _EMIT_ROW:
                label = 1.0 if source == _JOINED and event.is_positive else 0.0
                example = Example(self._impression(row, time_ms, position, value), label, SOURCES[source])
                self._release(row)
            else:
                example = Example(event, 1.0 if event.is_positive else 0.0, SOURCES[source])
            counts[example.source] += 1
            out.append(example)

    def _store_strings(self, row: int, event: Event) -> None:
        """Keep an open impression's strings in `row` (its event id only when it is not
        `<request_id>:<position>`, which `_impression` rebuilds)."""
        self._users[row], self._items[row] = event.user_id, event.item_id
        self._requests[row], self._contexts[row] = event.request_id, event.context
        rebuilt = event.position is not None and event.event_id == f"{event.request_id}:{event.position}"
        self._event_ids[row] = None if rebuilt else event.event_id

    def _release(self, row: int) -> None:
        """Drop a closed or forgotten impression's references to its strings."""
        self._users[row] = self._items[row] = self._requests[row] = self._event_ids[row] = self._contexts[row] = None

    def _impression(self, row: int, time_ms: int, position: int, value: float) -> Event:
        """The impression that waited in `row` (its numbers from the log), as an event again."""
        request_id = self._requests[row] or ""
        return Event(
            event_id=self._event_ids[row] or f"{request_id}:{position}",
            user_id=self._users[row] or "",
            item_id=self._items[row] or "",
            type="impression",
            timestamp_ms=time_ms,
            request_id=request_id,
            value=None if value != value else value,  # NaN: none
            context=self._contexts[row] or {},
            position=None if position < 0 else position,
        )

    def forget_user(self, user_id: str) -> int:
        """Drop a user's open impressions (erasure); how many there were. Closed ones are kept
        only as keys of (user, item) pairs, which no longer name the user once the items do not."""
        o = self._open
        mine = [row for row in o.rows_oldest_first().tolist() if self._users[row] == user_id]
        for row in mine:
            _remove(o.arrays, row)
            self._release(row)
        return len(mine)

    def __getstate__(self) -> dict[str, Any]:
        """What a checkpoint keeps: the open impressions (oldest first) and the closed pairs,
        not the reserved tables (their size is the config's; a checkpoint stays small)."""
        rows = self._open.rows_oldest_first()
        closed = self._closed.rows_oldest_first()
        return {
            "config": self.config,
            "stats": self.stats,
            "state": self._state.copy(),
            "open": {
                "pairs": self._open.row_key[rows],
                "time": self._time[rows],
                "position": self._position[rows],
                "value": self._value[rows],
                "strings": [
                    (self._users[r], self._items[r], self._requests[r], self._event_ids[r], self._contexts[r])
                    for r in rows.tolist()
                ],
            },
            "closed": {"pairs": self._closed.row_key[closed], "positive": self._positive[closed]},
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Rebuild from `__getstate__`, or from a joiner pickled by an older version (an
        OrderedDict of pending events and a dict of closed pairs)."""
        self.config, self.stats = state["config"], state["stats"]
        self._reserve()
        if "open" not in state:  # an older checkpoint
            self._state[0] = state.get("watermark_ms", 0)
            closed = state.get("_closed") or {}
            pairs = [_pair(k) if isinstance(k, tuple) else k for k in closed]
            self._restore_closed(np.array(pairs, dtype=np.uint64), np.array(list(closed.values()), dtype=bool))
            for event in state.get("_pending", {}).values():
                row = self._restore_open(_pair((event.user_id, event.item_id)))
                self._time[row] = event.timestamp_ms
                self._position[row] = -1 if event.position is None else event.position
                self._value[row] = np.nan if event.value is None else event.value
                self._store_strings(row, event)
            return
        self._state[:] = state["state"]
        self._restore_closed(state["closed"]["pairs"], state["closed"]["positive"])
        o = state["open"]
        for n, strings in enumerate(o["strings"]):
            row = self._restore_open(int(o["pairs"][n]))
            self._time[row], self._position[row], self._value[row] = o["time"][n], o["position"][n], o["value"][n]
            self._users[row], self._items[row], self._requests[row], self._event_ids[row], self._contexts[row] = strings

    def _restore_closed(self, pairs: np.ndarray, positive: np.ndarray) -> None:
        c = self._closed
        last = slice(-self.config.max_closed, None)
        for key, is_positive in zip(pairs[last].tolist(), positive[last].tolist(), strict=True):
            _remember(c.arrays, self._positive, np.uint64(key), bool(is_positive), self.config.max_closed)

    def _restore_open(self, key: int) -> int:
        """A row for a checkpoint's open impression, as the newest (the caller fills it)."""
        if len(self._open) == self.config.max_pending:  # a smaller bound than the checkpoint's
            oldest = int(self._open.meta[_OLDEST])
            _remove(self._open.arrays, oldest)
            self._release(oldest)
        return int(_add(self._open.arrays, np.uint64(key)))


@functools.cache
def _compiled() -> None:
    """Run the kernels once, on a joiner of their own: compiling them (seconds, the first time
    on a machine; numba caches them after) happens when a trainer is made, not in the middle of
    its first step while the process serves."""
    warm = Joiner.__new__(Joiner)
    warm.config, warm.stats = JoinerConfig(max_pending=1, max_closed=1), JoinerStats()
    warm._reserve()
    warm.push(
        [Event("a", "u", "i", "impression", 1), Event("b", "u", "i", "click", 2), Event("c", "u", "j", "dwell", 3)]
    )
    warm.forget_user("u")
    pickle_state = warm.__getstate__()
    warm.__setstate__(pickle_state)


def _kind(event: Event) -> int:
    if event.type == "impression":
        return _IMPRESSION
    if event.is_positive:
        return _POSITIVE
    return _SKIP if event.type == "skip" else _OTHER


def _pair_keys(pairs: Iterable[tuple[str, str]]) -> np.ndarray:
    """uint64 keys of (user, item) pairs (the unit separator keeps "a"+"bc" from "ab"+"c")."""
    return feature_keys("joined", [f"{user}\x1f{item}" for user, item in pairs])


def _pair(key: tuple[str, str]) -> int:
    """The 64-bit key of one (user, item) pair."""
    return int(_pair_keys([key])[0])
