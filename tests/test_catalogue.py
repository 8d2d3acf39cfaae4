"""The item catalogue: records validated field by field, carried from the log through the
trainer's sync to every serving path; hidden, deleted and expired items leave every list in
the next sync and come back when un-hidden; category and attribute filters return exactly k
items when k are eligible; the REST and gRPC catalogue API."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import grpc
import numpy as np
import pytest

from embedding_store import feature_keys
from embedding_store.base import TableDelta
from proto import freshrec_pb2 as pb
from proto import freshrec_pb2_grpc as pb_grpc
from services.errors import NotFound
from services.serving import Request, ServingReplica
from services.serving_store import codec
from services.serving_store.memory import MemoryServingStore
from services.serving_store.redis import RedisServingStore
from tests.nodes import rest, running_node, wait_trained_and_served
from tests.test_covisit import events_of
from trainer.config import TrainerConfig
from trainer.eventlog import MemoryLog
from trainer.events import InvalidEvent
from trainer.items import ItemRecord, UserRecord, erase_record, parse_item, parse_user
from trainer.loop import Trainer
from trainer.models import USER_TABLES
from trainer.sync import SyncMessage

ITEMS = 30


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"categories": ["a", 3]}, "categories[1]"),
        ({"categories": "a"}, "categories"),
        ({"attributes": {"lang": 1}}, "attributes.lang"),
        ({"hidden": "yes"}, "hidden"),
        ({"available_until_ms": -5}, "available_until_ms"),
        ({"available_until_ms": True}, "available_until_ms"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_a_bad_item_field_is_named(body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidEvent) as error:
        parse_item("i1", body, 1)
    assert error.value.field == field


def test_records_round_trip_through_the_log_the_codec_and_a_merge() -> None:
    record = parse_item("i 1", {"categories": ["a", "b", "a"], "attributes": {"x": "ü"}, "available_until_ms": 9}, 5)
    assert record.categories == ("a", "b")  # repeats collapse, order kept
    assert ItemRecord.from_log(record.to_log()) == record
    gone = ItemRecord("i 1", updated_ms=6, deleted=True)
    assert ItemRecord.from_log(gone.to_log()) == gone
    first = SyncMessage(*_empty_tables(), catalogue={"i 1": record, "j": parse_item("j", {}, 1)})
    merged = first.then(SyncMessage(*_empty_tables(), catalogue={"i 1": gone}))
    assert merged.catalogue == {"i 1": gone, "j": first.catalogue["j"]}
    assert not merged.is_empty()  # a message with nothing but catalogue records goes out
    assert codec.decode(codec.encode(merged)).catalogue == merged.catalogue


def _empty_tables() -> tuple[TableDelta, TableDelta]:
    return TableDelta.empty("user"), TableDelta.empty("item")


class World:
    """A trainer on 40 users x 30 items (even and odd categories, `lang` en for i0-i14, fr
    after), its log and a replica that follows it through a memory serving store."""

    def __init__(self, store: Any = None) -> None:
        self.log = MemoryLog()
        self.trainer = Trainer(TrainerConfig(batch_size=64, min_count=1), self.log.consumer("g"))
        rng = np.random.default_rng(0)
        pairs = [(f"u{u}", f"i{i}") for u in range(40) for i in rng.choice(ITEMS, 8, replace=False).tolist()]
        self.trainer.train_events(events_of(pairs))
        self.store = store or MemoryServingStore()
        self.replica = ServingReplica(self.store, candidates=10)
        self.put(
            *(
                parse_item(f"i{i}", {"categories": [("odd", "even")[i % 2 == 0]], "attributes": {"lang": _lang(i)}}, 1)
                for i in range(ITEMS)
            )
        )

    def put(self, *records: ItemRecord) -> None:
        """Log `records`, train, sync, and let the replica apply the version."""
        self.log.append_keyed([(r.item_id, r.to_log()) for r in records])
        while self.trainer.poll_and_train().events or self.trainer._consumer.lag():
            pass
        message = self.trainer.collect_sync()
        assert message is not None and set(message.catalogue) >= {r.item_id for r in records}
        self.store.publish(message)
        self.replica.catch_up()

    def listed(self, request: Request) -> list[str]:
        return [i.item_id for i in self.replica.recommend_batch([request])[0].items]

    def everywhere(self) -> set[str]:
        """Every item any path serves: personalised lists of all users, cold-start lists,
        similar items of every item, and the ranking stage given every item as candidates."""
        out: set[str] = set()
        requests = [Request(f"u{u}", 20, exclude_seen=False) for u in range(40)] + [Request("nobody", 20)]
        for answer in self.replica.recommend_batch(requests):
            out |= {i.item_id for i in answer.items}
        for i in range(ITEMS):
            with contextlib.suppress(NotFound):  # an item with neither neighbours nor a vector
                out |= {s.item_id for s in self.replica.similar_items(f"i{i}", 20)[1]}
        every = feature_keys("item", [f"i{i}" for i in range(ITEMS)])
        for answer in self.replica.rank_batch([Request("u1", ITEMS, exclude_seen=False)], [every]):
            out |= {i.item_id for i in answer.items}
        return out


def _lang(i: int) -> str:
    return "en" if i < 15 else "fr"


def test_hidden_deleted_and_expired_items_leave_every_path_and_come_back() -> None:
    world = World()
    assert {f"i{i}" for i in range(ITEMS)} <= world.everywhere()
    top = world.listed(Request("u1", 1))[0]
    world.put(parse_item(top, {"hidden": True}, 2), ItemRecord("i7", updated_ms=2, deleted=True))
    until = now_ms() + 4000  # room for a slow machine between the put and the check below
    world.put(parse_item("i9", {"available_until_ms": until}, 2), parse_item("i11", {}, 2))
    served = world.everywhere()
    assert top not in served and "i7" not in served and "i9" in served
    assert world.replica.catalogue_item("i7")[1] == ItemRecord("i7", updated_ms=2, deleted=True)
    time.sleep(max(0.0, (until - now_ms()) / 1000) + 0.1)  # past i9's availability: no sync needed for it to go
    assert "i9" not in world.everywhere()
    world.put(parse_item(top, {}, 3), parse_item("i7", {}, 3))  # un-hidden, put again
    assert {top, "i7"} <= world.everywhere()


def test_a_filter_returns_exactly_k_when_k_items_are_eligible() -> None:
    world = World()
    world.put(parse_item("new", {"categories": ["even"], "attributes": {"lang": "fr"}}, 2))  # no event yet
    even = {f"i{i}" for i in range(0, ITEMS, 2)} | {"new"}
    for user in ("u1", "nobody"):
        listed = world.listed(Request(user, len(even), exclude_seen=False, categories=("even",)))
        assert set(listed) == even, user  # every eligible item, from the sources then the catalogue
    listed = world.listed(Request("u2", 4, exclude_seen=False, categories=("even",), exclude_items=("i0",)))
    assert len(listed) == 4 and set(listed) <= even - {"i0"}
    french = world.listed(Request("u3", 8, exclude_seen=False, attributes=(("lang", "fr"),)))
    assert len(french) == 8 and all(i == "new" or int(i[1:]) >= 15 for i in french)
    no_odd = world.listed(Request("u4", 20, exclude_seen=False, exclude_categories=("odd",)))
    assert len(no_odd) == 16 and set(no_odd) == even  # the 15 odd ones are out, nothing else
    assert world.listed(Request("u5", 5, categories=("none",))) == []


def test_a_replica_that_bootstraps_from_redis_knows_the_catalogue(redis_url: str) -> None:
    world = World(RedisServingStore(redis_url.split("?")[0], prefix=redis_url.rsplit("=", 1)[1]))
    world.put(parse_item("i3", {"hidden": True}, 2), ItemRecord("i4", updated_ms=2, deleted=True))
    late = ServingReplica(world.store, candidates=10)
    late.bootstrap()
    assert late.catalogue_item("i3")[1] == parse_item("i3", {"hidden": True}, 2)
    assert [r.item_id for r in late.catalogue_page("i2", 3)] == ["i20", "i21", "i22"]  # id order, i4 gone
    lists = late.recommend_batch([Request(f"u{u}", 20, exclude_seen=False) for u in range(40)])
    assert not {i.item_id for a in lists for i in a.items} & {"i3", "i4"}


def test_the_catalogue_api_over_rest_and_grpc() -> None:
    t0 = now_ms() - 60_000
    events = [
        {"event_id": f"e{n}", "user_id": f"u{n % 7}", "item_id": f"i{n % 12}", "type": "click", "timestamp_ms": t0 + n}
        for n in range(120)
    ]
    with running_node() as node, rest(node) as client:
        assert client.post("/v1/events", json={"events": events}).status_code == 200
        reply = client.put("/v1/items/i1", json={"categories": ["news"], "attributes": {"lang": "en"}})
        assert reply.status_code == 202 and reply.json() == {"item_id": "i1", "status": "accepted"}
        bad = client.put("/v1/items/i2", json={"categories": ["news", ""]})
        assert bad.status_code == 422 and "categories[1]" in bad.json()["error"]["message"]
        batch = client.post(
            "/v1/items:batch",
            json={"items": [{"item_id": "i2", "categories": ["news"]}, {"item_id": "i3", "hidden": "no"}, 5]},
        ).json()
        assert batch["accepted"] == 1 and [r["status"] for r in batch["results"]] == [
            "accepted",
            "rejected",
            "rejected",
        ]
        assert batch["results"][1]["error"]["field"] == "items[1].hidden"
        with grpc.insecure_channel(f"127.0.0.1:{node.grpc_port}") as channel:
            stub = pb_grpc.GatewayStub(channel)
            stub.PutItem(pb.PutItemRequest(item=pb.Item(item_id="i4", categories=["news"], hidden=True)))
            with pytest.raises(grpc.RpcError) as error:
                stub.PutItem(pb.PutItemRequest(item=pb.Item(item_id="", categories=["news"])))
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "item_id" in (error.value.details() or "")
            wait_trained_and_served(node, len(events))
            assert node.publisher is not None
            node.publisher.publish_now()
            node.replica.catch_up()  # type: ignore[union-attr]
            got = client.get("/v1/items/i1").json()
            assert got["categories"] == ["news"] and got["attributes"] == {"lang": "en"} and not got["hidden"]
            assert stub.GetItem(pb.GetItemRequest(item_id="i4")).item.hidden
            news = client.post(
                "/v1/recommendations", json={"user_id": "u1", "k": 5, "filter": {"categories": ["news"]}}
            ).json()["items"]
            assert {i["item_id"] for i in news} <= {"i1", "i2"} and "i4" not in {i["item_id"] for i in news}
            grpc_news = stub.Recommend(
                pb.RecommendRequest(user_id="u1", k=5, exclude_seen=False, filter=pb.Filter(categories=["news"]))
            )
            assert {i.item_id for i in grpc_news.items} == {"i1", "i2"}
            first = client.get("/v1/items", params={"limit": 2}).json()
            assert [i["item_id"] for i in first["items"]] == ["i1", "i2"] and first["next_cursor"] == "i2"
            rest_page = client.get("/v1/items", params={"cursor": "i2", "limit": 2}).json()
            assert [i["item_id"] for i in rest_page["items"]] == ["i4"] and rest_page["next_cursor"] is None
            assert client.put("/v1/users/u1", json={"attributes": {"lang": "en"}}).status_code == 202
            stub.PutUser(pb.PutUserRequest(user=pb.User(user_id="u2", attributes={"lang": "fr"})))
            assert client.put("/v1/users/u1", json={"attributes": {"lang": 3}}).status_code == 422
            assert client.delete("/v1/items/i1").status_code == 202
            stub.DeleteItem(pb.DeleteItemRequest(item_id="i2"))
            node.publisher.publish_now()
            wait_until_absent(client, "i1")
            assert stub.ListItems(pb.ListItemsRequest()).items[0].item_id == "i4"
            assert client.get("/v1/users/u1").json()["attributes"] == {"lang": "en"}
            assert stub.GetUser(pb.GetUserRequest(user_id="u2")).user.attributes == {"lang": "fr"}
            assert client.get("/v1/users/nobody").status_code == 404
            with pytest.raises(grpc.RpcError) as error:
                stub.GetItem(pb.GetItemRequest(item_id="i2"))
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
        lists = [
            client.post("/v1/recommendations", json={"user_id": f"u{u}", "k": 12, "exclude_seen": False}).json()
            for u in range(7)
        ]
        assert not {i["item_id"] for answer in lists for i in answer["items"]} & {"i1", "i2", "i4"}


def wait_until_absent(client: Any, item_id: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get(f"/v1/items/{item_id}").status_code != 404:
        assert time.monotonic() < deadline, f"{item_id} still in the catalogue"
        time.sleep(0.05)


def _lists(client: Any, stub: Any, users: list[str], k: int = 10) -> dict[str, list[str]]:
    """Each user's list, over REST for even positions and gRPC for odd ones."""
    out = {}
    for n, user in enumerate(users):
        if n % 2 == 0:
            body = client.post("/v1/recommendations", json={"user_id": user, "k": k, "write_back": False}).json()
            out[user] = [i["item_id"] for i in body["items"]]
        else:
            reply = stub.Recommend(pb.RecommendRequest(user_id=user, k=k, write_back=False))
            out[user] = [i.item_id for i in reply.items]
    return out


def test_catalogue_attributes_are_the_items_features_before_any_event() -> None:
    world = World()
    world.put(parse_item("new", {"categories": ["even"], "attributes": {"lang": "fr"}}, 2))
    tokens = (("item.lang", "fr"), ("item.category", "even"))
    expected = sorted(int(feature_keys(k, [t])[0]) for k, t in tokens)
    key = feature_keys("item", ["new"])
    assert sorted(world.trainer.features.item_attributes(key)[0].tolist()) == expected
    assert sorted(world.replica._table_rows("item_attrs", key)[0][:2].tolist()) == expected  # synced to ranking


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["embedded", "kafka+redis"])
def test_hide_unhide_and_erase_end_to_end(mode: str, request: pytest.FixtureRequest) -> None:
    """After a replay: an item hidden over REST leaves, within 2 s, its top user's list, 50
    others', cold users' and its neighbours' similar items (both transports); un-hidden over
    gRPC it is served again; an erased user is gone from the trainer's tables, the serving
    store and serving, and gets a cold user's list."""
    logs, stores = ("memory://", "memory://")
    if mode != "embedded":
        logs, stores = request.getfixturevalue("kafka_url"), request.getfixturevalue("redis_url")
    rng = np.random.default_rng(3)
    t0 = now_ms() - 3_600_000
    events = [
        {
            "event_id": f"r{n}",
            "user_id": f"u{n % 60}",
            "item_id": f"i{int(rng.zipf(1.3)) % 80}",
            "type": "click",
            "timestamp_ms": t0 + n,
        }
        for n in range(3000)
    ]
    users = [f"u{u}" for u in range(52)] + ["cold-1", "cold-2"]
    with running_node(logs, stores) as node, rest(node) as client:
        for start in range(0, len(events), 1000):
            assert client.post("/v1/events", json={"events": events[start : start + 1000]}).status_code == 200
        wait_trained_and_served(node, len(events))
        channel = grpc.insecure_channel(f"127.0.0.1:{node.grpc_port}")
        stub = pb_grpc.GatewayStub(channel)
        target = _lists(client, stub, ["u0"])["u0"][0]
        neighbours = [i["item_id"] for i in client.get(f"/v1/items/{target}/similar", params={"k": 5}).json()["items"]]
        hidden_at = time.monotonic()
        assert client.put(f"/v1/items/{target}", json={"hidden": True}).status_code == 202
        while True:
            lists = _lists(client, stub, users)
            similar = [
                i.item_id for n in neighbours for i in stub.SimilarItems(pb.SimilarItemsRequest(item_id=n, k=20)).items
            ]
            if not any(target in items for items in lists.values()) and target not in similar:
                break
            assert time.monotonic() - hidden_at < 2.0, f"{target} still served 2 s after it was hidden"
            time.sleep(0.05)
        assert all(len(items) == 10 for items in lists.values())  # the others took its place
        stub.PutItem(pb.PutItemRequest(item=pb.Item(item_id=target)))  # un-hidden
        deadline = time.monotonic() + 10
        while target not in _lists(client, stub, ["u0"])["u0"]:
            assert time.monotonic() < deadline, f"{target} not served again after it was un-hidden"
            time.sleep(0.1)

        cold = _lists(client, stub, ["never-seen"])["never-seen"]
        key = feature_keys("user", ["u0"])
        assert node.trainer is not None and node.trainer.store.table("user").get(key)[1][0]
        assert client.delete("/v1/users/u0").status_code == 202
        deadline = time.monotonic() + 10
        while _lists(client, stub, ["u0"])["u0"] != cold:
            assert time.monotonic() < deadline, "an erased user still gets a personal list"
            time.sleep(0.1)
        for name in USER_TABLES:
            assert not node.trainer.store.table(name).get(key)[1][0], name
        assert not node.trainer.features.histories(key).any()
        snapshot = node.store.snapshot()
        assert key[0] not in snapshot.users.keys and key[0] not in snapshot.seen_users
        assert all(key[0] not in t.keys for t in snapshot.tables.values())
        channel.close()


def test_an_erasure_that_meets_a_store_outage_is_held_and_done_with_the_next_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    world = World()
    trainer, key = world.trainer, feature_keys("user", ["u1"])
    table = trainer.store.table("user")
    assert table.get(key)[1][0]
    real, calls = table.delete, []

    def away_once(keys: np.ndarray) -> int:
        calls.append(len(keys))
        if len(calls) == 1:
            raise ConnectionError("shard away")
        return real(keys)

    monkeypatch.setattr(table, "delete", away_once)
    world.log.append_keyed([("u1", erase_record("u1"))])
    while trainer.poll_and_train().events or trainer._consumer.lag():
        pass
    assert table.get(key)[1][0] and trainer.state_dict()["erase_later"] == ["u1"]  # held, kept in checkpoints
    world.log.append(events_of([("u9", "i1")], start_ms=now_ms()))
    while trainer.poll_and_train().events or trainer._consumer.lag():
        pass
    assert not table.get(key)[1][0] and not trainer.features.histories(key).any()


def test_user_attributes_are_features_at_once_served_after_a_sync_and_erased_with_the_user() -> None:
    world = World()
    trainer, key = world.trainer, feature_keys("user", ["u3"])
    world.log.append_keyed([("u3", parse_user("u3", {"attributes": {"gender": "F", "genres": "A|B"}}, 5).to_log())])
    world.put(parse_item("i1", {}, 6))  # a sync: trains the records, publishes, applies
    expected = sorted(
        int(feature_keys(k, [t])[0]) for k, t in (("user.gender", "F"), ("user.genres", "A"), ("user.genres", "B"))
    )
    assert sorted(trainer.features.user_attributes(key)[0].tolist()) == expected  # the model's features
    version, record = world.replica.user_record("u3")
    assert record == UserRecord("u3", {"gender": "F", "genres": "A|B"}, 5) and version == world.replica.version
    with pytest.raises(InvalidEvent) as bad:
        parse_user("u3", {"attributes": {"gender": 1}}, 5)
    assert bad.value.field == "attributes.gender"
    world.log.append_keyed([("u3", erase_record("u3"))])
    world.put(parse_item("i1", {}, 7))
    assert world.replica.user_record("u3")[1] is None and not trainer.features.user_attributes(key).any()
