"""docker-compose.yml cannot run here (no Docker engine): check what can be checked statically,
and that every freshrec command in it is one the CLI accepts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.cli import build_parser

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
    assert {"gateway", "trainer", "replay"} <= set(services)
    for name, service in services.items():
        args = parser.parse_args([expand(str(a)) for a in service["command"][1:]])
        assert args.command == name or (name, args.command) == ("replay", "replay")


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


def test_dockerfile_installs_the_console_script() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    for package in ("proto", "embedding_store", "retrieval", "ranking", "trainer", "services"):
        assert f"COPY {package} ./{package}" in dockerfile
    assert "pip install ." in dockerfile
