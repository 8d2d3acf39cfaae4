"""Choose the blend's weights for returning users on inner splits of `bench.peers`' history.

    python -m bench.return_blend [--quick]

The final blend scores a user who is back after `trainer.session_gap_s` with fixed weights
(`trainer.return_blend`, `ranking.blend`): what such a user picks over their next visits is
not what the stream's next positive says, so no online objective learns them. This picks
them the way `bench.peers` picks every peer's hyperparameters: on the history alone.

The history is the first 80% of MovieLens-100K by time (`bench.peers`' history; its truth is
never read). Each inner split takes a share of that history (0.7, 0.75 and 0.8; 0.8 alone with
`--quick`) as its own history and the rest as its truth (the same protocol: each returning
user's later items, seen ones excluded). The trainer learns its inner history as serving's
trainer does (events through a 4-partition log, `poll_and_train`), and each setting of the
grid orders every truth user's candidates (`OnlineModels.recommend`, serving's candidates
and scorer). The setting with the best recall@20, averaged over the inner splits, is
`chosen`; `shipped` says whether it is the default.

The last line printed is JSON with `chosen`, `chosen_inner_recall20`, `shipped`; the table goes
to bench/results/return_blend[_quick].json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from typing import Any

import numpy as np
import torch

from bench.peers import K, Split, evaluate, indexed, make_split
from bench.results import write
from embedding_store import feature_keys
from ranking.blend import FEATURES, RETURN_WEIGHTS
from services.datasets import load_dataset
from trainer.config import TrainerConfig
from trainer.eventlog import MemoryLog
from trainer.events import parse_event
from trainer.loop import Trainer

HISTORY_SHARE = 0.8  # bench.peers' history
INNER_SHARES = (0.7, 0.75, 0.8)
GRID = {  # the trending count's weight is the scale: 1
    "ranker logit": (0.0, 0.2),
    "log trending count": (1.0,),
    "co-visitation": (0.0, 0.5, 1.0),
    "attribute affinity": (0.0, 0.5),
    "attribute lift": (0.0, 0.1, 0.2, 0.3),
}


def trained(events: list[dict[str, Any]], seed: int) -> Trainer:
    """A trainer with the shipped settings after `events`, consumed as serving's trainer
    consumes them: from a 4-partition log, a poll at a time."""
    log = MemoryLog(partitions=4)
    trainer = Trainer(TrainerConfig(seed=seed, poll_timeout_s=0.0), log.consumer("tune"))
    log.append([parse_event(e) for e in events])
    while trainer.events_trained < len(events):
        trainer.poll_and_train()
    return trainer


def recall(
    trainer: Trainer, split: Split, user_ids: list[str], item_keys: np.ndarray, weights: tuple[float, ...]
) -> float:
    """recall@K of the trainer's lists for `split`'s truth users, returning users scored with `weights`."""
    with torch.no_grad():
        trainer.models.blend.get_buffer("returning").copy_(torch.tensor(weights))
    users = sorted(split.truth)
    seen: dict[int, set[int]] = {}
    for u, i in zip(split.users.tolist(), split.items.tolist(), strict=True):
        seen.setdefault(u, set()).add(int(item_keys[i]))
    keys = feature_keys("user", [user_ids[u] for u in users])
    lists = trainer.models.recommend(keys, K, [seen.get(u, set()) for u in users])
    index = {int(k): i for i, k in enumerate(item_keys.tolist())}
    return float(
        evaluate({u: [index[int(k)] for k in got] for u, got in zip(users, lists, strict=True)}, split)["recall20"]
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one inner split (0.8 of the history)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    dataset = load_dataset("movielens-100k")
    user_ids, item_ids, users, items = indexed(dataset)
    end = int(len(dataset.events) * HISTORY_SHARE)
    history, users, items = dataset.events[:end], users[:end], items[:end]
    item_keys = feature_keys("item", item_ids)
    settings = list(itertools.product(*GRID.values()))
    shares = INNER_SHARES[-1:] if args.quick else INNER_SHARES
    table = np.zeros((len(settings), len(shares)))
    for s, share in enumerate(shares):
        started = time.perf_counter()
        split = make_split(users, items, len(user_ids), len(item_ids), share)
        trainer = trained(history[: int(len(history) * share)], args.seed)
        for n, weights in enumerate(settings):
            table[n, s] = recall(trainer, split, user_ids, item_keys, weights)
        print(f"inner split {share:.2f}: {len(split.truth)} users, {time.perf_counter() - started:.0f} s", flush=True)
    mean = table.mean(axis=1)
    order = np.argsort(-mean, kind="stable")
    print(
        f"\n{'  '.join(f'{f[:12]:>12}' for f in FEATURES)}  {'recall@20':>9}  " + "  ".join(f"{s:.2f}" for s in shares)
    )
    for n in order[:10].tolist():
        row = "  ".join(f"{w:>12g}" for w in settings[n])
        print(f"{row}  {mean[n]:>9.4f}  " + "  ".join(f"{v:.4f}" for v in table[n]))
    best = settings[int(order[0])]
    figures = {
        "dataset": dataset.name,
        "history_share": HISTORY_SHARE,
        "inner_shares": list(shares),
        "quick": args.quick,
        "seed": args.seed,
        "features": list(FEATURES),
        "settings": [
            {"weights": list(w), "inner_recall20": float(mean[n]), "per_split": table[n].tolist()}
            for n, w in enumerate(settings)
        ],
        "chosen": list(best),
        "chosen_inner_recall20": float(mean[order[0]]),
        "shipped": list(RETURN_WEIGHTS) == list(best),
    }
    path = write(f"return_blend{'_quick' if args.quick else ''}", figures)
    print(f"written to {path}")
    last = {k: figures[k] for k in ("chosen", "chosen_inner_recall20", "shipped")}
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in last.items()}))
    return figures


if __name__ == "__main__":
    main()
