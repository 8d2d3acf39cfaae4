"""One suite for the item index, run against every kind: exact, IVF and HNSW (CPU here)."""

from __future__ import annotations

import itertools

import faiss
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retrieval.index import IndexConfig, ItemIndex, NormRangedHNSW

DIM = 8
KINDS = ["flat", "ivf", "hnsw"]


def make(kind: str, **overrides: object) -> ItemIndex:
    config = IndexConfig(kind=kind, min_ann_items=1, rebuild_fraction=0.3, device="cpu", nlist=4, nprobe=4)
    return ItemIndex(DIM, IndexConfig(**{**config.__dict__, **overrides}))


def exact_top(model: dict[int, np.ndarray], q: np.ndarray, k: int) -> list[int]:
    keys = sorted(model)
    scores = np.array([model[key] @ q for key in keys])
    return [keys[i] for i in np.argsort(-scores, kind="stable")[:k]]


operations = st.lists(
    st.tuples(
        st.sampled_from(["upsert", "remove", "publish", "search"]),
        st.lists(st.integers(1, 40), min_size=1, max_size=8),
        st.integers(0, 2**31),
    ),
    min_size=1,
    max_size=40,
)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=30, deadline=None)
@given(ops=operations)
def test_searches_follow_every_upsert_and_removal(kind: str, ops: list[tuple[str, list[int], int]]) -> None:
    """Against a dict of current vectors: a search returns only current items, with their
    current scores, whatever snapshot the ANN kinds are searching."""
    index, model = make(kind), {}
    for op, keys, seed in ops:
        rng = np.random.default_rng(seed)
        key_array = np.array(keys, dtype=np.uint64)
        if op == "upsert":
            vectors = rng.normal(size=(len(keys), DIM)).astype(np.float32)
            index.upsert(key_array, vectors)
            model.update({k: v for k, v in zip(keys, vectors, strict=True)})  # last write wins
        elif op == "remove":
            index.remove(key_array)
            for k in keys:
                model.pop(k, None)
        elif op == "publish":
            index.publish(wait=True)
        q = rng.normal(size=DIM).astype(np.float32)
        found, scores = index.search(q, 5)
        assert len(index) == len(model)
        assert set(found.tolist()) <= set(model), "a removed or unknown item was returned"
        assert len(found) == min(5, len(model))
        expected = np.array([model[k] @ q for k in found.tolist()], dtype=np.float32)
        np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)  # never a stale vector
        assert (np.diff(scores) <= 1e-6).all()
        if kind == "flat":  # exact: the best scores there are (items with equal vectors may swap places)
            best = np.array([model[k] @ q for k in exact_top(model, q, 5)], dtype=np.float32)
            np.testing.assert_allclose(scores, best, rtol=1e-4, atol=1e-4)
        # a batch of queries gets what each query gets alone
        batch = index.search_batch(np.stack([q, -q]), 5)
        np.testing.assert_allclose(batch[0][1], scores, rtol=1e-5, atol=1e-5)  # ties may swap places
        mine = np.array([model[k] @ q for k in batch[0][0].tolist()], dtype=np.float32)
        np.testing.assert_allclose(batch[0][1], mine, rtol=1e-4, atol=1e-4)
        alone = index.search(-q, 5)
        np.testing.assert_allclose(batch[1][1], alone[1], rtol=1e-5, atol=1e-5)  # ties may swap places
        own = np.array([model[k] @ -q for k in batch[1][0].tolist()], dtype=np.float32)
        np.testing.assert_allclose(batch[1][1], own, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_ann_recall_against_exact_search(kind: str) -> None:
    rng = np.random.default_rng(0)
    dim = 32  # the serving width
    keys = np.arange(1, 20_001, dtype=np.uint64)
    centers = rng.normal(size=(50, dim))
    vectors = (centers[rng.integers(0, 50, len(keys))] + 0.5 * rng.normal(size=(len(keys), dim))).astype(np.float32)
    # both with their defaults (HNSW: four norm-ranged graphs, 0.93 here; one graph gets 0.65)
    index = ItemIndex(dim, IndexConfig(kind=kind, device="cpu", min_ann_items=1000))
    index.upsert(keys, vectors)
    index.publish(wait=True)
    assert index.rebuilds == 1
    model = dict(zip(keys.tolist(), vectors, strict=True))
    recalls = []
    for q in rng.normal(size=(30, dim)).astype(np.float32):
        found, _ = index.search(q, 100)
        recalls.append(len(set(found.tolist()) & set(exact_top(model, q, 100))) / 100)
    assert np.mean(recalls) >= 0.9, np.mean(recalls)


@pytest.mark.parametrize("ranges", [1, 2, 4])
def test_norm_ranged_hnsw_splits_items_by_norm(ranges: int) -> None:
    rng = np.random.default_rng(2)
    vectors = (rng.normal(size=(3000, DIM)) * rng.lognormal(size=(3000, 1))).astype(np.float32)
    ids = rng.permutation(10_000)[:3000].astype(np.int64)
    index = NormRangedHNSW(ids, vectors, ranges, m=16, ef_search=64)
    norm = dict(zip(ids.tolist(), np.linalg.norm(vectors, axis=1).tolist(), strict=True))
    parts = [faiss_ids(graph) for graph in index.graphs]
    assert len(parts) == ranges and [len(p) for p in parts] == sorted(len(p) for p in parts)
    assert sorted(np.concatenate(parts).tolist()) == sorted(ids.tolist())  # every item in one graph
    for larger, smaller in itertools.pairwise(parts):  # each graph's norms above the next one's
        assert min(norm[i] for i in larger) >= max(norm[i] for i in smaller)
    _, found = index.search(np.zeros((2, DIM + 1), np.float32), 10)
    assert found.shape == (2, 10 * ranges)


def faiss_ids(index: faiss.IndexIDMap) -> np.ndarray:
    return faiss.vector_to_array(index.id_map)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_changes_during_a_rebuild_stay_visible(kind: str) -> None:
    rng = np.random.default_rng(1)
    index = make(kind)
    index.upsert(np.arange(1, 3001, dtype=np.uint64), rng.normal(size=(3000, DIM)).astype(np.float32))
    index.publish()  # rebuild running in the background
    q = np.ones(DIM, dtype=np.float32)
    index.upsert(np.array([7], dtype=np.uint64), 10 * q[None, :])  # an item everybody must see first
    index.remove(np.array([8], dtype=np.uint64))
    assert index.search(q, 1)[0].tolist() == [7]
    index.publish(wait=True)  # the rebuild that began before the changes is swapped in
    assert index.rebuilds >= 1
    found, _ = index.search(q, 3000)
    assert found[0] == 7 and 8 not in found.tolist()


def test_bad_index_settings_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"index\.kind"):
        IndexConfig(kind="annoy")
    with pytest.raises(ValueError, match=r"index\.device"):
        IndexConfig(device="tpu")


@pytest.mark.parametrize("kind", KINDS)
def test_a_search_finds_the_items_left_after_most_of_the_snapshot_was_removed(kind: str) -> None:
    index = make(kind, rebuild_fraction=1.0)  # no rebuild: the snapshot keeps the removed items
    rng = np.random.default_rng(0)
    keys = np.arange(1, 41, dtype=np.uint64)
    vectors = rng.normal(size=(40, DIM)).astype(np.float32)
    index.upsert(keys, vectors)
    index.publish(wait=True)
    query = vectors[0]  # the removed items score highest for it
    order = np.argsort(-(vectors @ query))
    index.remove(keys[order[:-3]])  # all but the 3 lowest-scoring items
    found, _ = index.search(query, 2)
    assert len(found) == 2 and set(found.tolist()) <= set(keys[order[-3:]].tolist())
