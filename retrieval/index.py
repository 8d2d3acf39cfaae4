"""Faiss index of item vectors with upserts and removals by 64-bit item key."""

from __future__ import annotations

import logging
import threading

import faiss
import numpy as np

log = logging.getLogger(__name__)


def _ids(keys: np.ndarray) -> np.ndarray:
    """Faiss ids are int64: reinterpret the uint64 keys bit for bit (a bijection)."""
    return np.ascontiguousarray(keys, dtype=np.uint64).view(np.int64)


class ItemIndex:
    """Exact inner-product search over item vectors, keyed by uint64 item keys.

    The master copy is a CPU `IndexIDMap2(IndexFlatIP)`, which supports removal. When
    Faiss sees a GPU, searches go to a GPU copy of the master that `publish()` rebuilds
    after each applied version (GPU flat indexes cannot remove ids, so the CPU master stays
    the source of truth and the copy is swapped in whole). IVF and HNSW backends arrive with
    the serving issue.

    Args:
        dim: vector width.
        use_gpu: search on a GPU copy; default: when `faiss.get_num_gpus() > 0`.

    Example:
        >>> index = ItemIndex(2)
        >>> index.upsert(np.array([3, 4], dtype=np.uint64), np.array([[1, 0], [0, 1]], dtype=np.float32))
        >>> index.search(np.array([0.0, 1.0], dtype=np.float32), 1)[0].tolist()
        [4]
    """

    def __init__(self, dim: int, use_gpu: bool | None = None) -> None:
        self.dim = dim
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._lock = threading.Lock()
        self.use_gpu = faiss.get_num_gpus() > 0 if use_gpu is None else use_gpu
        self._gpu_resources = faiss.StandardGpuResources() if self.use_gpu else None
        self._search_index: faiss.Index = self._index
        if self.use_gpu:
            log.info("item index searches on GPU (%d visible)", faiss.get_num_gpus())

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def upsert(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Insert or replace items: keys [n], vectors [n, dim]."""
        if not len(keys):
            return
        ids = _ids(keys)
        with self._lock:
            self._index.remove_ids(faiss.IDSelectorBatch(ids))
            self._index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)

    def remove(self, keys: np.ndarray) -> None:
        if len(keys):
            with self._lock:
                self._index.remove_ids(faiss.IDSelectorBatch(_ids(keys)))

    def publish(self) -> None:
        """Make all writes so far visible to searches (rebuilds the GPU copy when on GPU)."""
        if self._gpu_resources is None:
            return
        with self._lock:
            copy = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self._index)
            self._search_index = copy

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items for one query vector [dim] -> (uint64 keys [<=k], float32 scores [<=k])."""
        with self._lock:
            k = min(k, int(self._search_index.ntotal))
            if k == 0:
                return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.float32)
            scores, ids = self._search_index.search(np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1), k)
        keep = ids[0] != -1  # Faiss pads with -1; real keys may be negative as int64
        return ids[0][keep].view(np.uint64), scores[0][keep]
