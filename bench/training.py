"""Online-training throughput: freshrec's trainer on collisionless tables against the same
two-tower model on a fixed-size hashed `nn.Embedding` (ids folded modulo the table size, so
distinct ids collide), trained with torch's sparse Adagrad.

    python -m bench.training [--quick]

Both sides train on the same event stream, one batch at a time, with the same examples per
event (1 positive + 4 sampled negatives). The figure is examples/s, as medians of
interleaved repetitions; the ratio freshrec / hashed is what the collisionless store costs.
The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import warnings

import numpy as np
import torch
from torch import nn

from bench.results import Stopwatch, interleaved_medians, write
from embedding_store import feature_keys
from services.datasets import synthetic
from trainer.config import TrainerConfig
from trainer.eventlog import MemoryLog
from trainer.events import parse_event
from trainer.loop import Trainer


class HashedTwoTower(nn.Module):
    """The baseline: user and item ids hashed into fixed `rows`-row tables (collisions allowed)."""

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.rows = rows
        self.users = nn.Embedding(rows, dim, sparse=True)
        self.items = nn.Embedding(rows, dim + 1, sparse=True)
        nn.init.normal_(self.users.weight, std=0.1)
        nn.init.normal_(self.items.weight, std=0.1)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        u = self.users(users)  # [n] -> [n, dim]
        v = self.items(items)  # [n] -> [n, dim + 1]
        return (u * v[:, :-1]).sum(-1) + v[:, -1]


def main(argv: list[str] | None = None) -> dict[str, float]:
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")  # torch's notice about sparse COO tensors
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller stream, fewer repetitions (~20 s)")
    args = parser.parse_args(argv)
    n_events, repeats = (20_000, 3) if args.quick else (100_000, 5)
    data = synthetic(users=20_000, items=5_000, clusters=8, events=n_events, seed=1)
    events = [parse_event(e) for e in data.events]
    config = TrainerConfig(batch_size=512)
    negatives = config.negatives

    trained = {"freshrec": 0, "hashed": 0}  # examples of the last run of each

    def freshrec_run() -> float:
        log = MemoryLog(partitions=1)
        log.append(events)
        trainer = Trainer(config, log.consumer("bench"))
        trained["freshrec"] = 0
        with Stopwatch() as sw:  # polling the in-memory log is inside, as the trainer does it
            while trainer.events_trained < n_events:
                trained["freshrec"] += trainer.poll_and_train().examples
        return sw.seconds

    user_ids = [e.user_id for e in events]
    item_ids = [e.item_id for e in events]
    seen_items = torch.zeros(n_events, dtype=torch.int64)  # hashed items of the stream so far

    def hashed(slot: str, ids: list[str]) -> torch.Tensor:
        return torch.from_numpy((feature_keys(slot, ids) % np.uint64(2**20)).astype(np.int64))

    def hashed_step(model: HashedTwoTower, optimizer: torch.optim.Optimizer, gen: torch.Generator, start: int) -> int:
        end = start + config.batch_size
        u, i = hashed("user", user_ids[start:end]), hashed("item", item_ids[start:end])  # raw ids -> rows
        seen_items[start : start + len(i)] = i
        # negatives: items drawn from the stream so far (popularity-proportional), O(batch) per step
        neg = seen_items[torch.randint(0, start + len(i), (len(i) * negatives,), generator=gen)]
        all_u = torch.cat([u, u.repeat_interleave(negatives)])
        all_i = torch.cat([i, neg])
        labels = torch.cat([torch.ones(len(u)), torch.zeros(len(neg))])
        optimizer.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(all_u, all_i), labels)
        loss.backward()
        optimizer.step()
        return len(labels)

    def hashed_run() -> float:
        model = HashedTwoTower(rows=2**20, dim=config.dim)
        optimizer = torch.optim.Adagrad(model.parameters(), lr=config.learning_rate)
        gen = torch.Generator().manual_seed(0)
        trained["hashed"] = 0
        with Stopwatch() as sw:  # the 2^20-row table is allocated before the clock starts
            for start in range(0, n_events, config.batch_size):
                trained["hashed"] += hashed_step(model, optimizer, gen, start)
        return sw.seconds

    medians = interleaved_medians({"freshrec": freshrec_run, "hashed": hashed_run}, repeats)
    figures = {
        "events": n_events,
        "repeats": repeats,
        "freshrec_examples_per_s": trained["freshrec"] / medians["freshrec"],
        "hashed_examples_per_s": trained["hashed"] / medians["hashed"],
    }
    figures["freshrec_vs_hashed"] = figures["freshrec_examples_per_s"] / figures["hashed_examples_per_s"]
    print(f"freshrec (collisionless tables): {figures['freshrec_examples_per_s']:>10,.0f} examples/s")
    print(f"hashed nn.Embedding, 2^20 rows:  {figures['hashed_examples_per_s']:>10,.0f} examples/s")
    print(f"ratio freshrec / hashed: {figures['freshrec_vs_hashed']:.2f}")
    path = write("training_quick" if args.quick else "training", figures)
    print(f"written to {path}")
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}))
    return figures


if __name__ == "__main__":
    main()
