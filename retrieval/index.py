"""Faiss index of item vectors with upserts and removals by 64-bit item key.

Three kinds, chosen by `IndexConfig.kind`:

- "flat": exact inner-product search (`IndexIDMap2(IndexFlatIP)`);
- "ivf": `IndexIVFFlat` (`nlist` lists, `nprobe` searched) and
- "hnsw": `IndexHNSWFlat` graphs (`hnsw_m` links, `ef_search`), both over L2 of vectors
  augmented so that nearest means largest inner product (`mips_to_l2`). For IVF this matters:
  k-means cells of the augmented vectors are angular, and on bench.serving's 1,000,000
  clustered items recall@100 at 16 probes of 1,000 lists was 0.997, against 0.41 for
  inner-product cells (0.96 took 64 probes).

HNSW is *norm-ranged* (Yan et al., "Norm-Ranging LSH for Maximum Inner Product Search",
2018): the items are split by vector norm into `hnsw_norm_ranges` graphs, the largest norms in
the smallest graph (shares 1/125, 4/125, 20/125, 100/125 for four), each augmented against
its own largest norm, all searched and merged by exact score. One graph over all items fails
on the vectors a two-tower model learns: the top inner products belong to the few items of
largest norm, and their augmenting coordinate is tiny beside everybody else's, so the graph
walk rarely reaches them (bench.serving, 1,000,000 items, ef 256: recall@100 0.74 with one
graph, 0.965 with four at 10x exact).

The source of truth is a `RowMap` of the current vectors (the flat kind on the CPU also keeps
an exact, removable Faiss index in step with it). IVF and HNSW indexes — and GPU copies,
which cannot remove ids — are *snapshots* of those rows, rebuilt on a background thread and
swapped in atomically. Between rebuilds every item upserted or removed since the snapshot was
taken is "changed": searches drop changed ids from the snapshot's answer and score the
changed items that still exist exactly, then merge. So a search never returns a removed item
or a stale vector, and an update is visible as soon as `upsert`/`remove` returns. A rebuild
starts once the changed items pass `rebuild_fraction` of the index (and as soon as there are
`min_ann_items`); changes made during a rebuild stay "changed" for the new snapshot.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import faiss
import numpy as np

from embedding_store.row_map import RowMap

log = logging.getLogger(__name__)

KINDS = ("flat", "ivf", "hnsw")
_NO_IDS = np.zeros(0, dtype=np.int64)


def _ids(keys: np.ndarray) -> np.ndarray:
    """Faiss ids are int64: reinterpret the uint64 keys bit for bit (a bijection)."""
    return np.ascontiguousarray(keys, dtype=np.uint64).view(np.int64)


@dataclass(frozen=True)
class IndexConfig:
    """How serving searches item vectors.

    Args:
        kind: "flat" (exact), "ivf" or "hnsw".
        nlist: IVF lists; 0 picks about sqrt(items) at each rebuild.
        nprobe: IVF lists searched per query.
        hnsw_m: HNSW links per node.
        ef_search: HNSW search breadth (per graph).
        hnsw_norm_ranges: HNSW graphs, by ranges of item norm (1 = a single graph).
        rebuild_fraction: rebuild the ANN snapshot once this share of the items changed since it.
        min_ann_items: below this many items, search the exact master only.
        device: "auto" (the GPU when Faiss sees one), "cpu" or "gpu"; HNSW always searches on
            the CPU.

    Raises:
        ValueError: a value is out of range; the message names the field.
    """

    kind: str = "flat"
    nlist: int = 0
    nprobe: int = 32
    hnsw_m: int = 32
    ef_search: int = 256
    hnsw_norm_ranges: int = 4
    rebuild_fraction: float = 0.05
    min_ann_items: int = 5000
    device: str = "auto"

    def __post_init__(self) -> None:
        checks = {
            "kind": self.kind in KINDS,
            "nlist": self.nlist >= 0,
            "nprobe": self.nprobe >= 1,
            "hnsw_m": 4 <= self.hnsw_m <= 256,
            "ef_search": self.ef_search >= 1,
            "hnsw_norm_ranges": 1 <= self.hnsw_norm_ranges <= 8,
            "rebuild_fraction": 0.0 < self.rebuild_fraction <= 1.0,
            "min_ann_items": self.min_ann_items >= 1,
            "device": self.device in ("auto", "cpu", "gpu"),
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"index.{name}: invalid value {getattr(self, name)!r}")


def mips_to_l2(vectors: np.ndarray) -> np.ndarray:
    """Append sqrt(max |x|^2 - |x|^2) to each vector: for a query q with a 0 appended,
    |q - x|^2 = |q|^2 + max |x|^2 - 2 q . x, so the nearest items in L2 are those of largest
    inner product (Bachrach et al., 2014), and a metric index such as HNSW can search them."""
    norms = np.einsum("ij,ij->i", vectors, vectors)
    extra = np.sqrt(np.maximum(norms.max(initial=0.0) - norms, 0.0))
    return np.ascontiguousarray(np.concatenate([vectors, extra[:, None]], axis=1), dtype=np.float32)


class ItemIndex:
    """Inner-product search over item vectors keyed by uint64 item keys; see the module docstring.

    Args:
        dim: vector width.
        config: index kind and parameters.

    Example:
        >>> index = ItemIndex(2)
        >>> index.upsert(np.array([3, 4], dtype=np.uint64), np.array([[1, 0], [0, 1]], dtype=np.float32))
        >>> index.search(np.array([0.0, 1.0], dtype=np.float32), 1)[0].tolist()
        [4]
    """

    def __init__(self, dim: int, config: IndexConfig | None = None) -> None:
        self.dim = dim
        self.config = config or IndexConfig()
        self.use_gpu = faiss.get_num_gpus() > 0 if self.config.device == "auto" else self.config.device == "gpu"
        self._rows = RowMap(dim)  # current vectors by key: the source of truth
        self._exact = None if self.snapshots else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._lock = threading.Lock()
        self._gpu_resources = faiss.StandardGpuResources() if self.use_gpu else None
        self._snapshot: faiss.Index | NormRangedHNSW | None = None  # ANN (or GPU) index of the rows at some point
        self._changed = _NO_IDS  # sorted ids upserted or removed since `_snapshot` was taken
        self._changed_live: tuple[np.ndarray, np.ndarray] | None = None  # their current (ids, rows), cached
        self._since_build: np.ndarray | None = None  # the same, since the running rebuild began
        self._builder: threading.Thread | None = None
        self.rebuilds = 0
        if self.use_gpu:
            log.info("item index searches on GPU (%d visible)", faiss.get_num_gpus())

    @property
    def snapshots(self) -> bool:
        """Whether searches go to rebuilt snapshots (ANN kinds, or any kind on the GPU)."""
        return self.config.kind != "flat" or self.use_gpu

    def __len__(self) -> int:
        return len(self._rows)

    def upsert(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Insert or replace items: keys [n], vectors [n, dim]."""
        if not len(keys):
            return
        _, last = np.unique(np.asarray(keys)[::-1], return_index=True)  # a repeated key: its last vector wins
        pick = np.sort(len(keys) - 1 - last)
        keys, ids = np.asarray(keys)[pick], _ids(keys)[pick]
        vectors = np.ascontiguousarray(np.asarray(vectors)[pick], dtype=np.float32)
        with self._lock:
            self._rows.upsert(keys, vectors)
            if self._exact is not None:
                self._exact.remove_ids(faiss.IDSelectorBatch(ids))
                self._exact.add_with_ids(vectors, ids)
            self._mark(ids)

    def remove(self, keys: np.ndarray) -> None:
        if len(keys):
            ids = _ids(keys)
            with self._lock:
                self._rows.delete(keys)
                if self._exact is not None:
                    self._exact.remove_ids(faiss.IDSelectorBatch(ids))
                self._mark(ids)

    def _mark(self, ids: np.ndarray) -> None:
        if self.snapshots:
            self._changed = np.union1d(self._changed, ids)  # once per applied version, not per query
            self._changed_live = None
            if self._since_build is not None:
                self._since_build = np.union1d(self._since_build, ids)

    def publish(self, wait: bool = False) -> None:
        """Start a snapshot rebuild when one is due (on a background thread; `wait` joins it)."""
        if not self.snapshots:
            return
        with self._lock:
            n = len(self._rows)
            due = (
                self._builder is None
                and n >= (1 if self.config.kind == "flat" else self.config.min_ann_items)
                and (self._snapshot is None or len(self._changed) > self.config.rebuild_fraction * n)
            )
            if due:
                keys, vectors = self._rows.items()
                self._since_build = _NO_IDS
                self._builder = threading.Thread(target=self._build, args=(_ids(keys), vectors.copy()), daemon=True)
                self._builder.start()
            builder = self._builder
        if wait and builder is not None:
            builder.join()

    def _build(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        try:
            index = self._new_index(ids, vectors)
            if self._gpu_resources is not None and not isinstance(index, NormRangedHNSW):
                index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)
            with self._lock:
                self._snapshot = index
                self._changed = self._since_build if self._since_build is not None else _NO_IDS
                self._changed_live = None
                self.rebuilds += 1
        except Exception:  # keep serving from the previous snapshot and the exact rows
            log.exception("item index rebuild failed")
        finally:
            with self._lock:
                self._since_build = None
                self._builder = None

    def _new_index(self, ids: np.ndarray, vectors: np.ndarray) -> faiss.Index | NormRangedHNSW:
        """A snapshot index of `vectors` under `ids`, searched with a 0 appended to the query
        unless the kind is flat."""
        c = self.config
        if c.kind == "hnsw":
            return NormRangedHNSW(ids, vectors, c.hnsw_norm_ranges, c.hnsw_m, c.ef_search)
        if c.kind == "flat":
            index = faiss.IndexIDMap(faiss.IndexFlatIP(self.dim))
            index.add_with_ids(vectors, ids)
            return index
        n = len(ids)
        nlist = c.nlist or max(1, min(int(np.sqrt(n)), n // 39 or 1))
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(self.dim + 1), self.dim + 1, nlist, faiss.METRIC_L2)
        ivf.cp.max_points_per_centroid = 64  # k-means on a sample: a 1M-item rebuild in seconds
        ivf.nprobe = min(c.nprobe, nlist)
        augmented = mips_to_l2(vectors)
        ivf.train(augmented)
        ivf.add_with_ids(augmented, ids)
        return ivf

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items for one query vector [dim] -> (uint64 keys [<=k], float32 scores [<=k])."""
        return self.search_batch(np.reshape(query, (1, -1)), k)[0]

    def search_batch(self, queries: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Top-k items of each query [u, dim]: one (uint64 keys [<=k], float32 scores [<=k]) per
        query, best first, from one index search for all of them."""
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(len(queries), self.dim)
        empty = (np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.float32))
        with self._lock:
            k = min(k, len(self._rows))
            if k == 0 or not len(q):
                return [empty for _ in range(len(q))]
            if self._exact is not None:
                scores, ids = self._exact.search(q, k)
                keep = ids != -1  # Faiss pads with -1; real keys may be negative as int64
                return [(i[m].view(np.uint64), s[m]) for i, s, m in zip(ids, scores, keep, strict=True)]
            if self._snapshot is None:  # no snapshot yet: exact over the rows
                keys, vectors = self._rows.items()
                return [top_k(_ids(keys), scores, k) for scores in q @ vectors.T]
            # items changed (or removed) since the snapshot are dropped from its answer and
            # scored exactly below: k + their number deep, the snapshot still yields k unchanged
            # items when there are k (2k at least; the changed count stays under
            # `rebuild_fraction` of the items, plus what changes during a rebuild)
            depth = max(min(max(2 * k, k + len(self._changed)), int(self._snapshot.ntotal)), 1)
            snapshot_q = np.hstack([q, np.zeros((len(q), 1), np.float32)]) if self.config.kind != "flat" else q
            _, found = self._snapshot.search(snapshot_q, depth)  # [u, depth], -1 padded
            # exact scores of the current rows: the snapshot's unchanged finds, then the changed items
            vectors, live = self._rows.get(found.ravel().view(np.uint64))
            keep = (found != -1) & ~np.isin(found, self._changed) & live.reshape(found.shape)
            scores = np.einsum("ukd,ud->uk", vectors.reshape(*found.shape, self.dim), q)
            changed_ids, changed_rows = self._changed_rows()
            ids = np.hstack([found, np.broadcast_to(changed_ids, (len(q), len(changed_ids)))])
            scores = np.hstack([scores, q @ changed_rows.T])
            keep = np.hstack([keep, np.ones((len(q), len(changed_ids)), bool)])
            return [top_k(i[m], s[m], k) for i, s, m in zip(ids, scores, keep, strict=True)]

    def _changed_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Ids and current rows of the changed items that still exist (call under the lock);
        kept until the next change, not gathered again for every search."""
        if self._changed_live is None:
            rows, live = self._rows.get(self._changed.view(np.uint64))
            self._changed_live = (self._changed[live], rows[live])
        return self._changed_live


class NormRangedHNSW:
    """HNSW graphs over ranges of item norm (see the module docstring), searched like a Faiss
    index: `search(queries with a 0 appended, k)` returns the k nearest of every graph it
    searched, concatenated (up to `ranges * k` ids per query, -1 padded), for the caller to
    score exactly and merge.

    Graphs are searched from the largest norms down, and a query skips a graph when the k-th
    best inner product it has found already reaches |q| times that graph's largest norm (no
    item there can beat it). On bench.serving's 1,000,000 items the graph of the smallest norms
    (80% of the items) was skippable for every query.

    Args:
        ids: int64 item ids [n].
        vectors: item vectors [n, dim].
        ranges: graphs; the one of largest norms holds 1/5**(ranges-1) of the items, each next
            one five times more (the last takes the rest).
        m: HNSW links per node.
        ef_search: search breadth per graph.
    """

    def __init__(self, ids: np.ndarray, vectors: np.ndarray, ranges: int, m: int, ef_search: int) -> None:
        squared = np.einsum("ij,ij->i", vectors, vectors)
        order = np.argsort(-squared, kind="stable")
        ends = [round(len(ids) * 5.0 ** (j - ranges + 1)) for j in range(ranges)]
        self.graphs: list[faiss.IndexIDMap] = []
        self.max_squared: list[float] = []  # each graph's largest squared norm (its augmentation)
        start = 0
        for end in ends:
            if end <= start:
                continue
            part = order[start:end]
            graph = faiss.IndexHNSWFlat(vectors.shape[1] + 1, m, faiss.METRIC_L2)
            graph.hnsw.efSearch = ef_search
            index = faiss.IndexIDMap(graph)
            index.add_with_ids(mips_to_l2(vectors[part]), ids[part])
            self.graphs.append(index)
            self.max_squared.append(float(squared[part[0]]))
            start = end
        self.ntotal = len(ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[None, np.ndarray]:
        u = len(queries)
        q_squared = np.einsum("ij,ij->i", queries, queries)
        found = np.full((u, k * len(self.graphs)), -1, dtype=np.int64)
        scores = np.full((u, k * len(self.graphs)), -np.inf, dtype=np.float32)
        for g, (graph, max_squared) in enumerate(zip(self.graphs, self.max_squared, strict=True)):
            kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1] if g else np.full(u, -np.inf)
            active = np.flatnonzero(kth < np.sqrt(q_squared * max_squared))
            if not len(active):
                break
            n = min(k, int(graph.ntotal))
            distances, ids = graph.search(queries[active], n)
            # |q - x|^2 = |q|^2 + max |x|^2 - 2 q.x in this graph's augmentation
            inner = (q_squared[active, None] + max_squared - distances) / 2
            columns = slice(g * k, g * k + n)
            found[active, columns] = ids
            scores[active, columns] = np.where(ids != -1, inner, -np.inf)
        return None, found


def top_k(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (uint64 keys, float32 scores) of keys or their int64 ids and their scores,
    best first (ties keep their order)."""
    order = np.argsort(-scores, kind="stable")[:k]
    return ids[order].view(np.uint64), scores[order].astype(np.float32)
