"""docker-compose.yml cannot run here (no Docker engine): check what can be checked statically,
and that every freshrec command in it is one the CLI accepts."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.cli import build_parser
from services.config import load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def expand(value: str) -> str:
    """Resolve ${VAR:-default} to its default, as compose does with VAR unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def freshrec_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose["services"].items() if s.get("command", [None])[0] == "freshrec"}


def test_cluster_has_kafka_kraft_redis_gateway_trainer(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"kafka", "redis", "gateway", "trainer"} <= set(services)
    kafka_env = services["kafka"]["environment"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert kafka_env["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    assert "zookeeper" not in services


def test_every_command_is_a_real_freshrec_subcommand(compose: dict[str, Any]) -> None:
    parser = build_parser()
    services = freshrec_services(compose)
    assert {"gateway", "trainer", "retrieval", "ranking", "replay", "store-0", "store-1"} <= set(services)
    for name, service in services.items():
        args = parser.parse_args([expand(str(a)) for a in service["command"][1:]])
        assert args.command == ("store-shard" if name.startswith("store-") else name)


def test_ports_health_checks_and_dependencies_agree(compose: dict[str, Any]) -> None:
    services = compose["services"]
    parser = build_parser()
    gateway = parser.parse_args([expand(str(a)) for a in services["gateway"]["command"][1:]])
    published = {int(expand(p).split(":")[1]) for p in services["gateway"]["ports"]}
    assert published == {gateway.port, gateway.grpc_port}
    assert f":{gateway.port}/readyz" in " ".join(services["gateway"]["healthcheck"]["test"])
    trainer_metrics = int(services["trainer"]["environment"]["FRESHREC_METRICS_PORT"])
    assert f":{trainer_metrics}/metrics" in " ".join(services["trainer"]["healthcheck"]["test"])
    for name, service in services.items():
        if name != "replay":
            assert "healthcheck" in service, f"{name} has no health check"
        for dep, cond in service.get("depends_on", {}).items():
            assert dep in services and cond["condition"] == "service_healthy"
            assert "healthcheck" in services[dep]
    # the roles reach Kafka and Redis by their compose service names
    for role in ("gateway", "trainer"):
        command = " ".join(services[role]["command"])
        assert "--kafka kafka:9092" in command and "redis://redis:6379" in command
    replay = " ".join(expand(a) for a in services["replay"]["command"])
    assert f"http://gateway:{gateway.port}" in replay and f"http://trainer:{trainer_metrics}/metrics" in replay


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles_install_the_console_script(name: str, compose: dict[str, Any]) -> None:
    dockerfile = (ROOT / "deploy" / name).read_text()
    for package in ("proto", "embedding_store", "retrieval", "ranking", "trainer", "services"):
        assert f"COPY {package} ./{package}" in dockerfile
    assert "pip install ." in dockerfile
    if name.endswith(".gpu"):  # faiss-gpu replaces faiss-cpu (one `faiss` module)
        assert "pip uninstall -y faiss-cpu" in dockerfile and '".[gpu]"' in dockerfile
    build = compose["services"]["gateway"]["build"]
    assert expand(build["dockerfile"]) == "deploy/Dockerfile"  # the default; FRESHREC_DOCKERFILE picks the GPU one


def metrics_targets(compose: dict[str, Any]) -> dict[str, str]:
    """Each long-running freshrec service's /metrics address, "service:port", from its command."""
    parser, targets = build_parser(), {}
    for name, service in freshrec_services(compose).items():
        args = parser.parse_args([expand(str(a)) for a in service["command"][1:]])
        if args.command == "gateway":
            targets[name] = f"{name}:{args.port}"
        elif args.command == "trainer":
            targets[name] = f"{name}:{service['environment']['FRESHREC_METRICS_PORT']}"
        elif args.command in ("store-shard", "retrieval", "ranking"):
            targets[name] = f"{name}:{args.metrics_port}"
    return targets


def test_prometheus_scrapes_every_freshrec_service(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    scraped = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    targets = metrics_targets(compose)
    assert set(targets) == {"gateway", "trainer", "retrieval", "ranking", "store-0", "store-1"}
    assert set(targets.values()) == scraped
    mount = "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro"
    assert mount in compose["services"]["prometheus"]["volumes"]


def test_gateway_sends_the_serving_stages_to_the_stage_services(compose: dict[str, Any]) -> None:
    parser, services = build_parser(), compose["services"]
    env = {k: expand(str(v)) for k, v in services["gateway"]["environment"].items()}
    for stage, variable in (("retrieval", "FRESHREC_RETRIEVAL_URL"), ("ranking", "FRESHREC_RANKING_URL")):
        args = parser.parse_args([expand(str(a)) for a in services[stage]["command"][1:]])
        assert env[variable] == f"grpc://{stage}:{args.grpc_port}"
        assert "redis://redis:6379" in " ".join(services[stage]["command"])  # follows the serving store
        assert f":{args.metrics_port}/metrics" in " ".join(services[stage]["healthcheck"]["test"])
        assert services["gateway"]["depends_on"][stage]["condition"] == "service_healthy"


def test_trainer_uses_both_store_shards(compose: dict[str, Any]) -> None:
    parser, services = build_parser(), compose["services"]
    url = expand(services["trainer"]["environment"]["FRESHREC_STORE_URL"])
    assert url.startswith("grpc://")
    shards = {
        f"{name}:{parser.parse_args(s['command'][1:]).port}"
        for name, s in services.items()
        if name.startswith("store-")
    }
    assert set(url.removeprefix("grpc://").split(",")) == shards
    assert {"store-0", "store-1"} <= set(services["trainer"]["depends_on"])


def test_trainer_checkpoints_to_a_volume_its_shards_share(compose: dict[str, Any]) -> None:
    services = compose["services"]
    path = services["trainer"]["environment"]["FRESHREC_CHECKPOINT_DIR"]
    mount = f"trainer-checkpoints:{path}"
    for name in ("trainer", "store-0", "store-1"):  # remote shards save their tables on their host
        assert mount in services[name]["volumes"], name
    assert "trainer-checkpoints" in compose["volumes"]
    for dockerfile in ("Dockerfile", "Dockerfile.gpu"):  # a new volume takes the image folder's owner
        assert f"chown -R freshrec {Path(path).parent}" in (ROOT / "deploy" / dockerfile).read_text()


def test_grafana_is_provisioned_with_prometheus_and_the_dashboards(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
    provisioning = ROOT / "deploy" / "grafana" / "provisioning"
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    prometheus_port = expand(compose["services"]["prometheus"]["ports"][0]).split(":")[1]
    assert datasource["url"] == f"http://prometheus:{prometheus_port}" and datasource["uid"] == "prometheus"
    provider = yaml.safe_load((provisioning / "dashboards" / "freshrec.yml").read_text())["providers"][0]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboards = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
    titles = {json.loads(d.read_text())["title"] for d in dashboards}
    assert titles == {f"freshrec / {t}" for t in ("Overview", "Training", "Embedding store", "Serving and sync")}


def test_every_service_environment_is_a_valid_config(compose: dict[str, Any]) -> None:
    """An unknown `FRESHREC_*` variable stops a role at start: each service's environment (with
    the compose defaults filled in) loads, and sets what it means to."""
    for name, service in freshrec_services(compose).items():
        env = {key: expand(str(value)) for key, value in (service.get("environment") or {}).items()}
        config = load_config(env=env)  # raises naming a misspelt variable
        if "FRESHREC_METRICS_PORT" in env:
            assert config.metrics_port == int(env["FRESHREC_METRICS_PORT"]), name
    trainer = load_config(env={k: expand(str(v)) for k, v in compose["services"]["trainer"]["environment"].items()})
    assert trainer.trainer.store_url == "grpc://store-0:7070,store-1:7070"
    with pytest.raises(ValueError, match="FRESHREC_STORE_ULR"):
        load_config(env={"FRESHREC_STORE_ULR": "grpc://store-0:7070"})
