"""Taste profiles (`trainer.profiles`, `ranking.profile`) and what serving does with them: the
attribute lift the final blend reads, the fixed weights of returning users, the items of a
user's taste as candidates, and similar items that share attributes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedding_store import feature_key, feature_keys
from ranking.blend import TRENDING_EPS
from ranking.profile import ATTRIBUTE_ITEMS, Profiles, attribute_lift, attribute_shares, taste_attributes
from services.serving import Request, ServingReplica
from services.serving_store import MemoryServingStore
from trainer.config import TrainerConfig
from trainer.eventlog import MemoryLog
from trainer.events import Event
from trainer.loop import Trainer
from trainer.profiles import TasteProfiles

HOUR_MS = 3_600_000


def test_a_profile_counts_each_attribute_of_a_users_positives_and_keeps_the_most_picked() -> None:
    p = TasteProfiles(slots=3)
    users = np.full(6, 7, np.uint64)
    attrs = np.array([[1, 2], [2, 3], [1, 4], [1, 5], [1, 0], [6, 0]], np.uint64)
    p.observe(users, attrs, np.arange(6.0))
    got = p.profiles(np.array([7, 8], np.uint64))
    counts = dict(zip(got.keys[0].tolist(), got.counts[0].tolist(), strict=True))
    # 1 and 2 were picked most and stay; 3, 4, 5, 6 took turns in the third slot, the last one
    # counting from 1 again
    assert counts == {1: 4.0, 2: 2.0, 6: 1.0}
    assert got.totals.tolist() == [6.0, 0.0] and got.last_s[0] == 5.0 and np.isnan(got.last_s[1])
    assert p.population(np.array([1, 2, 6, 9], np.uint64)).tolist() == [4.0, 2.0, 1.0, 0.0] and p.positives == 6


def test_drains_carry_what_changed_forgotten_users_and_the_population_row() -> None:
    p = TasteProfiles(slots=2, max_users=10)
    p.observe(np.arange(1, 13, dtype=np.uint64), np.ones((12, 1), np.uint64), np.zeros(12))
    keys, counts, attributes = p.drain()
    assert len(p) == 9  # past 10 profiles, the least recently updated tenth (and more) go
    assert set(keys.keys.tolist()) == set(range(4, 13)) and set(keys.evicted.tolist()) == {1, 2, 3}
    assert counts.rows.shape == (9, 2 + 2)  # counts, positives, time of the last positive
    assert dict(zip(attributes.keys.tolist(), attributes.rows[:, 0].tolist(), strict=True)) == {
        1: 12.0,
        int(feature_key("freshrec.population", "positives")): 12.0,
    }
    assert all(not len(t) for t in p.drain())  # nothing changed since
    p.forget_users(np.array([5], np.uint64))
    assert p.drain()[0].evicted.tolist() == [5] and p.profiles(np.array([5], np.uint64)).totals[0] == 0


def test_a_profile_comes_back_from_its_state() -> None:
    p = TasteProfiles(slots=4)
    rng = np.random.default_rng(0)
    users = rng.integers(1, 30, 500).astype(np.uint64)
    p.observe(users, rng.integers(0, 9, (500, 3)).astype(np.uint64), rng.uniform(0, 100, 500))
    q = TasteProfiles(slots=4)
    q.load_state_dict(p.state_dict())
    every = np.arange(0, 31, dtype=np.uint64)
    a, b = p.profiles(every), q.profiles(every)
    for x, y in ((a.keys, b.keys), (a.counts, b.counts), (a.totals, b.totals), (a.last_s, b.last_s)):
        np.testing.assert_array_equal(x, y)
    attrs = np.arange(12, dtype=np.uint64)
    np.testing.assert_array_equal(p.shares(attrs), q.shares(attrs))


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_attribute_lift_is_the_naive_bayes_log_ratio(data: st.DataObject) -> None:
    """Against the formula of `ranking.profile`, written out one attribute at a time."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    u, c, b, p = 3, 4, 3, 5
    profile = rng.choice(np.arange(1, 12, dtype=np.uint64), (u, p), replace=True)
    profile[:, -1] = 0  # padding
    counts = rng.integers(1, 6, (u, p)).astype(float)
    totals = counts.sum(axis=1) + rng.integers(0, 5, u)
    totals[0] = 0.0  # no profile
    attrs = rng.integers(0, 14, (u, c, b)).astype(np.uint64)  # 0 = padding; 12, 13: unknown
    population = {a: float(rng.integers(1, 50)) for a in range(1, 12)}
    everyone = 200.0
    counted = np.array([population.get(int(a), 0.0) for a in attrs.ravel()])
    shares = attribute_shares(counted, counted > 0, everyone).reshape(attrs.shape)
    got = attribute_lift(profile, counts, totals, attrs, shares, prior=3.0)
    for r in range(u):
        for j in range(c):
            expected = 0.0
            for a in attrs[r, j].tolist():
                if a == 0 or a not in population or totals[r] == 0:
                    continue
                n = sum(counts[r, s] for s in range(p) if profile[r, s] == a)  # a key may repeat
                share = population[a] / everyone
                expected += np.log((n + 3.0 * share) / (totals[r] + 3.0) / share)
            # a repeated profile key counts once (the first slot found): the trainer never repeats one
            if len(set(profile[r][profile[r] != 0].tolist())) == int((profile[r] != 0).sum()):
                assert got[r, j] == pytest.approx(expected), (r, j)
    assert (got[0] == 0).all()


def test_taste_attributes_weigh_how_often_by_how_much_more() -> None:
    keys = np.array([[11, 12, 13, 0]], np.uint64)
    counts = np.array([[10.0, 3.0, 6.0, 0.0]])
    # 11: all ten picks, a fifth of everyone's; 12: three picks, rare overall; 13: six of a common one
    shares = np.log(np.array([[0.2, 0.01, 0.6, 1.0]]))
    assert [a.tolist() for a in taste_attributes(keys, counts, np.array([10.0]), shares, n=3)] == [[11, 12]]


def events(user: str, items: list[str], start_ms: int, genre: str) -> list[Event]:
    ctx = {"item.genres": genre}
    return [Event(f"{user}-{start_ms}-{n}", user, i, "click", start_ms + n, context=ctx) for n, i in enumerate(items)]


def world(config: TrainerConfig) -> tuple[Trainer, ServingReplica]:
    """Popular "pop" items (genre P) everyone picks; niche "doc" items (genre D, doc2-doc9) a
    few users pick in a session of their own, and a few others pick doc9 with three films of
    genre P nobody else picks (x0-x2); "regular" picked docs hours before the end."""
    trainer = Trainer(config, MemoryLog().consumer("g"))
    stream: list[Event] = []
    start = 1_700_000_000_000
    for u in range(30):
        stream += events(f"u{u}", [f"pop{i}" for i in range(u % 7, u % 7 + 6)], start + u * 1000, "P")
    for u in range(4):
        stream += events(f"docfan{u}", [f"doc{i}" for i in range(2, 10)], start + 40_000 + u * 1000, "D")
    for u in range(6):
        stream += events(f"crossover{u}", ["doc9"], start + 45_000 + u * 1000, "D")
        stream += events(f"crossover{u}", ["x0", "x1", "x2"], start + 45_100 + u * 1000, "P")
    stream += events("regular", ["doc2", "doc3", "pop0"], start + 50_000, "D")
    stream[-1] = Event(
        stream[-1].event_id, "regular", "pop0", "click", stream[-1].timestamp_ms, context={"item.genres": "P"}
    )
    stream += events("late", ["pop1", "pop2"], start + 3 * HOUR_MS, "P")  # the clock moves on 3 hours
    trainer.train_events(stream)
    store = MemoryServingStore()
    replica = ServingReplica(store, candidates=5)
    message = trainer.collect_sync()
    assert message is not None
    store.publish(message)
    replica.catch_up()
    return trainer, replica


def test_a_returning_user_is_scored_with_the_fixed_weights_one_in_a_session_with_the_learned() -> None:
    trainer, replica = world(TrainerConfig(batch_size=64, return_blend=(0.0, 1.0, 0.0, 0.0, 0.0)))
    counts = {feature_key("item", i): trainer.catalog.counts(feature_keys("item", [i]))[0][0] for i in ("pop3", "doc2")}
    regular, late = replica.recommend_batch([Request("regular", 5), Request("late", 5)])
    # "regular" last picked 3 hours ago: scored by trending counts alone (log count + eps)
    for item in regular.items:
        trending = trainer.catalog.counts(feature_keys("item", [item.item_id]))[0][0]
        assert item.score == pytest.approx(np.log(trending + TRENDING_EPS), rel=1e-4, abs=1e-4)
    assert counts  # the counts are there to compare with
    # "late" is in a session: the learned weights, which are not those
    for item in late.items:
        trending = trainer.catalog.counts(feature_keys("item", [item.item_id]))[0][0]
        assert item.score != pytest.approx(np.log(trending + TRENDING_EPS), rel=1e-3, abs=1e-3)


def test_the_items_of_a_users_taste_are_candidates_when_no_other_source_has_them() -> None:
    trainer, replica = world(TrainerConfig(batch_size=64))
    # a new fan of D picks two of its items nobody else picked: nothing co-visits them, and
    # the items of D are not trending; only the fan's taste finds them
    trainer.train_events(events("newfan", ["doc0", "doc1"], 1_700_000_000_000 + 3 * HOUR_MS + 10, "D"))
    message = trainer.collect_sync()
    assert message is not None
    replica._store.publish(message)
    replica.catch_up()
    got = replica.recommend_batch([Request("newfan", 5)])[0].items
    taste = replica._profiles(feature_keys("user", ["newfan"]))
    assert taste is not None and taste.taste()[0].tolist() == [feature_key("item.genres", "D")]
    docs = [i for i in got if i.item_id.startswith("doc")]
    assert len(docs) >= 4 and all(i.reason == "taste" for i in docs), [(i.item_id, i.reason) for i in got]
    # without its profile's attributes (no taste), the same user is served no "taste" item
    no_taste = Profiles(np.zeros((1, 1), np.uint64), np.zeros((1, 1)), np.zeros(1), np.full(1, np.nan), np.log)
    assert no_taste.taste_items(lambda a: np.zeros((len(a), 3), np.uint64)) == [pytest.approx(np.zeros(0))]


def test_attribute_items_are_each_attributes_most_trending() -> None:
    trainer, _ = world(TrainerConfig(batch_size=64, attribute_items=3))
    table = trainer.models.attribute_items()
    rows = dict(zip(table.keys.tolist(), table.rows.tolist(), strict=True))
    d, p = feature_key("item.genres", "D"), feature_key("item.genres", "P")
    assert set(rows) == {d, p}
    for key, prefix in ((d, "doc"), (p, "pop")):
        items = [i for i in rows[key] if i]
        names = trainer.catalog.names(np.array(items, np.uint64))
        assert len(items) == 3 and all(names[i].startswith(prefix) for i in items)
        trending = trainer.catalog.counts(np.array(items, np.uint64))[0]
        assert (np.diff(trending) <= 0).all()
        named = trainer.catalog.names(trainer.catalog.all_items()).items()
        others = [k for k, n in named if n.startswith(prefix) and k not in items]
        assert trending[-1] >= trainer.catalog.counts(np.array(others, np.uint64))[0].max() - 1e-9


def test_similar_items_share_attributes_and_co_visitation() -> None:
    trainer, replica = world(TrainerConfig(batch_size=64))
    assert ATTRIBUTE_ITEMS in replica._state.tables
    key = feature_keys("item", ["doc9"])
    neighbours = replica._state.tables["covisit_items"].get(key)[0][0]
    closest = trainer.catalog.names(neighbours[:6]).values()
    assert {"x0", "x1", "x2"} <= set(closest)  # among its most co-visited items: three of genre P
    _, similar = replica.similar_items("doc9", 6)
    # but the films like it are those of its genre that users pick with it: co-visited and alike
    assert [i.item_id[:3] for i in similar] == ["doc"] * 6, [(i.item_id, i.score, i.reason) for i in similar]
    assert {i.reason for i in similar} <= {"covisit", "content"}
    scores = [i.score for i in similar]
    assert scores == sorted(scores, reverse=True) and 0 < scores[-1] <= scores[0] <= 1.0


def test_only_positives_in_a_session_train_the_learned_weights() -> None:
    """Positives that come after `session_gap_s` away are what the fixed weights serve: they
    do not train the learned ones; positives within a session do."""
    rng = np.random.default_rng(0)

    def trained_blend(spacing_ms: int) -> np.ndarray:
        trainer = Trainer(TrainerConfig(batch_size=64, blend_users=16), MemoryLog().consumer("g"))
        stream = [
            Event(f"e{u}-{n}", f"u{u}", f"i{rng.integers(0, 30)}", "click", 1_700_000_000_000 + n * spacing_ms + u)
            for n in range(12)
            for u in range(40)
        ]
        for b in range(0, len(stream), 64):
            trainer.train_events(stream[b : b + 64])
        return trainer.models.blend.weights.detach().numpy()

    assert np.array_equal(trained_blend(HOUR_MS), np.ones(5, np.float32))  # every positive after an hour away
    assert not np.allclose(trained_blend(60_000), np.ones(5))  # a minute apart: sessions


def test_a_sync_carries_only_the_attribute_lists_that_changed() -> None:
    trainer, _ = world(TrainerConfig(batch_size=64, attribute_items=3, attribute_items_interval_s=1e-9))

    def sent() -> dict[int, list[int]]:
        (delta,) = (d for d in trainer.models.ranking_deltas() if d.table == ATTRIBUTE_ITEMS)
        return dict(zip(delta.keys.tolist(), delta.rows.tolist(), strict=True))

    sent()  # what changed since `world`'s sync
    assert sent() == {}  # nothing since
    # a burst of picks makes doc0 the most trending item of D: D's list changes, P's does not
    trainer.train_events(
        [
            Event(
                f"b{n}",
                f"burst{n}",
                "doc0",
                "click",
                1_700_000_000_000 + 3 * HOUR_MS + 30 + n,
                context={"item.genres": "D"},
            )
            for n in range(30)
        ]
    )
    changed = sent()
    assert list(changed) == [feature_key("item.genres", "D")] and changed[feature_key("item.genres", "D")][0] == (
        feature_key("item", "doc0")
    )
