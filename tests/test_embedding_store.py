"""The embedding store against plain-dict reference models.

One shared suite runs against every backend: a local store, N in-process shards, a remote
shard over gRPC, and N remote shards; `tests/test_cli.py` runs it against real
`freshrec store-shard` processes too.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedding_store import (
    CorruptSnapshot,
    KeyIndex,
    LocalStore,
    LocalTable,
    ShardedStore,
    Store,
    TableConfig,
    feature_key,
    feature_keys,
    open_store,
    shard_config,
)
from embedding_store.frequency import CountMinSketch
from embedding_store.remote import RemoteStore, serve_shard
from embedding_store.row_map import RowMap
from embedding_store.sharded import shard_of
from proto import store_pb2, store_pb2_grpc

# Small key space so that batches repeat keys and deletes hit; the top bit exercises uint64.
KEY_POOL = [0, 1, 2, 3, 17, 1 << 40, (1 << 64) - 1, (1 << 63) + 5, 99, 1000]
keys_st = st.lists(st.sampled_from(KEY_POOL), max_size=12)
ops_st = st.lists(st.tuples(st.sampled_from(["insert", "delete", "find"]), keys_st), max_size=40)

BACKENDS = ["local", "sharded", "remote", "remote-sharded"]


class Backend:
    """Makes fresh, empty stores of one backend; `close_all` closes what it made."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._servers: list[grpc.Server] = []
        self._stores: list[Store] = []

    def _remote(self, configs: list[TableConfig]) -> RemoteStore:
        server, port, _ = serve_shard("127.0.0.1:0", workers=2)
        self._servers.append(server)
        return RemoteStore(f"127.0.0.1:{port}", configs)

    def __call__(self, configs: list[TableConfig]) -> Store:
        store: Store
        if self.kind == "local":
            store = LocalStore(configs)
        elif self.kind == "sharded":
            store = ShardedStore(configs, [LocalStore([shard_config(c, 3, i) for c in configs]) for i in range(3)])
        elif self.kind == "remote":
            store = self._remote(configs)
        else:
            store = ShardedStore(configs, [self._remote([shard_config(c, 2, i) for c in configs]) for i in range(2)])
        self._stores.append(store)
        return store

    def close_all(self) -> None:
        for store in self._stores:
            store.close()
        for server in self._servers:
            server.stop(None)
        self._stores, self._servers = [], []


@pytest.fixture(params=BACKENDS)
def make_store(request: pytest.FixtureRequest) -> Iterator[Backend]:
    backend = Backend(request.param)
    yield backend
    backend.close_all()


# Property tests call `make_store` afresh for every example and close what it made at the end
# of each one, so sharing the function-scoped factory between examples is intended.
def shared_factory(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None
    )


# --- the hash index -------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(ops=ops_st, capacity=st.sampled_from([1, 4, 16]))
def test_key_index_matches_dict_model(ops: list, capacity: int) -> None:
    index = KeyIndex(capacity)
    model: dict[int, int] = {}
    for op, keys in ops:
        arr = np.array(keys, dtype=np.uint64)
        if op == "insert":
            known = set(model)
            rows, created = index.insert(arr)
            first = [k not in known and k not in keys[:i] for i, k in enumerate(keys)]
            assert created.tolist() == first
            for k, r in zip(keys, rows.tolist(), strict=True):
                assert model.setdefault(k, r) == r  # an existing key keeps its row
        elif op == "delete":
            freed = index.delete(arr)
            expected = {model.pop(k) for k in set(keys) if k in model}
            assert set(freed.tolist()) == expected
        found = index.find(arr)
        assert found.tolist() == [model.get(k, -1) for k in keys]
        assert len(index) == len(model)
        # collisionless: distinct live keys own distinct rows
        assert len(set(model.values())) == len(model)
    live_keys, live_rows = index.items()
    assert dict(zip(live_keys.tolist(), live_rows.tolist(), strict=True)) == model


def test_key_index_grows_and_stays_exact_for_many_keys() -> None:
    rng = np.random.default_rng(1)
    keys = np.unique(rng.integers(0, 2**63, 200_000, dtype=np.int64).astype(np.uint64))
    index = KeyIndex(8)
    rows, created = index.insert(keys)
    assert created.all()
    assert np.array_equal(index.keys_of(rows), keys)
    assert len(np.unique(rows)) == len(keys) == len(index)
    assert np.array_equal(index.find(keys), rows)
    assert (index.find(keys + np.uint64(1))[~np.isin(keys + np.uint64(1), keys)] == -1).all()
    # delete half, re-insert: freed row ids are reused, so row ids stay dense
    index.delete(keys[::2])
    _, created = index.insert(keys[::2])
    assert created.all() and index.row_capacity == len(keys)
    assert len(np.unique(index.find(keys))) == len(keys)


# --- the shared table suite: every backend against a dict model ------------------------------


class TableModel:
    """What a table must hold, in plain Python: rows by key, counts, update times, deltas."""

    def __init__(self, config: TableConfig) -> None:
        self.config = config
        self.rows: dict[int, np.ndarray] = {}
        self.updated: dict[int, float] = {}
        self.hits: dict[int, int] = {}
        self.counts: Counter[int] = Counter()
        self.dirty: set[int] = set()
        self.evicted: set[int] = set()

    def lookup(self, keys: list[int], now: float, got: np.ndarray) -> None:
        """Check a lookup's answer and take the initial values of newly admitted rows from it."""
        for k in keys:
            if k not in self.rows:
                self.counts[k] += 1
        for i, k in enumerate(keys):
            if k not in self.rows and self.counts[k] >= self.config.min_count:
                self.rows[k], self.hits[k] = got[i].copy(), 0
                self.dirty.add(k)
            if k in self.rows:
                self.updated[k] = now  # used for training: not stale
            expected = self.rows.get(k, np.zeros(self.config.dim, np.float32))
            np.testing.assert_allclose(got[i], expected, rtol=1e-6, atol=1e-7, err_msg=f"lookup of key {k}")

    def apply(self, keys: list[int], grads: np.ndarray, now: float) -> None:
        summed: dict[int, np.ndarray] = {}
        for k, g in zip(keys, grads, strict=True):
            if k in self.rows:
                summed[k] = summed[k] + g if k in summed else g.copy()
        for k, g in summed.items():  # SGD
            self.rows[k] = (self.rows[k].astype(np.float64) - self.config.learning_rate * g).astype(np.float32)
            self.updated[k], self.dirty = now, self.dirty | {k}
            self.hits[k] += 1

    def remove(self, keys: set[int]) -> None:
        for k in keys:
            del self.rows[k], self.updated[k], self.hits[k]
        self.dirty -= keys
        self.evicted |= keys

    def expire(self, now: float) -> int:
        ttl = self.config.ttl_s
        expired = {k for k, t in self.updated.items() if ttl is not None and t < now - ttl}
        self.remove(expired)
        return len(expired)

    def check(self, store: Store) -> None:
        table = store.table(self.config.name)
        assert len(table) == len(self.rows)
        keys = np.array(KEY_POOL, dtype=np.uint64)
        rows, found = table.get(keys)
        assert found.tolist() == [k in self.rows for k in KEY_POOL]
        for k, row in zip(KEY_POOL, rows, strict=True):
            if k in self.rows:
                np.testing.assert_allclose(row, self.rows[k], rtol=1e-6, atol=1e-7, err_msg=f"row of key {k}")


op_st = st.one_of(
    st.tuples(st.just("lookup"), keys_st, st.sampled_from([0.0, 1.0, 3.0])),
    st.tuples(st.just("apply"), keys_st, st.sampled_from([-1.0, 0.5, 2.0])),
    st.tuples(st.just("expire"), st.sampled_from([0.0, 2.0, 5.0])),
    st.tuples(st.just("drain")),
    st.tuples(st.just("snapshot")),
)


@shared_factory(max_examples=60)
@given(
    ops=st.lists(op_st, max_size=25),
    min_count=st.sampled_from([1, 2, 3]),
    ttl=st.sampled_from([None, 4.0]),
)
def test_store_matches_dict_model(
    make_store: Backend, tmp_path_factory: pytest.TempPathFactory, ops: list, min_count: int, ttl: float | None
) -> None:
    config = TableConfig(
        "t",
        dim=2,
        optimizer="sgd",
        learning_rate=0.5,
        init_scale=0.1,
        min_count=min_count,
        ttl_s=ttl,
        filter_capacity=1000,
        filter_error=1e-9,
    )
    try:
        _run_against_model(make_store, tmp_path_factory, config, ops)
    finally:
        make_store.close_all()


def _run_against_model(
    make_store: Backend, tmp_path_factory: pytest.TempPathFactory, config: TableConfig, ops: list
) -> None:
    store = make_store([config])
    model = TableModel(config)
    now = 0.0
    for op in ops:
        table = store.table("t")
        if op[0] == "lookup":
            now += op[2]
            model.lookup(op[1], now, table.lookup(np.array(op[1], dtype=np.uint64), now))
        elif op[0] == "apply":
            grads = np.array([[op[2], -op[2] * (i + 1)] for i in range(len(op[1]))], dtype=np.float32)
            table.apply_gradients(np.array(op[1], dtype=np.uint64), grads, now)
            model.apply(op[1], grads, now)
        elif op[0] == "expire":
            now += op[1]
            assert table.evict_expired(now) == model.expire(now)
        elif op[0] == "drain":
            delta = table.drain_delta()
            assert sorted(delta.keys.tolist()) == sorted(model.dirty)
            assert sorted(delta.evicted.tolist()) == sorted(model.evicted - set(model.rows))
            for k, row in zip(delta.keys.tolist(), delta.rows, strict=True):
                np.testing.assert_allclose(row, model.rows[k], rtol=1e-6, atol=1e-7)
            model.dirty, model.evicted = set(), set()
        else:
            directory = tmp_path_factory.mktemp("snap")
            store.save(directory)
            restored, probe = make_store([config]), make_store([config])
            restored.restore(directory)
            probe.restore(directory)
            # the initializer's random state and the filter's counts came along: a key seen for
            # the first time gets the same row (or the same default) in the copy as in the original
            fresh = np.array([12345], dtype=np.uint64)
            np.testing.assert_array_equal(probe.table("t").lookup(fresh, now), store.table("t").lookup(fresh, now))
            store = restored
            model.dirty = set(model.rows)  # a restored table republishes every row
        model.check(store)
    stats = store.table("t").stats()
    assert stats.ids == len(model.rows)
    assert stats.evicted_expired + stats.evicted_capacity <= stats.admissions


@shared_factory(max_examples=40)
@given(
    batches=st.lists(
        st.tuples(st.lists(st.sampled_from(KEY_POOL), min_size=1, max_size=3), st.booleans()), max_size=30
    ),
    policy=st.sampled_from(["lru", "lfu"]),
)
def test_full_table_evicts_by_policy_and_never_passes_its_cap(make_store: Backend, batches: list, policy: str) -> None:
    try:
        _fill_past_cap(make_store, batches, policy)
    finally:
        make_store.close_all()


def _fill_past_cap(make_store: Backend, batches: list, policy: str) -> None:
    cap = 4
    config = TableConfig("t", dim=2, optimizer="sgd", max_rows=cap, eviction=policy)
    store = make_store([config])
    table = store.table("t")
    if make_store.kind in ("sharded", "remote-sharded"):
        # each shard has its own share of the cap: for the whole table, only the bound holds
        for now, (keys, _) in enumerate(batches):
            table.lookup(np.array(keys, dtype=np.uint64), float(now))
            assert len(table) <= cap
        return
    model = TableModel(config)
    evicted = 0
    for now, (keys, update) in enumerate(batches):
        before = set(model.rows)
        got = table.lookup(np.array(keys, dtype=np.uint64), float(now))
        _, found = table.get(np.array(KEY_POOL, dtype=np.uint64))
        live = {k for k, f in zip(KEY_POOL, found, strict=True) if f}
        assert len(live) <= cap
        assert set(keys) <= live, "the batch's own keys get rows"
        victims = before - live
        survivors = (before & live) - set(keys)
        score = model.updated if policy == "lru" else model.hits
        for v in victims:
            assert all(score[v] <= score[s] for s in survivors), f"{policy} evicted {v} before a colder row"
        model.remove(victims)
        evicted += len(victims)
        model.lookup(keys, float(now), got)
        if update:
            grads = np.ones((len(keys), 2), dtype=np.float32)
            table.apply_gradients(np.array(keys, dtype=np.uint64), grads, float(now))
            model.apply(keys, grads, float(now))
        model.check(store)
    assert table.stats().evicted_capacity == evicted


def test_unknown_table_is_a_key_error(make_store: Backend) -> None:
    store = make_store([TableConfig("user", dim=2)])
    with pytest.raises(KeyError, match="nope"):
        store.table("nope")


def test_delete_removes_rows_on_every_shard_and_drains_them_as_evicted(make_store: Backend) -> None:
    store = make_store([TableConfig("user", dim=2)])
    table = store.table("user")
    keys = np.arange(1, 41, dtype=np.uint64)
    table.lookup(keys)
    table.drain_delta()
    gone = keys[::3]
    assert table.delete(np.concatenate([gone, gone[:2], np.array([999], np.uint64)])) == len(gone)
    found = table.get(keys)[1]
    assert not found[::3].any() and found[np.arange(40) % 3 != 0].all() and len(table) == 40 - len(gone)
    assert sorted(table.drain_delta().evicted.tolist()) == gone.tolist()


def test_snapshot_of_another_config_is_refused(make_store: Backend, tmp_path: Path) -> None:
    store = make_store([TableConfig("t", dim=2)])
    store.table("t").lookup(np.arange(5, dtype=np.uint64))
    store.save(tmp_path)
    other = make_store([TableConfig("t", dim=2, learning_rate=0.1)])
    with pytest.raises(ValueError, match="config"):
        other.restore(tmp_path)
    assert len(other.table("t")) == 0


# --- the frequency filter ----------------------------------------------------------------------


def test_frequency_filter_on_a_zipf_stream() -> None:
    """min_count=3: every key seen 3 times has a row; of the rarer keys, at most `filter_error` do."""
    rng = np.random.default_rng(7)
    stream = rng.zipf(1.3, 300_000).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # spread the ids
    counts = Counter(stream.tolist())
    error = 0.01
    config = TableConfig("t", dim=4, min_count=3, filter_capacity=len(counts), filter_error=error)
    table = LocalTable(config)
    for batch in np.array_split(stream, 150):
        table.lookup(batch, now=0.0)
    keys = np.array(list(counts), dtype=np.uint64)
    seen = np.array([counts[k] for k in counts])
    _, has_row = table.get(keys)
    assert has_row[seen >= 3].all()
    rare = seen < 3
    false_share = has_row[rare].mean()
    assert false_share <= error, f"{false_share:.4f} of {rare.sum()} rare keys got rows"
    stats = table.stats()
    assert stats.admissions == has_row.sum() == len(table)
    # every lookup of a key without a row was filtered, except the ones that admitted it
    assert stats.filtered_lookups > 0


def test_probabilistic_admission_admits_about_that_share() -> None:
    table = LocalTable(TableConfig("t", dim=2, admit_probability=0.25, seed=3))
    keys = np.arange(20_000, dtype=np.uint64)
    table.lookup(keys)
    assert 0.22 < len(table) / len(keys) < 0.28
    table.lookup(keys)  # each lookup is another chance
    assert 0.40 < len(table) / len(keys) < 0.47


def test_count_min_sketch_never_undercounts_and_ages() -> None:
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 200, 450).astype(np.uint64)
    sketch = CountMinSketch(capacity=50, error=0.5)  # deliberately too small: many collisions
    sketch.add(keys)
    true = Counter(keys.tolist())
    distinct = np.array(list(true), dtype=np.uint64)
    est = sketch.estimate(distinct).astype(int)
    assert (est >= np.array(list(true.values()))).all()
    assert (est > np.array(list(true.values()))).any()  # it did collide
    # after 10 x capacity additions every counter is halved (recent frequency, no saturation)
    sketch.add(np.full(50, 10_000, dtype=np.uint64))
    assert sketch.additions == 0
    assert (sketch.estimate(distinct).astype(int) <= (est + 1) // 2 + 1).all()


# --- optimizers ------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam"])
def test_optimizers_match_torch_on_rows_updated_every_step(optimizer: str) -> None:
    dim, n = 3, 5
    config = TableConfig("t", dim=dim, optimizer=optimizer, learning_rate=0.1, initial_accumulator=0.1, eps=1e-10)
    table = LocalTable(config)
    keys = np.arange(n, dtype=np.uint64)
    weight = torch.nn.Parameter(torch.from_numpy(table.lookup(keys).copy()))
    opt: torch.optim.Optimizer = {
        "sgd": lambda: torch.optim.SGD([weight], lr=0.1),
        "adagrad": lambda: torch.optim.Adagrad([weight], lr=0.1, initial_accumulator_value=0.1, eps=1e-10),
        "adam": lambda: torch.optim.Adam([weight], lr=0.1, eps=1e-10),
    }[optimizer]()
    rng = np.random.default_rng(0)
    for _ in range(6):
        grads = rng.normal(size=(n, dim)).astype(np.float32)
        table.apply_gradients(keys, grads)
        weight.grad = torch.from_numpy(grads)
        opt.step()
    np.testing.assert_allclose(table.get(keys)[0], weight.detach().numpy(), rtol=1e-4, atol=1e-6)


def test_lazy_adam_counts_steps_per_row() -> None:
    """A row updated once after many steps of other rows gets a first (fully bias-corrected) step."""
    table = LocalTable(TableConfig("t", dim=1, optimizer="adam", learning_rate=0.1, initializer="zeros"))
    busy, idle = np.array([1], dtype=np.uint64), np.array([2], dtype=np.uint64)
    table.lookup(np.array([1, 2], dtype=np.uint64))
    for _ in range(50):
        table.apply_gradients(busy, np.ones((1, 1), np.float32))
    table.apply_gradients(idle, np.ones((1, 1), np.float32))
    # Adam's first step is lr * sign(g) whatever the step count of other rows.
    assert table.get(idle)[0][0, 0] == pytest.approx(-0.1, rel=1e-4)


def test_rowwise_adagrad_keeps_one_accumulator_per_row() -> None:
    table = LocalTable(TableConfig("t", dim=2, optimizer="rowwise_adagrad", learning_rate=1.0, initializer="zeros"))
    k = np.array([9], dtype=np.uint64)
    table.lookup(k)
    table.apply_gradients(k, np.array([[3.0, 4.0]], np.float32))
    accum = 0.1 + (9 + 16) / 2
    np.testing.assert_allclose(table.get(k)[0], [[-3 / np.sqrt(accum), -4 / np.sqrt(accum)]], rtol=1e-5)


def test_gradients_of_repeated_keys_add_up() -> None:
    a = LocalTable(TableConfig(name="a", dim=2, seed=3))
    b = LocalTable(TableConfig(name="b", dim=2, seed=3))
    k = np.array([5], dtype=np.uint64)
    a.lookup(k)
    b.lookup(k)
    a.apply_gradients(np.array([5, 5], dtype=np.uint64), np.ones((2, 2), np.float32))
    b.apply_gradients(k, 2 * np.ones((1, 2), np.float32))
    np.testing.assert_allclose(a.get(k)[0], b.get(k)[0])


# --- snapshots ------------------------------------------------------------------------------


def _filled_table(min_count: int = 2) -> LocalTable:
    table = LocalTable(TableConfig("t", dim=3, optimizer="adam", min_count=min_count, ttl_s=10.0, seed=5))
    rng = np.random.default_rng(1)
    for step in range(5):
        keys = rng.integers(0, 300, 200).astype(np.uint64)
        table.lookup(keys, float(step))
        table.apply_gradients(keys, rng.normal(size=(200, 3)).astype(np.float32), float(step))
    return table


def test_snapshot_round_trip_is_exact(tmp_path: Path) -> None:
    table = _filled_table()
    table.save(tmp_path / "t.npz")
    copy = LocalTable(table.config)
    copy.restore(tmp_path / "t.npz")
    keys = np.arange(300, dtype=np.uint64)
    assert len(copy) == len(table) and copy.stats().admissions == table.stats().admissions
    np.testing.assert_array_equal(copy.get(keys)[0], table.get(keys)[0])
    # optimizer state, filter counts, update times and the random state all came along:
    # the same further training gives bit-identical tables
    more = np.arange(250, 400, dtype=np.uint64)
    grads = np.ones((len(more), 3), np.float32)
    for t in (table, copy):
        t.lookup(more, 6.0)
        t.apply_gradients(more, grads, 6.0)
        t.evict_expired(14.0)
    keys = np.arange(400, dtype=np.uint64)
    np.testing.assert_array_equal(copy.get(keys)[1], table.get(keys)[1])
    np.testing.assert_array_equal(copy.get(keys)[0], table.get(keys)[0])


def test_damaged_snapshot_is_refused_and_the_table_is_left_alone(tmp_path: Path) -> None:
    table = _filled_table()
    path = tmp_path / "t.npz"
    table.save(path)
    data = path.read_bytes()
    target = _filled_table(min_count=2)
    target.lookup(np.array([7777], dtype=np.uint64))
    before = target.get(np.arange(300, dtype=np.uint64))[0]
    for damaged in (data[: len(data) // 2], data[:100] + bytes([data[100] ^ 0xFF]) + data[101:], b""):
        path.write_bytes(damaged)
        with pytest.raises(CorruptSnapshot):
            target.restore(path)
        np.testing.assert_array_equal(target.get(np.arange(300, dtype=np.uint64))[0], before)


def test_crash_while_saving_keeps_the_previous_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = _filled_table()
    path = tmp_path / "t.npz"
    table.save(path)
    good = path.read_bytes()

    def crash(*args: object, **kwargs: object) -> None:
        f = args[0]
        f.write(b"PK\x03\x04 half a zip")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        table.save(path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["t.npz"]  # no temporary file left behind


# --- sharding and the remote shard -----------------------------------------------------------


def test_shards_hold_disjoint_keys_whose_union_is_every_key() -> None:
    configs = [TableConfig("t", dim=2)]
    shards = [LocalStore([shard_config(c, 4, i) for c in configs]) for i in range(4)]
    store = ShardedStore(configs, list(shards))
    keys = feature_keys("item", [str(i) for i in range(5000)])
    store.table("t").lookup(keys)
    held = [set(keys[s.table("t").get(keys)[1]].tolist()) for s in shards]
    assert all(a.isdisjoint(b) for a, b in itertools.combinations(held, 2))
    assert set().union(*held) == set(keys.tolist())
    assert all(900 < len(h) < 1600 for h in held), [len(h) for h in held]
    assert np.array_equal(shard_of(keys, 4), shard_of(keys.copy(), 4))


def test_remote_shard_rejects_malformed_arrays_with_invalid_argument() -> None:
    server, port, _ = serve_shard("127.0.0.1:0")
    try:
        store = RemoteStore(f"127.0.0.1:{port}", [TableConfig("t", dim=4)])
        stub = store_pb2_grpc.StoreShardStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        with pytest.raises(grpc.RpcError) as e:
            stub.Lookup(store_pb2.KeysRequest(table="t", keys=b"12345"))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "uint64" in (e.value.details() or "")
        with pytest.raises(grpc.RpcError) as e:
            stub.ApplyGradients(store_pb2.GradientsRequest(table="t", keys=b"\0" * 8, grads=b"\0" * 4))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "grads" in (e.value.details() or "")
        with pytest.raises(KeyError, match="no table"):
            store.call("Lookup", store_pb2.KeysRequest(table="nope", keys=b""))
        with pytest.raises(ValueError, match="other configs"):
            RemoteStore(f"127.0.0.1:{port}", [TableConfig("t", dim=8)])
        assert store.table("t").lookup(np.array([1], dtype=np.uint64)).shape == (1, 4)  # still serving
    finally:
        server.stop(None)


def test_open_store_by_url() -> None:
    configs = [TableConfig("t", dim=2)]
    assert isinstance(open_store("local://", configs), LocalStore)
    sharded = open_store("local://?shards=3", configs)
    assert isinstance(sharded, ShardedStore) and len(sharded.shards) == 3
    for bad in ("redis://x", "local://?shards=0", "local://?shards=x", "grpc://", "grpc://hostonly"):
        with pytest.raises(ValueError, match="store URL"):
            open_store(bad, configs)


# --- keys and the serving row map -------------------------------------------------------------


def test_feature_keys_are_stable_and_slot_specific() -> None:
    assert feature_key("item", "42") == int(feature_keys("item", ["42"])[0])
    assert feature_key("item", "42") != feature_key("user", "42")
    # Pinned values: keys are persisted (tables, Redis, Kafka partitions), so the hash must never
    # change between runs, processes or versions.
    assert feature_key("user", "1") == 1026803376307868667
    assert int(feature_keys("item", ["42"])[0]) == 17994764305165146179


def test_row_map_upsert_get_delete() -> None:
    m = RowMap(2, np.float16)
    keys = np.array([1, 2, 3], dtype=np.uint64)
    m.upsert(keys, np.arange(6, dtype=np.float32).reshape(3, 2))
    m.delete(np.array([2], dtype=np.uint64))
    rows, found = m.get(np.array([1, 2, 3, 4], dtype=np.uint64))
    assert found.tolist() == [True, False, True, False]
    assert rows[2].tolist() == [4.0, 5.0]
    k, r = m.items()
    assert sorted(k.tolist()) == [1, 3] and r.dtype == np.float16
