"""Soak: steady ingest and recommend load on one freshrec process over Kafka + Redis; does it
lose events, answer 5xx or grow?

    python -m bench.soak [--minutes 10] [--events-per-s 400] [--recommend-per-s 50]

A `freshrec up --kafka … --redis …` process (gateway + trainer, checkpoints every 10 s) runs on
a real Kafka-protocol broker and a real redis-server. From this process, sender threads post
synthetic events (batches of 20, unique event ids, 5% of them invalid on purpose) and
recommendation calls for known users, each open loop at a fixed rate, for `--minutes`.
Afterwards it waits for the trainer to take every acknowledged event.

- `lost_events`: events the gateway acknowledged, and impressions it wrote back for the lists
  it served, that the trainer never took (trained or, as copies, dropped) — must be 0.
- `errors_5xx`: answers with a 5xx status (or no answer at all) — must be 0.
- `rss_growth_mb`: the process' resident memory at the end minus when the load started.
- `rss_growth_after_warmup_mb`: at the end minus after the warm-up (the first two minutes, or
  the first fifth of a shorter run), once caches, seen sets and the model have filled in:
  growth under steady load. `rss_mb_every_10s` has the whole curve.
- `trainer_alive`, `step_failures`, `ready`: the trainer's state at the end (from /readyz).

The last line printed is JSON; the figures go to bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import httpx

from bench.results import write
from services import scrape
from services.replay import read_consumed
from tests import local_servers

USERS, ITEMS, BATCH = 5_000, 2_000, 20


def rss_mb(pid: int) -> float:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def written_back(client: httpx.Client) -> float:
    """Impressions the gateway wrote to the log for the lists it served: they reach the trainer
    beside the posted events."""
    return sum(scrape.values(scrape.fetch("/metrics", client), "freshrec_impressions_written_total"))


class Load:
    """Open-loop senders: `fn(i)` is called at i / rate from `threads` threads until `stop`."""

    def __init__(self, name: str, base_url: str, rate: float, threads: int, fn: Any) -> None:
        self.name, self.base_url, self.rate, self.fn = name, base_url, rate, fn
        self.codes: Counter[str] = Counter()
        self.latencies: list[float] = []
        self._lock = threading.Lock()
        self._next = 0
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def start(self, stop: threading.Event) -> None:
        self._stop, self._t0 = stop, time.perf_counter()
        for t in self._threads:
            t.start()

    def join(self) -> None:
        for t in self._threads:
            t.join()

    def _run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=10) as client:
            while not self._stop.is_set():
                with self._lock:
                    i, self._next = self._next, self._next + 1
                due = self._t0 + i / self.rate
                if (wait := due - time.perf_counter()) > 0:
                    time.sleep(wait)
                try:
                    code = str(self.fn(client, i))
                except httpx.HTTPError as e:
                    code = type(e).__name__
                with self._lock:
                    self.codes[code] += 1
                    self.latencies.append(time.perf_counter() - due)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--events-per-s", type=float, default=400.0)
    parser.add_argument("--recommend-per-s", type=float, default=50.0)
    args = parser.parse_args(argv)
    seconds = args.minutes * 60
    run = uuid.uuid4().hex[:8]
    acknowledged = 0
    ack_lock = threading.Lock()

    def ingest(client: httpx.Client, i: int) -> int:
        nonlocal acknowledged
        events = [
            {
                "event_id": f"soak-{run}-{i}-{k}",
                "user_id": f"u{(i * BATCH + k) % USERS}",
                "item_id": f"i{(i * 7 + k * 13) % ITEMS}",
                "type": "clik" if k == 0 and i % 5 == 0 else ("click" if k % 3 else "impression"),
            }
            for k in range(BATCH)
        ]
        response = client.post("/v1/events", json={"events": events})
        if response.status_code == 200:
            with ack_lock:
                acknowledged += response.json()["accepted"]
        return response.status_code

    def recommend(client: httpx.Client, i: int) -> int:
        body = {"user_id": f"u{(i * 31) % USERS}", "k": 10}
        return client.post("/v1/recommendations", json=body).status_code

    with ExitStack() as stack:
        checkpoints = stack.enter_context(TemporaryDirectory())  # removed after the process stops
        redis_url = stack.enter_context(local_servers.redis_server())
        broker = stack.enter_context(local_servers.kafka_broker())
        port, grpc_port = local_servers.free_port(), local_servers.free_port()
        base = f"http://127.0.0.1:{port}"
        env = {**os.environ, "FRESHREC_CHECKPOINT_DIR": checkpoints, "FRESHREC_CHECKPOINT_INTERVAL_S": "10"}
        argv_ = ["up", "--host", "127.0.0.1", "--port", str(port), "--grpc-port", str(grpc_port)]
        argv_ += ["--kafka", f"{broker}/soak-{run}", "--redis", redis_url]
        server = subprocess.Popen(
            [sys.executable, "-m", "services.cli", *argv_],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        stack.callback(server.wait, 30)
        stack.callback(server.terminate)
        client = stack.enter_context(httpx.Client(base_url=base, timeout=10))

        local_servers.wait_healthy(client)
        loads = [
            Load("ingest", base, args.events_per_s / BATCH, 4, ingest),
            Load("recommend", base, args.recommend_per_s, 8, recommend),
        ]
        stop = threading.Event()
        rss_start = rss_mb(server.pid)
        curve = [rss_start]
        started = time.perf_counter()
        for load in loads:
            load.start(stop)
        warmup_s = min(120.0, seconds / 5)
        rss_warm = float("nan")
        while (elapsed := time.perf_counter() - started) < seconds:
            time.sleep(min(10.0 - elapsed % 10.0, seconds - elapsed))
            elapsed = time.perf_counter() - started
            curve.append(rss_mb(server.pid))
            if rss_warm != rss_warm and elapsed >= warmup_s - 1e-3:  # NaN until the warm-up ends
                rss_warm = curve[-1]
                print(f"after {elapsed:.0f} s (warm-up): RSS {rss_warm:.0f} MB", flush=True)
        rss_end = rss_mb(server.pid)
        stop.set()
        for load in loads:
            load.join()
        print(f"after {time.perf_counter() - started:.0f} s: RSS {rss_end:.0f} MB; waiting for the trainer", flush=True)
        deadline = time.monotonic() + 120
        while read_consumed(client, "/metrics") < acknowledged + written_back(client) and time.monotonic() < deadline:
            time.sleep(0.5)
        impressions = written_back(client)
        taken = read_consumed(client, "/metrics")
        readiness = client.get("/readyz").json()

    errors_5xx = sum(n for load in loads for code, n in load.codes.items() if not code.isdigit() or int(code) >= 500)
    figures: dict[str, Any] = {
        "minutes": args.minutes,
        "events_per_s": args.events_per_s,
        "recommend_per_s": args.recommend_per_s,
        "acknowledged_events": acknowledged,
        "impressions_written": impressions,
        "consumed_events": taken,
        "codes": {load.name: dict(load.codes) for load in loads},
        "rss_start_mb": rss_start,
        "rss_warm_mb": rss_warm,
        "rss_end_mb": rss_end,
        "rss_mb_every_10s": [round(v, 1) for v in curve],
        "readiness": readiness,
    }
    for load in loads:
        lat = sorted(load.latencies)
        p99 = lat[int(0.99 * (len(lat) - 1))] * 1000 if lat else float("nan")
        print(f"{load.name:9} {sum(load.codes.values()):6,} calls, codes {dict(load.codes)}, p99 {p99:.1f} ms")
        figures[f"{load.name}_p99_ms"] = p99
    summary = {
        "lost_events": int(max(acknowledged + impressions - taken, 0)),
        "errors_5xx": errors_5xx,
        "rss_growth_mb": round(rss_end - rss_start, 1),
        "rss_growth_after_warmup_mb": round(rss_end - rss_warm, 1),
        "trainer_alive": bool(readiness.get("trainer", {}).get("alive")),
        "step_failures": readiness.get("trainer", {}).get("step_failures"),
        "ready": bool(readiness.get("ready")),
    }
    figures.update(summary)
    print(f"acknowledged {acknowledged:,} events, wrote {impressions:,.0f} impressions; the trainer took {taken:,.0f}")
    print(f"written to {write('soak', figures)}")
    print(json.dumps(summary))
    return figures


if __name__ == "__main__":
    main()
