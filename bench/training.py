"""Online-training throughput, like for like: the whole trainer on freshrec's store against the
same trainer on plain torch tables, the trainer's work outside the models, and events per
second end to end.

    python -m bench.training [--quick]

The stream is MovieLens-100K in time order (its first 30,000 ratings with --quick): users
with real histories (the DIN attention runs over up to 20 of their items) and attributes
(age, gender, occupation, genres, year). A synthetic stream of one event per user, as this
benchmark used before, ran 2.3x faster in events/s and measured little of the ranker.

1. Store vs torch tables. The trainer as it ships (decode, dedup, join, features, the
   two-tower with history and in-batch softmax, the DIN + DCN-v2 ranker, the blend,
   co-visitation) trains on the same stream twice per repetition, interleaved:
   once on freshrec's collisionless store (`embedding_store.local`: hash index, frequency
   filter, expiry bookkeeping, row-wise Adagrad) and once on `TorchTables`: for every table a
   plain torch tensor of as many rows as the store ended with, each key hashed to row
   `key % rows` (collisions allowed, every row exists from the start), stepped by torch's
   sparse Adagrad. Same batches, same models, same dense parameters. The ratio of their
   examples/s (medians) is `store_vs_torch_tables`: what the store costs.
2. Non-model work. One more run on the store with the models' calls timed (sightings, the
   ranking, retrieval and blend steps, co-visitation); the rest of each `poll_and_train` is
   polling, decoding, dedup, joining, features, negative sampling and bookkeeping, and
   `non_model_share` is its share of the step time. Syncs are not part of these runs.
3. End to end. A `freshrec up` process (embedded mode, shipped configuration) gets
   the same ratings posted over `POST /v1/events` as fast as it accepts them (500 per call, in
   order); `events_per_s_end_to_end` counts from the first post until the trainer has trained
   on every event (`services.replay`).

The last line printed is JSON with `store_vs_torch_tables`, `non_model_share`,
`examples_per_s` and `events_per_s_end_to_end`.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from bench.results import Stopwatch, interleaved_medians, write
from embedding_store import TableConfig, TableDelta, TableStats
from services.datasets import load_dataset
from services.replay import replay
from tests import local_servers
from trainer.config import TrainerConfig
from trainer.eventlog import MemoryLog
from trainer.events import Event, parse_event
from trainer.loop import Trainer
from trainer.models import table_configs


class TorchTable:
    """The `EmbeddingTable` interface on one plain torch tensor: key -> row `key % rows`, every
    row present, torch's `Adagrad` on sparse gradients. No admission, no expiry."""

    def __init__(self, config: TableConfig, rows: int, learning_rate: float, init_std: float) -> None:
        self._config = config
        self.rows = max(rows, 1)
        generator = torch.Generator().manual_seed(config.seed)
        self.weight = torch.nn.Parameter(torch.randn(self.rows, config.dim, generator=generator) * init_std)
        self._optimizer = torch.optim.Adagrad([self.weight], lr=learning_rate)
        self._touched: list[np.ndarray] = []

    @property
    def config(self) -> TableConfig:
        return self._config

    def _ids(self, keys: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((np.asarray(keys, np.uint64) % np.uint64(self.rows)).astype(np.int64))

    def lookup(self, keys: np.ndarray, now: float | None = None) -> np.ndarray:
        return self.weight.data[self._ids(keys)].numpy()

    def get(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.weight.data[self._ids(keys)].numpy(), np.ones(len(keys), bool)

    def apply_gradients(self, keys: np.ndarray, grads: np.ndarray, now: float | None = None) -> None:
        if not len(keys):
            return
        ids = self._ids(keys)
        values = torch.from_numpy(np.ascontiguousarray(grads, np.float32).reshape(len(keys), -1))
        self.weight.grad = torch.sparse_coo_tensor(ids.unsqueeze(0), values, self.weight.shape)
        self._optimizer.step()
        self.weight.grad = None
        self._touched.append(np.asarray(keys, np.uint64))

    def evict_expired(self, now: float) -> int:
        return 0

    def delete(self, keys: np.ndarray) -> int:
        return 0

    def drain_delta(self) -> TableDelta:
        keys = np.unique(np.concatenate(self._touched)) if self._touched else np.zeros(0, np.uint64)
        self._touched = []
        return TableDelta(self._config.name, keys, self.get(keys)[0])

    def stats(self) -> TableStats:
        return TableStats(self._config.name, ids=self.rows, bytes=self.weight.numel() * 4 * 2)


class TorchTables:
    """A `Store` of `TorchTable`s, `rows[name]` rows each (no checkpoints)."""

    def __init__(self, config: TrainerConfig, rows: dict[str, int]) -> None:
        self._configs = table_configs(config)
        self._tables = {
            c.name: TorchTable(c, rows[c.name], config.learning_rate, config.init_std) for c in self._configs
        }

    def table(self, name: str) -> TorchTable:
        return self._tables[name]

    def configs(self) -> list[TableConfig]:
        return list(self._configs)

    def save(self, directory: str | Path) -> None:
        raise NotImplementedError("torch tables in this benchmark are not checkpointed")

    def restore(self, directory: str | Path) -> None:
        raise NotImplementedError("torch tables in this benchmark are not checkpointed")

    def close(self) -> None:
        pass


QUICK_EVENTS = 30_000  # the first ratings of MovieLens-100K in --quick
MODEL_CALLS = ("sight", "ranking_step", "retrieval_step", "blend_step")


def _train(
    events: list[Event], config: TrainerConfig, store: Any = None, timed: dict[str, float] | None = None
) -> tuple[float, int, Trainer]:
    """Seconds and examples of training on `events` from an in-memory log (polling inside the
    clock, as the trainer does it); `timed` collects the seconds spent in the models' calls."""
    log = MemoryLog(partitions=1)
    log.append(events)
    trainer = Trainer(config, log.consumer("bench"), store=store)
    if timed is not None:
        _time_calls(trainer, timed)
    examples = 0
    with Stopwatch() as sw:
        while trainer.events_trained < len(events):
            examples += trainer.poll_and_train().examples
    return sw.seconds, examples, trainer


def _time_calls(trainer: Trainer, timed: dict[str, float]) -> None:
    """Wrap the models' calls so that their seconds add up in `timed`."""

    def timer(name: str, call: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(call)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                timed[name] = timed.get(name, 0.0) + time.perf_counter() - started

        return wrapped

    for name in MODEL_CALLS:
        setattr(trainer.models, name, timer(name, getattr(trainer.models, name)))
    covisit = trainer.models.covisit
    covisit.observe = timer("covisit", covisit.observe)  # type: ignore[method-assign]


def end_to_end(quick: bool) -> dict[str, Any]:
    """MovieLens-100K (its first QUICK_EVENTS ratings with --quick) over REST into `freshrec up`."""
    dataset = load_dataset("movielens-100k")
    if quick:
        dataset = type(dataset)(dataset.name, dataset.events[:QUICK_EVENTS], dataset.item_names)
    port, grpc_port = local_servers.free_port(), local_servers.free_port()
    argv = ["up", "--host", "127.0.0.1", "--port", str(port), "--grpc-port", str(grpc_port)]
    server = subprocess.Popen([sys.executable, "-m", "services.cli", *argv], stdout=subprocess.DEVNULL)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            local_servers.wait_healthy(client)
        report = replay(dataset, f"http://127.0.0.1:{port}", out=lambda _: None)
    finally:
        server.terminate()
        server.wait(30)
    if not report.trained:
        raise RuntimeError("the trainer did not catch up with the replay")
    return {
        "events": report.accepted,
        "posting_s": report.seconds,
        "trained_s": report.trained_s,
        "accepted_per_s": report.events_per_s,
        "events_per_s_end_to_end": report.trained_events_per_s,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")  # torch's notice about sparse COO tensors
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller stream, fewer repetitions (~2 min)")
    args = parser.parse_args(argv)
    n_events, repeats = (QUICK_EVENTS, 3) if args.quick else (100_000, 5)
    events = [parse_event(e) for e in load_dataset("movielens-100k").events[:n_events]]
    n_events = len(events)
    config = TrainerConfig()

    # the torch tables get as many rows as the store holds after the same stream
    _, _, probe = _train(events, config)
    rows = {c.name: probe.store.table(c.name).stats().ids for c in table_configs(config)}
    print("rows per table (the store's after the stream; the torch tables' size):", rows, flush=True)

    examples: dict[str, int] = {}

    def run(kind: str) -> float:
        seconds, examples[kind], _ = _train(events, config, TorchTables(config, rows) if kind == "torch" else None)
        return seconds

    medians = interleaved_medians({"store": lambda: run("store"), "torch": lambda: run("torch")}, repeats)
    figures: dict[str, Any] = {"events": n_events, "repeats": repeats, "rows": rows}
    figures["store_examples_per_s"] = examples["store"] / medians["store"]
    figures["torch_tables_examples_per_s"] = examples["torch"] / medians["torch"]
    figures["store_events_per_s"] = n_events / medians["store"]
    figures["torch_tables_events_per_s"] = n_events / medians["torch"]
    figures["store_vs_torch_tables"] = medians["torch"] / medians["store"]

    timed: dict[str, float] = {}
    seconds, _, _ = _train(events, config, timed=timed)
    figures["model_seconds"] = timed
    figures["non_model_share"] = 1.0 - sum(timed.values()) / seconds
    figures["examples_per_s"] = figures["store_examples_per_s"]

    figures["end_to_end"] = end_to_end(args.quick)
    figures["events_per_s_end_to_end"] = figures["end_to_end"]["events_per_s_end_to_end"]

    print(
        f"store (collisionless tables): {figures['store_examples_per_s']:>9,.0f} examples/s, "
        f"{figures['store_events_per_s']:>7,.0f} events/s"
    )
    print(
        f"plain torch tables (hashed):  {figures['torch_tables_examples_per_s']:>9,.0f} examples/s, "
        f"{figures['torch_tables_events_per_s']:>7,.0f} events/s"
    )
    print(f"store / torch tables: {figures['store_vs_torch_tables']:.2f}")
    shares = ", ".join(f"{k} {v / seconds:.0%}" for k, v in timed.items())
    print(f"model calls: {shares}; everything else (non-model) {figures['non_model_share']:.0%}")
    e2e = figures["end_to_end"]
    print(
        f"end to end over REST: {e2e['events']:,} events accepted in {e2e['posting_s']:.1f} s, all trained after "
        f"{e2e['trained_s']:.1f} s: {e2e['events_per_s_end_to_end']:,.0f} events/s"
    )
    path = write("training_quick" if args.quick else "training", figures)
    print(f"written to {path}")
    keys = ("store_vs_torch_tables", "non_model_share", "examples_per_s", "events_per_s_end_to_end")
    print(json.dumps({k: round(figures[k], 3) for k in keys}))
    return figures


if __name__ == "__main__":
    main()
