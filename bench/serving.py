"""Serving under load: REST and gRPC recommend latency at fixed rates, and ANN backends vs exact search.

    python -m bench.serving [--quick]

1. A model: the trainer learns from 30,000 synthetic events (2,000 items, 10,000 users), and
   its first sync message (rows, features, dense parameters) is padded with clustered item
   vectors up to `--items` (100,000 in --quick, 1,000,000 in full mode) and published to a
   real Redis. A `freshrec gateway` process (its own Python, REST + gRPC, Kafka for ingestion)
   bootstraps from it.
2. Load: a separate process sends recommend calls for random known users (k=10,
   exclude_seen) at each fixed rate, open loop (request i is due at i / rate; latency counts
   from then, so queueing is not hidden), first over REST then over gRPC. p50/p95/p99 and
   errors per transport and rate. The client must cost little next to the server on two
   cores: REST calls go out on 32 threads with raw keep-alive HTTP/1.1 connections, gRPC
   calls as asynchronous futures from one thread.
   The gateway's model thread batches calls that queue up (`services.gateway.batcher`); the
   mean number of calls per ranker pass is read from its metrics for each run, and the
   gateway's CPU per call (`gateway_cpu_ms_per_call`: user + system time of all its threads
   over the run, from /proc, divided by the calls).
3. Filters: in this process, one replica answers each user unfiltered and with a category
   filter that keeps 10% of the items (interleaved): the medians and their ratio.
4. ANN: IVF and HNSW (`retrieval.index`, defaults) against exact inner-product search over
   the same item vectors: recall@100 and queries/s of single queries (the serving path),
   in this process.

5. Capacity: for REST and for gRPC, the highest rate at which p99 <= 25 ms with no error
   (`capacity`: rates rising by 1.5x from 25 req/s, then bisected; `--probe-seconds` each; a
   rate fails when two probes in a row miss),
   beside the floor it would reach with no transport: `in_process_ms`, the in-process cost of
   one recommendation answered in a batch of 8 (`in_process_single_ms`: alone).

The last line printed is JSON: the capacities and the floor, p99 at 200 req/s per transport, `errors` (failed calls at
200 req/s, the rate the targets are set for), `errors_all_rates` (every rate, 400 req/s
overloading two cores included), recall@100 and speed-up over exact search per ANN kind, and
the filtered-to-unfiltered latency ratio.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.results import write
from embedding_store import TableDelta, feature_keys
from retrieval.index import IndexConfig, ItemIndex
from retrieval.two_tower import TwoTower
from services import scrape
from services.datasets import synthetic
from services.serving import FILTER_EXACT_ITEMS, Request, ServingReplica
from services.serving_store import MemoryServingStore, open_serving_store
from tests import local_servers
from trainer.config import TrainerConfig
from trainer.eventlog import MemoryLog
from trainer.events import parse_event
from trainer.items import ItemRecord
from trainer.loop import Trainer
from trainer.sync import SyncMessage

USERS = 10_000
BATCH = 8  # requests per ranker pass for the in-process floor (the gateway batches what queues up)


def build_model(items: int, seed: int = 0) -> tuple[SyncMessage, list[str]]:
    """A trained model's first sync message, its item table padded to `items` clustered vectors."""
    events = [parse_event(e) for e in synthetic(users=USERS, items=2000, events=30_000, seed=seed).events]
    trainer = Trainer(TrainerConfig(batch_size=512), MemoryLog().consumer("bench"))
    for b in range(0, len(events), 512):
        trainer.train_events(events[b : b + 512])
    message = trainer.collect_sync()
    assert message is not None
    rng = np.random.default_rng(seed)
    trained = message.items
    extra = items - len(trained.keys)
    names = [f"pad{i}" for i in range(extra)]
    keys = feature_keys("item", names)
    centers = trained.rows[rng.integers(0, len(trained.rows), 200)]  # clusters around trained items
    scale = float(trained.rows.std())
    rows = centers[rng.integers(0, 200, extra)] + 0.5 * scale * rng.normal(size=(extra, trained.rows.shape[1]))
    message.items = TableDelta(
        "item", np.concatenate([trained.keys, keys]), np.concatenate([trained.rows, rows.astype(np.float32)])
    )
    message.item_names.update(zip(keys.tolist(), names, strict=True))
    users = sorted({e.user_id for e in events})
    return message, users


def _load(
    transport: str, address: str, users: list[str], rate: float, seconds: float, out: Any, write_back: bool = True
) -> None:
    """Open-loop load (runs in its own process); sends (latencies in s, errors) to `out`.
    `write_back` False: the calls opt out of writing their lists back as impressions."""
    import grpc

    from proto import freshrec_pb2 as pb
    from proto import freshrec_pb2_grpc as pb_grpc

    rng = np.random.default_rng(int(rate))
    n = int(rate * seconds)
    chosen = [users[i] for i in rng.integers(0, len(users), n)]
    latencies = np.full(n, np.nan)
    errors = [0]
    if transport == "rest":
        host, port = address.removeprefix("http://").split(":")
        local = threading.local()

        def call(user: str) -> None:
            # raw HTTP/1.1 on a keep-alive connection per thread: the load process must stay cheap
            # next to the server on a 2-core machine (an httpx client costs more CPU than the call)
            if not hasattr(local, "conn"):
                local.conn = http.client.HTTPConnection(host, int(port), timeout=5)
            body = json.dumps({"user_id": user, "k": 10, "exclude_seen": True, "write_back": write_back})
            local.conn.request("POST", "/v1/recommendations", body, {"Content-Type": "application/json"})
            response = local.conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}")
    else:  # gRPC: asynchronous calls sent from this thread at their due times (no thread per call)
        stub = pb_grpc.GatewayStub(grpc.insecure_channel(address))
        stub.Recommend(pb.RecommendRequest(user_id=users[0], k=10, exclude_seen=True, write_back=False), timeout=5)
        finished, lock = threading.Semaphore(0), threading.Lock()

        def on_done(i: int, due: float) -> Callable[[grpc.Future], None]:
            def record(future: grpc.Future) -> None:
                with lock:
                    if future.exception() is None:
                        latencies[i] = time.perf_counter() - due
                    else:
                        errors[0] += 1
                finished.release()

            return record

        start = time.perf_counter() + 0.1
        for i in range(n):
            due = start + i / rate
            time.sleep(max(0.0, due - time.perf_counter()))
            request = pb.RecommendRequest(user_id=chosen[i], k=10, exclude_seen=True, write_back=write_back)
            stub.Recommend.future(request, timeout=5).add_done_callback(on_done(i, due))
        for _ in range(n):
            finished.acquire()
        out.send((latencies[~np.isnan(latencies)].tolist(), errors[0]))
        return

    call(users[0])  # connect
    start = time.perf_counter() + 0.1

    def one(i: int) -> None:
        due = start + i / rate
        time.sleep(max(0.0, due - time.perf_counter()))
        try:
            call(chosen[i])
            latencies[i] = time.perf_counter() - due
        except Exception:
            errors[0] += 1

    with ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(one, range(n)))
    out.send((latencies[~np.isnan(latencies)].tolist(), errors[0]))


def run_load(
    transport: str,
    address: str,
    users: list[str],
    rate: float,
    seconds: float,
    quiet: bool = False,
    write_back: bool = True,
) -> dict[str, float]:
    parent, child = multiprocessing.get_context("spawn").Pipe()
    proc = multiprocessing.get_context("spawn").Process(
        target=_load, args=(transport, address, users, rate, seconds, child, write_back)
    )
    proc.start()
    latencies, errors = parent.recv()
    proc.join()
    ms = np.array(latencies) * 1000
    figures = {
        "requests": len(ms) + errors,
        "errors": errors,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
        "p95_ms": float(np.percentile(ms, 95)) if len(ms) else float("nan"),
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
    }
    if quiet:
        return figures
    print(
        f"{transport:5} {rate:6.0f} req/s: p50 {figures['p50_ms']:6.1f} ms, p95 {figures['p95_ms']:6.1f} ms, "
        f"p99 {figures['p99_ms']:6.1f} ms, errors {errors}/{figures['requests']}",
        flush=True,
    )
    return figures


def capacity(transport: str, address: str, users: list[str], seconds: float, p99_ms: float = 25.0) -> dict[str, Any]:
    """The highest request rate at which `transport` answers with p99 <= `p99_ms` and no
    error: rates rise by 1.5x from 25 req/s until one fails twice in a row, then three
    bisections between the last that passed and the first that failed (each probe `seconds`
    of open-loop load from its own process, as `run_load`). Returns the rate and every probe."""
    probes: dict[str, dict[str, float]] = {}

    def passes(rate: float, tries: int = 2) -> bool:
        """A rate passes when one of `tries` probes does (a single spike of this shared
        machine does not end the search)."""
        for attempt in range(tries):
            result = run_load(transport, address, users, rate, seconds, quiet=True)
            probes[f"{rate:.0f}" + (f"_{attempt + 1}" if attempt else "")] = result
            ok = result["errors"] == 0 and result["p99_ms"] <= p99_ms
            print(
                f"  {transport:5} {rate:6.0f} req/s: p99 {result['p99_ms']:7.1f} ms, errors {result['errors']}"
                f" -> {'pass' if ok else 'fail'}",
                flush=True,
            )
            if ok:
                return True
        return False

    good, bad = 0.0, 25.0
    while bad <= 20_000 and passes(bad):
        good, bad = bad, bad * 1.5
    for _ in range(3):
        if bad - good < 10:
            break
        middle = round((good + bad) / 2)
        good, bad = (middle, bad) if passes(middle) else (good, middle)
    return {"max_rps": good, "p99_limit_ms": p99_ms, "probe_seconds": seconds, "probes": probes}


def _replica(message: SyncMessage, index: str) -> ServingReplica:
    store = MemoryServingStore()
    store.publish(message)
    replica = ServingReplica(store, index=IndexConfig(kind=index))
    replica.catch_up()
    replica.wait_for_index()
    return replica


def in_process_ms(message: SyncMessage, users: list[str], index: str, calls: int = 320, batch: int = 1) -> float:
    """The floor: median ms per recommendation called directly on a replica in this process
    (same model, same index kind as the gateway), no transport, `batch` requests per call of
    `recommend_batch` (as the gateway's model thread batches the calls that queue up)."""
    replica = _replica(message, index)
    times = []
    for b in range(0, calls, batch):
        requests = [Request(user, 10) for user in users[b : b + batch]]
        started = time.perf_counter()
        replica.recommend_batch(requests)
        times.append((time.perf_counter() - started) / len(requests))
    ms = float(np.median(times[max(1, 10 // batch) :]) * 1000)  # the first calls compile kernels
    print(f"in process: {ms:.2f} ms per recommendation in batches of {batch}", flush=True)
    return ms


def filter_cost(message: SyncMessage, users: list[str], index: str, share: float = 0.1, calls: int = 300) -> dict:
    """What a category filter that keeps `share` of the catalogue costs, in process: the
    same replica answers each user unfiltered and filtered, interleaved; medians and ratio."""
    rng = np.random.default_rng(2)
    names = list(message.item_names.values())
    kept = rng.choice(len(names), int(len(names) * share), replace=False)
    message.catalogue = {names[i]: ItemRecord(names[i], categories=("kept",)) for i in kept.tolist()}
    try:
        replica = _replica(message, index)
    finally:
        message.catalogue = {}
    plain: list[float] = []
    filtered: list[float] = []
    for user in users[:calls]:
        for times, request in ((plain, Request(user, 10)), (filtered, Request(user, 10, categories=("kept",)))):
            started = time.perf_counter()
            answer = replica.recommend_batch([request])[0]
            times.append(time.perf_counter() - started)
            assert len(answer.items) == 10
    unfiltered_ms, filtered_ms = float(np.median(plain[10:]) * 1000), float(np.median(filtered[10:]) * 1000)
    path = "exact over the allowed items" if len(kept) <= FILTER_EXACT_ITEMS else "index over-fetch"
    print(
        f"filter keeping {share:.0%} ({len(kept):,} items, {path}): {filtered_ms:.1f} ms vs "
        f"{unfiltered_ms:.1f} ms unfiltered ({filtered_ms / unfiltered_ms:.2f}x)",
        flush=True,
    )
    return {
        "kept_items": len(kept),
        "path": path,
        "unfiltered_ms": unfiltered_ms,
        "filtered_ms": filtered_ms,
        "filtered_vs_unfiltered": filtered_ms / unfiltered_ms,
    }


def ann_figures(vectors: np.ndarray, queries: np.ndarray, k: int = 100) -> dict[str, dict[str, float]]:
    keys = np.arange(1, len(vectors) + 1, dtype=np.uint64)
    exact_scores = queries @ vectors.T
    exact = [set(keys[np.argpartition(-s, k)[:k]].tolist()) for s in exact_scores]
    out: dict[str, dict[str, float]] = {}
    per_second: dict[str, float] = {}
    for kind in ("flat", "ivf", "hnsw"):
        index = ItemIndex(vectors.shape[1], IndexConfig(kind=kind, device="cpu", min_ann_items=1))
        started = time.perf_counter()
        index.upsert(keys, vectors)
        index.publish(wait=True)
        build_s = time.perf_counter() - started
        started = time.perf_counter()
        found = [index.search(q, k)[0] for q in queries]
        per_second[kind] = len(queries) / (time.perf_counter() - started)
        recall = float(np.mean([len(set(f.tolist()) & e) / k for f, e in zip(found, exact, strict=True)]))
        out[kind] = {"recall100": recall, "queries_per_s": per_second[kind], "build_s": build_s}
    for kind in out:
        out[kind]["speedup"] = per_second[kind] / per_second["flat"]
        print(
            f"{kind:5} recall@100 {out[kind]['recall100']:.3f}, {out[kind]['queries_per_s']:8,.0f} queries/s "
            f"({out[kind]['speedup']:.1f}x exact), built in {out[kind]['build_s']:.1f} s",
            flush=True,
        )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100,000 items, 100 and 200 req/s for 10 s per transport")
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--rates", default="100,200,400", help="requests per second, comma-separated")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of load per rate and transport")
    parser.add_argument("--index", default="ivf", help="the gateway's index kind (FRESHREC_INDEX)")
    parser.add_argument("--probe-seconds", type=float, default=10.0, help="seconds of load per capacity probe")
    args = parser.parse_args(argv)
    if args.quick:
        args.items, args.rates, args.seconds, args.probe_seconds = 100_000, "100,200", 10.0, 5.0
    rates = [float(r) for r in args.rates.split(",")]

    started = time.perf_counter()
    message, users = build_model(args.items)
    print(f"model: trained and padded to {len(message.items.keys):,} items in {time.perf_counter() - started:.0f} s")
    figures: dict[str, Any] = {"items": args.items, "index": args.index, "seconds": args.seconds, "load": {}}
    with ExitStack() as stack:
        redis_url = stack.enter_context(local_servers.redis_server())
        broker = stack.enter_context(local_servers.kafka_broker())
        store = open_serving_store(redis_url)
        store.publish(message)
        port, grpc_port = local_servers.free_port(), local_servers.free_port()
        env = {**os.environ, "FRESHREC_INDEX": args.index}
        gateway = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.cli",
                "gateway",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--grpc-port",
                str(grpc_port),
                "--kafka",
                f"{broker}/events-{uuid.uuid4().hex[:8]}",
                "--redis",
                redis_url,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        stack.callback(gateway.wait, 10)
        stack.callback(gateway.terminate)
        local_servers.wait_until(lambda: _model_version(port) >= 1, 120, "the gateway to load the model")
        transports = {"rest": f"http://127.0.0.1:{port}", "grpc": f"127.0.0.1:{grpc_port}"}
        # warm up: the gateway compiles its kernels on first use and builds the ANN snapshot in
        # the background after loading the model; measure after both
        for transport, address in transports.items():
            run_load(transport, address, users, 20, 5, quiet=True)
        for rate in rates:
            for transport, address in transports.items():
                before, cpu_before = _batch_counts(port), _cpu_s(gateway.pid)
                result = run_load(transport, address, users, rate, args.seconds)
                after, cpu_after = _batch_counts(port), _cpu_s(gateway.pid)
                result["mean_batch"] = (after[0] - before[0]) / max(after[1] - before[1], 1.0)
                result["gateway_cpu_ms_per_call"] = (cpu_after - cpu_before) * 1000 / max(result["requests"], 1)
                print(
                    f"      mean calls per ranker pass {result['mean_batch']:.2f}, "
                    f"gateway CPU {result['gateway_cpu_ms_per_call']:.1f} ms per call",
                    flush=True,
                )
                figures["load"][f"{transport}_{rate:.0f}"] = result
        figures["capacity"] = {}
        for transport, address in transports.items():
            figures["capacity"][transport] = found = capacity(transport, address, users, args.probe_seconds)
            print(f"{transport}: {found['max_rps']:.0f} req/s at p99 <= 25 ms with no error", flush=True)
    figures["in_process_ms"] = in_process_ms(message, users, args.index, batch=BATCH)
    figures["in_process_single_ms"] = in_process_ms(message, users, args.index)
    figures["filter_10pct"] = filter_cost(message, users, args.index)
    for figures_at_rate in figures["load"].values():
        figures_at_rate["p50_vs_in_process"] = figures_at_rate["p50_ms"] / figures["in_process_ms"]
    rng = np.random.default_rng(1)
    queries = TwoTower.user_queries(message.users.rows[rng.integers(0, len(message.users.rows), 300)])
    figures["ann"] = ann_figures(message.items.rows.astype(np.float32), queries)
    load = figures["load"]
    summary = {
        "max_rps_p99_25ms_rest": figures["capacity"]["rest"]["max_rps"],
        "max_rps_p99_25ms_grpc": figures["capacity"]["grpc"]["max_rps"],
        "in_process_ms": figures["in_process_ms"],
        "in_process_single_ms": figures["in_process_single_ms"],
        "rest_p99_ms_200qps": load.get("rest_200", {}).get("p99_ms"),
        "grpc_p99_ms_200qps": load.get("grpc_200", {}).get("p99_ms"),
        "errors": sum(v["errors"] for name, v in load.items() if name.endswith("_200")),
        "errors_all_rates": sum(v["errors"] for v in load.values()),
        "hnsw_recall100": figures["ann"]["hnsw"]["recall100"],
        "ivf_recall100": figures["ann"]["ivf"]["recall100"],
        "hnsw_speedup": figures["ann"]["hnsw"]["speedup"],
        "ivf_speedup": figures["ann"]["ivf"]["speedup"],
        "filter_10pct_vs_unfiltered": figures["filter_10pct"]["filtered_vs_unfiltered"],
    }
    figures.update(summary)
    path = write(f"serving{'_quick' if args.quick else ''}", figures)
    print(f"written to {path}")
    print(json.dumps({k: v if v is None or isinstance(v, int) else round(v, 4) for k, v in summary.items()}))
    return figures


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) a process has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _batch_counts(port: int) -> tuple[float, float]:
    """(calls, ranker passes) so far, from the gateway's freshrec_recommend_batch_size histogram."""
    text = scrape.fetch(f"http://127.0.0.1:{port}/metrics")
    calls, passes = (scrape.values(text, f"freshrec_recommend_batch_size_{part}") for part in ("sum", "count"))
    return sum(calls), sum(passes)


def _model_version(port: int) -> int:
    """The version the gateway serves (0 while it is not up or not loaded)."""
    try:
        return int(httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).json().get("model_version", 0))
    except httpx.HTTPError:
        return 0


if __name__ == "__main__":
    main()
