"""Data-parallel training: 1, 2 (and 4) trainer workers as processes in one consumer group,
on two store-shard processes, a real Kafka-protocol broker and a real redis-server.

    python -m bench.scaling [--quick]

For each worker count, fresh shards and a fresh topic: the workers start on the empty topic
and, once the group has split the partitions among all of them, this process produces the
event stream (synthetic clicks) as fast as the broker acknowledges. The figure is labelled
examples/s summed over the workers while the stream goes from 10% to 90% trained (start-up
and the tail left out). Each worker runs torch with one thread (OMP_NUM_THREADS=1): a worker
per core, so the 1-worker run is the baseline and `efficiency_N` = rate(N) / (N x rate(1))
measures data parallelism, not intra-op threads.

Honest about this machine: everything (workers, shards, broker, Redis, the producer) shares
its cores (`os.cpu_count()` is printed), so efficiency above that many busy processes says
more about the machine than the design. The shard figures (RPCs per example, RPCs per CPU
second of a shard, dense steps per second on the first shard) are what the written
projection to N machines is computed from.

The last line printed is JSON with `workers`, `examples_per_s` and `efficiency_2`; the
figures go to bench/results/scaling[_quick].json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from bench.results import write
from embedding_store.remote import RemoteDense
from services.datasets import synthetic
from tests import local_servers
from tests.local_servers import Shard, free_port, freshrec_process, metric, store_shards, wait_until
from trainer.eventlog import open_log
from trainer.events import parse_event

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def store_rpcs(shard: Shard, **labels: str) -> float:
    """gRPC calls the shard has answered (those with `labels`, e.g. method="DenseStep")."""
    return metric(shard.metrics_port, "freshrec_requests_total", **labels)


def run(workers: int, events: list[Any], partitions: int, kafka: str, redis_url: str, logs: Path) -> dict[str, Any]:
    """One measured run with `workers` workers; returns its figures."""
    with ExitStack() as stack:
        shards = stack.enter_context(store_shards(2, logs))
        store_url = "grpc://" + ",".join(s.address for s in shards)
        topic = f"{kafka}/scaling-{uuid.uuid4().hex[:8]}"
        log = open_log(f"kafka://{topic}", partitions=partitions)
        stack.callback(log.close)
        group = f"scaling-{uuid.uuid4().hex[:8]}"
        ports = [free_port() for _ in range(workers)]
        procs = []
        for n, port in enumerate(ports):
            env = {
                "FRESHREC_STORE_URL": store_url,
                "FRESHREC_TRAINER_WORKERS": str(workers),
                "FRESHREC_GROUP_ID": group,
                "FRESHREC_METRICS_PORT": str(port),
                "OMP_NUM_THREADS": "1",
                "MKL_NUM_THREADS": "1",
            }
            args = ["trainer", "--kafka", topic, "--redis", f"{redis_url}?prefix={group}"]
            proc = freshrec_process(args, env, logs / f"{group}-worker-{n}.log")
            procs.append(proc)
            stack.callback(local_servers.stop_process, proc)

        def total(name: str) -> float:
            return sum(max(metric(p, name), 0.0) for p in ports)

        def assigned() -> bool:
            counts = [metric(p, "freshrec_trainer_partitions") for p in ports]
            return min(counts) >= 1 and sum(counts) == partitions

        wait_until(assigned, 180, f"{workers} workers to split {partitions} partitions", interval_s=0.5)
        start = time.perf_counter()
        for b in range(0, len(events), 2000):
            log.append(events[b : b + 2000])
        produced_s = time.perf_counter() - start

        marks: dict[str, tuple[float, float, float, list[float], list[float]]] = {}

        def at(fraction: float) -> Callable[[], bool]:
            def reached() -> bool:
                trained = total("freshrec_trainer_events_total")
                if trained < fraction * len(events):
                    return False
                marks[f"{fraction}"] = (
                    time.perf_counter(),
                    total("freshrec_trainer_examples_total"),
                    trained,
                    [store_rpcs(s) for s in shards] + [store_rpcs(shards[0], method="DenseStep")],
                    [cpu_seconds(s.process.pid) for s in shards] + [cpu_seconds(p.pid) for p in procs],
                )
                return True

            return reached

        wait_until(at(0.1), 600, "10% of the events trained", interval_s=0.2)
        wait_until(at(0.9), 600, "90% of the events trained", interval_s=0.2)
        (t0, x0, e0, r0, c0), (t1, x1, e1, r1, c1) = marks["0.1"], marks["0.9"]
        seconds = t1 - t0
        rpcs = [b - a for a, b in zip(r0, r1, strict=True)]
        cpu = [b - a for a, b in zip(c0, c1, strict=True)]
        return {
            "workers": workers,
            "examples_per_s": (x1 - x0) / seconds,
            "events_per_s": (e1 - e0) / seconds,
            "window_s": seconds,
            "produce_s": produced_s,
            "shard_rpcs_per_s": [r / seconds for r in rpcs[:2]],
            "shard_rpcs_per_example": sum(rpcs[:2]) / max(x1 - x0, 1.0),
            "shard_cpu_share": [c / seconds for c in cpu[:2]],  # cores busy per shard
            "worker_cpu_share": [c / seconds for c in cpu[2:]],
            "dense_steps_per_s": rpcs[2] / seconds,
        }


def dense_step_rate(seconds: float = 3.0) -> float:
    """DenseStep calls/s one client gets from a shard for the ranker-sized vector (network included)."""
    from ranking.din_dcn import DinDcnRanker
    from ranking.scorer import DENSE_FEATURES

    size = sum(p.numel() for p in DinDcnRanker(16, dense_features=DENSE_FEATURES).parameters())
    with store_shards(1) as (shard,):
        dense = RemoteDense(shard.address)
        dense.register("ranker", np.zeros(size, np.float32), 0.001)
        grad = np.random.default_rng(0).normal(size=size).astype(np.float32)
        calls, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            dense.step("ranker", grad)
            calls += 1
        dense.close()
    return calls / seconds


def projection(runs: list[dict[str, Any]], per_worker: float, dense_per_s: float) -> dict[str, Any]:
    """What N machines would need, from the measured rate of one worker (`per_worker`
    examples/s, the median of the 1-worker runs) and the per-shard costs."""
    one = [r for r in runs if r["workers"] == 1]
    rpcs_per_example = float(np.mean([r["shard_rpcs_per_example"] for r in runs]))
    # RPCs a shard answers per second of one busy core, from the busiest run
    busy = max(runs, key=lambda r: sum(r["shard_rpcs_per_s"]))
    per_core = sum(busy["shard_rpcs_per_s"]) / max(sum(busy["shard_cpu_share"]), 1e-9)
    dense_per_example = float(np.mean([r["dense_steps_per_s"] / r["examples_per_s"] for r in one]))
    out: dict[str, Any] = {
        "examples_per_s_per_worker_core": per_worker,
        "shard_rpcs_per_example": rpcs_per_example,
        "shard_rpcs_per_core_s": per_core,
        "dense_steps_per_example": dense_per_example,
        "dense_steps_per_s_one_client": dense_per_s,
    }
    rows = []
    for machines in (1, 4, 16, 64):
        demand = machines * per_worker * rpcs_per_example  # shard RPCs/s the workers make
        shards = math.ceil(demand / (0.7 * per_core))  # at 70% of a core each
        dense_load = machines * per_worker * dense_per_example / dense_per_s
        rows.append({"worker_machines": machines, "shard_cores": shards, "dense_service_load": dense_load})
    out["machines"] = rows
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 and 2 workers, 40,000 events, 2 rounds (~2 min)")
    args = parser.parse_args(argv)
    counts, n_events, partitions, rounds = ([1, 2], 40_000, 4, 2) if args.quick else ([1, 2, 4], 120_000, 8, 3)
    data = synthetic(users=20_000, items=5_000, clusters=8, events=n_events, seed=1)
    events = [parse_event(e) for e in data.events]
    print(f"{os.cpu_count()} CPU cores; {n_events} events; {partitions} partitions; 2 store shards; {rounds} rounds")
    runs = []
    with (
        local_servers.kafka_broker() as kafka,
        local_servers.redis_server() as redis_url,
        tempfile.TemporaryDirectory(prefix="freshrec-scaling-") as logs,
    ):
        for workers in [w for _ in range(rounds) for w in counts]:  # interleaved: noise hits every count alike
            figures = run(workers, events, partitions, kafka, redis_url.split("?")[0], Path(logs))
            runs.append(figures)
            print(
                f"{workers} worker(s): {figures['examples_per_s']:,.0f} examples/s "
                f"({figures['events_per_s']:,.0f} events/s) over {figures['window_s']:.1f} s; "
                f"shards {[round(r) for r in figures['shard_rpcs_per_s']]} RPC/s, "
                f"{[round(c, 2) for c in figures['shard_cpu_share']]} cores; "
                f"workers {[round(c, 2) for c in figures['worker_cpu_share']]} cores; "
                f"produced in {figures['produce_s']:.1f} s",
                flush=True,
            )
    dense_per_s = dense_step_rate()
    rate = {w: float(np.median([r["examples_per_s"] for r in runs if r["workers"] == w])) for w in counts}
    efficiency = {f"efficiency_{w}": rate[w] / (w * rate[1]) for w in counts[1:]}
    plan = projection(runs, rate[1], dense_per_s)
    print(f"projection: {json.dumps(plan)}")
    summary = {
        "workers": counts,
        "examples_per_s": [round(rate[w], 1) for w in counts],
        **{k: round(v, 3) for k, v in efficiency.items()},
    }
    write(
        "scaling_quick" if args.quick else "scaling",
        {**summary, "cpu_cores": os.cpu_count(), "runs": runs, "projection": plan},
    )
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
