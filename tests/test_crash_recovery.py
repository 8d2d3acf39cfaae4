"""A trainer killed with SIGKILL in the middle of a stream resumes from its checkpoint: with the
real broker and Redis, every acknowledged event is trained on, and the resumed state counts
each exactly once (the killed process's work after its checkpoint is replayed, not added)."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import uuid
from pathlib import Path

import httpx
import pytest
import torch

from tests.local_servers import free_port, freshrec_process, metric, wait_until
from tests.test_ranking import events
from trainer.eventlog import open_log
from trainer.events import Event

EVENTS = 20_000


def trained(port: int) -> float:
    """freshrec_trainer_events_total of the trainer process on `port` (-1 while it is not up)."""
    return metric(port, "freshrec_trainer_events_total")


def newest_checkpoint_events(directory: Path) -> int:
    complete = sorted(p for p in directory.iterdir() if (p / "trainer.pt").is_file())
    return int(torch.load(complete[-1] / "trainer.pt", weights_only=False)["events_trained"]) if complete else 0


@pytest.mark.timeout(300)
def test_kill_9_mid_stream_loses_no_acknowledged_event(kafka_broker: str, redis_url: str, tmp_path: Path) -> None:
    topic = f"{kafka_broker}/events-crash-{uuid.uuid4().hex[:8]}"
    log = open_log(f"kafka://{topic}")
    env = {
        "FRESHREC_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
        "FRESHREC_CHECKPOINT_INTERVAL_S": "0.5",
        "FRESHREC_GROUP_ID": "crash-test",
        "FRESHREC_BATCH_SIZE": "256",
    }
    port = free_port()
    argv = ["trainer", "--kafka", topic, "--redis", redis_url]

    def start() -> subprocess.Popen[bytes]:
        log_path = tmp_path / f"trainer-{uuid.uuid4().hex[:6]}.log"
        return freshrec_process(argv, {**env, "FRESHREC_METRICS_PORT": str(port)}, log_path)

    stream = events(EVENTS, seed=3)
    acknowledged = 0

    def produce(start: int, stop: int) -> None:  # acknowledged = append returned (acks=all)
        nonlocal acknowledged
        for b in range(start, stop, 500):
            log.append(stream[b : b + 500])
            acknowledged += len(stream[b : b + 500])
            threading.Event().wait(0.05)

    first = start()
    try:
        wait_until(lambda: trained(port) >= 0, 60, "the trainer to start")
        producer = threading.Thread(target=produce, args=(0, EVENTS // 2))
        producer.start()
        wait_until(lambda: trained(port) >= EVENTS // 4, 120, "a quarter of the events to be trained")
        wait_until(lambda: newest_checkpoint_events(tmp_path / "checkpoints") > 0, 30, "a checkpoint")
        first.send_signal(signal.SIGKILL)  # no final checkpoint, no commit, no goodbye to the group
        first.wait(10)
        producer.join()
        produce(EVENTS // 2, EVENTS)  # the second half is acknowledged while no trainer runs
        assert acknowledged == EVENTS
        resumed_from = newest_checkpoint_events(tmp_path / "checkpoints")
        assert 0 < resumed_from < EVENTS
        second = start()
        try:
            # the new process trains what the checkpoint had not: together exactly every event
            wait_until(lambda: trained(port) >= EVENTS - resumed_from, 120, "the rest to be trained")
            threading.Event().wait(2.0)  # and nothing more comes (no event twice in the state)
            assert trained(port) == EVENTS - resumed_from
        finally:
            second.terminate()
            second.wait(20)
        assert second.returncode == 0
        # a clean stop wrote a final checkpoint holding every event
        assert newest_checkpoint_events(tmp_path / "checkpoints") == EVENTS
    finally:
        if first.poll() is None:
            first.kill()
        log.close()


def test_embedded_data_dir_survives_kill_9(tmp_path: Path) -> None:
    """`freshrec up --data-dir`: acknowledged events are on disk before the answer, so a
    SIGKILL loses none; the restarted process resumes training and serves at once from the
    serving state checkpointed with the trainer (item names and all)."""
    port = free_port()
    argv = ["up", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--grpc-port", str(free_port()), "--data-dir", str(tmp_path / "data")]
    env = {"FRESHREC_CHECKPOINT_INTERVAL_S": "0.5"}
    stream = events(3000, seed=4)
    base = f"http://127.0.0.1:{port}"

    def start() -> subprocess.Popen[bytes]:
        return freshrec_process(argv, env)

    def post(batch: list[Event]) -> int:
        body = {"events": [json.loads(e.to_json()) for e in batch]}
        response = httpx.post(f"{base}/v1/events", json=body, timeout=30)
        assert response.status_code == 200
        return int(response.json()["accepted"])

    first = start()
    try:
        wait_until(lambda: trained(port) >= 0, 60, "freshrec up")
        acknowledged = sum(post(stream[b : b + 500]) for b in range(0, 2000, 500))
        wait_until(lambda: trained(port) >= 2000, 60, "the first events to be trained")
        wait_until(lambda: newest_checkpoint_events(tmp_path / "data" / "checkpoints") >= 2000, 30, "a checkpoint")
        acknowledged += post(stream[2000:])  # acknowledged, then the process dies at once
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    resumed_from = newest_checkpoint_events(tmp_path / "data" / "checkpoints")
    second = start()
    try:
        wait_until(lambda: trained(port) >= 0, 60, "freshrec up again")
        # served from the restored serving state before anything new is trained: real names
        # (not written back as impressions: the counts below are of the replayed events)
        body = httpx.post(
            f"{base}/v1/recommendations", json={"user_id": "u1", "k": 5, "exclude_seen": False, "write_back": False}
        ).json()
        assert len(body["items"]) == 5 and all(i["item_id"].startswith("i") for i in body["items"])
        wait_until(lambda: trained(port) >= acknowledged - resumed_from, 60, "the rest to be trained")
        threading.Event().wait(1.0)
        assert trained(port) == acknowledged - resumed_from == 3000 - resumed_from
    finally:
        second.terminate()
        second.wait(20)
