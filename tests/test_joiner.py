"""The joiner: positives, negatives when the window closes, late actions, bounded memory."""

from __future__ import annotations

import gc
import pickle
import tracemalloc
from collections import OrderedDict

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.events import Event, served_events, served_record
from trainer.joiner import Joiner, JoinerConfig, JoinerStats, _add, _find, _pair, _PairTable, _remove

S = 1000  # ms per second


def shown(user: str, item: str, t_s: float, request: str = "r1") -> Event:
    return Event(f"imp-{user}-{item}-{t_s}", user, item, "impression", int(t_s * S), request_id=request)


def act(kind: str, user: str, item: str, t_s: float) -> Event:
    return Event(f"{kind}-{user}-{item}-{t_s}", user, item, kind, int(t_s * S))


def labels(examples: list) -> list[tuple[str, str, float, str]]:
    return [(e.event.user_id, e.event.item_id, e.label, e.source) for e in examples]


def test_a_click_inside_the_window_is_a_positive_at_once() -> None:
    j = Joiner(JoinerConfig(window_s=60))
    out = j.push([shown("u", "a", 0), shown("u", "b", 0), act("click", "u", "a", 10)])
    assert labels(out) == [("u", "a", 1.0, "joined")]
    assert out[0].event.type == "impression" and out[0].event.request_id == "r1"
    assert j.pending == 1


def test_impressions_without_action_become_negatives_when_the_window_closes() -> None:
    j = Joiner(JoinerConfig(window_s=60))
    assert j.push([shown("u", "a", 0), shown("u", "b", 30)]) == []
    assert labels(j.push([act("click", "v", "z", 61)])) == [
        ("u", "a", 0.0, "window_closed"),
        ("v", "z", 1.0, "unjoined"),
    ]
    assert labels(j.push([act("click", "v", "y", 91)])) == [
        ("u", "b", 0.0, "window_closed"),
        ("v", "y", 1.0, "unjoined"),
    ]
    assert j.pending == 0


def test_skip_is_a_negative_at_once_and_a_second_action_labels_nothing() -> None:
    j = Joiner(JoinerConfig(window_s=60))
    out = j.push([shown("u", "a", 0), act("skip", "u", "a", 1), act("like", "u", "c", 2)])
    assert labels(out) == [("u", "a", 0.0, "joined"), ("u", "c", 1.0, "unjoined")]
    j.push([shown("u", "b", 3), act("click", "u", "b", 4)])
    assert j.push([act("like", "u", "b", 5)]) == []  # b already has its positive
    assert j.stats.duplicate_actions == 1


def test_late_click_after_the_window_still_becomes_one_positive() -> None:
    j = Joiner(JoinerConfig(window_s=60))
    j.push([shown("u", "a", 0)])
    assert labels(j.push([act("click", "w", "x", 100)]))[0] == ("u", "a", 0.0, "window_closed")
    assert labels(j.push([act("click", "u", "a", 120)])) == [("u", "a", 1.0, "late")]
    assert j.push([act("click", "u", "a", 121)]) == []  # only one late positive per impression
    assert j.stats.examples["late"] == 1


def test_memory_is_bounded_and_overflow_closes_the_oldest_as_negatives() -> None:
    j = Joiner(JoinerConfig(window_s=3600, max_pending=100, max_closed=50))
    out = j.push([shown("u", f"i{n}", n) for n in range(250)])
    assert j.pending == 100
    assert len(out) == 150 and all(e.source == "forced_close" and e.label == 0.0 for e in out)
    assert [e.event.item_id for e in out[:3]] == ["i0", "i1", "i2"]  # oldest first
    assert j.closed == 50
    # a click on an impression closed so long ago that it was forgotten is an unjoined positive
    assert labels(j.push([act("click", "u", "i0", 300)])) == [("u", "i0", 1.0, "unjoined")]


events_st = st.lists(
    st.tuples(
        st.sampled_from(["impression", "click", "skip"]),
        st.sampled_from(["u1", "u2"]),
        st.sampled_from(["a", "b", "c"]),
        st.integers(0, 30),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(steps=events_st, window=st.sampled_from([5, 20]), max_pending=st.sampled_from([1, 2, 100]))
def test_every_impression_gets_exactly_one_label_and_bounds_hold(steps: list, window: int, max_pending: int) -> None:
    j = Joiner(JoinerConfig(window_s=window, max_pending=max_pending))
    t = 0
    out = []
    for kind, user, item, dt in steps:
        t += dt
        ev = Event(f"{kind}{t}{user}{item}", user, item, kind, t * S, request_id="r" if kind == "impression" else "")
        out += j.push([ev])
        assert j.pending <= max_pending
    out += j.push([Event("end", "z", "z", "click", (t + 10 * window) * S)])  # close every window
    assert j.pending == 0
    impressions = sum(kind == "impression" for kind, *_ in steps)
    labelled_impressions = [e for e in out if e.event.type == "impression"]
    assert len(labelled_impressions) == impressions - j.stats.duplicate_impressions
    # an action labels at most one example: joined/late ones come from an impression's key
    actions = sum(kind != "impression" for kind, *_ in steps) + 1
    assert (
        len(out) - len(labelled_impressions) + j.stats.duplicate_actions + sum(e.source == "joined" for e in out)
        == actions
    )


def test_a_joiner_from_an_older_checkpoint_still_recognises_late_actions() -> None:
    """Joiners were pickled as their attributes: pending events in an OrderedDict, closed pairs
    in a dict (as string pairs before that): both still restore."""
    pairs = {("u", "a"): False, ("u", "b"): True}
    state = {
        "config": JoinerConfig(window_s=60),
        "_pending": OrderedDict({("u", "c"): shown("u", "c", 5)}),
        "watermark_ms": 5 * S,
        "stats": JoinerStats(),
    }
    for closed in (pairs, {_pair(k): v for k, v in pairs.items()}):
        j = Joiner.__new__(Joiner)
        j.__setstate__({**state, "_closed": closed})
        assert (j.pending, j.closed, j.watermark_ms) == (1, 2, 5 * S)
        assert labels(j.push([act("click", "u", "a", 10)])) == [("u", "a", 1.0, "late")]
        assert j.push([act("click", "u", "b", 11)]) == []  # already a positive
        assert labels(j.push([act("click", "u", "c", 12)])) == [("u", "c", 1.0, "joined")]


class ReferenceJoiner:
    """The joiner as it was written first (an OrderedDict of pending events, a dict of closed
    pairs): the compact one must label every stream exactly as this does."""

    def __init__(self, config: JoinerConfig) -> None:
        self.config = config
        self.pending: OrderedDict[tuple[str, str], Event] = OrderedDict()
        self.closed: dict[tuple[str, str], bool] = {}
        self.watermark_ms = 0

    def push(self, events: list[Event]) -> list[tuple[Event, float, str]]:
        out: list[tuple[Event, float, str]] = []
        for event in events:
            if event.timestamp_ms > self.watermark_ms:
                self.watermark_ms = event.timestamp_ms
                horizon = self.watermark_ms - int(self.config.window_s * 1000)
                while self.pending and next(iter(self.pending.values())).timestamp_ms < horizon:
                    _, oldest = self.pending.popitem(last=False)
                    self._close(oldest, "window_closed", out)
            key = (event.user_id, event.item_id)
            if event.type == "impression":
                if key in self.pending:
                    continue
                self.closed.pop(key, None)
                self.pending[key] = event
                if len(self.pending) > self.config.max_pending:
                    _, oldest = self.pending.popitem(last=False)
                    self._close(oldest, "forced_close", out)
            elif event.is_positive or event.type == "skip":
                label = 1.0 if event.is_positive else 0.0
                if (impression := self.pending.pop(key, None)) is not None:
                    out.append((impression, label, "joined"))
                    self._remember(key, bool(label))
                elif (closed := self.closed.get(key)) is not None:
                    if label and not closed:
                        out.append((event, label, "late"))
                        self._remember(key, True)
                else:
                    out.append((event, label, "unjoined"))
        return out

    def _close(self, impression: Event, source: str, out: list[tuple[Event, float, str]]) -> None:
        out.append((impression, 0.0, source))
        self._remember((impression.user_id, impression.item_id), False)

    def _remember(self, key: tuple[str, str], positive: bool) -> None:
        self.closed.pop(key, None)
        self.closed[key] = positive
        while len(self.closed) > self.config.max_closed:
            del self.closed[next(iter(self.closed))]


stream_st = st.lists(
    st.tuples(
        st.sampled_from(["impression", "impression", "click", "skip", "dwell", "rating"]),
        st.sampled_from(["u1", "u2", "u3"]),
        st.sampled_from(["a", "b", "c", "d"]),
        st.integers(0, 12),  # seconds after the event before
        st.booleans(),  # an impression written back (id `<request>:<position>`) or a client's own
        st.integers(0, 3),  # the batch it arrives in
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(
    steps=stream_st,
    window=st.sampled_from([5, 20]),
    max_pending=st.sampled_from([1, 2, 3, 100]),
    max_closed=st.sampled_from([1, 2, 100]),
    pickle_at=st.integers(0, 3),
)
def test_labels_exactly_as_the_reference_joiner_does(
    steps: list, window: int, max_pending: int, max_closed: int, pickle_at: int
) -> None:
    config = JoinerConfig(window_s=window, max_pending=max_pending, max_closed=max_closed)
    j, ref = Joiner(config), ReferenceJoiner(config)
    t = 0
    batches: list[list[Event]] = [[] for _ in range(4)]
    for n, (kind, user, item, dt, served, batch) in enumerate(steps):
        t += dt * S
        request = f"r{n % 3}" if kind == "impression" else ""
        event_id = f"{request}:{n % 5}" if kind == "impression" and served else f"e{n}"
        value = 4.0 if kind in ("rating", "dwell") else None
        context = {"page": "home"} if n % 4 == 0 else {}
        position = n % 5 if kind == "impression" and (served or n % 2) else None
        batches[batch].append(Event(event_id, user, item, kind, t, request, value, context, position))
    got, want = [], []
    for b, events in enumerate(batches):
        if b == pickle_at:  # a checkpoint and a restart between two batches
            j = pickle.loads(pickle.dumps(j))
        got += [(x.event, x.label, x.source) for x in j.push(events)]
        want += ref.push(events)
        assert (j.pending, j.closed) == (len(ref.pending), len(ref.closed))
    assert got == want
    assert sum(j.stats.examples.values()) == len(want)


def test_forget_user_drops_only_that_users_open_impressions() -> None:
    j = Joiner(JoinerConfig(window_s=60))
    j.push([shown("u", "a", 0), shown("v", "a", 1), shown("u", "b", 2)])
    assert j.forget_user("u") == 2 and j.pending == 1
    assert labels(j.push([act("click", "u", "a", 3), act("click", "v", "a", 4)])) == [
        ("u", "a", 1.0, "unjoined"),  # its impression is gone: nothing to join to
        ("v", "a", 1.0, "joined"),
    ]
    assert j.forget_user("u") == 0


def test_the_window_is_reserved_at_start_and_holds_no_event_objects() -> None:
    """Filling the window allocates nothing per impression: its tables were made with the
    joiner, and an open impression holds references to its event's strings, not the event."""
    Joiner(JoinerConfig(max_pending=16, max_closed=16)).push([shown("u", "a", 0)])  # kernel loaded
    j = Joiner(JoinerConfig(window_s=3600, max_pending=50_000, max_closed=50_000))
    records = [served_record(f"u{n}", f"req-{n:08d}", [f"i{(n + k) % 300}" for k in range(10)], 1) for n in range(4000)]
    events = [e for r in records for e in served_events(r)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for at in range(0, len(events), 512):
            j.push(events[at : at + 512])
        del events
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert j.pending == 40_000
    assert held < 2 * 40_000, f"{held / 40_000:.0f} bytes an impression"  # was ~360 with events kept
    [example] = j.push([act("click", "u7", "i10", 2)])  # and each one is whole again when it closes
    assert (example.event.event_id, example.event.position, example.event.request_id) == (
        "req-00000007:3",
        3,
        "req-00000007",
    )


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 11), st.integers(0, 3)), max_size=80))
def test_the_pair_table_finds_every_key_after_any_adds_and_removes(ops: list) -> None:
    """Keys crowded onto a few home slots (their low bits), so probe runs wrap around the end of
    the slots and deletions must shift the keys behind them back; the table is checked against
    a plain dict, in insertion order, after every operation."""
    table = _PairTable(8)  # 16 slots
    model: dict[int, int] = {}
    for add, home, high in ops:
        key = np.uint64((home if home < 8 else home + 5) % 16 + 16 * high)  # homes 13-15 and 0-7
        row = _find(table.slot_key, table.slot_row, key)
        if add and row < 0 and len(model) < 8:
            model[int(key)] = _add(table.arrays, key)
        elif not add and row >= 0:
            _remove(table.arrays, row)
            del model[int(key)]
        for k, r in model.items():
            assert _find(table.slot_key, table.slot_row, np.uint64(k)) == r
        assert table.rows_oldest_first().tolist() == list(model.values())
        assert int((table.slot_row >= 0).sum()) == len(table) == len(model)
