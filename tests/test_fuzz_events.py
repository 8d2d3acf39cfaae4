"""Property tests of ingestion: every field of an event given every JSON type (REST) or any
value its protobuf type can hold (gRPC), between two good events. Never a server error, the
good events always accepted, a bad event rejected naming a field of its own."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto import freshrec_pb2 as pb
from proto import freshrec_pb2_grpc as pb_grpc
from services.node import Node
from tests.nodes import rest, running_node

FIELDS = ("event_id", "user_id", "item_id", "type", "timestamp_ms", "request_id", "value", "context")
EXAMPLES = 300

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.floats(allow_nan=False, allow_infinity=False)  # not JSON: the literals have a test of their own
    | st.text(max_size=300),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=8,
)


def good(n: int) -> dict[str, Any]:
    return {
        "event_id": f"g{n}",
        "user_id": "u",
        "item_id": "i",
        "type": "click",
        "timestamp_ms": int(time.time() * 1000),
    }


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    with running_node() as n:
        yield n


@pytest.fixture(scope="module")
def client(node: Node) -> Iterator[httpx.Client]:
    with rest(node) as c:
        yield c


@pytest.fixture(scope="module")
def stub(node: Node) -> Iterator[pb_grpc.GatewayStub]:
    with grpc.insecure_channel(f"127.0.0.1:{node.grpc_port}") as channel:
        yield pb_grpc.GatewayStub(channel)


@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(field=st.sampled_from(FIELDS), value=json_values, drop=st.booleans(), counter=st.integers(0, 10**9))
def test_rest_any_json_in_any_field(client: httpx.Client, field: str, value: Any, drop: bool, counter: int) -> None:
    odd = {**good(counter), "event_id": f"odd-{counter}"}
    if drop and field in odd:
        del odd[field]
    else:
        odd[field] = value
    batch = [good(2 * counter), odd, good(2 * counter + 1)]
    reply = client.post("/v1/events", json={"events": batch})
    assert reply.status_code == 200, (odd, reply.status_code, reply.text[:300])
    results = reply.json()["results"]
    assert results[0]["status"] == results[2]["status"] == "accepted", results
    if results[1]["status"] == "rejected":
        assert results[1]["error"]["field"].startswith("events[1]"), results[1]
        assert results[1]["error"]["message"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999", "[" * 200 + "]" * 200])
def test_rest_non_json_numbers_and_deep_nesting(client: httpx.Client, literal: str) -> None:
    odd = '{"event_id": "x", "user_id": "u", "item_id": "i", "type": "rating", "value": ' + literal + "}"
    body = '{"events": [' + odd + ", " + json.dumps(good(1)) + "]}"
    reply = client.post("/v1/events", content=body, headers={"content-type": "application/json"})
    assert reply.status_code < 500, reply.text
    if reply.status_code == 200:
        assert reply.json()["results"][1]["status"] == "accepted"


texts = st.text(max_size=300) | st.sampled_from(["", " ", "click", "rating", "\x00", "a" * 257])
int64s = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1) | st.sampled_from([0, (1 << 53) - 1, 1 << 53])


@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    event_id=texts,
    user_id=texts,
    item_id=texts,
    kind=texts,
    timestamp_ms=int64s,
    request_id=texts,
    value=st.none() | st.floats(),
    context=st.dictionaries(texts, texts, max_size=70),
    counter=st.integers(0, 10**9),
)
def test_grpc_any_value_in_any_field(
    stub: pb_grpc.GatewayStub,
    event_id: str,
    user_id: str,
    item_id: str,
    kind: str,
    timestamp_ms: int,
    request_id: str,
    value: float | None,
    context: dict[str, str],
    counter: int,
) -> None:
    odd = pb.Event(
        event_id=event_id,
        user_id=user_id,
        item_id=item_id,
        type=kind,
        timestamp_ms=timestamp_ms,
        request_id=request_id,
        context=context,
    )
    if value is not None:
        odd.value = value
    first, last = (pb.Event(**good(2 * counter + k)) for k in (0, 1))
    reply = stub.Ingest(pb.IngestRequest(events=[first, odd, last]), timeout=10)
    assert reply.results[0].accepted and reply.results[2].accepted, reply
    if not reply.results[1].accepted:
        assert reply.results[1].error.field.startswith("events[1]"), reply.results[1]
    elif value is not None:
        assert math.isfinite(value)
