"""Tables split across N shards by key hash, behind the same interfaces as one local table.

Each key belongs to exactly one shard, so a sharded table stays collisionless: it is the union
of N disjoint collisionless tables. The shard of a key is taken from a differently salted hash
than the one the shard's own hash index uses; with the same hash every key on shard j would
share its low bits and crowd 1/N of that shard's slots.

Calls go to the shards concurrently (a thread per shard), which is what lets remote shards in
separate processes work in parallel.
"""

from __future__ import annotations

import dataclasses
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from embedding_store.base import EmbeddingTable, Store, TableConfig, TableDelta, TableStats, pick_table

_SHARD_SALT = np.uint64(0x9E3779B97F4A7C15)


def shard_of(keys: np.ndarray, shards: int) -> np.ndarray:
    """Shard of each uint64 key: int64 [n] in [0, shards).

    Example:
        >>> shard_of(np.arange(6, dtype=np.uint64), 3).tolist()
        [0, 0, 2, 0, 2, 2]
    """
    with np.errstate(over="ignore"):
        z = np.asarray(keys, dtype=np.uint64) * _SHARD_SALT  # multiplicative (Fibonacci) hashing
    return ((z >> np.uint64(32)) % np.uint64(shards)).astype(np.int64)


def shard_config(config: TableConfig, shards: int, index: int) -> TableConfig:
    """The config of shard `index`'s slice of a table split `shards` ways.

    The row cap is split (rounded down), so the whole table never holds more than `max_rows`;
    so are the filter's capacity and the initial reservation. Each shard gets its own seed:
    with one seed, the first new key of every shard would start from the same vector.

    Example:
        >>> c = shard_config(TableConfig("item", max_rows=10, seed=1), shards=3, index=2)
        >>> c.max_rows, c.seed != 1
        (3, True)
    """
    return dataclasses.replace(
        config,
        max_rows=max(1, config.max_rows // shards),
        filter_capacity=math.ceil(config.filter_capacity / shards),
        initial_rows=max(1, config.initial_rows // shards),
        seed=config.seed * 1_000_003 + index,
    )


class ShardedTable:
    """One table spread over the shards of a `ShardedStore`.

    Args:
        config: the table's settings (each shard holds its own slice, with the same config).
        parts: the table on each shard, in shard order.
        pool: runs the per-shard calls concurrently.
    """

    def __init__(self, config: TableConfig, parts: list[EmbeddingTable], pool: ThreadPoolExecutor) -> None:
        self._config = config
        self._parts = parts
        self._pool = pool
        self._version = 0

    @property
    def config(self) -> TableConfig:
        return self._config

    def __len__(self) -> int:
        return sum(len(p) for p in self._parts)

    def _split(self, keys: np.ndarray) -> list[np.ndarray]:
        """Positions of the keys of each shard."""
        shard = shard_of(keys, len(self._parts))
        order = np.argsort(shard, kind="stable")
        bounds = np.searchsorted(shard[order], np.arange(len(self._parts) + 1))
        return [order[bounds[s] : bounds[s + 1]] for s in range(len(self._parts))]

    def _map(self, fn: Any, *args: Any) -> list[Any]:
        return list(self._pool.map(fn, self._parts, *args))

    def lookup(self, keys: np.ndarray, now: float | None = None) -> np.ndarray:
        keys = np.asarray(keys, dtype=np.uint64)
        where = self._split(keys)
        out = np.empty((len(keys), self._config.dim), dtype=np.float32)
        for idx, rows in zip(where, self._map(lambda p, i: p.lookup(keys[i], now), where), strict=True):
            out[idx] = rows
        return out

    def get(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keys = np.asarray(keys, dtype=np.uint64)
        where = self._split(keys)
        out = np.empty((len(keys), self._config.dim), dtype=np.float32)
        found = np.empty(len(keys), dtype=bool)
        for idx, (rows, hit) in zip(where, self._map(lambda p, i: p.get(keys[i]), where), strict=True):
            out[idx], found[idx] = rows, hit
        return out, found

    def apply_gradients(self, keys: np.ndarray, grads: np.ndarray, now: float | None = None) -> None:
        keys = np.asarray(keys, dtype=np.uint64)
        grads = np.asarray(grads, dtype=np.float32).reshape(len(keys), self._config.dim)
        where = self._split(keys)
        self._map(lambda p, i: p.apply_gradients(keys[i], grads[i], now) if len(i) else None, where)

    def evict_expired(self, now: float) -> int:
        return sum(self._map(lambda p: p.evict_expired(now)))

    def delete(self, keys: np.ndarray) -> int:
        keys = np.asarray(keys, dtype=np.uint64)
        where = self._split(keys)
        return sum(self._map(lambda p, i: p.delete(keys[i]) if len(i) else 0, where))

    def drain_delta(self) -> TableDelta:
        deltas = self._map(lambda p: p.drain_delta())
        self._version += 1
        return TableDelta(
            self._config.name,
            np.concatenate([d.keys for d in deltas]),
            np.concatenate([d.rows for d in deltas]).reshape(-1, self._config.dim),
            np.concatenate([d.evicted for d in deltas]),
            self._version,
        )

    def stats(self) -> TableStats:
        parts = self.shard_stats()
        return sum(parts[1:], parts[0])

    def shard_stats(self) -> list[TableStats]:
        """Stats of each shard's slice, in shard order."""
        return self._map(lambda p: p.stats())


class ShardedStore:
    """N stores (local or remote) acting as one: every table split across them by key hash.

    Args:
        configs: the tables as a whole.
        shards: the shards; shard i must hold `shard_config(c, N, i)` of every table `c`. Their
            order is part of the layout: keys route by position, and snapshots are restored
            shard by shard.

    Raises:
        ValueError: no shards, or a shard holds other table configs.

    Example:
        >>> from embedding_store.local import LocalStore
        >>> configs = [TableConfig("item", dim=2)]
        >>> store = ShardedStore(configs, [LocalStore([shard_config(c, 3, i) for c in configs]) for i in range(3)])
        >>> _ = store.table("item").lookup(np.arange(100, dtype=np.uint64))
        >>> [s.ids for s in store.table("item").shard_stats()]
        [33, 35, 32]
    """

    def __init__(self, configs: list[TableConfig], shards: list[Store]) -> None:
        if not shards:
            raise ValueError("a sharded store needs at least one shard")
        for i, shard in enumerate(shards):
            if shard.configs != [shard_config(c, len(shards), i) for c in configs]:
                raise ValueError(f"shard {i} holds other table configs than shard_config() gives it")
        self._configs = list(configs)
        self._shards = shards
        self._pool = ThreadPoolExecutor(max_workers=len(shards), thread_name_prefix="shard-call")
        self._tables = {c.name: ShardedTable(c, [s.table(c.name) for s in shards], self._pool) for c in configs}

    @property
    def shards(self) -> list[Store]:
        return list(self._shards)

    def table(self, name: str) -> ShardedTable:
        return pick_table(self._tables, name)

    @property
    def configs(self) -> list[TableConfig]:
        return list(self._configs)

    def _shard_dir(self, directory: str | Path, i: int) -> Path:
        return Path(directory) / f"shard-{i}-of-{len(self._shards)}"

    def save(self, directory: str | Path) -> None:
        list(self._pool.map(lambda i: self._shards[i].save(self._shard_dir(directory, i)), range(len(self._shards))))

    def restore(self, directory: str | Path) -> None:
        """Each shard restores its own `shard-I-of-N` directory: the shard count must match the snapshot's.

        Each shard checks all of its tables before loading any; across shards a failure can
        leave some shards restored and others not, so a failed restore should be retried or the
        store rebuilt.
        """
        list(self._pool.map(lambda i: self._shards[i].restore(self._shard_dir(directory, i)), range(len(self._shards))))

    def close(self) -> None:
        for shard in self._shards:
            shard.close()
        self._pool.shutdown(wait=False)
