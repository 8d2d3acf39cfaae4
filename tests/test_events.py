import math

import pytest

from trainer.events import Event, InvalidEvent, parse_event

GOOD = {"event_id": "e1", "user_id": "u1", "item_id": "i1", "type": "click", "timestamp_ms": 1_700_000_000_000}


def test_good_event_round_trips_through_json() -> None:
    event = parse_event({**GOOD, "value": 4, "context": {"device": "ios"}, "request_id": "r1"})
    assert Event.from_json(event.to_json()) == event
    assert event.value == 4.0 and event.is_positive


def test_integer_ids_are_accepted_as_strings() -> None:
    assert parse_event({**GOOD, "user_id": 42}).user_id == "42"


def test_missing_timestamp_defaults_to_now() -> None:
    raw = dict(GOOD)
    del raw["timestamp_ms"]
    assert parse_event(raw, now_ms=123).timestamp_ms == 123


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"event_id": ""}, "event_id"),
        ({"user_id": None}, "user_id"),
        ({"user_id": ["x"]}, "user_id"),
        ({"user_id": True}, "user_id"),
        ({"item_id": "x" * 300}, "item_id"),
        ({"item_id": "a\x00b"}, "item_id"),
        ({"type": "clik"}, "type"),
        ({"type": None}, "type"),
        ({"timestamp_ms": "yesterday"}, "timestamp_ms"),
        ({"timestamp_ms": -5}, "timestamp_ms"),
        ({"timestamp_ms": 1.5}, "timestamp_ms"),
        ({"value": math.nan}, "value"),
        ({"value": math.inf}, "value"),
        ({"value": 1e300}, "value"),
        ({"value": "five"}, "value"),
        ({"type": "rating"}, "value"),
        ({"context": {"device": 3}}, "context.device"),
        ({"context": "ios"}, "context"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_field_is_named(change: dict, field: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        parse_event({**GOOD, **change})
    assert info.value.field == field
    assert info.value.message


def test_non_object_and_non_json_are_rejected() -> None:
    with pytest.raises(InvalidEvent):
        parse_event(["not", "an", "object"])
    with pytest.raises(InvalidEvent):
        Event.from_json(b"\xff\xfe not json")


def test_decoded_events_share_their_ids_and_an_empty_context() -> None:
    """Hundreds of thousands of events wait in the joiner's window: the same user or item id
    decoded twice is one string, events without context share one empty mapping, and an event
    with a context keeps its own."""
    raw = [
        Event(f"e{n}", "".join(["u", "7"]), "".join(["i", "3"]), "impression", 1).to_json() for n in range(2)
    ]  # ids built at run time: distinct string objects before decoding
    a, b = (Event.from_json(r) for r in raw)
    assert a.user_id is b.user_id and a.item_id is b.item_id
    assert a.context is b.context and dict(a.context) == {}
    with_context = parse_event(
        {"event_id": "c", "user_id": "u", "item_id": "i", "type": "click", "context": {"p": "x"}}
    )
    assert dict(with_context.context) == {"p": "x"} and with_context.context is not a.context
