"""Learning never stops: history then live traffic keeps the model, far-future timestamps are
refused, a step that raises dead-letters its culprits, readiness tells when the trainer is
dead or stuck, and what users are served leaves out what they saw and never shows a key."""

from __future__ import annotations

import gc
import hashlib
import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import requests
from prometheus_client import REGISTRY

from embedding_store import feature_keys
from embedding_store.base import TableDelta
from embedding_store.remote import serve_shard
from proto import freshrec_pb2 as pb
from proto import freshrec_pb2_grpc as pb_grpc
from services.cli import _default_checkpoint_dir
from services.config import load_config
from services.datasets import movielens_100k
from services.node import Node
from tests.local_servers import wait_until
from tests.nodes import rest, running_node, wait_trained_and_served
from trainer.config import TrainerConfig
from trainer.eventlog import MemoryLog
from trainer.events import Event
from trainer.loop import Trainer
from trainer.models import TABLES
from trainer.sync import SyncMessage

NEAR_2_53 = (1 << 53) - 1  # the largest timestamp_ms that was accepted before the skew check


def now_ms() -> int:
    return int(time.time() * 1000)


def post(client: Any, events: list[dict[str, Any]]) -> dict[str, Any]:
    reply = client.post("/v1/events", json={"events": events})
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


def table_rows(node: Node) -> dict[str, int]:
    assert node.trainer is not None
    return {name: node.trainer.store.table(name).stats().ids for name in TABLES}


@pytest.mark.slow
def test_movielens_history_then_live_events_keep_training_and_the_model() -> None:
    data = movielens_100k()
    # expiry every half second: a clock jump from 1998 to now would empty the tables at once
    fast_expiry: dict[str, Any] = {"trainer.expiry_interval_s": 0.5}
    with running_node(**fast_expiry) as node, rest(node) as client:
        assert node.trainer is not None
        for start in range(0, len(data.events), 1000):
            assert post(client, data.events[start : start + 1000])["accepted"] == 1000
        wait_trained_and_served(node, len(data.events), timeout_s=180)
        before = table_rows(node)
        popular_before = node.trainer.catalog.popular(20)
        assert min(before.values()) > 0

        # a newcomer who likes what a few heavy raters of 1998 liked, with live timestamps and with none
        liked = [e["item_id"] for e in data.events if e["user_id"] == "13" and e.get("value", 0) >= 5][:20]
        assert len(liked) == 20
        live = [
            {"event_id": f"live-{i}", "user_id": "newcomer", "item_id": item, "type": "like", "timestamp_ms": now_ms()}
            for i, item in enumerate(liked[:10])
        ]
        stampless = [
            {"event_id": f"now-{i}", "user_id": "newcomer", "item_id": item, "type": "like"}
            for i, item in enumerate(liked[10:])
        ]
        assert post(client, live)["accepted"] == 10 and post(client, stampless)["accepted"] == 10
        wait_trained_and_served(node, len(data.events) + 20)
        assert node._trainer_thread is not None and node._trainer_thread.is_alive()
        assert node.trainer.events_trained == len(data.events) + 20  # every event, each once
        assert node.trainer.step_failures == 0
        assert node.trainer.expire() == 0  # nothing is stale: 25 years of silence are one day of model time
        after = table_rows(node)
        assert all(after[name] >= before[name] for name in TABLES), (before, after)
        keys, _ = node.trainer.catalog.popular(20)
        assert len(keys) == 20 and set(keys.tolist()) & set(popular_before[0].tolist())
        trending, _ = node.trainer.catalog.counts(keys[:1])
        assert trending[0] > 1.0  # the top trending count did not decay to nothing

        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["trainer"]["alive"] is True
        served = client.post("/v1/recommendations", json={"user_id": "newcomer", "k": 20}).json()["items"]
        cold = client.post("/v1/recommendations", json={"user_id": f"nobody-{uuid.uuid4().hex}", "k": 20}).json()
        assert len(served) == 20
        assert [i["item_id"] for i in served] != [i["item_id"] for i in cold["items"]]
        assert not {i["item_id"] for i in served} & set(liked)  # exclude_seen


def test_far_future_timestamps_get_a_per_event_error_on_rest_and_grpc() -> None:
    good: dict[str, Any] = {
        "event_id": "ok-1",
        "user_id": "u",
        "item_id": "i",
        "type": "click",
        "timestamp_ms": now_ms(),
    }
    future = {**good, "event_id": "bad-1", "timestamp_ms": NEAR_2_53}
    hour_ahead = {**good, "event_id": "bad-2", "timestamp_ms": now_ms() + 3_600_000}
    with running_node() as node, rest(node) as client:
        body = post(client, [good, future, hour_ahead])
        assert (body["accepted"], body["rejected"]) == (1, 2)
        for result in body["results"][1:]:
            assert result["status"] == "rejected"
            assert result["error"]["field"].endswith(".timestamp_ms")
            assert "ahead of the server clock" in result["error"]["message"]
        with grpc.insecure_channel(f"127.0.0.1:{node.grpc_port}") as channel:
            stub = pb_grpc.GatewayStub(channel)
            reply = stub.Ingest(
                pb.IngestRequest(
                    events=[pb.Event(**{**good, "event_id": "ok-2"}), pb.Event(**{**future, "event_id": "bad-3"})]
                )
            )
        assert (reply.accepted, reply.rejected) == (1, 1)
        assert reply.results[1].error.field == "events[1].timestamp_ms"
        wait_trained_and_served(node, 2)
        assert node.trainer is not None and node.trainer.events_trained == 2


def patch_observe(trainer: Trainer, fault: Callable[[list[Event]], None]) -> None:
    """Run `fault` on each batch before the trainer's feature step (it may raise or block)."""
    observe = trainer.features.observe

    def faulty(events: list[Event], *args: Any) -> None:
        fault(events)
        observe(events, *args)

    vars(trainer.features)["observe"] = faulty


def poisoned(trainer: Trainer, poison: set[str]) -> None:
    """Make the trainer's feature step raise on any batch holding an item of `poison`."""

    def fault(events: list[Event]) -> None:
        bad = [e.item_id for e in events if e.item_id in poison]
        if bad:
            raise RuntimeError(f"cannot featurise {bad[0]}")

    patch_observe(trainer, fault)


def test_a_step_that_raises_dead_letters_the_events_at_fault_and_trains_the_rest() -> None:
    log = MemoryLog()
    t0 = now_ms()
    events = [Event(f"e{n}", f"u{n % 7}", f"i{n % 13}", "click", t0 + n) for n in range(100)]
    events[17] = Event("e17", "u3", "poison-a", "click", t0 + 17)
    events[71] = Event("e71", "u1", "poison-b", "click", t0 + 71)
    log.append(events)
    trainer = Trainer(TrainerConfig(batch_size=512), log.consumer("g"), dead_letter=log.dead_letter)
    poisoned(trainer, {"poison-a", "poison-b"})
    step = trainer.poll_and_train()
    assert step.events == 98 and step.poisoned == 2
    assert trainer.events_trained == 98
    assert step.failures >= 4  # the step, its retry, then the halves of the bisection that held poison
    assert trainer.step_failures == step.failures
    by_id = {Event.from_json(d.record.value).event_id: d.reason for d in log.dead_letters}
    assert set(by_id) == {"e17", "e71"}, by_id
    assert all("training failed: RuntimeError: cannot featurise poison" in r for r in by_id.values())
    # the others were trained: every good item has a row, no poisoned one has
    found = trainer.items.get(feature_keys("item", [f"i{n}" for n in range(13)] + ["poison-a", "poison-b"]))[1]
    assert found[:13].all() and not found[13:].any()
    # a step that raises only once is retried and trains everything
    # a fault later in the step (the joiner): the culprit's pair is not published as seen
    vars(trainer.features).pop("observe")
    trainer.collect_sync()
    push = trainer.joiner.push

    def joiner_fault(events: list[Event]) -> Any:
        if any(e.item_id == "poison-c" for e in events):
            raise RuntimeError("cannot join poison-c")
        return push(events)

    vars(trainer.joiner)["push"] = joiner_fault
    log.append([Event("p1", "u2", "poison-c", "click", t0 + 150), Event("p2", "u2", "i5", "click", t0 + 151)])
    assert trainer.poll_and_train().poisoned == 1
    message = trainer.collect_sync()
    assert message is not None
    seen = set(zip(message.seen_users.tolist(), message.seen_items.tolist(), strict=True))
    u2, (poison_c, i5) = feature_keys("user", ["u2"])[0], feature_keys("item", ["poison-c", "i5"])
    assert (u2, i5) in seen and (u2, poison_c) not in seen
    vars(trainer.joiner).pop("push")
    flaky = {"calls": 0}

    def once(events: list[Event]) -> None:
        flaky["calls"] += 1
        if flaky["calls"] == 1:
            raise RuntimeError("transient")

    patch_observe(trainer, once)
    log.append([Event(f"f{n}", "u1", "i1", "click", t0 + 200 + n) for n in range(10)])
    step = trainer.poll_and_train()
    assert (step.events, step.failures, step.poisoned) == (10, 1, 0)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread killed on purpose
def test_readiness_says_when_the_trainer_is_stuck_or_dead_and_recovers() -> None:
    overrides: dict[str, Any] = {"trainer.stall_after_s": 1.0}
    with running_node(**overrides) as node, rest(node) as client:
        assert node.trainer is not None
        post(client, [{"event_id": "a", "user_id": "u", "item_id": "i", "type": "click"}])
        wait_trained_and_served(node, 1)
        wait_until(lambda: client.get("/readyz").status_code == 200, 10, "readiness")
        body = client.get("/readyz").json()
        assert body["trainer"]["ok"] and body["sync"]["ok"] and body["trainer"]["step_failures"] == 0

        # a step that hangs: not ready, naming the trainer; ready again once it returns
        release = threading.Event()

        def hang(events: list[Event]) -> None:
            if any(e.item_id == "hang" for e in events):
                release.wait(30)

        patch_observe(node.trainer, hang)
        post(client, [{"event_id": "h", "user_id": "u", "item_id": "hang", "type": "click"}])
        wait_until(lambda: client.get("/readyz").status_code == 503, 15, "readiness to see the stuck step")
        stuck = client.get("/readyz").json()
        assert "trainer: a training step has run for" in stuck["reason"] and stuck["trainer"]["ok"] is False
        release.set()
        wait_until(lambda: client.get("/readyz").status_code == 200, 15, "readiness after the step returned")

        # a step that raises for one event: retried, bisected, dead-lettered, counted; still ready
        counted = REGISTRY.get_sample_value("freshrec_trainer_step_failures_total") or 0.0
        poisoned(node.trainer, {"poison"})
        post(client, [{"event_id": "p", "user_id": "u", "item_id": "poison", "type": "click"}])
        wait_until(lambda: node.trainer is not None and node.trainer.step_failures >= 2, 15, "the failing step")
        assert node.trainer.step_failures == 2  # one event: the step and its retry, then dead-lettered
        assert [Event.from_json(d.record.value).event_id for d in node.log.dead_letters] == ["p"]  # type: ignore[union-attr]
        assert client.get("/readyz").status_code == 200
        wait_until(
            lambda: REGISTRY.get_sample_value("freshrec_trainer_step_failures_total") == counted + 2, 5, "the metric"
        )

        # the training thread dies (nothing catches a BaseException): readiness says so
        def die(events: list[Event]) -> None:
            raise SystemExit("the trainer thread ends")

        patch_observe(node.trainer, die)
        post(client, [{"event_id": "d", "user_id": "u", "item_id": "i2", "type": "click"}])
        wait_until(lambda: client.get("/readyz").status_code == 503, 15, "readiness to see the dead trainer")
        assert "trainer: the training thread has died" in client.get("/readyz").json()["reason"]


def test_not_ready_until_a_model_version_exists() -> None:
    slow_sync: dict[str, Any] = {"trainer.sparse_sync_interval_s": 3600.0}
    with running_node(**slow_sync) as node, rest(node) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["model_version"] == 0
        assert "no model version published yet" in ready.json()["reason"]
        assert node.publisher is not None
        node.publisher.publish_now()  # the first version (the dense parameters)
        wait_until(lambda: client.get("/readyz").status_code == 200, 10, "readiness at version 1")


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_exclude_seen_leaves_out_everything_a_heavy_user_rated(backend: str, request: pytest.FixtureRequest) -> None:
    store = request.getfixturevalue("redis_url") if backend == "redis" else "memory://"
    log = "memory://" if backend == "memory" else request.getfixturevalue("kafka_url")
    t0 = now_ms() - 3_600_000
    # 400 items; the heavy user rates 300 of them, some twice; others make all 400 known
    rated = [f"i{n}" for n in range(300)]
    events = [
        {"event_id": f"h{n}", "user_id": "heavy", "item_id": item, "type": "click", "timestamp_ms": t0 + n}
        for n, item in enumerate(rated + rated[:50])
    ]
    events += [
        {
            "event_id": f"o{n}",
            "user_id": f"o{n % 20}",
            "item_id": f"i{n % 400}",
            "type": "click",
            "timestamp_ms": t0 + n,
        }
        for n in range(800)
    ]
    with running_node(log, store) as node, rest(node) as client:
        for start in range(0, len(events), 500):
            post(client, events[start : start + 500])
        wait_trained_and_served(node, len(events))
        served = client.post("/v1/recommendations", json={"user_id": "heavy", "k": 100}).json()["items"]
        assert len(served) == 100
        assert not {i["item_id"] for i in served} & set(rated)
        with grpc.insecure_channel(f"127.0.0.1:{node.grpc_port}") as channel:
            reply = pb_grpc.GatewayStub(channel).Recommend(pb.RecommendRequest(user_id="heavy", k=100))
        assert len(reply.items) == 100 and not {i.item_id for i in reply.items} & set(rated)


def test_an_evicted_item_that_returns_is_served_under_its_own_id() -> None:
    # rows unused for 100 s of model time expire; gaps here are traffic (no jump limit); no
    # sampled negatives or blend candidates, which would keep the old items' rows in use
    overrides: dict[str, Any] = {
        "trainer.ttl_s": 100.0,
        "trainer.max_clock_jump_s": 1e6,
        "trainer.expiry_interval_s": 3600.0,
        "trainer.retrieval_negatives": 0,
        "trainer.negatives": 0,
        "trainer.blend_users": 0,
    }
    t0 = now_ms() - 86_400_000
    with running_node(**overrides) as node, rest(node) as client:
        assert node.trainer is not None
        first = [
            {
                "event_id": f"a{n}",
                "user_id": f"u{n % 5}",
                "item_id": f"old-{n % 4}",
                "type": "click",
                "timestamp_ms": t0,
            }
            for n in range(20)
        ]
        post(client, first)
        wait_trained_and_served(node, 20)
        later = [
            {"event_id": f"b{n}", "user_id": f"v{n % 5}", "item_id": f"new-{n % 4}", "type": "click"} for n in range(20)
        ]
        post(client, later)  # a day later on the model clock: the old items' rows are stale
        wait_trained_and_served(node, 40)
        assert node.trainer.expire() > 0
        wait_trained_and_served(node, 40)
        assert node.replica is not None
        old_keys = feature_keys("item", [f"old-{n}" for n in range(4)])
        assert all(int(k) not in node.replica._state.names for k in old_keys)  # evicted from serving
        back = [
            {"event_id": f"c{n}", "user_id": f"v{n % 5}", "item_id": f"old-{n % 4}", "type": "click"} for n in range(20)
        ]
        post(client, back)  # the old items return: new rows, the same keys
        wait_trained_and_served(node, 60)
        ids = {f"old-{n}" for n in range(4)} | {f"new-{n}" for n in range(4)}
        for user in ("u0", "v1", f"cold-{uuid.uuid4().hex}"):
            served = client.post("/v1/recommendations", json={"user_id": user, "k": 8, "exclude_seen": False})
            assert {i["item_id"] for i in served.json()["items"]} <= ids
        similar = client.get("/v1/items/old-1/similar", params={"k": 7})
        assert similar.status_code == 200 and {i["item_id"] for i in similar.json()["items"]} <= ids


def test_a_restarted_trainer_on_a_durable_log_keeps_its_model(kafka_url: str, redis_url: str, tmp_path: Path) -> None:
    overrides = {
        "log_url": kafka_url,
        "serving_store_url": redis_url,
        "server.host": "127.0.0.1",
        "server.http_port": 0,
        "server.grpc_port": 0,
        "trainer.group_id": f"g-{uuid.uuid4().hex[:8]}",
        "trainer.poll_timeout_s": 0.05,
        "trainer.sparse_sync_interval_s": 0.5,
    }
    config = load_config(env={}, overrides=overrides)
    default = _default_checkpoint_dir(config)
    assert default is not None and "freshrec" in default  # `up --kafka` checkpoints without being told
    with_dir = load_config(env={}, overrides={**overrides, "trainer.checkpoint_dir": str(tmp_path)})
    node = Node(with_dir)
    node.start()
    try:
        with rest(node) as client:
            post(
                client,
                [
                    {"event_id": f"e{n}", "user_id": f"u{n % 3}", "item_id": f"i{n % 9}", "type": "click"}
                    for n in range(90)
                ],
            )
            wait_trained_and_served(node, 90)
    finally:
        node.stop()  # the final checkpoint
    restarted = Node(with_dir)
    try:
        assert restarted.trainer is not None and restarted.trainer.events_trained == 90
        rows = restarted.trainer.users.get(feature_keys("user", ["u0", "u1", "u2"]))[1]
        assert rows.all()  # the tables came back
    finally:
        restarted.stop()
    # without its checkpoints the trainer would start empty beside the served model: refused
    with pytest.raises(ValueError, match=r"serving_store_url: .* already holds version"):
        Node(config)


def test_slots_that_share_a_long_prefix_get_distinct_keys() -> None:
    a = feature_keys("attribute.category.subcategory.a", ["x"])
    b = feature_keys("attribute.category.subcategory.b", ["x"])
    assert a[0] != b[0]
    short = hashlib.blake2b(b"x", digest_size=8, person=b"item").digest()
    assert feature_keys("item", ["x"])[0] == np.frombuffer(short, "<u8")[0]  # short slots keep their keys


def test_a_restarted_store_shard_is_opened_again_and_no_event_is_lost() -> None:
    server, port, _ = serve_shard("127.0.0.1:0")
    address = f"127.0.0.1:{port}"
    log = MemoryLog()
    trainer = Trainer(
        TrainerConfig(store_url=f"grpc://{address}", batch_size=200), log.consumer("g"), dead_letter=log.dead_letter
    )
    t0 = now_ms()
    log.append([Event(f"a{n}", f"u{n % 10}", f"i{n % 20}", "click", t0 + n) for n in range(100)])
    assert trainer.poll_and_train().events == 100
    server.stop(0).wait()  # the shard goes away with its tables and the dense parameters
    log.append([Event(f"b{n}", f"u{n % 10}", f"i{n % 20}", "click", t0 + 200 + n) for n in range(100)])
    with pytest.raises(ConnectionError, match="100 records held"):
        trainer.poll_and_train()
    with pytest.raises(ConnectionError):  # still away: still held, nothing new polled
        trainer.poll_and_train()
    assert trainer.events_trained == 100 and trainer.step_failures == 2
    restarted, _, _ = serve_shard(address)  # back, empty
    try:
        trained: list[int] = []

        def retried() -> bool:  # as `Trainer.run` does, once a second (the channel reconnects with a backoff)
            try:
                trained.append(trainer.poll_and_train().events)
            except ConnectionError:
                return False
            return True

        wait_until(retried, 30, "the held batch to train on the restarted shard", interval_s=0.5)
        assert trained == [100]  # the held batch: tables opened again, dense parameters registered again
        assert trainer.events_trained == 200 and not log.dead_letters
        log.append([Event(f"c{n}", f"u{n % 10}", f"i{n % 20}", "click", t0 + 400 + n) for n in range(50)])
        assert trainer.poll_and_train().events == 50
        assert trainer.users.get(feature_keys("user", ["u1"]))[1].all()  # rows again on the new shard
        assert trainer.collect_sync() is not None
    finally:
        trainer.close()
        restarted.stop(0)


def test_a_body_over_the_limit_reaches_plain_clients_as_413() -> None:
    events = [{"event_id": f"e{n}", "user_id": "u", "item_id": "i", "type": "click"} for n in range(100_000)]
    body = json.dumps({"events": events}).encode() + b" " * (20 * 1024 * 1024)  # 100,000 events, ~26 MB
    with running_node() as node:
        url = f"http://127.0.0.1:{node.http_port}/v1/events"
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        assert refused.value.code == 413 and b"PayloadTooLarge" in refused.value.read()
        reply = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=60)
        assert reply.status_code == 413 and reply.json()["error"]["code"] == "PayloadTooLarge"
        for expect in ("Expect:", "Expect: 100-continue"):  # curl without Expect, and with it
            curl = subprocess.run(
                [
                    "curl",
                    "-sS",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "-H",
                    expect,
                    "-H",
                    "Content-Type: application/json",
                    "--data-binary",
                    "@-",
                    url,
                ],
                input=body,
                capture_output=True,
                timeout=60,
                check=False,
            )
            assert curl.stdout == b"413", (expect, curl.stdout, curl.stderr)
        # and the gateway goes on taking events of a normal size
        assert requests.post(url, json={"events": events[:10]}, timeout=10).json()["accepted"] == 10


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_applied_versions_do_not_make_garbage_permanent(monkeypatch: pytest.MonkeyPatch) -> None:
    version = SyncMessage(users=TableDelta.empty("user"), items=TableDelta.empty("item"), version=1)
    with running_node() as node:
        try:
            monkeypatch.setattr(node, "_refreeze_at", time.monotonic() + 3600)  # no thaw due
            gc.disable()  # only the node collects
            dropped = weakref.ref(_Cycle())  # garbage before the version comes: never frozen
            node._on_apply(version)
            assert dropped() is None
            gc.enable()
            garbage = _Cycle()
            alive = weakref.ref(garbage)
            node._on_apply(version)  # frozen with the served state
            del garbage
            gc.collect()
            node._on_apply(version)
            assert alive() is not None  # frozen: the collector skips it until the next refreeze
            monkeypatch.setattr(node, "_refreeze_at", 0.0)  # REFREEZE_S have passed
            node._on_apply(version)
            assert alive() is None  # thawed, collected, the rest frozen again
            assert gc.get_freeze_count() > 0
        finally:
            gc.enable()
            gc.unfreeze()
