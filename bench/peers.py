"""freshrec against the models its users would otherwise train, on one time split, in one run.

    python -m bench.peers [--quick] [--no-live] [--no-online]

MovieLens-100K in time order. History = the first 80% of ratings; truth = for each user who
rated something in the history, the items they rate afterwards (items absent from the history
left out: no row can recommend an item it never saw; an item the user rated in the history is
never truth, and every row excludes those). Each row recommends 20 items per user; recall@20 =
hits / min(20, truth) and NDCG@20 (binary gains), averaged over users, overall and by segment
of the user's history length: new (< 5 ratings), returning (5-199), heavy (>= 200).

Rows, all on the same split:

- freshrec live: a `freshrec up` process (embedded mode, shipped configuration) gets the
  history through `POST /v1/events` with its own timestamps, in order; once it has trained on
  all of it and a dense sync (every `trainer.dense_sync_interval_s`, 60 s) has carried the
  ranker and blend trained on it, each user's list comes from `POST /v1/recommendations`
  (seen items excluded), the way a client sees it; the same server's lists with `diversity`
  0.5 and 1 are the rows "freshrec live, diversity ..." (what spreading a list costs in recall),
  and its trending list with each user's history items left out is "freshrec live, trending
  list" (what the ranker and blend add to the counts they start from);
- recent popularity: the most rated items among the last N ratings of the history;
- EASE (closed form, Steck 2019), popularity + EASE (a tuned sum of the two), item-kNN
  (cosine, top-k neighbours), ALS and BPR from
  `implicit`; SASRec from RecBole when an environment with it is named by `--recbole-python`
  (skipped with the reason printed otherwise).

Every peer's hyperparameters are chosen on an inner split of the history alone (its first 80%
against the rest, the same protocol), by recall@20; the chosen setting is then fitted on the
whole history. freshrec runs with its shipped configuration: nothing of it is tuned here.

Every row also reports `genre_similarity`: the mean, over users, of the mean pairwise Jaccard
similarity of the genre sets of the items in their list (lower: a more varied list), a
measure no row's model sees.

One figure that is no row: `oracle_recall20`, the recall@20 of the truth period's own
popularity (every rating after the history, counted), which reads the truth — how far a list
that is the same for everyone could go on this split.

The online progressive protocol of `bench.quality` (the trainer learns as the stream goes;
recall@10 at each tenth on the next tenth) runs too and gives `online_recall10_vs_popularity`.

The last line printed is JSON; the figures go to bench/results/peers[_quick].json and a plot of
every row to bench/results/peers[_quick].png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.results import RESULTS_DIR, write
from services.config import load_config
from services.datasets import Dataset, load_dataset
from services.replay import replay
from tests import local_servers

K = 20
DIVERSITIES = (0.5, 1.0)  # the live rows besides the default list (diversity 0)
SEGMENTS = {"new": (1, 5), "returning": (5, 200), "heavy": (200, 1 << 62)}


@dataclass
class Split:
    """Interactions of a history and the truth after it, as index arrays.

    users, items: int [n] of the history's interactions (indices into `user_ids`, `item_ids`).
    truth: user index -> item indices rated after the history (history items only, unseen).
    """

    users: np.ndarray
    items: np.ndarray
    truth: dict[int, set[int]]
    n_users: int
    n_items: int

    def matrix(self) -> np.ndarray:
        """Binary float32 [users, items] of the history."""
        x = np.zeros((self.n_users, self.n_items), dtype=np.float32)
        x[self.users, self.items] = 1.0
        return x

    def history_counts(self) -> np.ndarray:
        return np.bincount(self.users, minlength=self.n_users)


def indexed(dataset: Dataset) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(user ids, item ids, sorted; user and item index int [n] of each event, in order)."""
    user_ids = sorted({e["user_id"] for e in dataset.events})
    item_ids = sorted({e["item_id"] for e in dataset.events})
    user_index = {u: n for n, u in enumerate(user_ids)}
    item_index = {i: n for n, i in enumerate(item_ids)}
    users = np.array([user_index[e["user_id"]] for e in dataset.events])
    items = np.array([item_index[e["item_id"]] for e in dataset.events])
    return user_ids, item_ids, users, items


def make_split(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int, share: float) -> Split:
    """The first `share` of the (time-ordered) interactions as history, the rest as truth."""
    cut = int(len(users) * share)
    hist_u, hist_i = users[:cut], items[:cut]
    known = np.zeros(n_items, dtype=bool)
    known[hist_i] = True
    seen = set(zip(hist_u.tolist(), hist_i.tolist(), strict=True))
    in_history = np.zeros(n_users, dtype=bool)
    in_history[hist_u] = True
    truth: dict[int, set[int]] = {}
    for u, i in zip(users[cut:].tolist(), items[cut:].tolist(), strict=True):
        if in_history[u] and known[i] and (u, i) not in seen:
            truth.setdefault(u, set()).add(i)
    return Split(hist_u, hist_i, truth, n_users, n_items)


def evaluate(lists: Mapping[int, Sequence[int]], split: Split) -> dict[str, Any]:
    """recall@K and NDCG@K overall and by segment; a user without a list counts as 0."""
    discounts = 1.0 / np.log2(np.arange(2, K + 2))
    counts = split.history_counts()
    per_user: dict[int, tuple[float, float]] = {}
    for u, truth in split.truth.items():
        got = list(lists.get(u, ()))[:K]
        hits = np.array([i in truth for i in got], dtype=float)
        ideal = discounts[: min(K, len(truth))].sum()
        per_user[u] = (hits.sum() / min(K, len(truth)), float(hits @ discounts[: len(hits)]) / ideal)

    def summary(users: list[int]) -> dict[str, Any]:
        if not users:
            return {"users": 0, "recall20": float("nan"), "ndcg20": float("nan")}
        values = np.array([per_user[u] for u in users])
        return {"users": len(users), "recall20": float(values[:, 0].mean()), "ndcg20": float(values[:, 1].mean())}

    out = summary(list(per_user))
    out["segments"] = {
        name: summary([u for u in per_user if lo <= counts[u] < hi]) for name, (lo, hi) in SEGMENTS.items()
    }
    return out


def genre_similarity(lists: Mapping[int, Sequence[int]], genres: Sequence[frozenset[str]]) -> float:
    """Mean over lists (of 2 items or more) of the mean pairwise Jaccard similarity of their
    items' genre sets; NaN when there is no such list.

    Example:
        >>> genres = [frozenset({"a"}), frozenset({"a", "b"}), frozenset({"c"})]
        >>> round(genre_similarity({0: [0, 1], 1: [0, 2]}, genres), 3)
        0.25
    """

    def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
        return len(a & b) / len(a | b) if a | b else 0.0

    means = [
        float(np.mean([jaccard(genres[i], genres[j]) for i, j in itertools.combinations(got[:K], 2)]))
        for got in (list(x) for x in lists.values())
        if len(got) >= 2
    ]
    return float(np.mean(means)) if means else float("nan")


def top_unseen(scores: np.ndarray, split: Split, users: Sequence[int]) -> dict[int, list[int]]:
    """Each user's top K items by `scores` [len(users), items], history items excluded."""
    scores = np.array(scores, dtype=np.float32, copy=True)
    rows = {u: r for r, u in enumerate(users)}
    mask = np.isin(split.users, users)
    scores[[rows[u] for u in split.users[mask].tolist()], split.items[mask]] = -np.inf
    k = min(K, scores.shape[1])  # a catalogue smaller than K: every item, ranked
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
    ranked = np.take_along_axis(top, order, axis=1)
    return {u: [i for i in ranked[r].tolist() if np.isfinite(scores[r, i])] for r, u in enumerate(users)}


# --- peers: fit(split, **params) -> scores for the truth's users [len(users), items] ---------


def popularity(split: Split, users: list[int], window: int) -> np.ndarray:
    recent = split.items[-window:] if window else split.items
    counts = np.bincount(recent, minlength=split.n_items).astype(np.float32)
    return np.broadcast_to(counts, (len(users), split.n_items))


def ease(split: Split, users: list[int], lam: float) -> np.ndarray:
    x = split.matrix()
    gram = (x.T @ x).astype(np.float64)
    gram[np.diag_indices_from(gram)] += lam
    p = np.linalg.inv(gram)
    b = -p / np.diag(p)
    b[np.diag_indices_from(b)] = 0.0
    return x[users] @ b.astype(np.float32)


def popularity_ease(split: Split, users: list[int], window: int, beta: float, lam: float) -> np.ndarray:
    """Recent popularity (log counts, scaled to a maximum of 1) plus `beta` times EASE's scores
    (each user's scaled to a maximum of 1): the hybrid a user would try when popularity is
    hard to beat."""
    pop = np.log1p(popularity(split, users, window)[0])
    personal = ease(split, users, lam)
    top = personal.max(axis=1, keepdims=True)
    return pop / max(float(pop.max()), 1e-9) + beta * personal / np.where(top > 0, top, 1.0)


def item_knn(split: Split, users: list[int], neighbours: int, shrink: float) -> np.ndarray:
    x = split.matrix()
    co = x.T @ x
    norms = np.sqrt(np.diag(co))
    sim = co / (np.outer(norms, norms) + shrink + 1e-9)
    np.fill_diagonal(sim, 0.0)
    if neighbours < sim.shape[0]:
        weakest = np.argpartition(-sim, neighbours, axis=0)[neighbours:]
        np.put_along_axis(sim, weakest, 0.0, axis=0)
    return x[users] @ sim


def _implicit_scores(make: Callable[[], Any], split: Split, users: list[int]) -> np.ndarray:
    """Fit an `implicit` model (`make()` builds it) on the binary history; its scores of `users`."""
    import scipy.sparse as sp
    from threadpoolctl import threadpool_limits

    x = sp.csr_matrix(
        (np.ones(len(split.users), np.float32), (split.users, split.items)), (split.n_users, split.n_items)
    )
    x.data[:] = 1.0  # a pair rated twice counts once
    with threadpool_limits(1, "blas"):  # implicit runs its own threads; a BLAS pool beside them slows it
        model = make()
        model.fit(x, show_progress=False)
    return np.asarray(model.user_factors)[users] @ np.asarray(model.item_factors).T


def als(split: Split, users: list[int], factors: int, regularization: float, alpha: float) -> np.ndarray:
    from implicit.als import AlternatingLeastSquares

    def make() -> Any:
        return AlternatingLeastSquares(
            factors=factors, regularization=regularization, alpha=alpha, iterations=15, random_state=0
        )

    return _implicit_scores(make, split, users)


def bpr(split: Split, users: list[int], factors: int, learning_rate: float, regularization: float) -> np.ndarray:
    from implicit.bpr import BayesianPersonalizedRanking

    def make() -> Any:
        return BayesianPersonalizedRanking(
            factors=factors, learning_rate=learning_rate, regularization=regularization, iterations=100, random_state=0
        )

    return _implicit_scores(make, split, users)


@dataclass(frozen=True)
class Peer:
    name: str
    fit: Callable[..., np.ndarray]
    grid: dict[str, list[Any]]
    quick_grid: dict[str, list[Any]]


PEERS = [
    Peer(
        "recent popularity", popularity, {"window": [1000, 2500, 5000, 10000, 20000, 0]}, {"window": [2500, 10000, 0]}
    ),
    Peer("EASE", ease, {"lam": [50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0]}, {"lam": [100.0, 500.0, 2000.0]}),
    Peer(
        "popularity + EASE",
        popularity_ease,
        {"beta": [1.0, 0.1, 0.25, 0.5, 2.0], "window": [2500, 5000, 10000], "lam": [100.0, 500.0, 2000.0]},
        {"beta": [1.0, 0.25, 0.5], "window": [2500, 5000], "lam": [500.0]},
    ),
    Peer(
        "item-kNN",
        item_knn,
        {"neighbours": [20, 50, 100, 200, 400], "shrink": [0.0, 10.0, 50.0]},
        {"neighbours": [50, 200], "shrink": [0.0, 10.0]},
    ),
    Peer(
        "ALS (implicit)",
        als,
        {"factors": [32, 64, 128], "regularization": [0.01, 0.1, 1.0], "alpha": [1.0, 5.0, 20.0]},
        {"factors": [32, 128], "regularization": [0.1], "alpha": [1.0, 20.0]},
    ),
    Peer(
        "BPR (implicit)",
        bpr,
        {"factors": [32, 64, 128], "learning_rate": [0.01, 0.05], "regularization": [0.001, 0.01]},
        {"factors": [64], "learning_rate": [0.01, 0.05], "regularization": [0.01]},
    ),
]


def tune_and_fit(peer: Peer, inner: Split, outer: Split, quick: bool) -> dict[str, Any]:
    """Choose the peer's setting by recall@K on `inner`, then fit it on `outer`'s history
    (`lists` in the result: its lists, by user index)."""
    grid = peer.quick_grid if quick else peer.grid
    started = time.perf_counter()
    inner_users = sorted(inner.truth)
    tried = []
    for values in itertools.product(*grid.values()):
        params = dict(zip(grid, values, strict=True))
        lists = top_unseen(peer.fit(inner, inner_users, **params), inner, inner_users)
        tried.append((evaluate(lists, inner)["recall20"], params))
    inner_recall, best = max(tried, key=lambda t: t[0])
    users = sorted(outer.truth)
    lists = top_unseen(peer.fit(outer, users, **best), outer, users)
    result = evaluate(lists, outer)
    result.update(params=best, inner_recall20=inner_recall, settings_tried=len(tried), lists=lists)
    result["seconds"] = time.perf_counter() - started
    return result


# --- freshrec, live, through its public API ---------------------------------------------------


def live(
    dataset: Dataset, cut: int, user_ids: list[str], item_index: dict[str, int], split: Split
) -> dict[str, dict[str, Any]]:
    """Replay the history into a fresh `freshrec up` process over REST; fetch every truth user's
    list over REST, with diversity 0 and each of `DIVERSITIES`; evaluate each. Also the row
    "freshrec live, trending list": the same server's trending list (what it serves a user it
    knows nothing of, `max_k` long), each user's history items left out, top K — what the
    ranker and the blend add to (or take from) the trending counts they start from. Returns
    the rows by name (`lists` in each: the lists, by user index)."""
    started = time.perf_counter()
    port, grpc_port = local_servers.free_port(), local_servers.free_port()
    base = f"http://127.0.0.1:{port}"
    argv = ["up", "--host", "127.0.0.1", "--port", str(port), "--grpc-port", str(grpc_port)]
    server = subprocess.Popen([sys.executable, "-m", "services.cli", *argv], stdout=subprocess.DEVNULL)
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            local_servers.wait_healthy(client)
            history = Dataset(dataset.name, dataset.events[:cut], dataset.item_names)
            report = replay(history, base, out=lambda _: None)
            if not report.trained:
                raise RuntimeError("freshrec did not train on the whole history in time")
            # the rows go out every second, the ranker's and blend's dense parameters every
            # `dense_sync_interval_s`: wait for a dense sync after the last step, then until the
            # served version has stopped moving for 3 s (the replica applied what was published;
            # a trainer with nothing new publishes nothing more)
            time.sleep(load_config().trainer.dense_sync_interval_s + 1.0)
            _wait_quiet(client, quiet_s=3.0, timeout_s=30.0)
            lists: dict[float, dict[int, list[int]]] = {d: {} for d in (0.0, *DIVERSITIES)}
            for (diversity, got), u in itertools.product(lists.items(), sorted(split.truth)):
                # not written back as impressions: nobody was shown these lists, and the
                # trainer must not learn "shown and not clicked" of the truth users' items
                body = {"user_id": user_ids[u], "k": K, "write_back": False, "diversity": diversity}
                response = client.post("/v1/recommendations", json=body)
                response.raise_for_status()
                got[u] = [item_index[i["item_id"]] for i in response.json()["items"] if i["item_id"] in item_index]
            body = {"user_id": "bench-peers-nobody", "k": load_config().server.max_k, "write_back": False}
            response = client.post("/v1/recommendations", json=body)
            response.raise_for_status()
            trending = [item_index[i["item_id"]] for i in response.json()["items"] if i["item_id"] in item_index]
    finally:
        server.terminate()
        server.wait(30)
    seen: dict[int, set[int]] = {}
    for u, i in zip(split.users.tolist(), split.items.tolist(), strict=True):
        seen.setdefault(u, set()).add(i)
    named: dict[str, tuple[dict[int, list[int]], dict[str, Any]]] = {
        "freshrec live" + (f", diversity {d:g}" if d else ""): (got, {"diversity": d}) for d, got in lists.items()
    }
    unseen_trending = {u: [i for i in trending if i not in seen.get(u, set())][:K] for u in split.truth}
    named["freshrec live, trending list"] = (unseen_trending, {"list": "trending, history items left out"})
    rows = {}
    for name, (got, params) in named.items():
        rows[name] = result = evaluate(got, split)
        result.update(params={"configuration": "shipped defaults", **params}, lists=got)
        result.update(seconds=time.perf_counter() - started, replay_events_per_s=report.events_per_s)
    return rows


def _wait_quiet(client: httpx.Client, quiet_s: float, timeout_s: float) -> None:
    """Until /readyz's model version has not changed for `quiet_s` (at most `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    version, since = client.get("/readyz").json()["model_version"], time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.25)
        now = client.get("/readyz").json()["model_version"]
        if now != version:
            version, since = now, time.monotonic()


def _plot(rows: dict[str, dict[str, Any]], quick: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    groups = ["all", *SEGMENTS]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / len(names)
    for ax, metric in zip(axes, ("recall20", "ndcg20"), strict=True):
        for n, name in enumerate(names):
            r = rows[name]
            values = [r[metric], *(r["segments"][s][metric] for s in SEGMENTS)]
            ax.bar(np.arange(len(groups)) + n * width, values, width, label=name, color=f"C{n}")
        ax.set_xticks(np.arange(len(groups)) + width * (len(names) - 1) / 2)
        users = [rows[names[0]]["users"], *(rows[names[0]]["segments"][s]["users"] for s in SEGMENTS)]
        ax.set_xticklabels([f"{g}\n({u} users)" for g, u in zip(groups, users, strict=True)])
        ax.set_ylabel(metric.replace("20", "@20"))
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("MovieLens-100K, time split (history = first 80%): freshrec live vs peers tuned on an inner split")
    fig.tight_layout()
    path = RESULTS_DIR / f"peers{'_quick' if quick else ''}.png"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _online(quick: bool) -> dict[str, Any]:
    from bench import quality

    argv = ["--dataset", "movielens-100k", *(["--quick"] if quick else [])]
    figures = quality.main(argv)
    return {
        "online_recall10": figures["online_recall10"],
        "popularity_recall10": figures["popularity_recall10"],
        "events": figures["events"],
        "new_user_share": figures["new_user_share"],
        "oracle_recall10": figures["oracle_recall10"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller hyperparameter grids, quick online protocol")
    parser.add_argument("--share", type=float, default=0.8, help="history share of the ratings")
    parser.add_argument("--no-live", action="store_true", help="leave out the freshrec live row")
    parser.add_argument("--no-online", action="store_true", help="leave out the online progressive protocol")
    parser.add_argument("--recbole-python", default="", help="a Python with RecBole installed (for SASRec)")
    args = parser.parse_args(argv)

    dataset = load_dataset("movielens-100k")
    user_ids, item_ids, users, items = indexed(dataset)
    item_index = {i: n for n, i in enumerate(item_ids)}
    cut = int(len(users) * args.share)
    outer = make_split(users, items, len(user_ids), len(item_ids), args.share)
    inner = make_split(users[:cut], items[:cut], len(user_ids), len(item_ids), args.share)
    print(f"history {cut:,} ratings, {len(outer.truth)} users with truth; inner split {len(inner.truth)} users")

    genres: list[frozenset[str]] = [frozenset() for _ in item_ids]
    for e in dataset.events:
        genres[item_index[e["item_id"]]] = frozenset(e.get("context", {}).get("item.genres", "").split("|")) - {""}

    rows: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for peer in PEERS:
        rows[peer.name] = r = tune_and_fit(peer, inner, outer, args.quick)
        r["genre_similarity"] = genre_similarity(r.pop("lists"), genres)
        print(f"{peer.name:20} recall@20 {r['recall20']:.4f}  NDCG@20 {r['ndcg20']:.4f}  {r['params']}", flush=True)
    if args.recbole_python:
        skipped["SASRec (RecBole)"] = "not run: the RecBole row is not built yet"
    else:
        skipped["SASRec (RecBole)"] = "no --recbole-python given (RecBole 1.2.1 needs numpy < 2: its own environment)"
    for name, reason in skipped.items():
        print(f"{name:20} skipped: {reason}")
    best_peer = max(rows, key=lambda name: rows[name]["recall20"])
    figures: dict[str, Any] = {"dataset": dataset.name, "history_share": args.share, "k": K, "quick": args.quick}
    truth_users = sorted(outer.truth)
    later = np.bincount(items[cut:], minlength=len(item_ids)).astype(np.float32)
    oracle = top_unseen(np.broadcast_to(later, (len(truth_users), len(item_ids))), outer, truth_users)
    figures["oracle_recall20"] = evaluate(oracle, outer)["recall20"]
    print(f"(oracle: the truth period's popularity, no peer) recall@20 {figures['oracle_recall20']:.4f}")
    if not args.no_live:
        for name, r in live(dataset, cut, user_ids, item_index, outer).items():
            rows[name] = r
            r["genre_similarity"] = genre_similarity(r.pop("lists"), genres)
            print(f"{name:20} recall@20 {r['recall20']:.4f}  NDCG@20 {r['ndcg20']:.4f}", flush=True)
        r = rows["freshrec live"]
        figures["live_recall20"] = r["recall20"]
        figures["live_ndcg20"] = r["ndcg20"]
        figures["live_vs_best_peer"] = r["recall20"] / rows[best_peer]["recall20"]
    figures.update(best_peer=best_peer, best_peer_recall20=rows[best_peer]["recall20"], rows=rows, skipped=skipped)
    if not args.no_online:
        online = _online(args.quick)
        figures["online"] = online
        figures["online_recall10_vs_popularity"] = online["online_recall10"] / online["popularity_recall10"]

    header = f"\n{'':30}{'recall@20':>10}{'NDCG@20':>9}{'genre sim':>10}"
    print(header + "".join(f"{s + ' r@20':>16}" for s in SEGMENTS))
    for name, r in rows.items():
        segs = "".join(f"{r['segments'][s]['recall20']:>16.4f}" for s in SEGMENTS)
        print(f"{name:30}{r['recall20']:>10.4f}{r['ndcg20']:>9.4f}{r['genre_similarity']:>10.3f}{segs}")
    figures["plot"] = str(_plot(rows, args.quick).relative_to(RESULTS_DIR.parent.parent))
    path = write(f"peers{'_quick' if args.quick else ''}", figures)
    print(f"written to {path} and {figures['plot']}")
    keys = ("live_recall20", "best_peer", "best_peer_recall20", "live_vs_best_peer", "online_recall10_vs_popularity")
    last = {k: figures.get(k) for k in keys}
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in last.items()}))
    return figures


if __name__ == "__main__":
    main()
