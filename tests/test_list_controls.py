"""What a recommendation call controls beyond filters: pages with no item repeated, diversity,
and impressions written back to the log (and joined with the clicks that carry their
`request_id`)."""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest

from embedding_store import feature_keys
from services.config import ServerConfig
from services.errors import InvalidArgument
from services.gateway.core import Gateway
from services.serving import Recommendation
from tests.test_catalogue import World
from trainer.events import Event


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
    impressions = [Event.from_json(r.value) for r in records if b'"impression"' in r.value]
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
