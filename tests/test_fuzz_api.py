"""schemathesis against the gateway's own OpenAPI spec, on a running node with a trained model:
valid and invalid requests for every operation (a bounded number each), never a 5xx, never
a stack trace in a response."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import get_args

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.core.result import Ok
from schemathesis.generation import GenerationMode

from services.gateway.rest import EventBody
from services.node import Node
from tests.nodes import rest, running_node, wait_trained_and_served
from trainer.events import EVENT_TYPES, Event

EXAMPLES = 100  # per operation and mode


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    with running_node() as n:
        events = [
            {"event_id": f"fz{n}", "user_id": f"u{n % 7}", "item_id": f"i{n % 11}", "type": "click", "timestamp_ms": n}
            for n in range(200)
        ]
        with rest(n) as client:
            assert client.post("/v1/events", json={"events": events}).status_code == 200
        wait_trained_and_served(n, 200)
        yield n


def test_the_documented_event_is_the_validated_one() -> None:
    assert set(get_args(EventBody.model_fields["type"].annotation)) == EVENT_TYPES
    documented = set(EventBody.model_fields)
    assert documented == {f.name for f in dataclasses.fields(Event)}


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_request_gets_a_server_error(node: Node, mode: GenerationMode) -> None:
    base = f"http://127.0.0.1:{node.http_port}"
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    seen: dict[str, set[int]] = {}
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # the spec itself is valid
        operation = result.ok()

        @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case: schemathesis.Case) -> None:
            response = case.call(base_url=base, timeout=10)
            what = f"{case.method} {case.formatted_path} {case.body!r:.200} -> {response.status_code}"
            assert response.status_code < 500, f"{what}: {response.text[:300]}"
            assert "Traceback" not in response.text, what
            seen.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)

        try:
            check()
        except Unsatisfiable:  # an operation without inputs has no invalid form (GET /healthz)
            assert mode == GenerationMode.NEGATIVE and not list(operation.iter_parameters()), operation.label
    # every operation was exercised (the three with inputs, in negative mode)
    assert len(seen) >= (6 if mode == GenerationMode.POSITIVE else 3), seen
    if mode == GenerationMode.NEGATIVE:  # invalid input was refused as such somewhere
        assert any(code in (400, 404, 405, 413, 422) for codes in seen.values() for code in codes), seen
