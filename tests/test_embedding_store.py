"""The hash index and the local table against plain-dict reference models."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from embedding_store import KeyIndex, LocalTable, TableConfig, feature_key, feature_keys
from embedding_store.row_map import RowMap

# Small key space so that batches repeat keys and deletes hit; the top bit exercises uint64.
keys_st = st.lists(st.sampled_from([0, 1, 2, 3, 17, 1 << 40, (1 << 64) - 1, (1 << 63) + 5, 99, 1000]), max_size=12)
ops_st = st.lists(st.tuples(st.sampled_from(["insert", "delete", "find"]), keys_st), max_size=40)


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
            assert created.tolist() == [k not in known for k in keys]
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


@settings(max_examples=100, deadline=None)
@given(batches=st.lists(st.tuples(keys_st, st.sampled_from([-1.0, -0.25, 0.0, 0.5, 1.0])), min_size=1, max_size=10))
def test_local_table_rows_are_private_to_keys(batches: list) -> None:
    table = LocalTable(TableConfig(name="t", dim=3, initial_rows=2, learning_rate=0.5))
    model: dict[int, np.ndarray] = {}
    touched: set[int] = set()
    for keys, g in batches:
        arr = np.array(keys, dtype=np.uint64)
        rows = table.lookup(arr)
        for k, row in zip(keys, rows, strict=True):
            np.testing.assert_array_equal(model.setdefault(k, row.copy()), row)
        if keys:
            table.apply_gradients(arr, np.full((len(keys), 3), g, dtype=np.float32))
            after = table.lookup(arr)
            for k, row in dict(zip(keys, after, strict=True)).items():
                if g != 0:
                    assert not np.array_equal(row, model[k]), "an updated row must change"
                model[k] = row.copy()
            touched |= set(keys)
        # rows of keys not in this batch are untouched
        others = [k for k in model if k not in keys]
        if others:
            np.testing.assert_array_equal(
                table.lookup(np.array(others, dtype=np.uint64)), np.stack([model[k] for k in others])
            )
    assert len(table) == len(model)
    delta = table.drain_delta()
    assert set(delta.keys.tolist()) == touched
    for k, row in zip(delta.keys.tolist(), delta.rows, strict=True):
        np.testing.assert_array_equal(row, model[k])
    assert len(table.drain_delta().keys) == 0


def test_gradients_of_repeated_keys_add_up() -> None:
    a = LocalTable(TableConfig(name="a", dim=2, seed=3))
    b = LocalTable(TableConfig(name="b", dim=2, seed=3))
    k = np.array([5], dtype=np.uint64)
    a.lookup(k)
    b.lookup(k)
    a.apply_gradients(np.array([5, 5], dtype=np.uint64), np.ones((2, 2), np.float32))
    b.apply_gradients(k, 2 * np.ones((1, 2), np.float32))
    np.testing.assert_allclose(a.lookup(k), b.lookup(k))


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
