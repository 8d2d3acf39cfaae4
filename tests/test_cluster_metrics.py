"""The compose cluster without Docker: the same `freshrec` commands as docker-compose.yml
(gateway, retrieval, ranking, trainer, two store shards) as real processes on loopback, with the real broker and
a real Redis standing in for the `kafka` and `redis` services. Traffic goes in through the
public API; then every /metrics is scraped and every series that a Grafana panel charts must
be in a scrape, with the labels the query selects."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml

from proto import freshrec_pb2 as pb
from proto import freshrec_pb2_grpc as pb_grpc
from services import scrape
from services.scrape import Sample
from tests.local_servers import free_port, wait_until
from tests.test_compose import expand, freshrec_services

ROOT = Path(__file__).resolve().parent.parent
SELECTOR = re.compile(r"(freshrec_[a-z0-9_]+)(?:\{([^}]*)\})?")
MATCHER = re.compile(r'\s*([a-z_]+)\s*(=~|!~|!=|=)\s*"([^"]*)"\s*')

EXPERIMENTS = '{"cluster-test": {"a": {"weight": 1}, "b": {"weight": 1, "ranking": "trending"}}}'


def dashboard_selectors() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, selector text) of every series every panel's queries read."""
    out = []
    for path in sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel["targets"]:
                out += [(board["title"], panel["title"], m.group(0)) for m in SELECTOR.finditer(target["expr"])]
    return out


def matches(selector: str, sample: Sample) -> bool:
    m = SELECTOR.fullmatch(selector)
    assert m is not None
    name, matchers = m.group(1), m.group(2) or ""
    if sample[0] != name:
        return False
    for part in filter(None, matchers.split(",")):
        parsed = MATCHER.fullmatch(part)
        assert parsed is not None, f"cannot read matcher {part!r}"
        label, op, value = parsed.groups()
        actual = sample[1].get(label, "")
        ok = {
            "=": actual == value,
            "!=": actual != value,
            "=~": re.fullmatch(value, actual) is not None,
            "!~": re.fullmatch(value, actual) is None,
        }[op]
        if not ok:
            return False
    return True


def command(service: dict[str, Any], ports: dict[str, int], kafka: str, redis_url: str) -> list[str]:
    """The service's compose command for this machine: Python's module instead of the console
    script, loopback, free ports, the test broker and Redis for the `kafka` and `redis` hosts."""
    argv = [expand(str(a)) for a in service["command"][1:]]
    for flag, port in ports.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = str(port)
    argv = [{"0.0.0.0": "127.0.0.1", "kafka:9092": kafka, "redis://redis:6379/0": redis_url}.get(a, a) for a in argv]
    return [sys.executable, "-m", "services.cli", *argv]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trainer's checkpoint folder (the compose volume shared with the shards)."""
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def cluster(
    redis_server: str, kafka_broker: str, tmp_path_factory: pytest.TempPathFactory, checkpoints: Path
) -> Iterator[dict[str, int]]:
    """Start store-0, store-1, trainer, retrieval, ranking and gateway as compose describes them (their logs in a
    temporary folder); yields each service's metrics port (plus "http" and "grpc")."""
    logs = tmp_path_factory.mktemp("cluster-logs")
    services = freshrec_services(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))
    metrics_ports: dict[str, int] = {}
    with ExitStack() as stack:
        shard_ports = {}

        def start(name: str, argv: list[str], env: dict[str, str]) -> None:
            proc = subprocess.Popen(
                argv,
                env={**os.environ, **env},
                stdout=subprocess.DEVNULL,
                stderr=stack.enter_context(logs.joinpath(f"{name}.log").open("w")),
            )
            stack.callback(proc.wait, 10)
            stack.callback(proc.terminate)

        for name in ("store-0", "store-1"):
            shard_ports[name] = free_port()
            metrics_ports[name] = free_port()
            ports = {"--port": shard_ports[name], "--metrics-port": metrics_ports[name]}
            start(name, command(services[name], ports, kafka_broker, redis_server), {})
        topic = f"{kafka_broker}/events-cluster"
        trainer = services["trainer"]
        env = {k: expand(str(v)) for k, v in trainer["environment"].items()}
        metrics_ports["trainer"] = free_port()
        env["FRESHREC_METRICS_PORT"] = str(metrics_ports["trainer"])
        env["FRESHREC_GROUP_ID"] = "trainer-cluster-test"
        env["FRESHREC_CHECKPOINT_DIR"] = str(checkpoints)
        env["FRESHREC_CHECKPOINT_INTERVAL_S"] = "2"
        env["FRESHREC_EXPERIMENTS"] = EXPERIMENTS  # each arm's series exported from the start
        for name, port in shard_ports.items():
            env["FRESHREC_STORE_URL"] = env["FRESHREC_STORE_URL"].replace(f"{name}:7070", f"127.0.0.1:{port}")
        argv = command(trainer, {}, kafka_broker, redis_server)
        start("trainer", [topic if a == kafka_broker else a for a in argv], env)
        gateway = services["gateway"]
        gateway_env = {k: expand(str(v)) for k, v in gateway.get("environment", {}).items()}
        gateway_env["FRESHREC_EXPERIMENTS"] = EXPERIMENTS
        for stage in ("retrieval", "ranking"):
            stage_port, metrics_ports[stage] = free_port(), free_port()
            ports = {"--grpc-port": stage_port, "--metrics-port": metrics_ports[stage]}
            env = {k: expand(str(v)) for k, v in services[stage].get("environment", {}).items()}
            start(stage, command(services[stage], ports, kafka_broker, redis_server), env)
            variable = f"FRESHREC_{stage.upper()}_URL"  # the gateway finds the stage on this machine
            assert gateway_env[variable].startswith(f"grpc://{stage}:")
            gateway_env[variable] = f"grpc://127.0.0.1:{stage_port}"
        metrics_ports["gateway"] = metrics_ports["http"] = free_port()
        metrics_ports["grpc"] = free_port()
        argv = command(
            gateway, {"--port": metrics_ports["http"], "--grpc-port": metrics_ports["grpc"]}, kafka_broker, redis_server
        )
        start("gateway", [topic if a == kafka_broker else a for a in argv], gateway_env)
        for name in ("store-0", "store-1", "trainer", "retrieval", "ranking", "gateway"):
            wait_until(partial(scrape_port, metrics_ports[name]), 90, f"{name} to serve /metrics")
        yield metrics_ports


def scrape_port(port: int) -> list[Sample]:
    try:
        return scrape.samples(scrape.fetch(f"http://127.0.0.1:{port}/metrics"))
    except httpx.HTTPError:
        return []


def value(samples: list[Sample], name: str, **labels: str) -> float:
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


def test_every_dashboard_series_is_exported_by_the_cluster(cluster: dict[str, int], checkpoints: Path) -> None:
    url = f"http://127.0.0.1:{cluster['http']}"
    users = [f"u{u}" for u in range(30)]
    with httpx.Client(base_url=url, timeout=10) as client:
        events = [
            {
                "event_id": f"c{n}-{kind}",
                "user_id": users[n % 30],
                "item_id": f"i{n % 17}",
                "type": kind,
                "timestamp_ms": 1_700_000_000_000 + 1000 * n,
            }
            for n in range(600)
            for kind in ("impression", "click" if n % 2 else "skip")  # positives and negatives
        ]
        events.insert(0, {"event_id": "bad", "user_id": "u1", "item_id": "i1", "type": "clik", "timestamp_ms": 1})
        for b in range(0, len(events), 200):
            assert client.post("/v1/events", json={"events": events[b : b + 200]}).status_code == 200
        assert client.post("/v1/recommendations", json={"user_id": "", "k": 5}).status_code == 422
        wait_until(
            lambda: value(scrape_port(cluster["trainer"]), "freshrec_trainer_events_total") >= 1200, 120, "training"
        )
        for stage in ("retrieval", "ranking"):
            version = partial(lambda port: value(scrape_port(port), "freshrec_serving_version") >= 2, cluster[stage])
            wait_until(version, 60, f"{stage} to serve a version")
        ready = client.get("/readyz")  # ready once both stages are
        assert ready.status_code == 200 and ready.json()["model_version"] >= 2
        for user in users[:5]:
            # every one of the 17 items is seen by these users: ask for seen items too
            answer = client.post("/v1/recommendations", json={"user_id": user, "k": 5, "exclude_seen": False})
            assert answer.status_code == 200 and len(answer.json()["items"]) == 5
    with grpc.insecure_channel(f"127.0.0.1:{cluster['grpc']}") as channel:
        pb_grpc.GatewayStub(channel).Recommend(pb.RecommendRequest(user_id="u2", k=5), timeout=10)

    scrapes = {name: scrape_port(port) for name, port in cluster.items() if name not in ("http", "grpc")}
    samples = [s for found in scrapes.values() for s in found]
    missing = [
        f"{board} / {panel}: {selector}"
        for board, panel, selector in dashboard_selectors()
        if not any(matches(selector, s) for s in samples)
    ]
    assert not missing, "series charted but not exported:\n" + "\n".join(missing)
    # and they carry the traffic: the shards served the trainer, serving saw fresh events
    assert value(scrapes["store-0"], "freshrec_requests_total", transport="store", code="OK") > 0
    assert value(scrapes["store-1"], "freshrec_requests_total", transport="store", code="OK") > 0
    assert value(scrapes["store-0"], "freshrec_store_ids") > 0 and value(scrapes["store-1"], "freshrec_store_ids") > 0
    assert value(scrapes["ranking"], "freshrec_freshness_seconds_count") > 0
    # recommendations went through the stage services (one batch per call or more calls)
    assert value(scrapes["retrieval"], "freshrec_requests_total", transport="retrieval", method="Candidates") >= 1
    assert value(scrapes["ranking"], "freshrec_requests_total", transport="ranking", method="Rank", code="OK") >= 1
    assert value(scrapes["gateway"], "freshrec_requests_total", transport="grpc", method="Recommend", code="OK") == 1
    assert value(scrapes["trainer"], "freshrec_trainer_progressive_auc") > 0
    # checkpoints: the trainer's state and both shards' tables in one complete checkpoint
    wait_until(
        lambda: value(scrape_port(cluster["trainer"]), "freshrec_trainer_checkpoints_total") >= 1, 30, "a checkpoint"
    )
    assert 0 <= value(scrape_port(cluster["trainer"]), "freshrec_trainer_checkpoint_age_seconds") < 30
    newest = max(p for p in checkpoints.iterdir() if (p / "trainer.pt").is_file())
    assert sorted(p.name for p in (newest / "store").iterdir()) == ["shard-0-of-2", "shard-1-of-2"]
