"""In-process collisionless tables: hash index + dense rows + per-row optimizer state.

A `LocalTable` keeps, per row id of its `KeyIndex`: the embedding, the optimizer state, the
event time it was last used for training, looked up or updated (expiry, LRU), the number of
updates (LFU) and a dirty flag (deltas). Admission goes through a count-min sketch when
`min_count > 1`. A `LocalStore` is a set of such tables: one process's shard, or the whole
store in embedded mode.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numba
import numpy as np

from embedding_store.base import TableConfig, TableDelta, TableStats, pick_table
from embedding_store.frequency import CountMinSketch
from embedding_store.hash_index import PARALLEL_LOCK, KeyIndex, grow_rows
from embedding_store.optimizers import RowOptimizer, initial_state, state_width
from embedding_store.snapshot import load_snapshot, save_snapshot

_EVICTION_SLACK = 0.01  # a full table evicts 1% of max_rows beyond what it needs, so it does not evict every batch


@numba.njit(cache=True, parallel=True)
def _gather(rows: np.ndarray, ids: np.ndarray, out: np.ndarray) -> None:
    """out[i] = rows[ids[i]], or zeros where ids[i] < 0."""
    dim = rows.shape[1]
    for i in numba.prange(len(ids)):
        r = ids[i]
        if r < 0:
            for d in range(dim):
                out[i, d] = 0.0
        else:
            for d in range(dim):
                out[i, d] = rows[r, d]


class LocalTable:
    """A collisionless embedding table held in this process.

    Two distinct keys never share a row: rows live densely in one float32 array indexed by the
    row ids of a `KeyIndex`. All methods are thread-safe (one lock per table).

    Args:
        config: the table's settings.

    Example:
        >>> table = LocalTable(TableConfig(name="item", dim=4, min_count=2))
        >>> keys = np.array([11, 12, 12], dtype=np.uint64)
        >>> table.lookup(keys, now=0.0)[:, 0] != 0  # 11 seen once: default vector; 12 twice: a row
        array([False,  True,  True])
        >>> table.apply_gradients(keys, np.ones((3, 4), dtype=np.float32), now=1.0)
        >>> table.drain_delta().keys.tolist()
        [12]
    """

    def __init__(self, config: TableConfig) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._optimizer = RowOptimizer(config.optimizer, config.learning_rate, config.beta1, config.beta2, config.eps)
        self._init_state = initial_state(config.optimizer, config.dim, config.initial_accumulator)
        self._reset(min(config.initial_rows, config.max_rows))

    def _reset(self, rows: int) -> None:
        config = self._config
        self._index = KeyIndex(capacity=2 * rows, max_rows=config.max_rows)
        self._rows = np.zeros((rows, config.dim), dtype=np.float32)
        self._state = np.zeros((rows, state_width(config.optimizer, config.dim)), dtype=np.float32)
        self._updated = np.zeros(rows, dtype=np.float64)  # event time of the last training lookup or update (s)
        self._hits = np.zeros(rows, dtype=np.uint32)  # updates since admission
        self._dirty = np.zeros(rows, dtype=bool)
        self._sketch = (
            CountMinSketch(config.filter_capacity, config.filter_error, config.seed) if config.min_count > 1 else None
        )
        self._rng = np.random.default_rng(config.seed)
        self._evicted: list[np.ndarray] = []
        self._version = 0
        self._counters = {"admissions": 0, "filtered_lookups": 0, "evicted_expired": 0, "evicted_capacity": 0}

    @property
    def config(self) -> TableConfig:
        return self._config

    def __len__(self) -> int:
        return len(self._index)

    def lookup(self, keys: np.ndarray, now: float | None = None) -> np.ndarray:
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        now = time.time() if now is None else float(now)
        with self._lock:
            ids = self._index.find(keys)
            missing = np.flatnonzero(ids < 0)
            if missing.size:
                ids[missing] = self._admit(keys[missing], now, protect=ids)
                self._counters["filtered_lookups"] += int((ids[missing] < 0).sum())
            self._updated[ids[ids >= 0]] = now  # in use for training: not stale
            out = np.empty((len(keys), self._config.dim), dtype=np.float32)  # [n] -> [n, dim]
            with PARALLEL_LOCK:
                _gather(self._rows, ids, out)
            return out

    def get(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            ids = self._index.find(keys)
            out = np.empty((len(ids), self._config.dim), dtype=np.float32)
            with PARALLEL_LOCK:
                _gather(self._rows, ids, out)
            return out, ids >= 0

    def apply_gradients(self, keys: np.ndarray, grads: np.ndarray, now: float | None = None) -> None:
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        grads = np.ascontiguousarray(grads, dtype=np.float32).reshape(len(keys), self._config.dim)
        now = time.time() if now is None else float(now)
        if not len(keys):
            return
        with self._lock:
            ids = self._index.find(keys)
            touched = self._optimizer.apply(self._rows, self._state, ids, grads)
            self._updated[touched] = now
            self._hits[touched] += 1
            self._dirty[touched] = True

    def evict_expired(self, now: float) -> int:
        if self._config.ttl_s is None:
            return 0
        with self._lock:
            n = self._index.row_capacity
            expired = np.flatnonzero(self._index.live & (self._updated[:n] < now - self._config.ttl_s))
            self._remove(expired)
            self._counters["evicted_expired"] += expired.size
            return int(expired.size)

    def delete(self, keys: np.ndarray) -> int:
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        with self._lock:
            ids = self._index.find(keys)
            ids = np.unique(ids[ids >= 0])
            self._remove(ids)
            return int(ids.size)

    def drain_delta(self) -> TableDelta:
        with self._lock:
            rows = np.flatnonzero(self._dirty)
            self._dirty[rows] = False
            evicted = np.unique(np.concatenate([np.zeros(0, np.uint64), *self._evicted]))
            self._evicted = []
            evicted = evicted[self._index.find(evicted) < 0]  # removed, then admitted again: a change, not a removal
            self._version += 1
            return TableDelta(self._config.name, self._index.keys_of(rows), self._rows[rows], evicted, self._version)

    def stats(self) -> TableStats:
        with self._lock:
            arrays = (self._rows, self._state, self._updated, self._hits, self._dirty)
            nbytes = sum(a.nbytes for a in arrays) + self._index.nbytes
            nbytes += self._sketch.nbytes if self._sketch else 0
            return TableStats(self._config.name, len(self._index), nbytes, **self._counters)

    def save(self, path: str | Path) -> None:
        """Snapshot rows, optimizer state, filter and counters to `path` atomically."""
        with self._lock:
            keys, rows = self._index.items()
            arrays = {
                "keys": keys,
                "rows": self._rows[rows],
                "state": self._state[rows],
                "updated": self._updated[rows],
                "hits": self._hits[rows],
                "pending_evicted": np.concatenate([np.zeros(0, np.uint64), *self._evicted]),
            }
            meta: dict[str, Any] = {
                "config": self._config.to_dict(),
                "version": self._version,
                "counters": self._counters,
                "rng": self._rng.bit_generator.state,
            }
            if self._sketch:
                arrays["sketch"] = self._sketch.counters
                meta["sketch_additions"] = self._sketch.additions
            save_snapshot(path, arrays, meta)

    def restore(self, path: str | Path) -> None:
        """Replace this table's contents with the snapshot at `path`; every row is marked changed.

        Raises:
            CorruptSnapshot: the file is damaged (the table is left as it was).
            ValueError: the snapshot was taken with a different config.
        """
        self.load_state(*self.check_snapshot(path))

    def check_snapshot(self, path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Read and verify the snapshot at `path` for this table, without loading it."""
        arrays, meta = load_snapshot(path)
        if TableConfig.from_dict(meta["config"]) != self._config:
            raise ValueError(f"{path}: snapshot of table config {meta['config']}, not {self._config.to_dict()}")
        return arrays, meta

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Load what `check_snapshot` returned."""
        with self._lock:
            keys = arrays["keys"]
            self._reset(max(len(keys), min(self._config.initial_rows, self._config.max_rows)))
            ids, _ = self._index.insert(keys)  # a fresh index hands out 0..n-1 in order
            self._rows[ids], self._state[ids] = arrays["rows"], arrays["state"]
            self._updated[ids], self._hits[ids] = arrays["updated"], arrays["hits"]
            self._dirty[ids] = True
            self._evicted = [arrays["pending_evicted"]]
            self._version = int(meta["version"])
            self._counters = {k: int(v) for k, v in meta["counters"].items()}
            self._rng.bit_generator.state = meta["rng"]
            if self._sketch:
                self._sketch.counters[...] = arrays["sketch"]
                self._sketch.additions = int(meta["sketch_additions"])

    def _admit(self, keys: np.ndarray, now: float, protect: np.ndarray) -> np.ndarray:
        """Rows for keys that have none (lock held): new rows for admitted keys, -1 for the rest."""
        config = self._config
        uniq, inverse = np.unique(keys, return_inverse=True)
        admit = np.ones(len(uniq), dtype=bool)
        if self._sketch:
            self._sketch.add(keys)
            admit = self._sketch.estimate(uniq) >= config.min_count
        if config.admit_probability < 1.0:
            admit &= self._rng.random(len(uniq)) < config.admit_probability
        protected = np.unique(protect[protect >= 0])
        room = config.max_rows - len(protected)  # rows this batch uses cannot make room
        admit[np.flatnonzero(admit)[max(room, 0) :]] = False
        new_keys = uniq[admit]
        excess = len(self._index) + len(new_keys) - config.max_rows
        if excess > 0:
            self._evict_for_room(excess + int(_EVICTION_SLACK * config.max_rows), protected)
        ids, _ = self._index.insert(new_keys)
        self._grow(self._index.row_capacity)
        self._init_rows(ids, now)
        self._counters["admissions"] += len(new_keys)
        rows_of_uniq = np.full(len(uniq), -1, dtype=np.int64)
        rows_of_uniq[admit] = ids
        return rows_of_uniq[inverse]

    def _init_rows(self, ids: np.ndarray, now: float) -> None:
        config, n = self._config, len(ids)
        if config.initializer == "normal":
            self._rows[ids] = self._rng.normal(0.0, config.init_scale, (n, config.dim))
        elif config.initializer == "uniform":
            self._rows[ids] = self._rng.uniform(-config.init_scale, config.init_scale, (n, config.dim))
        else:
            self._rows[ids] = 0.0
        self._state[ids] = self._init_state
        self._updated[ids] = now
        self._hits[ids] = 0
        self._dirty[ids] = True  # a new row is a change serving must see

    def _evict_for_room(self, count: int, protect: np.ndarray) -> None:
        """Evict `count` rows by the table's policy, never one of the rows in `protect` (lock held)."""
        candidates = self._index.live.copy()
        candidates[protect] = False
        rows = np.flatnonzero(candidates)
        count = min(count, len(rows))
        if count <= 0:
            return
        score = self._updated[rows] if self._config.eviction == "lru" else self._hits[rows]
        victims = rows[np.argpartition(score, count - 1)[:count]]
        self._remove(victims)
        self._counters["evicted_capacity"] += count

    def _remove(self, rows: np.ndarray) -> None:
        keys = self._index.keys_of(rows)
        self._index.delete(keys)
        self._dirty[rows] = False
        self._evicted.append(keys)

    def _grow(self, rows: int) -> None:
        limit = self._config.max_rows
        self._rows = grow_rows(self._rows, rows, limit)
        self._state = grow_rows(self._state, rows, limit)
        self._updated = grow_rows(self._updated, rows, limit)
        self._hits = grow_rows(self._hits, rows, limit)
        self._dirty = grow_rows(self._dirty, rows, limit)


class LocalStore:
    """Named `LocalTable`s in this process: embedded mode, or one shard's tables.

    Args:
        configs: one config per table (names must be distinct).

    Example:
        >>> store = LocalStore([TableConfig("user", dim=4), TableConfig("item", dim=5)])
        >>> store.table("item").lookup(np.array([1], dtype=np.uint64)).shape
        (1, 5)
    """

    def __init__(self, configs: list[TableConfig]) -> None:
        names = [c.name for c in configs]
        if len(set(names)) != len(names):
            raise ValueError(f"table names must be distinct, got {names}")
        self._tables = {c.name: LocalTable(c) for c in configs}

    def table(self, name: str) -> LocalTable:
        return pick_table(self._tables, name)

    @property
    def configs(self) -> list[TableConfig]:
        return [t.config for t in self._tables.values()]

    def save(self, directory: str | Path) -> None:
        for name, table in self._tables.items():
            table.save(Path(directory) / f"{name}.npz")

    def restore(self, directory: str | Path) -> None:
        # Check every table's snapshot before replacing any table.
        loaded = {name: t.check_snapshot(Path(directory) / f"{name}.npz") for name, t in self._tables.items()}
        for name, table in self._tables.items():
            table.load_state(*loaded[name])

    def close(self) -> None:
        pass
