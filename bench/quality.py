"""Online-training quality on a time-ordered replay, against baselines and ablations.

    python -m bench.quality --dataset movielens-100k [--quick]

The data set's events go through the trainer in timestamp order, in batches, with no HTTP in
between. Every labelled example is scored before it is trained on (progressive AUC of the
ranking model; each rating is a positive, paired with 4 sampled negatives). At every 10% of
the stream, each user who rates something in the next 10% gets a top-10 list (items they
already rated excluded); recall@10 = hits / min(10, relevant) and NDCG@10 are measured on the
items they rate in that next 10% (only items seen before the checkpoint count: no model can
recommend an item it never saw). At most `--eval-users` users per checkpoint, the same for
every row. Rows, all in one run:

- freshrec online: two-tower retrieval of 100 candidates plus the 100 trending items, ordered
  by the same scorer serving uses (DIN + DCN-v2, then the learned blend with trending
  counts), learning as the stream goes (frequency filter min_count=2); users it knows nothing
  of get its trending list;
- popularity: the 10 most rated items in a sliding window of recent events;
- frozen: the same models trained on the first 50% (3 passes) and then frozen;
- hashed: freshrec with every table folded into a fixed number of rows (`--hashed-rows`), so
  distinct ids share rows — the collisions the collisionless store avoids;
- no filter: freshrec online without the frequency filter (min_count=1).

Two figures say how far any list can go on this protocol: `new_user_share`, the share of
evaluated users with no event before the checkpoint (only popularity can serve them), and
`oracle_recall10`, the recall@10 of the next tenth's own popularity (it reads the truth: a
ceiling of popularity lists, not a row to beat).

Figures on the second half of the stream are what the JSON's headline keys report. A PNG plot
of recall@10 and AUC along the stream and a JSON file go to bench/results/. The last line
printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.results import RESULTS_DIR, write
from embedding_store import EmbeddingTable, LocalStore, TableConfig, TableDelta, TableStats, feature_keys
from services.datasets import load_dataset
from trainer.config import TrainerConfig
from trainer.evaluation import StreamingAUC
from trainer.eventlog import MemoryLog
from trainer.events import parse_event
from trainer.loop import Trainer
from trainer.models import table_configs

K = 10
SEGMENTS = 10


class HashedTable:
    """The hashed-table ablation: keys folded modulo `rows` before a collisionless table sees them."""

    def __init__(self, inner: EmbeddingTable, rows: int) -> None:
        self._inner = inner
        self._rows = np.uint64(rows)

    @property
    def config(self) -> TableConfig:
        return self._inner.config

    def __len__(self) -> int:
        return len(self._inner)

    def _fold(self, keys: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys, dtype=np.uint64)
        return np.where(keys == 0, keys, keys % self._rows + np.uint64(1))  # keep 0 as padding

    def lookup(self, keys: np.ndarray, now: float | None = None) -> np.ndarray:
        return self._inner.lookup(self._fold(keys), now)

    def get(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._inner.get(self._fold(keys))

    def apply_gradients(self, keys: np.ndarray, grads: np.ndarray, now: float | None = None) -> None:
        self._inner.apply_gradients(self._fold(keys), grads, now)

    def evict_expired(self, now: float) -> int:
        return self._inner.evict_expired(now)

    def delete(self, keys: np.ndarray) -> int:
        return self._inner.delete(self._fold(keys))

    def drain_delta(self) -> TableDelta:
        return self._inner.drain_delta()

    def stats(self) -> TableStats:
        return self._inner.stats()


class HashedStore(LocalStore):
    """A `LocalStore` whose tables are `HashedTable`s of `rows` rows each."""

    def __init__(self, configs: list[TableConfig], rows: int) -> None:
        super().__init__(configs)
        self._hashed = {c.name: HashedTable(super(HashedStore, self).table(c.name), rows) for c in configs}

    def table(self, name: str) -> HashedTable:  # type: ignore[override]
        return self._hashed[name]


@dataclass
class Row:
    """One system under evaluation and what it measured."""

    name: str
    trainer: Trainer | None = None  # None: the popularity baseline
    mode: str = "ranked"  # or "two_tower" (its own top 10, no ranker), "trending" (the cold-start list)
    trains: bool = True  # False: evaluates another row's trainer
    recall: list[float] = field(default_factory=list)  # per checkpoint
    ndcg: list[float] = field(default_factory=list)
    segment_auc: list[float] = field(default_factory=list)  # per segment
    second_half_auc: StreamingAUC = field(default_factory=StreamingAUC)
    seconds: float = 0.0


def _metrics(recommended: list[np.ndarray], truths: list[set[int]]) -> tuple[float, float]:
    recalls, ndcgs = [], []
    discounts = 1.0 / np.log2(np.arange(2, K + 2))
    for items, truth in zip(recommended, truths, strict=True):
        hits = np.array([int(i) in truth for i in items[:K]], dtype=float)
        recalls.append(hits.sum() / min(K, len(truth)))
        ndcgs.append(float(hits @ discounts[: len(hits)]) / discounts[: min(K, len(truth))].sum())
    return float(np.mean(recalls)), float(np.mean(ndcgs))


def _popular(window: Iterable[int], exclude: list[set[int]]) -> list[np.ndarray]:
    ranked = [item for item, _ in Counter(window).most_common(K + 200)]
    return [np.array([i for i in ranked if i not in seen][:K], dtype=np.uint64) for seen in exclude]


def run(args: argparse.Namespace) -> dict[str, Any]:
    dataset = load_dataset(args.dataset)
    events = [parse_event(e) for e in dataset.events]
    if args.limit:
        events = events[: args.limit]
    n = len(events)
    bounds = [round(n * s / SEGMENTS) for s in range(SEGMENTS + 1)]
    base = TrainerConfig(batch_size=args.batch_size, min_count=2, expiry_interval_s=1e9, seed=args.seed)

    def trainer(config: TrainerConfig, hashed: bool = False) -> Trainer:
        store = HashedStore(table_configs(config), args.hashed_rows) if hashed else None
        return Trainer(config, MemoryLog().consumer("bench"), store=store)

    rows = [
        Row("freshrec online", trainer(base)),
        Row("popularity (sliding window)"),
        Row("frozen after 50%", trainer(base)),
        Row(f"hashed ({args.hashed_rows} rows/table)", trainer(base, hashed=True)),
        Row("no frequency filter", trainer(replace(base, min_count=1))),
    ]
    online, popularity, frozen, hashed, nofilter = rows
    rows.append(Row("  online, two-tower only", online.trainer, mode="two_tower", trains=False))
    rows.append(Row("  online, trending list only", online.trainer, mode="trending", trains=False))

    # Frozen: three passes over the first half before the replay starts; it learns nothing after.
    first_half = events[: bounds[SEGMENTS // 2]]
    started = time.perf_counter()
    assert frozen.trainer is not None
    for _ in range(2):
        for b in range(0, len(first_half), args.batch_size):
            frozen.trainer.train_events(first_half[b : b + args.batch_size])
    frozen.seconds = time.perf_counter() - started
    frozen_pretrained = len(first_half) * 2

    rng = np.random.default_rng(args.seed)
    newcomers: list[float] = []  # per checkpoint: share of evaluated users with no history
    oracle: list[float] = []  # per checkpoint: recall@10 of the next tenth's own popularity
    seen: dict[int, set[int]] = {}  # user key -> item keys rated so far
    known_items: set[int] = set()
    window: deque[int] = deque(maxlen=args.popularity_window)
    user_keys = feature_keys("user", [e.user_id for e in events])
    item_keys = feature_keys("item", [e.item_id for e in events])
    for seg in range(SEGMENTS):
        lo, hi = bounds[seg], bounds[seg + 1]
        if seg == SEGMENTS // 2 and frozen.trainer is not None:
            frozen.trainer.learning = False
        for row in rows:
            if row.trainer is None or not row.trains:
                continue
            before = row.trainer.auc.copy()
            started = time.perf_counter()
            for b in range(lo, hi, args.batch_size):
                row.trainer.train_events(events[b : min(b + args.batch_size, hi)])
            row.seconds += time.perf_counter() - started
            auc = row.trainer.auc.since(before)  # this segment's examples, each scored before its step
            row.segment_auc.append(auc.value())
            if seg >= SEGMENTS // 2:
                row.second_half_auc.add(auc)
        for u, i in zip(user_keys[lo:hi].tolist(), item_keys[lo:hi].tolist(), strict=True):
            seen.setdefault(u, set()).add(i)
            known_items.add(i)
            window.append(i)
        if seg == SEGMENTS - 1:
            break
        # checkpoint: recommend for users active in the next segment, truth = their next ratings
        nxt_lo, nxt_hi = bounds[seg + 1], bounds[seg + 2]
        truth: dict[int, set[int]] = {}
        for u, i in zip(user_keys[nxt_lo:nxt_hi].tolist(), item_keys[nxt_lo:nxt_hi].tolist(), strict=True):
            if i in known_items and i not in seen.get(u, ()):
                truth.setdefault(u, set()).add(i)
        users = sorted(truth)
        if len(users) > args.eval_users:
            # choose by position: numpy would turn uint64 keys above 2^63 into floats
            users = sorted(users[j] for j in rng.choice(len(users), args.eval_users, replace=False).tolist())
        keys = np.array(users, dtype=np.uint64)
        exclude = [seen.get(u, set()) for u in users]
        truths = [truth[u] for u in users]
        newcomers.append(float(np.mean([u not in seen for u in users])))
        oracle.append(_metrics(_popular(item_keys[nxt_lo:nxt_hi].tolist(), exclude), truths)[0])
        for row in rows:
            if row.trainer is None:
                recommended = _popular(window, exclude)
            else:
                recommended = row.trainer.models.recommend(keys, K, exclude, args.candidates, mode=row.mode)
            recall, ndcg = _metrics(recommended, truths)
            row.recall.append(recall)
            row.ndcg.append(ndcg)
        print(
            f"{(seg + 1) * 10:>3}% of {n:,} events, {len(users)} users, recall@10: "
            + ", ".join(f"{r.name.strip().split(' ')[0]} {r.recall[-1]:.3f}" for r in rows),
            flush=True,
        )

    half = SEGMENTS // 2 - 1  # checkpoints at 50%..90% evaluate the second half
    figures: dict[str, Any] = {
        "dataset": args.dataset,
        "events": n,
        "batch_size": args.batch_size,
        "eval_users": args.eval_users,
        "hashed_rows": args.hashed_rows,
        "frozen_pretraining_events": frozen_pretrained,
        "new_user_share": float(np.mean(newcomers[half:])),
        "oracle_recall10": float(np.mean(oracle[half:])),
        "rows": {
            r.name: {
                "auc_second_half": r.second_half_auc.value() if r.trainer and r.trains else None,
                "recall10_second_half": float(np.mean(r.recall[half:])),
                "ndcg10_second_half": float(np.mean(r.ndcg[half:])),
                "recall10": r.recall,
                "ndcg10": r.ndcg,
                "segment_auc": r.segment_auc if r.trainer and r.trains else None,
                "seconds": r.seconds,
            }
            for r in rows
        },
    }
    summary = figures["rows"]
    figures.update(
        online_auc=summary[online.name]["auc_second_half"],
        frozen_auc=summary[frozen.name]["auc_second_half"],
        hashed_auc=summary[hashed.name]["auc_second_half"],
        nofilter_auc=summary[nofilter.name]["auc_second_half"],
        online_recall10=summary[online.name]["recall10_second_half"],
        popularity_recall10=summary[popularity.name]["recall10_second_half"],
        frozen_recall10=summary[frozen.name]["recall10_second_half"],
        hashed_recall10=summary[hashed.name]["recall10_second_half"],
        nofilter_recall10=summary[nofilter.name]["recall10_second_half"],
    )
    print(f"\nsecond half of the stream ({n - bounds[SEGMENTS // 2]:,} events):")
    print(f"{'':32}{'AUC':>8}{'recall@10':>11}{'NDCG@10':>9}{'train s':>9}")
    for name, r in summary.items():
        auc_text = "-" if r["auc_second_half"] is None else f"{r['auc_second_half']:.4f}"
        print(
            f"{name:32}{auc_text:>8}{r['recall10_second_half']:>11.4f}{r['ndcg10_second_half']:>9.4f}{r['seconds']:>9.1f}"
        )
    figures["plot"] = str(_plot(rows, bounds, args).relative_to(RESULTS_DIR.parent.parent))
    return figures


def _plot(rows: list[Row], bounds: list[int], args: argparse.Namespace) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    checkpoints = [100 * (s + 1) / SEGMENTS for s in range(SEGMENTS - 1)]
    segments = [100 * (s + 0.5) / SEGMENTS for s in range(SEGMENTS)]
    for n, r in enumerate(rows):
        # the frozen model was trained on the whole first half, so before 50% it has seen the future
        start = SEGMENTS // 2 if r.name.startswith("frozen") else 0
        style = {"marker": "o", "color": f"C{n}", "label": r.name, "linestyle": "--" if r.name.startswith(" ") else "-"}
        left.plot(checkpoints[max(start - 1, 0) :], r.recall[max(start - 1, 0) :], **style)
        if r.trainer is not None and r.trains:
            right.plot(segments[start:], r.segment_auc[start:], **style)
    for ax in (left, right):
        ax.axvline(50, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("position in the stream (%)")
        ax.grid(alpha=0.3)
    left.set_ylabel("recall@10 on each user's next ratings")
    right.set_ylabel("progressive AUC of the segment")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.suptitle(f"{args.dataset}: online training vs baselines ({bounds[-1]:,} events in time order)")
    fig.tight_layout()
    path = RESULTS_DIR / f"quality_{args.dataset}{'_quick' if args.quick else ''}.png"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="movielens-100k", choices=["movielens-100k", "synthetic"])
    parser.add_argument("--quick", action="store_true", help="the first 30,000 events, 200 users per checkpoint")
    parser.add_argument("--limit", type=int, default=0, help="only the first N events (0: all)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--eval-users", type=int, default=500)
    parser.add_argument("--candidates", type=int, default=100, help="retrieval candidates handed to the ranker")
    parser.add_argument("--hashed-rows", type=int, default=512)
    parser.add_argument("--popularity-window", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.limit = args.limit or 30_000
        args.eval_users = min(args.eval_users, 200)
    figures = run(args)
    path = write(f"quality_{args.dataset}{'_quick' if args.quick else ''}", figures)
    print(f"written to {path} and {figures['plot']}")
    keys = (
        "online_auc",
        "frozen_auc",
        "hashed_auc",
        "nofilter_auc",
        "online_recall10",
        "popularity_recall10",
        "frozen_recall10",
    )
    print(json.dumps({k: None if figures[k] is None or math.isnan(figures[k]) else round(figures[k], 4) for k in keys}))
    return figures


if __name__ == "__main__":
    main()
