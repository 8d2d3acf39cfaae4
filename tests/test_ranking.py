"""The ranking service: the scorer's dense round trip, and serving ranking as the trainer does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedding_store import feature_keys
from embedding_store.row_map import RowMap
from ranking.blend import ScoreBlend, blend_features
from ranking.din_dcn import DinDcnRanker
from ranking.scorer import Candidates, CandidateScorer, attribute_affinity
from retrieval.covisit import HistoryScores
from retrieval.index import IndexConfig
from services.serving import Request, ServingReplica
from services.serving_store import MemoryServingStore
from trainer.config import TrainerConfig
from trainer.eventlog import MemoryLog
from trainer.events import Event
from trainer.loop import Trainer


def random_candidates(rng: np.random.Generator, users: int = 3, cands: int = 5) -> Candidates:
    def keys(*shape: int) -> np.ndarray:
        return rng.integers(1, 40, shape).astype(np.uint64)

    return Candidates(
        keys(users),
        keys(users, 2),
        keys(users, 4),
        keys(users, cands),
        keys(users * cands, 3),
        rng.uniform(0, 5, (users, cands)),
        rng.uniform(0, 50, (users, cands)),
        rng.normal(size=(users, cands)),
        rng.uniform(0, 1, (users, cands)),
        rng.uniform(0, 1, (users, cands)),
        rng.normal(size=(users, cands)),
        np.array([np.nan, 60.0, 7200.0])[np.arange(users) % 3],  # new, in a session, returning
    )


def random_rows(rng: np.random.Generator, dim: int) -> RowMap:
    rows = RowMap(dim)
    keys = np.arange(1, 40, dtype=np.uint64)
    rows.upsert(keys, rng.normal(size=(len(keys), dim)).astype(np.float32))
    return rows


def test_dense_parameters_round_trip_exactly() -> None:
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    ranker, blend = DinDcnRanker(4, cross_layers=3, hidden=(8, 6, 5), dense_features=3), ScoreBlend()
    with torch.no_grad():
        blend.weights.copy_(torch.tensor([0.3, 2.0, 1.5, 0.7, 0.4]))
    original = CandidateScorer(ranker, blend)
    rebuilt = CandidateScorer.from_dense(CandidateScorer.dense_state(ranker, blend))
    ids, attrs, c = random_rows(rng, 4), random_rows(rng, 4), random_candidates(rng)
    expected = original.score(ids, attrs, c)
    assert expected.shape == (3, 5) and np.isfinite(expected).all()
    np.testing.assert_array_equal(rebuilt.score(ids, attrs, c), expected)
    # the blend takes part: other weights, other scores for the users in a session (rows 0,
    # 1) and not for the returning one (row 2), whose weights are fixed; the same the other way
    with torch.no_grad():
        blend.weights.copy_(torch.tensor([0.3, -2.0, 1.5, 0.7, 0.4]))
    learned = CandidateScorer(ranker, blend).score(ids, attrs, c)
    assert not np.allclose(learned[:2], expected[:2]) and np.allclose(learned[2], expected[2])
    returning = ScoreBlend(returning=(0.0, 1.0, 0.0, 0.0, -1.0))
    returning.load_state_dict({**blend.state_dict(), "returning": returning.get_buffer("returning")})
    other = CandidateScorer(ranker, returning).score(ids, attrs, c)
    assert np.allclose(other[:2], learned[:2]) and not np.allclose(other[2], learned[2])
    # the returning weights and the session gap travel with the dense parameters
    assert CandidateScorer.from_dense(CandidateScorer.dense_state(ranker, returning)).score(ids, attrs, c) == (
        pytest.approx(other)
    )


def reference_logits(m: DinDcnRanker, *inputs: torch.Tensor) -> torch.Tensor:
    """The model as its docstring states it, one pair at a time: attention MLP over the
    concatenation [h, t, h - t, h * t], masked softmax, then DCN-v2 over x0."""
    user, item, ua, ua_mask, ia, ia_mask, hist, hist_mask, dense = inputs
    out = []
    for n in range(len(item)):
        t, h, mask = item[n], hist[n], hist_mask[n]
        a = m.attention(torch.cat([h, t.expand_as(h), h - t, h * t], dim=-1)).squeeze(-1)
        w = torch.softmax(a.masked_fill(~mask, float("-inf")), dim=0).nan_to_num(0.0)
        pooled = [(r * k[:, None]).sum(0) / k.sum().clamp(min=1) for r, k in ((ua[n], ua_mask[n]), (ia[n], ia_mask[n]))]
        x0 = torch.cat([user[n], t, *pooled, (w[:, None] * h).sum(0), user[n] * t, dense[n]])
        x = x0
        for layer in m.cross:
            x = x0 * layer(x) + x
        out.append(m.out(torch.cat([x, m.deep(x0)])))
    return torch.cat(out)


def test_ranker_matches_its_definition_and_broadcasts_one_users_rows() -> None:
    torch.manual_seed(0)
    m = DinDcnRanker(4, dense_features=3)
    n, a, b, h = 6, 2, 3, 5
    user, ua, hist = torch.randn(1, 4), torch.randn(1, a, 4), torch.randn(1, h, 4)
    ua_mask, hist_mask = torch.tensor([[True, False]]), torch.tensor([[True, True, False, True, False]])
    item, ia, dense = torch.randn(n, 4), torch.randn(n, b, 4), torch.randn(n, 3)
    ia_mask = torch.rand(n, b) < 0.7
    user_n, ua_n, ua_mask_n = (x.expand(n, *x.shape[1:]) for x in (user, ua, ua_mask))
    hist_n, hist_mask_n = hist.expand(n, h, 4), hist_mask.expand(n, h)
    pairs = (user_n, item, ua_n, ua_mask_n, ia, ia_mask, hist_n, hist_mask_n, dense)
    with torch.no_grad():
        expected = reference_logits(m, *pairs)
        per_pair = m(*pairs)
        shared = m(user, item, ua, ua_mask, ia, ia_mask, hist, hist_mask, dense)  # one user's rows, not repeated
        no_history = m(user, item, ua, ua_mask, ia, ia_mask, hist, torch.zeros(1, h, dtype=torch.bool), dense)
    torch.testing.assert_close(per_pair, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared, expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(no_history).all() and not torch.allclose(no_history, expected)


def test_unusable_dense_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="do not describe a ranker"):
        CandidateScorer.from_dense({"ranker.attention.0.weight": np.zeros((3, 8), np.float32)})


def events(n: int, seed: int = 0) -> list[Event]:
    """Users of four groups who each mostly click items of their group; attributes in context."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 60, n)
    items = np.where(rng.random(n) < 0.9, users % 4, rng.integers(0, 4, n)) + 4 * rng.integers(0, 15, n)
    return [
        Event(
            f"e{seed}-{k}",
            f"u{u}",
            f"i{i}",
            "click",
            1_700_000_000_000 + 1000 * k,
            context={"user.group": str(u % 4), "item.genres": f"g{i % 4}|h{i % 3}"},
        )
        for k, (u, i) in enumerate(zip(users.tolist(), items.tolist(), strict=True))
    ]


def trained(n: int = 3000) -> Trainer:
    """A trainer after `n` events of `events` (its first sync carries the dense parameters)."""
    config = TrainerConfig(batch_size=128, blend_users=16)
    trainer = Trainer(config, MemoryLog().consumer("g"))
    stream = events(n)
    for b in range(0, len(stream), config.batch_size):
        trainer.train_events(stream[b : b + config.batch_size])
    return trainer


@pytest.mark.parametrize("index_kind", ["flat", "ivf", "hnsw"])
def test_serving_ranks_with_the_trainers_ranker_and_features(index_kind: str) -> None:
    trainer = trained()
    config = trainer.config
    store = MemoryServingStore()
    replica = ServingReplica(store, candidates=20, index=IndexConfig(kind=index_kind, min_ann_items=1))
    message = trainer.collect_sync()
    assert message is not None and message.dense, "the first sync carries the dense parameters"
    store.publish(message)
    replica.catch_up()

    user = "u5"
    rec = replica.recommend(user, k=10, exclude_seen=False)
    assert len(rec.items) == 10
    scores = np.array([i.score for i in rec.items])
    assert (np.diff(scores) <= 0).all()
    # The trainer's own scorer, on its float32 tables and live features, gives the same scores
    # to the same candidates (serving holds fp16 rows: close, not equal).
    m = trainer.models
    u = feature_keys("user", [user])
    cand = feature_keys("item", [i.item_id for i in rec.items])[None, :]
    trending, total = trainer.catalog.counts(cand.ravel())
    history = m.features.histories(u, config.history_length)
    c = Candidates(
        u,
        m.features.user_attributes(u),
        history,
        cand,
        m.features.item_attributes(cand.ravel()),
        trending[None, :],
        total[None, :],
        (m.user_vectors(u, history) @ torch.from_numpy(m.items.get(cand.ravel())[0]).T).numpy(),
        HistoryScores(m.covisit.neighbour_rows, history).matrix(cand),
        attribute_affinity(m._history_attributes(history), m.features.item_attributes(cand.ravel())[None]),
        m.profiles.profiles(u).lift(m.features.item_attributes(cand.ravel())[None]),
        trainer.catalog.clock_s - m.profiles.profiles(u).last_s,
    )
    assert c.affinity is not None and (c.affinity > 0).any(), "attribute affinity takes part"
    assert c.lift is not None and (c.lift > 0).any(), "attribute lift takes part"
    assert c.covisit is not None and (c.covisit > 0).any(), "co-visitation takes part"
    expected = CandidateScorer(m.ranker, m.blend).score(m.rank_ids, m.rank_attrs, c)[0]
    np.testing.assert_allclose(scores, expected, rtol=0.02, atol=0.05)
    # several requests answered together get what each gets alone
    alone = [replica.recommend(u_id, 7, exclude_seen=ex) for u_id, ex in (("u5", False), ("u9", True), ("cold", True))]
    together = replica.recommend_batch([Request("u5", 7, False), Request("u9", 7, True), Request("cold", 7, True)])
    for one, batched in zip(alone, together, strict=True):
        assert [i.item_id for i in batched.items] == [i.item_id for i in one.items]
        np.testing.assert_allclose([i.score for i in batched.items], [i.score for i in one.items], rtol=1e-5, atol=1e-6)
    # the ranker's inputs reached serving: without features the same items score differently
    bare = Candidates(
        u,
        np.zeros((1, 1), np.uint64),
        np.zeros((1, 1), np.uint64),
        cand,
        np.zeros((10, 1), np.uint64),
        c.trending,
        c.total,
        c.retrieval,
        c.covisit,
        c.affinity,
        c.lift,
        c.gap_s,
    )
    assert not np.allclose(
        CandidateScorer(m.ranker, m.blend).score(m.rank_ids, m.rank_attrs, bare)[0], scores, atol=0.05
    )


def test_blend_recovers_the_weights_that_generated_the_choices() -> None:
    """Choices drawn from softmax(0.5 * logit + 2 * log trending + 3 * co-visitation - 1 *
    affinity + 1.5 * lift): the blend's softmax loss finds the five weights (and leaves the
    returning users' fixed ones alone)."""
    rng = np.random.default_rng(0)
    blend = ScoreBlend()
    fixed = blend.get_buffer("returning").clone()
    optimizer = torch.optim.Adam(blend.parameters(), lr=0.05)
    truth = torch.tensor([0.5, 2.0, 3.0, -1.0, 1.5])
    for _ in range(300):
        logits = torch.from_numpy(rng.normal(size=(64, 20)).astype(np.float32))
        trending = torch.from_numpy(rng.uniform(0, 50, (64, 20)).astype(np.float32))
        covisit, affinity = (torch.from_numpy(rng.uniform(0, 1, (64, 20)).astype(np.float32)) for _ in range(2))
        lift = torch.from_numpy(rng.normal(size=(64, 20)).astype(np.float32))
        features = blend_features(logits, trending, covisit, affinity, lift)
        target = torch.multinomial(torch.softmax(features @ truth, dim=1), 1).squeeze(1)
        valid = torch.ones(64, 20, dtype=torch.bool)
        optimizer.zero_grad()
        (blend.loss(features, valid, target) / 64).backward()
        optimizer.step()
    found = blend.weights.detach()
    assert torch.allclose(found, truth, atol=0.35), found
    assert torch.equal(blend.get_buffer("returning"), fixed)


def test_the_trainers_evaluation_lists_are_servings_lists() -> None:
    """`OnlineModels.recommend` (what bench.quality measures) takes serving's candidates — each
    source's best, taken in turn up to twice `candidates` — and orders them with the same scorer:
    on an exact index its lists are the replica's, up to fp16 rounding of the synced rows."""
    trainer = trained()
    store = MemoryServingStore()
    replica = ServingReplica(store, candidates=5, index=IndexConfig(kind="flat"))
    message = trainer.collect_sync()
    assert message is not None
    store.publish(message)
    replica.catch_up()
    names = [f"u{u}" for u in range(0, 60, 3)]
    keys = feature_keys("user", names)
    evaluated = trainer.models.recommend(keys, 10, [set() for _ in names], candidates=5)
    same = 0
    for name, items in zip(names, evaluated, strict=True):
        served = feature_keys("item", [i.item_id for i in replica.recommend(name, k=10, exclude_seen=False).items])
        assert len(items) == len(served) == 10
        same += len(set(items.tolist()) & set(served.tolist()))
    assert same >= 0.9 * 10 * len(names), same
