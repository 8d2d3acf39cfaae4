"""Event-to-served freshness at a steady event rate, embedded and on Kafka + Redis.

    python -m bench.freshness [--quick] [--rate 500] [--seconds 40]

For each mode one freshrec process (gateway + trainer, in this process) runs twice: with the
shipped sync (a step's rows published as soon as `trainer.sparse_sync_min_interval_s` has
passed since the previous publish) and, as the baseline, with one publish a second (the min
interval set to 1 s); senders post synthetic events to `POST /v1/events` at `--rate` events/s
(4 clients, batches every 100 ms) from 20,000 synthetic users over 5,000 items. Freshness is
what the serving replica exports: for a sample of each
version's events, the time from the log's acceptance of the event to the moment the replica
has applied the first version that includes it (`freshrec_freshness_seconds`). Percentiles
are read from that histogram (linear within buckets, as Prometheus' histogram_quantile does;
buckets are 0.1 s wide up to 1 s, 0.25 s up to 2 s). The first `--warmup` seconds of each mode
are left out.

Delta size: the encoded bytes of an average published version (what the Redis stream holds
per version, rows as fp16) against a full push of the current state (the encoded snapshot
a bootstrapping replica reads, at the end of the run), and the bytes per synced row (all
bytes of the versions over all rows they carry: embeddings, feature keys, counts).

CPU: the process's CPU time over the measured part of each run, the senders' threads left
out, per 1,000 events trained (`cpu_s_per_1k_events`), and its ratio to the baseline's. Each
mode and setting runs `--repeats` times, interleaved with the other setting (the machine is
shared and noisy): the rows give the worst latency percentiles and the mean CPU of the runs.

Modes: "embedded" (in-memory log and serving store) and "redis" (a real Kafka-protocol broker
and a real redis-server, started on loopback ports for the run). The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client import REGISTRY

from bench.results import write
from services import metrics
from services.datasets import synthetic
from services.serving_store import codec
from tests import local_servers

PARTS = ("trainer", "sync", "replica")  # the node's threads whose CPU is reported one by one
BASELINE_INTERVAL_S = 1.0  # the baseline publishes once a second, as before steps nudged the sync
USERS, ITEMS = 20_000, 5_000  # synthetic catalogue: a delta touches a small share of it, as in production


def _histogram() -> np.ndarray:
    """Cumulative counts of the freshness histogram, one per bucket (the last is +Inf)."""
    return np.array(
        [
            REGISTRY.get_sample_value("freshrec_freshness_seconds_bucket", {"le": le}) or 0.0
            for le in (*map(str, metrics.FRESHNESS_BUCKETS), "+Inf")
        ]
    )


def _synced_rows() -> float:
    """Rows published so far, all tables together."""
    return sum(
        sample.value
        for family in REGISTRY.collect()
        if family.name == "freshrec_sync_rows"
        for sample in family.samples
        if sample.name == "freshrec_sync_rows_total"
    )


def quantile(cumulative: np.ndarray, q: float) -> float:
    """The q-quantile of a histogram's cumulative bucket counts (linear within a bucket)."""
    total = cumulative[-1]
    if total <= 0:
        return float("nan")
    bounds = np.array([0.0, *metrics.FRESHNESS_BUCKETS])
    rank = q * total
    i = int(np.searchsorted(cumulative, rank))
    if i >= len(metrics.FRESHNESS_BUCKETS):
        return float("inf")  # beyond the last finite bucket
    below = cumulative[i - 1] if i else 0.0
    inside = cumulative[i] - below
    return float(bounds[i] + (bounds[i + 1] - bounds[i]) * ((rank - below) / inside if inside else 1.0))


SENDERS = 4  # concurrent clients: one waits for its batch's acknowledgement (acks=all) while others send


def _send(port: int, rate: float, seconds: float, stop: threading.Event, sent: list[int], seed: int) -> None:
    """Post synthetic events at `rate` per second in 100 ms batches, with current timestamps."""
    events = synthetic(users=USERS, items=ITEMS, events=int(rate * seconds) + 1000, seed=seed).events
    per_batch = max(1, round(rate * 0.1))
    run = uuid.uuid4().hex[:8]
    start = time.monotonic()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        n = 0
        while not stop.is_set() and n + per_batch <= len(events):
            now_ms = int(time.time() * 1000)
            batch = [
                {**e, "event_id": f"{run}-{n + k}", "timestamp_ms": now_ms}
                for k, e in enumerate(events[n : n + per_batch])
            ]
            reply = client.post("/v1/events", json={"events": batch})
            reply.raise_for_status()
            n += per_batch
            sent[seed] = n
            pause = start + n / rate - time.monotonic()
            if pause > 0:
                stop.wait(pause)


def _thread_cpu_s(native_id: int) -> float:
    """CPU seconds (user + system) a thread of this process has used so far (Linux /proc)."""
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_mode(mode: str, args: argparse.Namespace, min_interval_s: float | None = None) -> dict[str, Any]:
    """One mode's run; `min_interval_s` overrides `trainer.sparse_sync_min_interval_s` (None:
    the shipped setting)."""
    overrides = {} if min_interval_s is None else {"trainer.sparse_sync_min_interval_s": min_interval_s}
    with ExitStack() as stack:
        if mode == "embedded":
            log_url, store_url = "memory://", "memory://"
        else:
            broker = stack.enter_context(local_servers.kafka_broker())
            log_url = f"kafka://{broker}/events-{uuid.uuid4().hex[:8]}"
            store_url = stack.enter_context(local_servers.redis_server())
        node = stack.enter_context(local_servers.running_node(log_url, store_url, **overrides))
        assert node.trainer is not None and node.replica is not None
        stop, sent = threading.Event(), [0] * SENDERS
        senders = [
            threading.Thread(
                target=_send, args=(node.http_port, args.rate / SENDERS, args.seconds, stop, sent, s), daemon=True
            )
            for s in range(SENDERS)
        ]
        for sender in senders:
            sender.start()
        time.sleep(args.warmup)
        senders_cpu0 = sum(_thread_cpu_s(t.native_id or 0) for t in senders)
        parts = [t for t in threading.enumerate() if t.name in PARTS]
        parts_cpu0 = {t.name: _thread_cpu_s(t.native_id or 0) for t in parts}
        cpu0, trained0 = time.process_time(), node.trainer.events_trained
        hist0 = _histogram()
        bytes0 = REGISTRY.get_sample_value("freshrec_sync_bytes_total") or 0.0
        rows0 = _synced_rows()
        version0 = node.store.latest_version()
        time.sleep(args.seconds - args.warmup)
        # the node's CPU (trainer, sync, serving, gateway; the senders' threads left out) per
        # 1,000 events trained, over the measured part of the run
        senders_cpu = sum(_thread_cpu_s(t.native_id or 0) for t in senders) - senders_cpu0
        node_cpu = time.process_time() - cpu0 - senders_cpu
        trained = node.trainer.events_trained - trained0
        parts_cpu = {
            t.name: (_thread_cpu_s(t.native_id or 0) - parts_cpu0[t.name]) / max(trained, 1) * 1000 for t in parts
        }
        stop.set()
        for sender in senders:
            sender.join()
        time.sleep(2 * node.config.trainer.sparse_sync_interval_s + 1)  # the last events reach serving
        hist = _histogram() - hist0
        versions = node.store.latest_version() - version0
        all_bytes = (REGISTRY.get_sample_value("freshrec_sync_bytes_total") or 0.0) - bytes0
        delta_bytes = all_bytes / max(versions, 1)
        rows = _synced_rows() - rows0
        full_bytes = len(codec.encode(node.store.snapshot()))
        figures = {
            "sparse_sync_interval_s": node.config.trainer.sparse_sync_interval_s,
            "sparse_sync_min_interval_s": node.config.trainer.sparse_sync_min_interval_s,
            "cpu_s_per_1k_events": node_cpu / max(trained, 1) * 1000,
            # the threads of the parts (the trainer's steps, the sync publisher's collection and
            # publishes, the replica applying versions) per 1,000 events: less noisy than the total
            **{f"{name}_cpu_s_per_1k_events": parts_cpu.get(name, 0.0) for name in PARTS},
            "events_sent": sum(sent),
            "rate": sum(sent) / args.seconds,
            "events_trained": node.trainer.events_trained,
            "versions": versions,
            "samples": int(hist[-1]),
            "p50_s": quantile(hist, 0.5),
            "p90_s": quantile(hist, 0.9),
            "p99_s": quantile(hist, 0.99),
            "avg_delta_bytes": delta_bytes,
            "rows_per_version": rows / max(versions, 1),
            "bytes_per_synced_row": all_bytes / max(rows, 1),
            "full_push_bytes": full_bytes,
            "delta_bytes_vs_full": delta_bytes / full_bytes,
        }
    print(
        f"{mode:9} min interval {figures['sparse_sync_min_interval_s']:.2f} s: "
        f"{figures['events_sent']:>7,} events ({figures['rate']:.0f}/s), {versions} versions, "
        f"{figures['cpu_s_per_1k_events']:.3f} CPU s per 1k events (trainer "
        f"{figures['trainer_cpu_s_per_1k_events']:.3f}, sync {figures['sync_cpu_s_per_1k_events']:.3f}, "
        f"replica {figures['replica_cpu_s_per_1k_events']:.3f}): "
        f"freshness p50 {figures['p50_s']:.2f} s, p90 {figures['p90_s']:.2f} s, p99 {figures['p99_s']:.2f} s; "
        f"avg delta {delta_bytes / 1024:.1f} KiB vs full push {full_bytes / 1024:.1f} KiB "
        f"({figures['delta_bytes_vs_full']:.3f}); {figures['rows_per_version']:,.0f} rows/version, "
        f"{figures['bytes_per_synced_row']:.0f} bytes/row (fp16 rows, uint64 feature keys, all included)",
        flush=True,
    )
    return figures


def _combined(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One setting's repeated runs as one row: the worst of each latency figure, the mean of
    the rest."""
    worst = {k: max(r[k] for r in runs) for k in ("p50_s", "p90_s", "p99_s")}
    return {k: float(np.mean([r[k] for r in runs])) for k in runs[0]} | worst


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="25 s per run (about 5 minutes in all)")
    parser.add_argument("--rate", type=float, default=500.0, help="events per second")
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds of load per mode")
    parser.add_argument("--warmup", type=float, default=5.0, help="first seconds left out of the percentiles")
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode and setting (interleaved)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = 25.0
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {"shipped": {}, "baseline": {}}
    for mode in ("embedded", "redis"):  # interleaved: baseline, shipped, baseline, shipped, ...
        for _ in range(args.repeats):
            runs["baseline"].setdefault(mode, []).append(run_mode(mode, args, min_interval_s=BASELINE_INTERVAL_S))
            runs["shipped"].setdefault(mode, []).append(run_mode(mode, args))
    # per setting and mode: the worst percentiles of its runs, the mean CPU per event
    modes, baseline = ({mode: _combined(r) for mode, r in runs[name].items()} for name in ("shipped", "baseline"))
    figures = {"rate": args.rate, "seconds": args.seconds, "repeats": args.repeats, "modes": modes}
    figures.update(baseline_1s=baseline, runs=runs)
    cpu = {mode: modes[mode]["cpu_s_per_1k_events"] / baseline[mode]["cpu_s_per_1k_events"] for mode in modes}
    # each part's CPU per event against the baseline's, both modes together
    parts = {
        part: sum(modes[m][f"{part}_cpu_s_per_1k_events"] for m in modes)
        / max(sum(baseline[m][f"{part}_cpu_s_per_1k_events"] for m in modes), 1e-9)
        for part in PARTS
    }
    summary = {
        "p50_s": modes["embedded"]["p50_s"],
        "p99_s": modes["embedded"]["p99_s"],
        "redis_p50_s": modes["redis"]["p50_s"],
        "redis_p99_s": modes["redis"]["p99_s"],
        "cpu_s_per_1k_events": modes["embedded"]["cpu_s_per_1k_events"],
        "redis_cpu_s_per_1k_events": modes["redis"]["cpu_s_per_1k_events"],
        "cpu_vs_1s_interval": cpu["embedded"],
        "redis_cpu_vs_1s_interval": cpu["redis"],
        **{f"{part}_cpu_vs_1s_interval": parts[part] for part in PARTS},
        "baseline_p99_s": baseline["embedded"]["p99_s"],
        "baseline_redis_p99_s": baseline["redis"]["p99_s"],
        "delta_bytes_vs_full": modes["redis"]["delta_bytes_vs_full"],
    }
    figures.update(summary)
    path = write(f"freshness{'_quick' if args.quick else ''}", figures)
    print(f"written to {path}")
    print(json.dumps({k: round(v, 4) for k, v in summary.items()}))
    return figures


if __name__ == "__main__":
    main()
