"""Real data, through the API: after MovieLens-100K, a new fan of a genre is served that genre
within two seconds, and an item's similar items share its genre."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from services.datasets import movielens_100k
from tests.nodes import rest, running_node, wait_trained_and_served

GENRE_MOVIES = 50  # genres with at least this many movies are tried
PICKS, TOP, WITHIN_S = 10, 20, 2.0


@pytest.fixture(scope="module")
def replayed() -> Iterator[tuple[httpx.Client, dict[str, set[str]], Counter[str]]]:
    """A node that trained on all of MovieLens-100K (its own timestamps), its REST client,
    each movie's genres and rating counts."""
    data = movielens_100k()
    genres = {e["item_id"]: set(e["context"].get("item.genres", "").split("|")) for e in data.events}
    ratings = Counter(e["item_id"] for e in data.events)
    with running_node() as node, rest(node) as client:
        for start in range(0, len(data.events), 1000):
            assert client.post("/v1/events", json={"events": data.events[start : start + 1000]}).status_code == 200
        wait_trained_and_served(node, len(data.events), timeout_s=300)
        yield client, genres, ratings


def by_genre(genres: dict[str, set[str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item, gs in sorted(genres.items()):
        for g in gs:
            out.setdefault(g, []).append(item)
    return {g: items for g, items in out.items() if len(items) >= GENRE_MOVIES}


def share(items: list[dict[str, Any]], genre: str, genres: dict[str, set[str]]) -> float:
    return sum(genre in genres.get(i["item_id"], ()) for i in items) / max(len(items), 1)


@pytest.mark.slow
def test_a_new_fan_of_a_genre_is_served_it_within_two_seconds(
    replayed: tuple[httpx.Client, dict[str, set[str]], Counter[str]],
) -> None:
    client, genres, ratings = replayed
    rng = np.random.default_rng(0)
    reached, report = 0, {}
    groups = by_genre(genres)
    for genre, movies in sorted(groups.items()):
        base = len(movies) / len(genres)
        target = min(3 * base, 0.9)  # 3x the genre's share; Drama (43%) and Comedy (30%) cannot triple
        known = [m for m in movies if ratings[m] >= 20]  # a fan rates movies people watch
        fan = f"fan-{uuid.uuid4().hex[:8]}"
        now = int(time.time() * 1000)
        events = [
            {"event_id": f"{fan}-{n}", "user_id": fan, "item_id": m, "type": "rating", "value": 5, "timestamp_ms": now}
            for n, m in enumerate(rng.choice(known, PICKS, replace=False).tolist())
        ]
        accepted = time.monotonic()
        assert client.post("/v1/events", json={"events": events}).json()["accepted"] == PICKS
        best = 0.0
        while time.monotonic() - accepted < WITHIN_S and best < target:
            # polled to measure, not shown to anyone: not written back as impressions
            body = {"user_id": fan, "k": TOP, "write_back": False}
            items = client.post("/v1/recommendations", json=body).json()["items"]
            assert len(items) == TOP
            best = max(best, share(items, genre, genres))
            time.sleep(0.05)
        reached += best >= target
        report[genre] = (round(base, 3), round(best, 2))
    # measured with taste profiles (the candidates of a fan's genre, its attribute lift): 12 or
    # 13 of the 14 genres in four runs (6 to 11 before them). Missed: Drama (0.7-0.95) and
    # Comedy (0.7-0.9), whose 3x is capped at 18 of the 20; the model the replay trains depends
    # on how the polls happen to batch the events
    assert reached >= len(groups) - 3, report
    if reached < len(groups):
        pytest.xfail(f"issue 18: {reached} of {len(groups)} genres reach 3x their share in 2 s: {report}")


@pytest.mark.slow
def test_similar_items_share_the_genre_far_above_its_base_rate(
    replayed: tuple[httpx.Client, dict[str, set[str]], Counter[str]],
) -> None:
    client, genres, ratings = replayed
    lifts, targets = {}, {}
    for genre, movies in sorted(by_genre(genres).items()):
        base = len(movies) / len(genres)
        targets[genre] = min(3.0, 0.9 / base)  # 3x the base rate; Drama (43%) and Comedy (30%): 9 in 10
        shares = []
        for movie in sorted(movies, key=lambda m: -ratings[m])[:20]:
            reply = client.get(f"/v1/items/{movie}/similar", params={"k": 10})
            assert reply.status_code == 200, reply.text
            shares.append(share(reply.json()["items"], genre, genres))
        lifts[genre] = float(np.mean(shares)) / base
    # measured with similar items that share attributes: every genre but Comedy (2.4) and Drama
    # (1.9) at 3x, the median 6.2 (co-visitation alone: 1.3 to 6.6, median 3.0)
    assert min(lifts.values()) > 1.5, lifts
    assert float(np.median(list(lifts.values()))) >= 4.0, lifts
    missed = {g: round(lift, 2) for g, lift in lifts.items() if lift < targets[g]}
    if missed:
        pytest.xfail(f"issue 18: similar items reach 3x the base rate (9 in 10 at most) but in {missed}")
