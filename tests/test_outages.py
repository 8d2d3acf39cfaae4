"""The broker goes away (SIGSTOP: the test broker keeps its data only in memory, so it is
frozen, not killed), then Redis restarts: ingestion answers 503 and acknowledges nothing while
the broker is away, recommendations keep being served, and afterwards every acknowledged event
is trained on exactly once and serving follows the trainer again, with no manual step."""

from __future__ import annotations

import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import httpx
import redis

from tests import local_servers
from tests.local_servers import free_port, wait_until
from tests.nodes import rest, running_node


def start_redis(port: int, directory: Path) -> subprocess.Popen[bytes]:
    """A redis-server with an append-only file in `directory` (as the compose file runs it)."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--appendonly", "yes", "--dir", str(directory)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    wait_until(lambda: _pings(port), 10, "redis PING")
    return proc


def _pings(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port).ping())
    except redis.ConnectionError:
        return False


def batch(prefix: str, n: int) -> dict[str, list[dict[str, object]]]:
    return {
        "events": [
            {"event_id": f"{prefix}-{i}", "user_id": f"u{i % 9}", "item_id": f"i{i % 13}", "type": "click"}
            for i in range(n)
        ]
    }


def test_broker_away_then_redis_restart(tmp_path: Path) -> None:
    redis_port = free_port()
    redis_proc = start_redis(redis_port, tmp_path)
    try:
        with local_servers.kafka_broker_process() as (broker, broker_proc):
            log_url = f"kafka://{broker}/events-outage-{uuid.uuid4().hex[:6]}?timeout_s=2"
            with running_node(log_url, f"redis://127.0.0.1:{redis_port}/0") as node, rest(node) as client:
                assert node.trainer is not None and node.replica is not None and node.publisher is not None
                trainer, replica, publisher = node.trainer, node.replica, node.publisher
                acknowledged = 0

                def post(body: dict[str, list[dict[str, object]]]) -> httpx.Response:
                    nonlocal acknowledged
                    response = client.post("/v1/events", json=body)
                    if response.status_code == 200:
                        acknowledged += response.json()["accepted"]
                    return response

                def serving_caught_up() -> bool:
                    publisher.publish_now()
                    return replica.version >= node.store.latest_version() > 0

                assert post(batch("before", 100)).status_code == 200
                wait_until(lambda: trainer.events_trained >= 100, 30, "the first events to be trained")
                wait_until(serving_caught_up, 30, "serving the first version")

                broker_proc.send_signal(signal.SIGSTOP)
                try:
                    refused = post(batch("during", 50))
                    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
                    assert refused.json()["error"]["code"] == "Unavailable"
                    assert acknowledged == 100  # nothing of the refused batch was acknowledged
                    body = {"user_id": "u1", "k": 5, "exclude_seen": False, "write_back": False}  # counts: events only
                    served = client.post("/v1/recommendations", json=body)
                    assert served.status_code == 200 and len(served.json()["items"]) == 5  # serving goes on
                finally:
                    broker_proc.send_signal(signal.SIGCONT)

                # the client retries the refused batch (same event ids) until the log takes it
                wait_until(lambda: post(batch("during", 50)).status_code == 200, 60, "the broker to take events")
                assert post(batch("after", 100)).status_code == 200 and acknowledged == 250
                wait_until(lambda: trainer.events_trained >= 250, 60, "every acknowledged event to be trained")

                # Redis restarts (its append-only file keeps the serving store)
                version = replica.version
                redis_proc.terminate()
                redis_proc.wait(10)
                redis_proc = start_redis(redis_port, tmp_path)
                assert post(batch("later", 30)).status_code == 200
                wait_until(lambda: trainer.events_trained >= 280, 60, "events after the restart to be trained")
                wait_until(serving_caught_up, 60, "serving to follow the trainer after the Redis restart")
                assert replica.version > version
                # each acknowledged event trained exactly once: copies the producer delivered
                # after the outage, and the client's retries, were dropped by event id
                assert trainer.events_trained == acknowledged == 280
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)
