"""The gateway's REST and gRPC edges on a running embedded node."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from embedding_store import feature_keys
from proto import freshrec_pb2 as pb
from proto import freshrec_pb2_grpc as pb_grpc
from services.node import Node
from tests.local_servers import wait_until
from tests.nodes import rest, running_node, wait_trained_and_served


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    with running_node() as n:
        yield n


@pytest.fixture(scope="module")
def stub(node: Node) -> Iterator[pb_grpc.GatewayStub]:
    with grpc.insecure_channel(f"127.0.0.1:{node.grpc_port}") as channel:
        yield pb_grpc.GatewayStub(channel)


def event(n: int, user: str, **change: object) -> dict:
    return {
        "event_id": f"gw-{user}-{n}",
        "user_id": user,
        "item_id": f"item-{n}",
        "type": "click",
        "timestamp_ms": 1_700_000_000_000 + n,
        **change,
    }


def users_in_table(node: Node, users: list[str]) -> list[bool]:
    assert node.trainer is not None
    _, found = node.trainer.users.get(feature_keys("user", users))
    return [bool(f) for f in found]


def test_rest_batch_with_one_bad_event_keeps_the_good_ones(node: Node) -> None:
    assert node.trainer is not None
    trained_before = node.trainer.events_trained
    batch = [event(1, "rest-a"), event(2, "rest-bad", type="clik"), event(3, "rest-c")]
    with rest(node) as client:
        r = client.post("/v1/events", json={"events": batch})
    assert r.status_code == 200
    body = r.json()
    assert (body["accepted"], body["rejected"]) == (2, 1)
    assert [x["status"] for x in body["results"]] == ["accepted", "rejected", "accepted"]
    error = body["results"][1]["error"]
    assert error["field"] == "events[1].type" and "clik" in error["message"]
    wait_trained_and_served(node, trained_before + 2)
    assert users_in_table(node, ["rest-a", "rest-bad", "rest-c"]) == [True, False, True]


def test_grpc_batch_with_one_bad_event_keeps_the_good_ones(node: Node, stub: pb_grpc.GatewayStub) -> None:
    assert node.trainer is not None
    trained_before = node.trainer.events_trained
    reply = stub.Ingest(
        pb.IngestRequest(
            events=[
                pb.Event(**event(1, "grpc-a")),
                pb.Event(**event(2, "")),
                pb.Event(**event(3, "grpc-c", type="rating", value=4.5)),
            ]
        )
    )
    assert (reply.accepted, reply.rejected) == (2, 1)
    assert [r.accepted for r in reply.results] == [True, False, True]
    assert reply.results[1].error.field == "events[1].user_id"
    wait_trained_and_served(node, trained_before + 2)
    assert users_in_table(node, ["grpc-a", "grpc-c"]) == [True, True]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"events": []}, "events"),
        ({"events": [event(1, "x", type="nope")]}, "events[0].type"),
        ({"evnts": []}, "events"),
        ({"events": "many"}, "events"),
    ],
)
def test_rest_rejects_unusable_batches_with_4xx(node: Node, body: dict, needle: str) -> None:
    with rest(node) as client:
        r = client.post("/v1/events", json=body)
    assert r.status_code == 422
    assert needle in r.json()["error"]["message"]


def test_rest_rejects_oversized_batches_and_non_json(node: Node) -> None:
    with rest(node) as client:
        too_many = client.post("/v1/events", json={"events": [event(i, "big") for i in range(1001)]})
        not_json = client.post("/v1/events", content=b"\xff{", headers={"content-type": "application/json"})
    assert too_many.status_code == 422 and "at most 1000" in too_many.json()["error"]["message"]
    assert not_json.status_code == 400 and "parsing the body" in not_json.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"user_id": "", "k": 5}, "user_id"),
        ({"user_id": "u", "k": 0}, "k"),
        ({"user_id": "u", "k": 100000}, "k"),
        ({"k": 5}, "user_id"),
    ],
)
def test_recommend_validation(node: Node, stub: pb_grpc.GatewayStub, body: dict, needle: str) -> None:
    with rest(node) as client:
        r = client.post("/v1/recommendations", json=body)
    assert r.status_code == 422 and needle in r.json()["error"]["message"]
    if body.get("k") != 0:  # k=0 over gRPC means "server default", as proto3 cannot tell it from unset
        with pytest.raises(grpc.RpcError) as info:
            stub.Recommend(pb.RecommendRequest(user_id=body.get("user_id", ""), k=body["k"]))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in (info.value.details() or "")


def test_a_filter_excludes_items_and_still_fills_k(node: Node, stub: pb_grpc.GatewayStub) -> None:
    assert node.trainer is not None
    before = node.trainer.events_trained
    events = [event(n, f"flt-{n % 4}", item_id=f"flt-item-{n % 12}") for n in range(48)]
    with rest(node) as client:
        client.post("/v1/events", json={"events": events})
        wait_trained_and_served(node, before + len(events))
        first = [
            i["item_id"] for i in client.post("/v1/recommendations", json={"user_id": "flt-0", "k": 6}).json()["items"]
        ]
        body = {"user_id": "flt-0", "k": 6, "filter": {"exclude_items": first[:3]}}
        filtered = [i["item_id"] for i in client.post("/v1/recommendations", json=body).json()["items"]]
        unknown = client.post("/v1/recommendations", json={"user_id": "u", "filter": {"colour": ["x"]}})
        empty_id = client.post("/v1/recommendations", json={"user_id": "u", "filter": {"exclude_items": ["a", ""]}})
    assert len(first) == 6 and len(filtered) == 6  # k items, none of the excluded
    assert not set(first[:3]) & set(filtered)
    grpc_items = stub.Recommend(
        pb.RecommendRequest(user_id="flt-0", k=6, filter=pb.Filter(exclude_items=first[:3]))
    ).items
    assert len(grpc_items) == 6 and not set(first[:3]) & {i.item_id for i in grpc_items}
    assert unknown.status_code == 422 and "colour" in unknown.json()["error"]["message"]
    assert empty_id.status_code == 422 and "filter.exclude_items[1]" in empty_id.json()["error"]["message"]
    with pytest.raises(grpc.RpcError) as info:
        stub.Recommend(pb.RecommendRequest(user_id="u", filter=pb.Filter(exclude_items=["x"] * 1001)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "filter.exclude_items" in (
        info.value.details() or ""
    )


def test_similar_items_and_unknown_item(node: Node, stub: pb_grpc.GatewayStub) -> None:
    assert node.trainer is not None
    before = node.trainer.events_trained
    with rest(node) as client:
        client.post("/v1/events", json={"events": [event(n, f"sim-{n % 3}") for n in range(30)]})
        wait_trained_and_served(node, before + 30)
        r = client.get("/v1/items/item-1/similar", params={"k": 5})
        missing = client.get("/v1/items/no-such-item/similar")
    assert r.status_code == 200
    items = [i["item_id"] for i in r.json()["items"]]
    assert len(items) == 5 and "item-1" not in items
    grpc_items = stub.SimilarItems(pb.SimilarItemsRequest(item_id="item-1", k=5)).items
    assert [i.item_id for i in grpc_items] == items
    reasons = [i["reason"] for i in r.json()["items"]]
    assert set(reasons) <= {"covisit", "ann"} and [i.reason for i in grpc_items] == reasons
    assert missing.status_code == 404
    with pytest.raises(grpc.RpcError) as info:
        stub.SimilarItems(pb.SimilarItemsRequest(item_id="no-such-item", k=5))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_items_and_users_whose_ids_contain_a_slash_are_reachable(node: Node) -> None:
    """A client percent-encodes `/` in a path segment (`a%2Fb`); the gateway decodes it and
    routes the whole id, for similar items, the catalogue and users alike."""
    assert node.trainer is not None
    before = node.trainer.events_trained
    slashed = "films/horror/it"
    events = [event(n, f"slash-{n % 3}", item_id=slashed if n % 2 else f"films/{n}") for n in range(30)]
    quoted = "films%2Fhorror%2Fit"
    with rest(node) as client:
        assert client.post("/v1/events", json={"events": events}).json()["accepted"] == 30
        wait_trained_and_served(node, before + 30)
        similar = client.get(f"/v1/items/{quoted}/similar", params={"k": 3})
        assert client.put(f"/v1/items/{quoted}", json={"attributes": {"genre": "horror"}}).status_code == 202
        assert client.put("/v1/users/u%2F1", json={"attributes": {"country": "fr"}}).status_code == 202
        wait_until(lambda: client.get(f"/v1/items/{quoted}").status_code == 200, 10, "the item in the catalogue")
        item = client.get(f"/v1/items/{quoted}").json()
        wait_until(lambda: client.get("/v1/users/u%2F1").status_code == 200, 10, "the user's attributes")
        user = client.get("/v1/users/u%2F1").json()
    assert similar.status_code == 200, similar.text
    assert len(similar.json()["items"]) == 3 and slashed not in [i["item_id"] for i in similar.json()["items"]]
    assert item["item_id"] == slashed and item["attributes"] == {"genre": "horror"}
    assert user["user_id"] == "u/1"


def test_cold_user_gets_popular_items(node: Node, stub: pb_grpc.GatewayStub) -> None:
    assert node.trainer is not None
    before = node.trainer.events_trained
    events = [event(n, f"pop-{n}", item_id="hit") for n in range(20)] + [event(50, "pop-x", item_id="flop")]
    with rest(node) as client:
        client.post("/v1/events", json={"events": events})
        wait_trained_and_served(node, before + len(events))
        r = client.post("/v1/recommendations", json={"user_id": "never-seen", "k": 3}).json()
    assert r["items"][0]["item_id"] == "hit"
    assert len({i["item_id"] for i in r["items"]}) == 3
    assert [i["reason"] for i in r["items"]] == ["trending"] * 3
    grpc_items = stub.Recommend(pb.RecommendRequest(user_id="never-seen", k=3)).items
    assert [(i.item_id, i.reason) for i in grpc_items] == [(i["item_id"], i["reason"]) for i in r["items"]]


def test_health_metrics_readiness_and_reflection(node: Node) -> None:
    with rest(node) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        metrics = client.get("/metrics").text
    assert ready.status_code == 200 and ready.json()["ready"] is True
    for series in (
        "freshrec_requests_total",
        "freshrec_trainer_events_total",
        "freshrec_serving_version",
        "freshrec_events_accepted_total",
        "freshrec_trainer_progressive_auc",
    ):
        assert series in metrics
    with grpc.insecure_channel(f"127.0.0.1:{node.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "freshrec.v1.Gateway"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"freshrec.v1.Gateway", "grpc.health.v1.Health"} <= names


def test_openapi_lists_the_contract(node: Node) -> None:
    with rest(node) as client:
        paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/events", "/v1/recommendations", "/v1/items/{item_id}/similar", "/healthz", "/readyz"} <= set(paths)


def test_exclude_seen_defaults_to_true_on_both_transports(node: Node, stub: pb_grpc.GatewayStub) -> None:
    assert node.trainer is not None
    before = node.trainer.events_trained
    events = [event(n, "seer", item_id=f"seen-{n % 4}") for n in range(12)]
    events += [event(100 + n, f"other-{n}", item_id=f"seen-{n % 4}") for n in range(12)]
    with rest(node) as client:
        client.post("/v1/events", json={"events": events})
        wait_trained_and_served(node, before + len(events))
        default = client.post("/v1/recommendations", json={"user_id": "seer", "k": 50}).json()["items"]
        everything = client.post(
            "/v1/recommendations", json={"user_id": "seer", "k": 50, "exclude_seen": False}
        ).json()["items"]
    seen = {f"seen-{n}" for n in range(4)}
    assert not seen & {i["item_id"] for i in default}
    assert seen <= {i["item_id"] for i in everything}
    grpc_default = stub.Recommend(pb.RecommendRequest(user_id="seer", k=50)).items
    grpc_everything = stub.Recommend(pb.RecommendRequest(user_id="seer", k=50, exclude_seen=False)).items
    assert [i.item_id for i in grpc_default] == [i["item_id"] for i in default]
    assert [i.item_id for i in grpc_everything] == [i["item_id"] for i in everything]


def test_the_spec_declares_the_error_bodies_the_gateway_sends(node: Node) -> None:
    """/openapi.json names `ErrorResponse` for each /v1 error status, and the answers are of
    that shape (not FastAPI's default validation-error body)."""
    with rest(node) as client:
        spec = client.get("/openapi.json").json()
        bad = client.post("/v1/recommendations", json={"user_id": "u1", "k": -1})
        missing = client.get("/v1/items/never-catalogued")
    declared = spec["paths"]["/v1/recommendations"]["post"]["responses"]["422"]["content"]["application/json"]
    assert declared["schema"]["$ref"].endswith("/ErrorResponse")
    assert "HTTPValidationError" not in json.dumps(spec)
    shape = spec["components"]["schemas"]["ErrorDetail"]["required"]
    for answer, status, code in ((bad, 422, "InvalidArgument"), (missing, 404, "NotFound")):
        assert answer.status_code == status, answer.text
        assert set(answer.json()) == {"error"} and set(answer.json()["error"]) == set(shape)
        assert answer.json()["error"]["code"] == code
    assert "k" in bad.json()["error"]["message"]
