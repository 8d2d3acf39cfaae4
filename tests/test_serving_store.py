"""One suite for the ServingStore interface, run against the in-process store, a real Redis and
a real Redis Cluster (three redis-server processes in cluster mode)."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
import redis

from embedding_store.base import TableDelta
from services.serving_store import MemoryServingStore, ServingStore, VersionGap, codec, open_serving_store
from services.serving_store.redis import RedisServingStore
from services.serving_store.state import ServingState
from tests.local_servers import wait_until
from trainer.sync import SyncMessage


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
def store(request: pytest.FixtureRequest) -> ServingStore:
    url = {
        "memory": lambda: "memory://",
        "redis": lambda: request.getfixturevalue("redis_url"),
        "redis-cluster": lambda: request.getfixturevalue("redis_cluster_url"),
    }[request.param]()
    s = open_serving_store(url)
    request.addfinalizer(s.close)
    return s


def message(rng: np.random.Generator, n_users: int = 3, n_items: int = 4, dim: int = 4) -> SyncMessage:
    users = rng.integers(0, 50, n_users).astype(np.uint64)
    items = rng.integers(1000, 1050, n_items).astype(np.uint64)
    return SyncMessage(
        users=TableDelta("user", users, rng.normal(size=(n_users, dim)).astype(np.float32)),
        items=TableDelta(
            "item",
            items,
            rng.normal(size=(n_items, dim)).astype(np.float32),
            evicted=rng.integers(1000, 1050, 1).astype(np.uint64),
        ),
        item_names={int(k): f"name-{int(k)}" for k in items},
        seen_users=users[:2],
        seen_items=items[:2],
        popular_keys=items[:3],
        popular_scores=np.array([3, 2, 1], dtype=np.float32),
        tables={  # what the ranking service reads: embeddings (fp16 served), keys and counts (exact)
            "rank_id": TableDelta(
                "rank_id",
                items,
                rng.normal(size=(n_items, 3)).astype(np.float32),
                np.setdiff1d(rng.integers(1000, 1050, 2).astype(np.uint64), items),
            ),
            "user_attrs": TableDelta(
                "user_attrs", users, rng.integers(2**63, 2**64 - 1, (n_users, 2), dtype=np.uint64)
            ),
            "item_counts": TableDelta("item_counts", items, rng.normal(2000.0, 1.0, (n_items, 2))),
        },
        dense={"ranker.w": rng.normal(size=(2, 3)).astype(np.float32)} if rng.random() < 0.5 else {},
        clock_s=float(rng.uniform(0, 1e9)),
        trending_half_life_s=3600.0,
        created_ms=1,
    )


def same_state(a: SyncMessage, b: SyncMessage) -> None:
    sa, sb = ServingState(), ServingState()
    sa.apply(a)
    sb.apply(b)
    assert sa.version == sb.version
    for ta, tb in ((sa.users, sb.users), (sa.items, sb.items)):
        assert (ta is None) == (tb is None)
        if ta is not None and tb is not None:
            ka, ra = ta.items()
            kb, rb = tb.items()
            oa, ob = np.argsort(ka), np.argsort(kb)
            np.testing.assert_array_equal(ka[oa], kb[ob])
            np.testing.assert_array_equal(ra[oa], rb[ob])
    assert sa.names == sb.names
    assert {u: set(h) for u, h in sa.seen.items()} == {u: set(h) for u, h in sb.seen.items()}
    np.testing.assert_array_equal(sa.popular_keys, sb.popular_keys)
    assert sorted(sa.tables) == sorted(sb.tables)
    for name, ta in sa.tables.items():
        ka, ra = ta.items()
        kb, rb = sb.tables[name].items()
        oa, ob = np.argsort(ka), np.argsort(kb)
        np.testing.assert_array_equal(ka[oa], kb[ob])
        assert ra.dtype == rb.dtype
        np.testing.assert_array_equal(ra[oa], rb[ob])
    assert sa.dense.keys() == sb.dense.keys()
    for name, value in sa.dense.items():
        np.testing.assert_array_equal(value, sb.dense[name])
    assert (sa.clock_s, sa.trending_half_life_s) == (sb.clock_s, sb.trending_half_life_s)


def test_versions_are_ordered_and_tailable(store: ServingStore) -> None:
    rng = np.random.default_rng(0)
    assert store.latest_version() == 0
    messages = [message(rng) for _ in range(5)]
    versions = [store.publish(m) for m in messages]
    assert versions == [1, 2, 3, 4, 5] and store.latest_version() == 5
    # the size each version was stored at (what freshrec_sync_bytes_total adds up)
    assert [m.encoded_bytes for m in messages] == [len(codec.encode(m, store.row_dtype)) for m in messages]
    tail = store.read_since(2, timeout_s=0.1)
    assert [m.version for m in tail] == [3, 4, 5]
    assert store.read_since(5, timeout_s=0.05) == []


def test_snapshot_equals_replaying_every_version(store: ServingStore) -> None:
    rng = np.random.default_rng(1)
    replica = ServingState()
    for _ in range(20):
        store.publish(message(rng))
    for m in store.read_since(0, timeout_s=0.1):
        replica.apply(m)
    snap = store.snapshot()
    assert snap.full and snap.version == 20
    same_state(snap, replica.to_message())


def test_rows_are_stored_as_fp16(store: ServingStore) -> None:
    m = message(np.random.default_rng(2))
    store.publish(m)
    snap = store.snapshot()
    order = np.argsort(snap.users.keys)
    keys, idx = np.unique(m.users.keys, return_index=True)
    np.testing.assert_array_equal(snap.users.keys[order], keys)
    np.testing.assert_array_equal(snap.users.rows[order], m.users.rows[idx].astype(np.float16).astype(np.float32))


def test_feature_tables_are_exact_and_embeddings_fp16(store: ServingStore) -> None:
    rng = np.random.default_rng(3)
    first = message(rng)
    store.publish(first)
    m = message(rng)
    gone = np.setdiff1d(first.tables["rank_id"].keys, m.tables["rank_id"].keys)
    m.tables["rank_id"] = dataclasses.replace(m.tables["rank_id"], evicted=gone)
    store.publish(m)
    snap = store.snapshot()
    for name, dtype in (("user_attrs", np.uint64), ("item_counts", np.float64)):  # uint64 keys above 2^63 too
        sent, stored = m.tables[name], snap.tables[name]
        assert stored.rows.dtype == dtype
        last = {int(k): r for k, r in zip(sent.keys, sent.rows, strict=True)}  # last write wins
        at = {int(k): i for i, k in enumerate(stored.keys)}
        for key, row in last.items():
            np.testing.assert_array_equal(stored.rows[at[key]], row)
    rank = snap.tables["rank_id"]
    assert rank.rows.dtype == np.float32
    evicted = m.tables["rank_id"].evicted
    assert len(evicted) and not np.isin(evicted, rank.keys).any()  # evicted rows are gone


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_rows_can_be_kept_as_float32(backend: str, request: pytest.FixtureRequest) -> None:
    base = "memory://" if backend == "memory" else request.getfixturevalue("redis_url")
    store = open_serving_store(f"{base}{'&' if '?' in base else '?'}row_dtype=float32")
    m = message(np.random.default_rng(4))
    store.publish(m)
    for got in (store.snapshot(), store.read_since(0, 0.1)[0]):
        keys, idx = np.unique(m.users.keys[::-1], return_index=True)  # last write wins
        order = np.argsort(got.users.keys)
        np.testing.assert_array_equal(got.users.keys[order], keys)
        np.testing.assert_array_equal(got.users.rows[order], m.users.rows[::-1][idx])  # exact, no fp16 rounding
    store.close()


def test_a_bad_row_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="row_dtype"):
        open_serving_store("memory://?row_dtype=int8")


def test_redis_announces_each_version(redis_url: str) -> None:
    store = open_serving_store(redis_url)
    prefix = redis_url.rsplit("prefix=", 1)[1]
    listener = redis.Redis.from_url(redis_url.split("?")[0]).pubsub()
    listener.subscribe(f"{prefix}:published")
    assert listener.get_message(timeout=1)["type"] == "subscribe"
    store.publish(message(np.random.default_rng(5)))
    store.publish(message(np.random.default_rng(6)))
    got = [listener.get_message(timeout=2) for _ in range(2)]
    assert [int(g["data"]) for g in got if g] == [1, 2]
    listener.close()
    store.close()


def test_read_since_wakes_up_on_publish(store: ServingStore) -> None:
    rng = np.random.default_rng(3)
    timer = threading.Timer(0.2, lambda: store.publish(message(rng)))
    timer.start()
    got = store.read_since(0, timeout_s=5)
    timer.join()
    assert [m.version for m in got] == [1]


def test_trimmed_stream_reports_a_gap(redis_url: str) -> None:
    rng = np.random.default_rng(4)
    for s in (
        MemoryServingStore(retention=3),
        RedisServingStore(redis_url.split("?")[0], prefix=redis_url.rsplit("=", 1)[1] + "g", retention=3),
    ):
        for _ in range(200):
            s.publish(message(rng))
        with pytest.raises(VersionGap):
            s.read_since(1, timeout_s=0.1)
        s.close()


def test_unknown_scheme_names_the_url() -> None:
    with pytest.raises(ValueError, match="mongodb://x"):
        open_serving_store("mongodb://x")


def test_concurrent_publishers_get_consecutive_versions_and_one_state(store: ServingStore) -> None:
    """Trainer workers publish at once: each version is claimed once, in stream order, and a
    snapshot equals replaying the stream (the rows were written in version order)."""
    rngs = [np.random.default_rng(10 + t) for t in range(3)]
    threads = [threading.Thread(target=lambda r=r: [store.publish(message(r)) for _ in range(8)]) for r in rngs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stream = store.read_since(0, timeout_s=0.1)
    assert [m.version for m in stream] == list(range(1, 25)) and store.latest_version() == 24
    replayed = ServingState()
    for m in stream:
        replayed.apply(m)
    snapshot = store.snapshot()
    assert snapshot.version == 24
    same_state(snapshot, replayed.to_message())


def test_a_redis_cluster_spreads_the_tables_over_its_nodes(redis_cluster_url: str) -> None:
    store = open_serving_store(redis_cluster_url)
    rng = np.random.default_rng(7)
    for _ in range(10):
        store.publish(message(rng, n_users=20, n_items=20))
    prefix = redis_cluster_url.rsplit("prefix=", 1)[1]
    cluster = redis.cluster.RedisCluster.from_url("redis://" + redis_cluster_url.split("://")[1].split(",")[0])
    keys_per_node = [
        sum(1 for _ in node.redis_connection.scan_iter(match=f"{prefix}:*")) for node in cluster.get_primaries()
    ]
    assert len(keys_per_node) == 3 and min(keys_per_node) > 0, keys_per_node
    cluster.close()
    store.close()


@pytest.mark.parametrize("seed", range(20))
def test_a_merged_message_applies_as_both_one_after_the_other(seed: int) -> None:
    """What a publisher that fell behind sends instead of two messages (`SyncMessage.then`)."""
    rng = np.random.default_rng(seed)
    a, b = message(rng), message(rng)
    if seed % 3 == 0:  # the newer one evicts what the older one wrote, names and ranking rows too
        evicted = np.union1d(b.items.evicted, a.items.keys[:2]).astype(np.uint64)
        b.items = dataclasses.replace(b.items, evicted=evicted[~np.isin(evicted, b.items.keys)])
    if seed % 4 == 1:
        b.popular_keys, b.popular_scores, b.dense = b.popular_keys[:0], b.popular_scores[:0], {}
    a.version, b.version = 1, 2
    one_by_one = ServingState()
    one_by_one.apply(a)
    one_by_one.apply(b)
    merged = a.then(b)
    merged.version = 2
    same_state(one_by_one.to_message(), merged)


def test_seen_items_are_kept_once_each(store: ServingStore) -> None:
    rows = TableDelta("user", np.array([7], np.uint64), np.ones((1, 4), np.float32))
    for items in ([1, 2, 3, 2, 1], [3, 4, 1]):
        store.publish(
            SyncMessage(
                users=rows,
                items=TableDelta.empty("item", 4),
                seen_users=np.full(len(items), 7, np.uint64),
                seen_items=np.array(items, np.uint64),
            )
        )
    snapshot = store.snapshot()
    assert sorted(snapshot.seen_items.tolist()) == [1, 2, 3, 4]  # each once, however often seen
    replayed = ServingState()
    for m in store.read_since(0, timeout_s=0.1):
        replayed.apply(m)
    assert list(replayed.seen[7]) == [2, 3, 4, 1]  # oldest first: an item seen again is the newest


def seen_by(user: int, items: list[int]) -> SyncMessage:
    """A version that carries only `user`'s new interactions with `items`, in order."""
    return SyncMessage(
        users=TableDelta.empty("user"),
        items=TableDelta.empty("item"),
        seen_users=np.full(len(items), user, np.uint64),
        seen_items=np.array(items, np.uint64),
    )


def test_a_full_seen_set_drops_the_oldest() -> None:
    state = ServingState(max_seen=3)
    for items in ([1, 2, 3], [1, 4]):  # 1 seen again: 2 is now the oldest
        state.apply(seen_by(9, items))
    assert list(state.seen[9]) == [3, 1, 4]


def test_a_publish_longer_than_the_lock_timeout_keeps_the_lock(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.serving_store import redis as redis_store

    monkeypatch.setattr(redis_store, "LOCK_TIMEOUT_S", 0.6)
    slow = open_serving_store(redis_url)
    other = open_serving_store(redis_url)
    write_rows = slow._write_rows  # type: ignore[attr-defined]
    started = threading.Event()

    def slow_rows(pipe: object, m: SyncMessage) -> None:
        started.set()
        time.sleep(2.0)  # three lock timeouts
        write_rows(pipe, m)

    vars(slow)["_write_rows"] = slow_rows
    rng = np.random.default_rng(3)
    versions: list[int] = []
    first = threading.Thread(target=lambda: versions.append(slow.publish(message(rng))))
    first.start()
    started.wait(5)

    def second() -> bool:  # as SyncPublisher does: a publish that cannot get the lock is tried again
        try:
            versions.append(other.publish(message(rng)))
        except redis.exceptions.LockError:
            return False
        return True

    wait_until(second, 10, "the second publisher to get the lock")
    first.join()
    assert versions == [1, 2]  # the slow publish kept its lock and its version; the other waited
    assert [m.version for m in other.read_since(0, timeout_s=0.1)] == [1, 2]
    slow.close()
    other.close()


def test_an_item_seen_twice_in_one_version_is_kept_once_at_its_newest_place() -> None:
    state = ServingState(max_seen=10)
    for items in ([5, 6, 5, 7], [8, 6, 8]):
        state.apply(seen_by(9, items))
    assert state.seen[9].tolist() == [5, 7, 6, 8]
    assert state.seen[9].dtype == np.uint64


def test_the_codec_round_trips_every_field_and_still_reads_npz_bytes() -> None:
    import io

    rng = np.random.default_rng(3)
    original = message(rng)
    original.item_names = {int(k): f"item {k}" for k in original.items.keys.tolist()}
    original.dense = {"ranker.w": rng.normal(size=(2, 3)).astype(np.float32)}
    back = codec.decode(codec.encode(original, np.float32))
    for field in ("keys", "rows", "evicted"):
        assert np.array_equal(getattr(back.items, field), getattr(original.items, field))
        assert np.array_equal(getattr(back.users, field), getattr(original.users, field))
    assert back.item_names == original.item_names
    assert back.tables.keys() == original.tables.keys()
    assert all(np.array_equal(back.tables[t].rows, original.tables[t].rows) for t in original.tables)
    assert np.array_equal(back.dense["ranker.w"], original.dense["ranker.w"])
    back.items.rows[0, 0] = 1.0  # decoded arrays are the replica's own: writable
    # bytes an earlier version wrote (numpy .npz) are still read: a Redis stream outlives an upgrade
    arrays = codec.unpack(codec.encode(original))
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    old = codec.decode(buf.getvalue())
    assert np.array_equal(old.items.keys, original.items.keys) and old.item_names == original.item_names
