"""API keys with scopes, per-key rate limits and body limits at both edges of a running gateway."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest

from proto import freshrec_pb2 as pb
from proto import freshrec_pb2_grpc as pb_grpc
from services.config import load_config
from services.node import Node
from tests.nodes import rest, running_node

INGEST, RECOMMEND, ADMIN = "ingest-secret-1", "recommend-secret-2", "admin-secret-3"
KEYS = f"ingest:{INGEST};recommend:{RECOMMEND};admin:{ADMIN}"
EVENT = {"event_id": "a1", "user_id": "u1", "item_id": "i1", "type": "click", "timestamp_ms": 1_700_000_000_000}


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    with running_node("memory://", "memory://", **{"server.api_keys": KEYS, "server.max_body_bytes": 4096}) as n:
        yield n


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_rest_needs_a_key_with_the_calls_scope(node: Node) -> None:
    with rest(node) as client:
        events, recommend = {"events": [EVENT]}, {"user_id": "u1", "k": 3}
        missing = client.post("/v1/events", json=events)
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "Unauthenticated"
        assert client.post("/v1/events", json=events, headers=bearer("guess-guess")).status_code == 401
        wrong_scope = client.post("/v1/recommendations", json=recommend, headers=bearer(INGEST))
        assert wrong_scope.status_code == 403 and "key1" in wrong_scope.json()["error"]["message"]
        assert client.post("/v1/events", json=events, headers=bearer(INGEST)).status_code == 200
        assert client.post("/v1/recommendations", json=recommend, headers=bearer(RECOMMEND)).status_code == 200
        assert client.post("/v1/recommendations", json=recommend, headers={"x-api-key": ADMIN}).status_code == 200
        assert client.get("/v1/items/i1/similar", headers=bearer(INGEST)).status_code == 403
        for open_path in ("/healthz", "/metrics"):  # probes and Prometheus need no key
            assert client.get(open_path).status_code == 200
        bodies = missing.text + wrong_scope.text
        assert not any(secret in bodies for secret in (INGEST, RECOMMEND, ADMIN))


def test_grpc_needs_a_key_with_the_calls_scope(node: Node) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{node.grpc_port}") as channel:
        stub = pb_grpc.GatewayStub(channel)
        request = pb.RecommendRequest(user_id="u1", k=3)
        cases = [
            ((), grpc.StatusCode.UNAUTHENTICATED),
            ((("authorization", f"Bearer {INGEST}"),), grpc.StatusCode.PERMISSION_DENIED),
        ]
        for metadata, code in cases:
            with pytest.raises(grpc.RpcError) as refused:
                stub.Recommend(request, metadata=metadata, timeout=10)
            assert refused.value.code() == code
        assert stub.Recommend(request, metadata=(("x-api-key", RECOMMEND),), timeout=10).request_id
        event = pb.Event(event_id="g1", user_id="u1", item_id="i1", type="click", timestamp_ms=1_700_000_000_000)
        reply = stub.Ingest(pb.IngestRequest(events=[event]), metadata=(("authorization", f"Bearer {ADMIN}"),))
        assert reply.accepted == 1


def test_bodies_over_the_limit_are_refused_unread(node: Node) -> None:
    big = {"events": [{**EVENT, "event_id": f"b{n}"} for n in range(100)]}  # ~9 KB
    with rest(node) as client:
        declared = client.post("/v1/events", json=big, headers=bearer(INGEST))
        assert declared.status_code == 413 and declared.json()["error"]["code"] == "PayloadTooLarge"
        chunks = (b'{"events": [' + b" " * 1000 for _ in range(6))  # no Content-Length: chunked
        chunked = client.post(
            "/v1/events", content=chunks, headers={**bearer(INGEST), "content-type": "application/json"}
        )
        assert chunked.status_code == 413
        small = client.post("/v1/events", content=(c for c in [b'{"events": ', b"[]}"]), headers=bearer(INGEST))
        assert small.status_code == 422  # a small chunked body reaches the app (an empty batch is invalid)


def test_each_key_has_its_own_rate_limit() -> None:
    overrides = {"server.api_keys": KEYS, "server.rate_limit_per_s": 5.0}
    with running_node("memory://", "memory://", **overrides) as node, rest(node) as client:
        recommend = {"user_id": "u1", "k": 3}
        codes = [client.post("/v1/recommendations", json=recommend, headers=bearer(RECOMMEND)) for _ in range(12)]
        limited = [r for r in codes if r.status_code == 429]
        assert 5 <= len(codes) - len(limited) <= 7 and limited  # a one-second burst, then refused
        assert limited[0].headers["retry-after"] == "1" and limited[0].json()["error"]["code"] == "ResourceExhausted"
        assert (
            client.post("/v1/recommendations", json=recommend, headers=bearer(ADMIN)).status_code == 200
        )  # another key
        time.sleep(1.0)  # refilled
        assert client.post("/v1/recommendations", json=recommend, headers=bearer(RECOMMEND)).status_code == 200


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("ingest", "entry 1 must be 'scopes:secret'"),
        ("read:long-enough-secret", "unknown scope 'read'"),
        ("ingest:short", "8+"),
    ],
)
def test_bad_key_settings_name_the_entry_never_the_secret(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as bad:
        load_config(env={"FRESHREC_API_KEYS": spec})
    assert "long-enough-secret" not in str(bad.value) and "ingest:" not in str(bad.value)


def test_keys_are_not_in_the_configs_repr() -> None:
    assert INGEST not in repr(load_config(env={"FRESHREC_API_KEYS": KEYS}))
