"""Soak: steady ingest and recommend load on one freshrec process over Kafka + Redis; does it
lose events, answer 5xx or grow?

    python -m bench.soak [--minutes 10] [--events-per-s 400] [--recommend-per-s 50] [--split]

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
  the first fifth of a shorter run): growth under steady load.
- `rss_growth_after_join_window_mb`: at the end minus one minute after the trainer's join
  window (`trainer.join_window_s`, 300 s) first filled. Impressions wait in that window for an
  action, so the joiner's working set grows for its whole length (every impression of the last
  300 s of event time, written-back ones included) and only then levels off; growth after it is
  what a leak would show. Absent when the run is too short for that.
- `rss_slope_mb_per_min`: least-squares slope of the RSS over that same stretch.

RSS is sampled every 2 s; "at" a time means the median of the samples in the minute around it
("at the end": the last minute), because single samples swing by up to 100 MB as training
steps, syncs and checkpoints allocate and free. `rss_mb_every_10s` has the whole curve, and
`joiner` the impressions pending and closed at the end.
- `trainer_alive`, `step_failures`, `ready`: the trainer's state at the end (from /readyz).

With `--split` the same load goes to a `freshrec gateway` and a `freshrec trainer` process
(the cluster roles) instead of one `up`: the RSS figures are of the two together, and
`processes` has each one's, so that growth can be told apart between serving and training.
Its figures go to bench/results/soak_split.json.

Every 10 s each process' /metrics is read too, so that a rise in RSS can be told apart. In
`processes`: `rss_anon_growth_after_warmup_mb` and `rss_file_growth_after_warmup_mb`, the
growth of its anonymous memory (heaps, Python's object arenas, stacks) and of the pages of
files it maps (the code of its shared libraries, paged in as new paths run), apart;
`allocator`, the C allocator the process ran on; `heap_in_use_mb_growth_after_warmup`, what
the program holds more of (C heap in use, from jemalloc's or glibc's statistics);
`heap_free_mb_growth_after_warmup`, what the allocator keeps freed; and
`gc_frozen_objects_growth_after_warmup`, the objects frozen out of Python's cyclic collector.

The last line printed is JSON; the figures go to bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
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
from services.config import load_config
from services.replay import read_consumed
from tests import local_servers

USERS, ITEMS, BATCH = 5_000, 2_000, 20
SAMPLE_S = 2.0  # RSS sampling period
RSS_PARTS = ("anon", "file")  # RssAnon, RssFile of /proc/<pid>/status
LEVEL_S = 60.0  # the RSS "at" a time: the median of the samples in this long a span around it


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident set size of a process (or, by `field`, its anonymous part `RssAnon` or its
    part mapped from files `RssFile`), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for process {pid}")


def level(samples: list[tuple[float, float]], at_s: float) -> float:
    """The median RSS of (seconds, MB) samples within LEVEL_S / 2 of `at_s`."""
    near = [mb for t, mb in samples if abs(t - at_s) <= LEVEL_S / 2]
    return float(statistics.median(near)) if near else float("nan")


def total(by_process: list[tuple[float, dict[str, float]]]) -> list[tuple[float, float]]:
    """(seconds, MB of all the processes together) of per-process samples."""
    return [(t, sum(mb.values())) for t, mb in by_process]


def levels(samples: list[tuple[float, float]], warmup_s: float, settled_s: float) -> dict[str, float]:
    """The RSS at the start (first sample), after the warm-up, a minute after the join window
    filled (NaN when the run ends before a whole minute after that) and at the end (the
    median of the last LEVEL_S)."""
    end_s = samples[-1][0]
    return {
        "start": samples[0][1],
        "warm": level(samples, warmup_s),
        "settled": level(samples, settled_s) if settled_s <= end_s - LEVEL_S else float("nan"),
        "end": float(statistics.median(mb for t, mb in samples if t >= end_s - LEVEL_S)),
    }


def slope_mb_per_min(samples: list[tuple[float, float]], from_s: float) -> float:
    """Least-squares slope of the RSS samples taken from `from_s` on, in MB per minute."""
    after = [(t, mb) for t, mb in samples if t >= from_s]
    if len(after) < 2:
        return float("nan")
    return statistics.linear_regression([t for t, _ in after], [mb for _, mb in after]).slope * 60


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
    parser.add_argument("--split", action="store_true", help="a gateway and a trainer process instead of one up")
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
        cluster = ["--kafka", f"{broker}/soak-{run}", "--redis", redis_url]
        serving = ["--host", "127.0.0.1", "--port", str(port), "--grpc-port", str(grpc_port), *cluster]
        metrics_url = "/metrics"  # where the trainer's series are
        if args.split:
            metrics_port = local_servers.free_port()
            metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            trainer_env = {**env, "FRESHREC_METRICS_PORT": str(metrics_port)}
            commands = {"trainer": (["trainer", *cluster], trainer_env), "gateway": (["gateway", *serving], env)}
        else:
            commands = {"up": (["up", *serving], env)}
        servers: dict[str, subprocess.Popen[bytes]] = {}
        for name, (argv_, env_) in commands.items():
            servers[name] = server = subprocess.Popen(
                [sys.executable, "-m", "services.cli", *argv_],
                env=env_,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            stack.callback(server.wait, 30)
            stack.callback(server.terminate)
        client = stack.enter_context(httpx.Client(base_url=base, timeout=10))

        local_servers.wait_healthy(client)
        if args.split:
            local_servers.wait_healthy(client, what="the trainer's /metrics", path=metrics_url)
        loads = [
            Load("ingest", base, args.events_per_s / BATCH, 4, ingest),
            Load("recommend", base, args.recommend_per_s, 8, recommend),
        ]
        stop = threading.Event()

        def rss_now() -> dict[str, float]:
            return {name: rss_mb(server.pid) for name, server in servers.items()}

        def parts_now() -> dict[str, dict[str, float]]:
            """Each process' RSS split: anonymous memory, and pages of mapped files."""
            return {
                name: {part: rss_mb(server.pid, f"Rss{part.title()}") for part in RSS_PARTS}
                for name, server in servers.items()
            }

        metrics_urls = {name: metrics_url if name == "trainer" else "/metrics" for name in servers}
        allocators: dict[str, str] = {}  # the C allocator each process runs on, from its heap series

        def memory_now() -> dict[str, dict[str, float]]:
            """Each process' C heap in use and free (MB) and its frozen objects, from /metrics."""
            held = {}
            for name, url in metrics_urls.items():
                page = scrape.fetch(url, client)
                held[name] = {"frozen": sum(scrape.values(page, "freshrec_gc_frozen_objects"))}
                for sample_name, labels, value in scrape.samples(page):
                    if sample_name == "freshrec_heap_bytes":
                        held[name][labels["state"]] = value / 2**20
                        allocators[name] = labels.get("allocator", "")
            return held

        by_process = [(0.0, rss_now())]  # (seconds, MB by process)
        parts = [(0.0, parts_now())]  # (seconds, {process: {part: MB}})
        memory = [(0.0, memory_now())]  # every 10 s: (seconds, {process: {what: figure}})
        started = time.perf_counter()
        for load in loads:
            load.start(stop)
        warmup_s = min(120.0, seconds / 5)
        join_window_s = load_config(env=env).trainer.join_window_s
        settled_s = join_window_s + LEVEL_S  # the join window has filled, a minute ago
        warm_reported = False
        while (elapsed := time.perf_counter() - started) < seconds:
            time.sleep(min(SAMPLE_S - elapsed % SAMPLE_S, seconds - elapsed))
            elapsed = time.perf_counter() - started
            by_process.append((elapsed, rss_now()))
            parts.append((elapsed, parts_now()))
            if round(elapsed / SAMPLE_S) % round(10 / SAMPLE_S) == 0:
                memory.append((elapsed, memory_now()))
            if not warm_reported and elapsed >= warmup_s + LEVEL_S / 2:
                warm_reported = True
                print(f"after {warmup_s:.0f} s (warm-up): RSS {level(total(by_process), warmup_s):.0f} MB", flush=True)
        samples = total(by_process)
        rss = levels(samples, warmup_s, settled_s)
        rss_start, rss_warm, rss_settled, rss_end = (rss[k] for k in ("start", "warm", "settled", "end"))
        stop.set()
        for load in loads:
            load.join()
        print(f"after {time.perf_counter() - started:.0f} s: RSS {rss_end:.0f} MB; waiting for the trainer", flush=True)
        deadline = time.monotonic() + 120
        while read_consumed(client, metrics_url) < acknowledged + written_back(client) and time.monotonic() < deadline:
            time.sleep(0.5)
        impressions = written_back(client)
        taken = read_consumed(client, metrics_url)
        readiness = client.get("/readyz").json()
        page = scrape.fetch(metrics_url, client)
        joiner = {
            "pending_impressions": sum(scrape.values(page, "freshrec_joiner_pending_impressions")),
            "closed_impressions": sum(scrape.values(page, "freshrec_joiner_closed_impressions")),
        }
        if args.split:  # the gateway's /readyz has no trainer block: the trainer process' own state
            readiness["trainer"] = {
                "alive": servers["trainer"].poll() is None,
                "step_failures": int(sum(scrape.values(page, "freshrec_trainer_step_failures_total"))),
            }
        processes: dict[str, dict[str, Any]] = {}
        for name in servers:
            one = levels([(t, mb[name]) for t, mb in by_process], warmup_s, settled_s)
            processes[name] = {f"rss_{k}_mb": v for k, v in one.items() if k in ("warm", "settled", "end")}
            processes[name]["rss_growth_after_warmup_mb"] = round(one["end"] - one["warm"], 1)
            for part in RSS_PARTS:
                at = levels([(t, mb[name][part]) for t, mb in parts], warmup_s, settled_s)
                processes[name][f"rss_{part}_growth_after_warmup_mb"] = round(at["end"] - at["warm"], 1)
            processes[name]["allocator"] = allocators.get(name)
            for what in ("in_use", "free", "frozen"):
                curve = [(t, held[name][what]) for t, held in memory if what in held[name]]
                if curve:
                    at = levels(curve, warmup_s, settled_s)
                    grown = at["end"] - at["warm"]
                    key = "gc_frozen_objects" if what == "frozen" else f"heap_{what}_mb"
                    processes[name][f"{key}_growth_after_warmup"] = round(grown, 1)
            processes[name]["heap_in_use_mb_every_10s"] = [round(held[name].get("in_use", 0), 1) for _, held in memory]

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
        "rss_settled_mb": rss_settled,
        "join_window_s": join_window_s,
        "rss_mb_every_10s": [round(mb, 1) for t, mb in samples if round(t / SAMPLE_S) % round(10 / SAMPLE_S) == 0],
        "joiner": joiner,
        "processes": processes,
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
        "rss_growth_after_join_window_mb": None if math.isnan(rss_settled) else round(rss_end - rss_settled, 1),
        "rss_slope_mb_per_min": None if math.isnan(rss_settled) else round(slope_mb_per_min(samples, settled_s), 2),
        "trainer_alive": bool(readiness.get("trainer", {}).get("alive")),
        "step_failures": readiness.get("trainer", {}).get("step_failures"),
        "ready": bool(readiness.get("ready")),
    }
    figures.update(summary)
    print(f"acknowledged {acknowledged:,} events, wrote {impressions:,.0f} impressions; the trainer took {taken:,.0f}")
    print(f"written to {write('soak_split' if args.split else 'soak', figures)}")
    print(json.dumps(summary))
    return figures


if __name__ == "__main__":
    main()
