"""Embedding-store throughput and memory against a dense floor and a dict-of-rows store.

    python -m bench.embedding_store [--quick]

A table of 1,000,000 random 64-bit keys with dim 64 (row-wise Adagrad, the default optimizer)
answers batches of 65,536 keys drawn uniformly from those keys. Three stores do the same work:

- freshrec's `LocalTable`: hash the keys, gather their rows; for the update, also sum repeated
  keys' gradients and take an Adagrad step on each row;
- the dense floor: a torch tensor of 1,000,000 rows addressed by row number, `index_select`
  for the lookup and `index_add_` (a plain SGD step, no optimizer state) for the update. It
  knows each key's row number for free, so no store of 64-bit keys can beat it;
- a dict store: a Python dict from key to its numpy row (and Adagrad accumulator), one dict
  access per key.

Each figure is the median of interleaved repetitions (a, b, c, a, b, c, ...), each on a fresh
random batch; ratios are throughput over the floor's (or the dict's). Memory is the table's
bytes per live id (rows, optimizer state, index slots, bookkeeping) over the raw size of an id:
8-byte key + dim x 4 bytes + optimizer state. The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
import torch

from bench.results import Stopwatch, interleaved_medians, write
from embedding_store import LocalTable, TableConfig
from embedding_store.optimizers import state_width


class DictStore:
    """The baseline that keeps each row in a dict: one Python-level operation per key."""

    def __init__(self, keys: np.ndarray, rows: np.ndarray, lr: float, accumulator: float) -> None:
        self.rows = {int(k): row.copy() for k, row in zip(keys.tolist(), rows, strict=True)}
        self.accum = dict.fromkeys(self.rows, accumulator)
        self.lr = lr

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        rows = self.rows
        return np.stack([rows[k] for k in keys.tolist()])

    def apply_gradients(self, keys: np.ndarray, grads: np.ndarray) -> None:
        for k, g in zip(keys.tolist(), grads, strict=True):
            self.accum[k] += float(np.mean(g * g))
            self.rows[k] -= (self.lr / (self.accum[k] ** 0.5 + 1e-8)) * g


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (under a minute on 2 cores)")
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=65_536)
    args = parser.parse_args(argv)
    repeats, dict_repeats = (7, 3) if args.quick else (25, 7)
    n, dim, batch = args.keys, args.dim, args.batch

    rng = np.random.default_rng(0)
    keys = np.unique(rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True))
    config = TableConfig("bench", dim=dim, learning_rate=0.01, max_rows=len(keys), filter_capacity=1)
    table = LocalTable(config)
    with Stopwatch() as build:
        for chunk in np.array_split(keys, max(1, len(keys) // batch)):
            table.lookup(chunk, now=0.0)
    stored, found = table.get(keys)
    assert found.all() and len(table) == len(keys)
    dense = torch.from_numpy(stored.copy())  # the same rows, addressed by position
    dicts = DictStore(keys, stored, config.learning_rate, config.initial_accumulator)
    print(f"{len(keys):,} keys x dim {dim}; freshrec table built in {build.seconds:.1f} s; batches of {batch:,}")

    def draw() -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
        idx = rng.integers(0, len(keys), batch)
        return keys[idx], torch.from_numpy(idx), rng.normal(size=(batch, dim)).astype(np.float32)

    def timed(fn: Any) -> Any:
        def run() -> float:
            batch_keys, batch_idx, grads = draw()  # set-up outside the clock
            with Stopwatch() as sw:
                fn(batch_keys, batch_idx, grads)
            return sw.seconds

        return run

    def freshrec_update(k: np.ndarray, _: torch.Tensor, g: np.ndarray) -> None:
        table.lookup(k, now=1.0)
        table.apply_gradients(k, g, now=1.0)

    def dense_update(_: np.ndarray, i: torch.Tensor, g: np.ndarray) -> None:
        torch.index_select(dense, 0, i)
        dense.index_add_(0, i, torch.from_numpy(g), alpha=-config.learning_rate)

    def dict_update(k: np.ndarray, _: torch.Tensor, g: np.ndarray) -> None:
        dicts.lookup(k)
        dicts.apply_gradients(k, g)

    fast_runs = {
        "freshrec_lookup": timed(lambda k, i, g: table.lookup(k, now=1.0)),
        "dense_lookup": timed(lambda k, i, g: torch.index_select(dense, 0, i)),
        "freshrec_update": timed(freshrec_update),
        "dense_update": timed(dense_update),
    }
    interleaved_medians(fast_runs, 2)  # warm-up, not counted: thread pools, caches, page faults
    fast = interleaved_medians(fast_runs, repeats)
    slow = interleaved_medians(
        {"dict_lookup": timed(lambda k, i, g: dicts.lookup(k)), "dict_update": timed(dict_update)}, dict_repeats
    )
    seconds = fast | slow
    per_s = {name: batch / s for name, s in seconds.items()}
    stats = table.stats()
    raw = 8 + 4 * dim + 4 * state_width(config.optimizer, dim)
    figures: dict[str, Any] = {
        "keys": len(keys),
        "dim": dim,
        "batch": batch,
        "optimizer": config.optimizer,
        "repeats": repeats,
        "dict_repeats": dict_repeats,
        "keys_per_s": per_s,
        "bytes_per_id": stats.bytes / stats.ids,
        "raw_bytes_per_id": raw,
        "lookup_vs_dense": per_s["freshrec_lookup"] / per_s["dense_lookup"],
        "update_vs_dense": per_s["freshrec_update"] / per_s["dense_update"],
        "lookup_vs_dict": per_s["freshrec_lookup"] / per_s["dict_lookup"],
        "update_vs_dict": per_s["freshrec_update"] / per_s["dict_update"],
        "bytes_per_id_vs_raw": stats.bytes / stats.ids / raw,
    }
    print(f"{'':24}{'freshrec':>14}{'dense floor':>14}{'dict store':>14}   (keys/s, median)")
    for op in ("lookup", "update"):
        label = "lookup" if op == "lookup" else "lookup + update"
        row = [per_s[f"{store}_{op}"] for store in ("freshrec", "dense", "dict")]
        print(f"{label:24}" + "".join(f"{v:>14,.0f}" for v in row))
    print(
        f"lookup: {figures['lookup_vs_dense']:.2f}x the dense floor, {figures['lookup_vs_dict']:.1f}x the dict store; "
        f"lookup+update: {figures['update_vs_dense']:.2f}x the floor, {figures['update_vs_dict']:.1f}x the dict store"
    )
    print(
        f"memory: {figures['bytes_per_id']:.0f} bytes per id vs {raw} raw "
        f"(8 key + {4 * dim} row + {raw - 8 - 4 * dim} optimizer) = {figures['bytes_per_id_vs_raw']:.2f}x"
    )
    path = write("embedding_store_quick" if args.quick else "embedding_store", figures)
    print(f"written to {path}")
    keys_out = ("lookup_vs_dense", "update_vs_dense", "lookup_vs_dict", "bytes_per_id_vs_raw")
    print(json.dumps({k: round(figures[k], 3) for k in keys_out}))
    return figures


if __name__ == "__main__":
    main()
