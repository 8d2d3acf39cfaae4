"""Event-to-served freshness at a steady event rate, embedded and on Kafka + Redis.

    python -m bench.freshness [--quick] [--rate 500] [--seconds 40]

For each mode one freshrec process (gateway + trainer, in this process) runs with the default
1 s sparse sync; senders post synthetic events to `POST /v1/events` at `--rate` events/s
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

Modes: "embedded" (in-memory log and serving store) and "redis" (a real Kafka-protocol broker
and a real redis-server, started on loopback ports for the run). The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from contextlib import ExitStack
from typing import Any

import httpx
import numpy as np
from prometheus_client import REGISTRY

from bench.results import write
from services import local_servers, metrics
from services.datasets import synthetic
from services.serving_store import codec

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


def run_mode(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    with ExitStack() as stack:
        if mode == "embedded":
            log_url, store_url = "memory://", "memory://"
        else:
            broker = stack.enter_context(local_servers.kafka_broker())
            log_url = f"kafka://{broker}/events-{uuid.uuid4().hex[:8]}"
            store_url = stack.enter_context(local_servers.redis_server())
        node = stack.enter_context(local_servers.running_node(log_url, store_url))  # default 1 s sync
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
        hist0 = _histogram()
        bytes0 = REGISTRY.get_sample_value("freshrec_sync_bytes_total") or 0.0
        rows0 = _synced_rows()
        version0 = node.store.latest_version()
        time.sleep(args.seconds - args.warmup)
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
            "events_sent": sum(sent),
            "rate": sum(sent) / args.seconds,
            "events_trained": node.trainer.events_trained,
            "versions": versions,
            "samples": int(hist[-1]),
            "p50_s": quantile(hist, 0.5),
            "p90_s": quantile(hist, 0.9),
            "p99_s": quantile(hist, 0.99),
            # the baseline: an event waits on average half a sync interval for the next publish
            "p50_vs_half_interval": quantile(hist, 0.5) / (node.config.trainer.sparse_sync_interval_s / 2),
            "avg_delta_bytes": delta_bytes,
            "rows_per_version": rows / max(versions, 1),
            "bytes_per_synced_row": all_bytes / max(rows, 1),
            "full_push_bytes": full_bytes,
            "delta_bytes_vs_full": delta_bytes / full_bytes,
        }
    print(
        f"{mode:9} {figures['events_sent']:>7,} events ({figures['rate']:.0f}/s), {versions} versions: "
        f"freshness p50 {figures['p50_s']:.2f} s, p90 {figures['p90_s']:.2f} s, p99 {figures['p99_s']:.2f} s; "
        f"avg delta {delta_bytes / 1024:.1f} KiB vs full push {full_bytes / 1024:.1f} KiB "
        f"({figures['delta_bytes_vs_full']:.3f}); {figures['rows_per_version']:,.0f} rows/version, "
        f"{figures['bytes_per_synced_row']:.0f} bytes/row (fp16 rows, uint64 feature keys, all included)",
        flush=True,
    )
    return figures


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="25 s per mode (under 2 minutes in all)")
    parser.add_argument("--rate", type=float, default=500.0, help="events per second")
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds of load per mode")
    parser.add_argument("--warmup", type=float, default=5.0, help="first seconds left out of the percentiles")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = 25.0
    modes = {mode: run_mode(mode, args) for mode in ("embedded", "redis")}
    figures = {"rate": args.rate, "seconds": args.seconds, "sparse_sync_interval_s": 1.0, "modes": modes}
    summary = {
        "p50_s": modes["embedded"]["p50_s"],
        "p99_s": modes["embedded"]["p99_s"],
        "redis_p50_s": modes["redis"]["p50_s"],
        "redis_p99_s": modes["redis"]["p99_s"],
        "delta_bytes_vs_full": modes["redis"]["delta_bytes_vs_full"],
    }
    figures.update(summary)
    path = write(f"freshness{'_quick' if args.quick else ''}", figures)
    print(f"written to {path}")
    print(json.dumps({k: round(v, 4) for k, v in summary.items()}))
    return figures


if __name__ == "__main__":
    main()
