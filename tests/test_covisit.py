"""Streaming co-visitation: counts within a user's window, decay, bounds, drains, checkpoints,
history queries, and the path from trainer to serving (candidates, blend, similar items)."""

from __future__ import annotations

import numpy as np
import pytest

from embedding_store import feature_keys
from retrieval.covisit import COVISIT_ITEMS, COVISIT_SCORES, CoVisitation, HistoryScores
from services.serving import Request, ServingReplica
from services.serving_store.memory import MemoryServingStore
from trainer.config import TrainerConfig
from trainer.eventlog import MemoryLog
from trainer.events import Event
from trainer.loop import Trainer


def keys(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.uint64)


def test_pairs_are_counted_within_the_window_closer_ones_weigh_more() -> None:
    co = CoVisitation(window=2, neighbours=5)
    co.observe(keys(1, 1, 1, 1), keys(10, 20, 30, 40), now_s=0.0)  # 40 is 3 picks after 10: out of the window
    neighbours, scores = co.neighbour_rows(keys(10, 40))
    assert neighbours[0].tolist()[:2] == [20, 30] and 40 not in neighbours[0].tolist()
    assert scores[0, 0] > scores[0, 1] > 0  # distance 1 before distance 2
    assert neighbours[1].tolist()[:2] == [30, 20]


def test_cosine_keeps_a_popular_partner_from_topping_every_list() -> None:
    co = CoVisitation(window=1, neighbours=3)
    # three users pick 1 then 99, two pick 1 then 2; 99 is also picked by 200 others, 2 by nobody else
    pairs = [(u, i) for u in range(3) for i in (1, 99)] + [(u, i) for u in range(3, 5) for i in (1, 2)]
    pairs += [(u, i) for u in range(10, 210) for i in (u + 1000, 99)]
    users, items = (np.array(c, dtype=np.uint64) for c in zip(*pairs, strict=True))
    co.observe(users, items, now_s=0.0)
    neighbours, _ = co.neighbour_rows(keys(1))
    assert neighbours[0, :2].tolist() == [2, 99]  # by raw counts 99 (3) would beat 2 (2)


def test_old_pairs_fade_and_a_rebase_changes_no_score() -> None:
    day = 86400.0
    co = CoVisitation(window=1, neighbours=2, half_life_s=day)
    co.observe(keys(1, 1), keys(10, 20), now_s=0.0)  # 10-20, long ago
    co.observe(keys(2, 2), keys(10, 30), now_s=10 * day)  # 10-30, ten half-lives later
    neighbours, scores = co.neighbour_rows(keys(10))
    assert neighbours[0].tolist() == [30, 20] and scores[0, 0] > 5 * scores[0, 1]
    before = co.neighbour_rows(keys(10, 20, 30))
    co.observe(keys(3), keys(77), now_s=200 * day)  # past 2^64: every weight is rebased
    after = co.neighbour_rows(keys(10, 20, 30))
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_allclose(before[1], after[1], rtol=1e-9)


def test_rows_stay_bounded_and_the_heaviest_partners_survive() -> None:
    co = CoVisitation(window=1, neighbours=3)
    rng = np.random.default_rng(0)
    for user in range(2000):  # item 1 followed by one of 500 items; item 7 three times as often as any
        follower = 7 if user % 3 == 0 else int(rng.integers(100, 600))
        co.observe(keys(user, user), keys(1, follower), now_s=0.0)
    assert len(co._pairs[1]) <= 4 * 3
    assert co.neighbour_rows(keys(1))[0][0, 0] == 7


def test_drain_carries_what_changed_once_and_checkpoints_round_trip() -> None:
    co = CoVisitation(window=3, neighbours=4)
    co.observe(keys(1, 1, 2, 2), keys(10, 20, 20, 30), now_s=5.0)
    items, neighbours, _, evicted = co.drain()
    assert set(items.tolist()) == {10, 20, 30} and neighbours.shape == (3, 4) and not len(evicted)
    assert len(co.drain()[0]) == 0  # nothing changed since
    co.observe(keys(3), keys(40), now_s=6.0)  # a user's first item pairs with nothing
    assert co.drain()[0].tolist() == [40]
    copy = CoVisitation(window=3, neighbours=4)
    copy.load_state_dict(co.state_dict())
    every = keys(10, 20, 30, 40)
    for mine, theirs in zip(co.neighbour_rows(every), copy.neighbour_rows(every), strict=True):
        np.testing.assert_array_equal(mine, theirs)
    co.observe(keys(1), keys(50), now_s=7.0)
    copy.observe(keys(1), keys(50), now_s=7.0)  # the users' windows came along too
    np.testing.assert_array_equal(co.neighbour_rows(keys(50))[0], copy.neighbour_rows(keys(50))[0])
    assert co.neighbour_rows(keys(50))[0][0, 0] == 20


def test_cached_lists_follow_the_steps_not_the_clock_or_the_syncs() -> None:
    """A list is served from the cache for `refresh_every` (4) observe calls, then computed again;
    drains (syncs, which run on wall time) change nothing training sees, and a copy loaded from
    a checkpoint sees what the one that wrote it does from then on."""
    a, b = (CoVisitation(window=1, neighbours=2, refresh_every=4) for _ in range(2))
    for co in (a, b):
        co.observe(keys(1, 1), keys(10, 20), now_s=0.0)
        assert co.neighbour_rows(keys(10))[0][0, 0] == 20
    seen, copy = [], None
    for step in range(4):  # 10 then 30, four times: 30 overtakes 20 as 10's neighbour
        for co in (a, b):
            co.observe(keys(100 + step, 100 + step), keys(10, 30), now_s=1.0)
        b.drain()  # only b syncs
        seen.append(int(a.neighbour_rows(keys(10))[0][0, 0]))
        if copy is None:
            assert b.neighbour_rows(keys(10))[0][0, 0] == seen[-1]
        else:
            copy.observe(keys(100 + step, 100 + step), keys(10, 30), now_s=1.0)
            np.testing.assert_array_equal(b.neighbour_rows(keys(10))[1], copy.neighbour_rows(keys(10))[1])
        if step == 1:
            copy = CoVisitation(window=1, neighbours=2, refresh_every=4)
            copy.load_state_dict(b.state_dict())
    assert seen == [20, 20, 20, 30]  # cached for four steps (it was computed before the first)


def test_the_item_cap_forgets_the_rarest_and_says_so() -> None:
    co = CoVisitation(window=1, neighbours=2, max_items=10)
    co.observe(np.zeros(20, np.uint64), np.repeat(keys(1, 2), 10), now_s=0.0)
    co.observe(np.arange(1, 12, dtype=np.uint64), np.arange(100, 111, dtype=np.uint64), now_s=0.0)
    assert len(co) <= 10
    items, _, _, evicted = co.drain()
    assert {1, 2} <= set(items.tolist()) and len(evicted) > 0 and not set(evicted.tolist()) & {1, 2}
    # an item forgotten while still another's partner is no neighbour (its count is gone)
    co = CoVisitation(window=1, neighbours=2, max_items=10)
    co.observe(np.zeros(20, np.uint64), np.tile(keys(1, 2), 10), now_s=0.0)
    co.observe(keys(5, 5), keys(1, 50), now_s=0.0)  # 50: one pair with 1, the rarest item
    singles = np.repeat(np.arange(100, 109, dtype=np.uint64), 2)  # each picked twice: all commoner than 50
    co.observe(np.arange(10, 28, dtype=np.uint64), singles, now_s=0.0)
    assert 50 not in co._counts and 50 in co._pairs[1]
    neighbours, scores = co.neighbour_rows(keys(1))
    assert neighbours[0].tolist() == [2, 0] and 0 < scores[0, 0] < 10  # no 1 / sqrt(0)


def test_history_scores_weigh_recent_items_most_and_leave_out_the_users_own() -> None:
    co = CoVisitation(window=1, neighbours=3)
    co.observe(keys(1, 1, 2, 2), keys(10, 11, 20, 21), now_s=0.0)  # 11 goes with 10, 21 with 20
    history = np.array([[10, 20], [20, 10], [0, 20]], dtype=np.uint64)  # most recent last
    scores = HistoryScores(co.neighbour_rows, history)
    assert scores.top(0, 2)[0].tolist() == [21, 11]
    assert scores.top(1, 2)[0].tolist() == [11, 21]
    assert scores.top(2, 5)[0].tolist() == [21]
    top_scores = scores.top(0, 2)[1]
    assert top_scores[0] == 1.0 and 0 < top_scores[1] < 1
    np.testing.assert_allclose(scores.of(0, keys(11, 21, 10, 999)), [top_scores[1], 1.0, 0.0, 0.0])
    assert scores.matrix(np.array([[21, 11], [21, 11], [21, 11]], np.uint64)).shape == (3, 2)


def events_of(pairs: list[tuple[str, str]], start_ms: int = 1_700_000_000_000) -> list[Event]:
    return [Event(f"e{start_ms}-{n}", u, i, "click", start_ms + 1000 * n) for n, (u, i) in enumerate(pairs)]


@pytest.fixture
def served() -> tuple[Trainer, ServingReplica]:
    """A trainer on two groups of items that users pick in sequence beside a group of
    blockbusters everyone picks (the whole trending list), and a replica that applied its sync."""
    trainer = Trainer(TrainerConfig(batch_size=64, min_count=3), MemoryLog().consumer("g"))
    rng = np.random.default_rng(1)
    pairs = []
    for user in range(60):
        group = "a" if user % 2 else "b"
        for item in rng.choice(12, 6, replace=False).tolist():
            pairs.append((f"u{user}", f"{group}{item}"))
        for item in rng.choice(20, 10, replace=False).tolist():
            pairs.append((f"u{user}", f"hit{item}"))
    stream = events_of(pairs)
    for b in range(0, len(stream), 64):
        trainer.train_events(stream[b : b + 64])
    store = MemoryServingStore()
    replica = ServingReplica(store, candidates=10)
    message = trainer.collect_sync()
    assert message is not None
    assert COVISIT_ITEMS in message.tables and COVISIT_SCORES in message.tables
    assert all(
        replica_key.startswith("hit") for replica_key in trainer.catalog.names(message.popular_keys[:10]).values()
    )
    store.publish(message)
    replica.catch_up()
    return trainer, replica


def test_similar_items_are_the_items_picked_with_it(served: tuple[Trainer, ServingReplica]) -> None:
    _, replica = served
    _, similar = replica.similar_items("a3", 5)
    assert len(similar) == 5 and sum(s.item_id.startswith("a") for s in similar) >= 4, similar
    assert "a3" not in {s.item_id for s in similar}


def train_and_serve(trainer: Trainer, replica: ServingReplica, pairs: list[tuple[str, str]], start_ms: int) -> None:
    """Train on clicks of (user, item) `pairs` and let the replica apply the sync that follows."""
    trainer.train_events(events_of(pairs, start_ms=start_ms))
    message = trainer.collect_sync()
    assert message is not None
    replica._store.publish(message)
    replica.catch_up()


def test_a_newcomers_first_events_drive_their_list_before_they_have_a_row(
    served: tuple[Trainer, ServingReplica],
) -> None:
    trainer, replica = served
    train_and_serve(trainer, replica, [("newcomer", "b1"), ("newcomer", "b4")], start_ms=1_700_001_000_000)
    assert replica._state.users is not None
    assert not replica._state.users.get(feature_keys("user", ["newcomer"]))[1][0]  # min_count=3: no row yet
    _, (candidates,) = replica.candidates_batch([Request("newcomer", 6)])
    names = trainer.catalog.names(candidates)
    assert sum(n.startswith("b") for n in names.values()) >= 5, names  # no row, no b in trending: co-visited
    items = [i.item_id for i in replica.recommend_batch([Request("newcomer", 6)])[0].items]
    assert len(items) == 6 and "b1" not in items and "b4" not in items
    assert sum(i.startswith("b") for i in items) >= 2, items  # beside the hits everyone picks


def test_each_item_names_the_source_that_put_it_there(served: tuple[Trainer, ServingReplica]) -> None:
    trainer, replica = served
    train_and_serve(trainer, replica, [("fan", "a2"), ("fan", "a5")], start_ms=1_700_002_000_000)
    fan, stranger = replica.recommend_batch([Request("fan", 8), Request("nobody-knows-me", 8)])
    reasons = {i.item_id: i.reason for i in fan.items}
    picked_together = [i for i in reasons if i.startswith("a")]
    assert picked_together and all(reasons[i] == "covisit" for i in picked_together), reasons  # not trending
    assert [i.reason for i in stranger.items] == ["trending"] * 8  # a cold user gets the trending list
    _, similar = replica.similar_items("a3", 5)
    assert [s.reason for s in similar] == ["covisit"] * 5  # a3 has enough neighbours
    _, (candidates,) = replica.candidates_batch([Request("fan", 8)])
    (ranked,) = replica.rank_batch([Request("fan", 8)], [candidates])  # the ranking stage alone
    assert [(i.item_id, i.reason) for i in ranked.items] == [(i.item_id, i.reason) for i in fan.items]
