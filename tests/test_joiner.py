"""The joiner: positives, negatives when the window closes, late actions, bounded memory."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.events import Event
from trainer.joiner import Joiner, JoinerConfig

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
    import pickle

    old = Joiner(JoinerConfig(window_s=60))
    old._closed = {("u", "a"): False, ("u", "b"): True}  # type: ignore[dict-item]  # pairs as strings
    j = pickle.loads(pickle.dumps(old))
    assert labels(j.push([act("click", "u", "a", 10)])) == [("u", "a", 1.0, "late")]
    assert j.push([act("click", "u", "b", 11)]) == []  # already a positive
    assert j.closed == 2
