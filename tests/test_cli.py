"""The `freshrec` command as users run it: real processes, real ports."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from services import scrape
from tests.local_servers import free_port, wait_until

FRESHREC = [sys.executable, "-m", "services.cli"]
ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def process(args: list[str], env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [*FRESHREC, *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_http(url: str, proc: subprocess.Popen[str]) -> None:
    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"process exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            return httpx.get(url, timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(up, 60, url, interval_s=0.2)


def replay(url: str, *extra: str) -> str:
    result = subprocess.run(
        [*FRESHREC, "replay", "synthetic", "--url", url, *extra], cwd=ROOT, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_up_then_replay_embedded() -> None:
    port, grpc_port = free_port(), free_port()
    with process(["up", "--host", "127.0.0.1", "--port", str(port), "--grpc-port", str(grpc_port)]) as up:
        wait_http(f"http://127.0.0.1:{port}/readyz", up)
        out = replay(f"http://127.0.0.1:{port}", "--watch-user", "u1")
    assert "replayed 20,000/20,000 events" in out and "trainer caught up: yes" in out
    auc = float(out.rsplit("progressive AUC:", 1)[1].split()[0])
    assert auc > 0.6, out
    assert "[after replay] top 5 for user u1" in out


def test_cluster_roles_on_kafka_and_redis(kafka_broker: str, redis_url: str) -> None:
    port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    flags = ["--host", "127.0.0.1", "--kafka", f"{kafka_broker}/events-{uuid.uuid4().hex[:8]}", "--redis", redis_url]
    env = {"FRESHREC_METRICS_PORT": str(metrics_port), "FRESHREC_GROUP_ID": f"g-{uuid.uuid4().hex[:8]}"}
    with (
        process(["trainer", *flags, "--port", "0", "--grpc-port", "0"], env) as trainer,
        process(["gateway", *flags, "--port", str(port), "--grpc-port", str(grpc_port)]) as gateway,
    ):
        wait_http(f"http://127.0.0.1:{port}/readyz", gateway)
        wait_http(f"http://127.0.0.1:{metrics_port}/metrics", trainer)
        out = replay(f"http://127.0.0.1:{port}", "--metrics-url", f"http://127.0.0.1:{metrics_port}/metrics")
        assert "trainer caught up: yes" in out
        wait_until(
            lambda: httpx.get(f"http://127.0.0.1:{port}/readyz").json()["model_version"] > 0,
            30,
            "the gateway to serve a trained version",
        )


def _series(metrics_text: str, name: str, table: str) -> float:
    found = scrape.values(metrics_text, name, table=table)
    assert found, f"no {name} for table {table} in scrape"
    return sum(found)


def test_trainer_on_two_store_shard_processes() -> None:
    shard_ports, shard_metrics = [free_port(), free_port()], [free_port(), free_port()]
    port = free_port()
    shard_args = [
        ["store-shard", "--host", "127.0.0.1", "--port", str(p), "--metrics-port", str(m)]
        for p, m in zip(shard_ports, shard_metrics, strict=True)
    ]
    store_url = "grpc://" + ",".join(f"127.0.0.1:{p}" for p in shard_ports)
    with process(shard_args[0]) as a, process(shard_args[1]) as b:
        for m, proc in zip(shard_metrics, (a, b), strict=True):
            wait_http(f"http://127.0.0.1:{m}/metrics", proc)
        up_args = ["up", "--host", "127.0.0.1", "--port", str(port), "--grpc-port", "0"]
        with process(up_args, {"FRESHREC_STORE_URL": store_url, "FRESHREC_MIN_COUNT": "2"}) as up:
            wait_http(f"http://127.0.0.1:{port}/readyz", up)
            out = replay(f"http://127.0.0.1:{port}")
            assert "trainer caught up: yes" in out
            assert float(out.rsplit("progressive AUC:", 1)[1].split()[0]) > 0.6, out
            total = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        shards = [httpx.get(f"http://127.0.0.1:{m}/metrics").text for m in shard_metrics]
    for table in ("user", "item"):
        held = [_series(s, "freshrec_store_ids", table) for s in shards]
        assert all(h > 0 for h in held), f"both shards hold {table} rows: {held}"
        assert sum(held) == _series(total, "freshrec_store_ids", table)
        # min_count=2: users and items seen once were looked up but got no row
        assert sum(_series(s, "freshrec_store_filtered_lookups_total", table) for s in shards) > 0


@pytest.mark.parametrize("allocator", ["jemalloc", "system"])
def test_up_runs_on_the_configured_allocator(allocator: str) -> None:
    if allocator == "jemalloc" and not ctypes.util.find_library("jemalloc"):
        pytest.skip("libjemalloc2 is not installed (scripts/setup.sh installs it)")
    port = free_port()
    args = ["up", "--host", "127.0.0.1", "--port", str(port), "--grpc-port", "0"]
    with process(args, env={"FRESHREC_ALLOCATOR": allocator}) as up:
        wait_http(f"http://127.0.0.1:{port}/healthz", up)
        on_jemalloc = "libjemalloc" in Path(f"/proc/{up.pid}/maps").read_text()  # the same pid, restarted
        page = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert on_jemalloc == (allocator == "jemalloc")
    heap = "jemalloc" if allocator == "jemalloc" else "glibc"
    in_use = scrape.values(page, "freshrec_heap_bytes", state="in_use", allocator=heap)
    assert in_use and in_use[0] > 50e6, page  # torch, Faiss and the tables are in it


def test_an_unknown_allocator_is_refused() -> None:
    result = subprocess.run(
        [*FRESHREC, "up", "--port", "0"],
        cwd=ROOT,
        env={**os.environ, "FRESHREC_ALLOCATOR": "tcmalloc"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "allocator" in result.stderr and "tcmalloc" in result.stderr


def test_bad_flags_fail_with_a_clear_message() -> None:
    result = subprocess.run(
        [*FRESHREC, "up", "--kafka", "127.0.0.1:1"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "memory:// must be used for both or neither" in result.stderr


@pytest.mark.parametrize("name", ["nope"])
def test_unknown_dataset_is_refused(name: str) -> None:
    result = subprocess.run([*FRESHREC, "replay", name], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_sigterm_stops_up_cleanly() -> None:
    port = free_port()
    with process(["up", "--host", "127.0.0.1", "--port", str(port), "--grpc-port", "0"]) as up:
        wait_http(f"http://127.0.0.1:{port}/readyz", up)
        up.terminate()
        assert up.wait(20) == 0
