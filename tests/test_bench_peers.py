"""The peers benchmark's parts: the time split, the metrics, the peers on data with a known
answer, and tuning that never sees the truth."""

from __future__ import annotations

import numpy as np
import pytest

from bench import peers


def blocks(users: int = 60, items: int = 40, per_user: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Interactions in time order: even users pick from items 0-19, odd users from 20-39."""
    rng = np.random.default_rng(seed)
    pairs = []
    for u in range(users):
        base = 0 if u % 2 == 0 else items // 2
        for i in rng.choice(items // 2, per_user, replace=False).tolist():
            pairs.append((u, base + i))
    order = rng.permutation(len(pairs))
    shuffled = np.array(pairs)[order]
    return shuffled[:, 0], shuffled[:, 1]


def test_the_split_keeps_truth_to_history_users_unseen_history_items() -> None:
    users = np.array([0, 0, 1, 0, 0, 2, 1])
    items = np.array([0, 1, 0, 1, 2, 3, 4])  # after the cut: 0 re-rates 1, rates 2; 2 is new; 1 rates 4 (never seen)
    split = peers.make_split(users, items, n_users=3, n_items=5, share=3 / 7)
    assert split.truth == {}  # 2, 3 and 4 are unknown to the history, 1 was seen, user 2 is new
    split = peers.make_split(np.r_[users, 1], np.r_[items, 1], n_users=3, n_items=5, share=3 / 8)
    assert split.truth == {1: {1}}


def test_metrics_count_hits_against_the_smaller_of_k_and_the_truth() -> None:
    split = peers.Split(np.array([0, 1]), np.array([0, 0]), {0: {1, 2}, 1: {3}}, 2, 5)
    perfect = peers.evaluate({0: [1, 2], 1: [3]}, split)
    assert perfect["recall20"] == 1.0 and perfect["ndcg20"] == pytest.approx(1.0)
    half = peers.evaluate({0: [4, 1], 1: []}, split)  # user 1 without a list counts 0
    assert half["recall20"] == pytest.approx(0.25) and 0 < half["ndcg20"] < 0.25
    assert half["segments"]["new"]["users"] == 2


@pytest.mark.parametrize("peer", [p.name for p in peers.PEERS if p.name != "recent popularity"])
def test_each_collaborative_peer_recommends_the_users_own_block(peer: str) -> None:
    users, items = blocks()
    split = peers.make_split(users, items, 60, 40, share=0.7)
    model = next(p for p in peers.PEERS if p.name == peer)
    params = {k: v[0] for k, v in model.quick_grid.items()}
    if peer.startswith(("ALS", "BPR")):
        params["factors"] = 8
    truth_users = sorted(split.truth)
    lists = peers.top_unseen(model.fit(split, truth_users, **params), split, truth_users)
    hits = np.mean([np.mean([(i >= 20) == (u % 2 == 1) for i in lists[u][:5]]) for u in truth_users])
    assert hits > 0.9, (peer, hits)
    history = set(zip(split.users.tolist(), split.items.tolist(), strict=True))
    assert not any((u, i) in history for u in truth_users for i in lists[u])  # seen items excluded


def test_tuning_reads_the_inner_split_only() -> None:
    users, items = blocks(seed=3)
    outer = peers.make_split(users, items, 60, 40, share=0.8)
    cut = int(len(users) * 0.8)
    inner = peers.make_split(users[:cut], items[:cut], 60, 40, share=0.8)
    ease = next(p for p in peers.PEERS if p.name == "EASE")
    chosen = peers.tune_and_fit(ease, inner, outer, quick=True)
    scrambled = peers.Split(outer.users, outer.items, {u: {39 - i for i in t} for u, t in outer.truth.items()}, 60, 40)
    again = peers.tune_and_fit(ease, inner, scrambled, quick=True)
    assert again["params"] == chosen["params"] and again["inner_recall20"] == chosen["inner_recall20"]
    assert again["recall20"] != chosen["recall20"]  # the truth is only scored
