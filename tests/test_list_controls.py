"""What a recommendation call controls beyond filters: pages with no item repeated, diversity,
and impressions written back to the log (and joined with the clicks that carry their
`request_id`)."""

from __future__ import annotations

import asyncio
import itertools
import time

import numpy as np
import pytest

from embedding_store import feature_keys
from ranking.explore import thompson
from services.config import ServerConfig
from services.errors import InvalidArgument
from services.gateway.core import Gateway
from services.serving import Recommendation, Request, ServingReplica
from services.serving_store.memory import MemoryServingStore
from tests.test_catalogue import World
from tests.test_covisit import events_of
from trainer.config import TrainerConfig
from trainer.eventlog import MemoryLog
from trainer.events import SERVED_PREFIX, Event, InvalidEvent, served_events, served_record
from trainer.items import parse_item
from trainer.loop import Trainer


@pytest.fixture
def world() -> World:
    return World()


def ask(gateway: Gateway, user: str, k: int, **kwargs: object) -> Recommendation:
    return asyncio.run(gateway.recommend(user, k, False, **kwargs))  # type: ignore[arg-type]


def test_pages_never_repeat_an_item_and_end_when_the_items_do(world: World) -> None:
    gateway = Gateway(ServerConfig(), world.log, world.replica)
    try:
        pages, token = [], ""
        for _ in range(10):
            page = ask(gateway, "u1", 7, page_token=token, write_back=False, categories=("even",))
            pages.append([i.item_id for i in page.items])
            token = page.next_page_token
            if not token:
                break
        served = list(itertools.chain(*pages))
        assert len(served) == len(set(served)) == 15  # every even item once, over three pages
        assert [len(p) for p in pages] == [7, 7, 1]
        first = ask(gateway, "u1", 7, write_back=False)
        with pytest.raises(InvalidArgument, match="another list"):
            ask(gateway, "u2", 7, page_token=first.next_page_token)
        with pytest.raises(InvalidArgument, match="another list"):
            ask(gateway, "u1", 8, page_token=first.next_page_token)
        with pytest.raises(InvalidArgument, match="page_token"):
            ask(gateway, "u1", 7, page_token="not-a-token")
    finally:
        gateway.close()


def test_diversity_spreads_the_list_over_the_item_space(world: World) -> None:
    gateway = Gateway(ServerConfig(), world.log, world.replica)
    assert world.replica._state.items is not None
    rows = world.replica._state.items

    def spread(items: list[str]) -> float:
        vectors = rows.get(feature_keys("item", items))[0].astype(np.float64)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        cosines = vectors @ vectors.T
        return float(cosines[np.triu_indices(len(items), 1)].mean())

    try:
        users = [f"u{u}" for u in range(10)]
        plain = [[i.item_id for i in ask(gateway, u, 6, write_back=False).items] for u in users]
        mixed = [[i.item_id for i in ask(gateway, u, 6, write_back=False, diversity=1.0).items] for u in users]
        assert all(len(p) == len(m) == 6 for p, m in zip(plain, mixed, strict=True))
        assert np.mean([spread(m) for m in mixed]) < np.mean([spread(p) for p in plain]) - 0.05
        with pytest.raises(InvalidArgument, match="diversity"):
            ask(gateway, "u1", 6, diversity=1.5)
    finally:
        gateway.close()


def test_served_lists_are_written_back_as_impressions_that_clicks_join(world: World) -> None:
    gateway = Gateway(ServerConfig(), world.log, world.replica)
    try:
        shown = ask(gateway, "u1", 5)
        ask(gateway, "u2", 5, write_back=False)
        assert gateway.impressions.flush()
    finally:
        gateway.close()
    consumer = world.log.consumer("check")
    records = consumer.poll(100_000, 0.1)
    served = [r for r in records if r.value.startswith(SERVED_PREFIX)]
    assert len(served) == 1  # one record for the list
    impressions = served_events(served[0].value)
    assert [(e.user_id, e.item_id, e.request_id, e.position) for e in impressions] == [
        ("u1", i.item_id, shown.request_id, n) for n, i in enumerate(shown.items)
    ]
    trainer = world.trainer
    before = dict(trainer.joiner.stats.examples)
    clicked = shown.items[2].item_id
    world.log.append([Event("c1", "u1", clicked, "click", impressions[0].timestamp_ms + 1000, shown.request_id)])
    while trainer.poll_and_train().events or trainer._consumer.lag():
        pass
    assert trainer.joiner.stats.examples["joined"] == before.get("joined", 0) + 1
    assert trainer.joiner.pending == 4  # the four others wait for their window to close as negatives
    assert trainer.feedback._counts[int(feature_keys("item", [clicked])[0])] == [1.0, 1.0]


def test_a_simulated_ab_test_ranks_the_arms_by_their_click_through_rate() -> None:
    """A click model with a known better arm: users click the five items trending at the start
    half the time and any other item 5% of the time, so arm "popular" (the trending list) must
    beat arm "model" (the ranker, which lists each user's own taste group of a0-a11 or b0-b11
    too); users are split by the hash of their id, and the per-arm CTR that the trainer counts
    from the joined impressions must rank the arms so, round after round (with the arms' settings
    swapped in the config, it does not)."""
    log = MemoryLog()
    trainer = Trainer(TrainerConfig(batch_size=256, min_count=1, join_window_s=60.0), log.consumer("g"))
    rng = np.random.default_rng(5)
    start = int(time.time() * 1000) - 86_400_000  # history over the last day
    pairs = []
    for user in range(80):
        group = "ab"[user % 2]
        pairs += [(f"u{user}", f"{group}{i}") for i in rng.choice(12, 10, replace=False).tolist()]
        pairs += [(f"u{user}", f"hit{i}") for i in rng.choice(10, 3, replace=False).tolist()]
    trainer.train_events(events_of(pairs, start))
    store = MemoryServingStore()
    replica = ServingReplica(store, candidates=10)

    def sync() -> None:
        while trainer.poll_and_train().events or trainer._consumer.lag():
            pass
        message = trainer.collect_sync()
        if message is not None:
            store.publish(message)
        replica.catch_up()

    sync()
    liked = {i.item_id for i in replica.recommend("nobody", 5).items}  # a cold user's list: trending
    config = ServerConfig(
        experiments='{"ab": {"model": {"weight": 1}, "popular": {"weight": 1, "ranking": "trending"}}}'
    )
    gateway = Gateway(config, log, replica)
    series: list[dict[str, float]] = []
    arms: dict[str, str] = {}
    try:
        for round_ in range(3):
            clicks = []
            for user in range(80):
                rec = ask(gateway, f"u{user}", 5, experiment="ab")
                arms[f"u{user}"] = rec.arm
                for item in rec.items:
                    if rng.random() < (0.5 if item.item_id in liked else 0.05):
                        clicks.append((f"u{user}", item.item_id, rec.request_id))
            assert gateway.impressions.flush()  # stamped now
            clock = int(time.time() * 1000) + 1000
            log.append([Event(f"c{round_}-{n}", u, i, "click", clock, r) for n, (u, i, r) in enumerate(clicks)])
            # a later event closes the round's impression windows (60 s of event time)
            log.append([Event(f"tick{round_}", "ticker", "hit0", "skip", clock + 120_000)])
            sync()
            counts = trainer.experiment_counts
            series.append({arm: counts[("ab", arm)][1] / counts[("ab", arm)][0] for arm in ("model", "popular")})
    finally:
        gateway.close()
    assert {"model", "popular"} == set(arms.values())
    assert 25 <= sum(a == "model" for a in arms.values()) <= 55  # split by the hash of the user id
    assert all(ctr["popular"] > 1.2 * ctr["model"] for ctr in series), series  # cumulative CTR per round
    assert gateway.experiments.arm("ab", "u1").name == arms["u1"]  # the same arm on every call


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('{"x": {"a": {"ranking": "nope"}}}', "server.experiments.x.a.ranking"),
        ('{"x": {"a": {"weight": -1}}}', "server.experiments.x.a.weight"),
        ('{"x": {"a": {"colour": 1}}}', "server.experiments.x.a.colour"),
        ('{"x": {}}', "server.experiments.x"),
        ("[1]", "server.experiments"),
    ],
)
def test_a_bad_experiment_config_is_refused_naming_the_field(text: str, named: str) -> None:
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        ServerConfig(experiments=text)


def test_an_unknown_experiment_is_an_invalid_argument(world: World) -> None:
    gateway = Gateway(ServerConfig(experiments='{"x": {"a": {}}}'), world.log, world.replica)
    try:
        with pytest.raises(InvalidArgument, match="experiment"):
            ask(gateway, "u1", 3, experiment="y")
        assert ask(gateway, "u1", 3, experiment="x", write_back=False).arm == "a"
    finally:
        gateway.close()


def test_exploration_slots_go_to_items_with_little_data(world: World) -> None:
    shown = feature_keys("item", [f"i{i}" for i in range(30)])
    world.trainer.feedback.observe(np.repeat(shown, 200), np.zeros(6000))  # every old item: shown enough
    world.put(parse_item("fresh", {"categories": ["even"], "attributes": {"lang": "fr"}}, 2))  # no event yet
    gateway = Gateway(ServerConfig(), world.log, world.replica)
    try:
        users = [f"u{u}" for u in range(40)]
        plain = [ask(gateway, u, 10, write_back=False) for u in users]
        assert not any(i.item_id == "fresh" for rec in plain for i in rec.items)  # full lists: never listed
        explored = [ask(gateway, u, 10, write_back=False, exploration=0.2) for u in users]
        assert all(len(rec.items) == 10 for rec in explored)
        # two slots for exploration, one item with little data: the last slot is its
        assert all([(i.item_id, i.reason) for i in rec.items[9:]] == [("fresh", "exploration")] for rec in explored)
        assert all(i.reason != "exploration" for rec in explored for i in rec.items[:9])
        world.put(parse_item("fresher", {"categories": ["odd"]}, 3))
        explored = [ask(gateway, u, 10, write_back=False, exploration=0.2) for u in users]
        assert all({i.item_id for i in rec.items[8:]} == {"fresh", "fresher"} for rec in explored)
    finally:
        gateway.close()


def test_thompson_sampling_explores_the_unknown_and_stops_at_enough_data() -> None:
    feedback = np.array([[150.0, 0.0], [0.0, 0.0], [300.0, 50.0], [20.0, 10.0]])
    rng = np.random.default_rng(0)
    picks = np.bincount(np.concatenate([thompson(feedback, 1, rng) for _ in range(2000)]), minlength=4)
    assert picks[2] == 0  # past MAX_IMPRESSIONS: known enough
    assert picks[3] > picks[1] > 10 * picks[0]  # a good record, then no record, then a bad one


def test_a_served_list_record_round_trips_and_a_bad_one_is_refused() -> None:
    record = served_record("u1", "r1", ["a", "b"], 5, {"arm": "x"})
    events = served_events(record)
    assert [(e.event_id, e.item_id, e.position, e.request_id, dict(e.context)) for e in events] == [
        ("r1:0", "a", 0, "r1", {"arm": "x"}),
        ("r1:1", "b", 1, "r1", {"arm": "x"}),
    ]
    for bad in (SERVED_PREFIX + b"[]}", SERVED_PREFIX + b'{"items": 3}}', served_record("", "r1", ["a"], 5)):
        with pytest.raises(InvalidEvent):
            served_events(bad)


class Clustered(World):
    """40 users x 30 items in two tastes: even users pick 6 of the 15 even items (category
    "even"), odd users 6 of the odd ones; each pick three times."""

    def __init__(self) -> None:
        self.log = MemoryLog()
        self.trainer = Trainer(TrainerConfig(batch_size=64, min_count=1), self.log.consumer("g"))
        rng = np.random.default_rng(0)
        picks = [rng.choice(np.arange(u % 2, 30, 2), 6, replace=False).tolist() for u in range(40)]
        pairs = [(f"u{u}", f"i{i}") for u, items in enumerate(picks) for i in items]
        self.trainer.train_events(events_of(pairs * 3))
        self.store = MemoryServingStore()
        self.replica = ServingReplica(self.store, candidates=10)
        self.put(*(parse_item(f"i{i}", {"categories": [("odd", "even")[i % 2 == 0]]}, 1) for i in range(30)))


def test_a_new_item_is_listed_for_the_users_its_content_fits_and_explored_for_the_others() -> None:
    world = Clustered()
    world.put(parse_item("new", {"categories": ["even"]}, 2))  # no event yet: a content row only
    lists = world.replica.recommend_batch([Request(f"u{u}", 10) for u in range(40)])
    listed = [[(i.item_id, i.reason) for i in rec.items if i.item_id == "new"] for rec in lists]
    fans, others = listed[0::2], listed[1::2]
    assert sum(bool(x) for x in fans) >= 10  # of the 20 users who pick even items
    assert all(x == [("new", "content")] for x in fans if x)
    assert not any(others)
    explored = world.replica.recommend_batch([Request(f"u{u}", 10, exploration=0.1) for u in range(1, 40, 2)])
    for rec in explored:  # for the others it may only take an exploration slot
        assert all(i.reason == "exploration" for i in rec.items if i.item_id == "new")
    similar = [i.item_id for i in world.replica.similar_items("new", 5)[1]]
    assert len(similar) == 5 and all(int(i[1:]) % 2 == 0 for i in similar)  # near its kind
    world.log.append(events_of([("u0", "new"), ("u2", "new")], start_ms=1_700_000_900_000))
    world.put(parse_item("new", {"categories": ["even"]}, 3))  # trains the events, syncs
    key = feature_keys("item", ["new"])
    assert world.trainer.models.items.get(key)[1].all()  # its own row now, trained from here on
    assert int(key[0]) not in world.trainer._content  # and no content row computed for it again
