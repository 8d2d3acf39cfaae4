"""A gateway whose serving store is down keeps answering, says so on /readyz, and recovers
by itself when the store comes back (real Redis, started late)."""

from __future__ import annotations

import shutil
import subprocess
import time

from tests.local_servers import free_port, wait_until
from tests.nodes import rest, running_node


def test_gateway_starts_without_redis_and_recovers_when_it_appears(kafka_url: str) -> None:
    port = free_port()
    with running_node(kafka_url, f"redis://127.0.0.1:{port}/0") as node, rest(node) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        cold = client.post("/v1/recommendations", json={"user_id": "u1", "k": 5})
        assert cold.status_code == 200 and cold.json()["items"] == []  # nothing known yet, but no error
        accepted = client.post(
            "/v1/events",
            json={"events": [{"event_id": "d1", "user_id": "u1", "item_id": "i1", "type": "click"}]},
        )
        assert accepted.json()["accepted"] == 1  # ingestion needs only the log

        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        server = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        try:
            wait_until(lambda: client.get("/readyz").status_code == 200, 30, "readiness after Redis started")

            def served() -> bool:
                body: dict = client.post("/v1/recommendations", json={"user_id": "u2", "k": 5}).json()
                return [i["item_id"] for i in body["items"]] == ["i1"]

            wait_until(served, 30, "the event trained while Redis was down to reach serving")
            fresh = client.get("/readyz").json()
            assert fresh["store_age_s"] < 2 and fresh["stale"] is False
        finally:
            server.terminate()
            server.wait(10)
        # Redis gone again: the last applied version keeps serving; /readyz says how old it is
        time.sleep(2.5)
        assert served()
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["store_age_s"] > 2
