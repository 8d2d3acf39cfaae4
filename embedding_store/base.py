"""The embedding-table and store interfaces, their config, and what they hand to sync and metrics."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from embedding_store.optimizers import OPTIMIZERS

T = TypeVar("T")

INITIALIZERS = ("normal", "uniform", "zeros")
EVICTION_POLICIES = ("lru", "lfu")


@dataclass(frozen=True)
class TableConfig:
    """Settings of one embedding table.

    Args:
        name: table name, used in deltas, snapshots and metrics ("user", "item").
        dim: embedding width.
        optimizer: per-row optimizer, one of `embedding_store.optimizers.OPTIMIZERS`.
        learning_rate: its step size.
        initial_accumulator: starting accumulator of the Adagrad variants. Zero makes the first
            step of every new row a full `learning_rate` step whatever its gradient.
        beta1, beta2, eps: Adam's moment decays and (for all adaptive optimizers) the
            denominator's epsilon.
        initializer: "normal" (N(0, init_scale^2)), "uniform" (U(-init_scale, init_scale)) or "zeros".
        init_scale: scale of the initializer.
        min_count: times a key must be seen by `lookup` before it gets its own row (1: at once).
        admit_probability: chance that a key which passed `min_count` is admitted on each lookup
            (Monolith's probabilistic filter); 1.0 admits it at once.
        filter_capacity: distinct keys the frequency sketch is sized for.
        filter_error: bound on the share of keys seen fewer than `min_count` times that get a
            row anyway, with `filter_capacity` distinct keys.
        ttl_s: rows neither looked up for training nor updated for this many seconds of event
            time are removed by `evict_expired`; None keeps rows until the cap evicts them.
        max_rows: hard cap on rows; a lookup that would pass it first evicts by `eviction`.
        eviction: "lru" (least recently used for training first) or "lfu" (fewest updates first).
        initial_rows: rows to reserve up front; tables grow up to `max_rows`.
        seed: seed of the initializer, the sketch and probabilistic admission.

    Raises:
        ValueError: a value is out of range; the message names the field.
    """

    name: str
    dim: int = 32
    optimizer: str = "rowwise_adagrad"
    learning_rate: float = 0.05
    initial_accumulator: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    initializer: str = "normal"
    init_scale: float = 0.05
    min_count: int = 1
    admit_probability: float = 1.0
    filter_capacity: int = 1_000_000
    filter_error: float = 0.01
    ttl_s: float | None = None
    max_rows: int = 5_000_000
    eviction: str = "lru"
    initial_rows: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "name": bool(self.name),
            "dim": 1 <= self.dim <= 4096,
            "optimizer": self.optimizer in OPTIMIZERS,
            "learning_rate": self.learning_rate > 0,
            "initial_accumulator": self.initial_accumulator >= 0,
            "beta1": 0 <= self.beta1 < 1,
            "beta2": 0 <= self.beta2 < 1,
            "eps": self.eps > 0,
            "initializer": self.initializer in INITIALIZERS,
            "init_scale": self.init_scale >= 0 and math.isfinite(self.init_scale),
            "min_count": 1 <= self.min_count <= 255,
            "admit_probability": 0 < self.admit_probability <= 1,
            "filter_capacity": self.filter_capacity >= 1,
            "filter_error": 0 < self.filter_error < 1,
            "ttl_s": self.ttl_s is None or self.ttl_s > 0,
            "max_rows": self.max_rows >= 1,
            "eviction": self.eviction in EVICTION_POLICIES,
            "initial_rows": self.initial_rows >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}: invalid value {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TableConfig:
        """The inverse of `to_dict`; unknown keys raise ValueError naming them."""
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown table settings: {sorted(unknown)}")
        return cls(**values)


@dataclass(frozen=True)
class TableDelta:
    """Rows of one table changed since the previous drain.

    Args:
        table: the table's name.
        keys: uint64 [n] keys whose rows changed.
        rows: float32 [n, dim] current values of those rows.
        evicted: uint64 [m] keys removed since the previous drain (and not re-admitted).
        version: counts the table's drains, so a consumer can tell deltas apart and in order.
    """

    table: str
    keys: np.ndarray
    rows: np.ndarray
    evicted: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))
    version: int = 0

    def __len__(self) -> int:
        return len(self.keys) + len(self.evicted)

    def then(self, newer: TableDelta) -> TableDelta:
        """This delta followed by `newer`, as one delta: a key's newest row wins, a key evicted
        later loses its row, a key re-admitted later is no longer evicted.

        Example:
            >>> a = TableDelta("t", np.array([1, 2], np.uint64), np.ones((2, 1), np.float32))
            >>> b = TableDelta("t", np.array([2], np.uint64), np.zeros((1, 1), np.float32),
            ...                np.array([1], np.uint64), version=2)
            >>> c = a.then(b)
            >>> c.keys.tolist(), c.rows[:, 0].tolist(), c.evicted.tolist(), c.version
            ([2], [0.0], [1], 2)
        """
        keep = ~(np.isin(self.keys, newer.keys) | np.isin(self.keys, newer.evicted))
        if not len(newer.keys):
            keys, rows = self.keys[keep], self.rows[keep]
        elif not keep.any():
            keys, rows = newer.keys, newer.rows
        else:
            keys, rows = np.concatenate([self.keys[keep], newer.keys]), np.concatenate([self.rows[keep], newer.rows])
        evicted = np.union1d(self.evicted[~np.isin(self.evicted, newer.keys)], newer.evicted).astype(np.uint64)
        return TableDelta(newer.table, keys, rows, evicted, max(self.version, newer.version))

    @classmethod
    def empty(cls, table: str, dim: int = 1) -> TableDelta:
        """A delta with no rows."""
        return cls(table, np.zeros(0, dtype=np.uint64), np.zeros((0, dim), dtype=np.float32))


@dataclass(frozen=True)
class TableStats:
    """Counters of one table (or one shard of it), for metrics.

    Args:
        table: table name.
        ids: live rows.
        bytes: memory held by rows, optimizer state, index, filter and bookkeeping.
        admissions: rows created so far.
        filtered_lookups: lookups answered with the default vector because the key was not admitted.
        evicted_expired: rows removed by `evict_expired`.
        evicted_capacity: rows removed to stay under `max_rows`.
    """

    table: str
    ids: int = 0
    bytes: int = 0
    admissions: int = 0
    filtered_lookups: int = 0
    evicted_expired: int = 0
    evicted_capacity: int = 0

    def __add__(self, other: TableStats) -> TableStats:
        values = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)[1:]}
        return TableStats(self.table, **values)


class EmbeddingTable(Protocol):
    """A collisionless table of trainable rows addressed by 64-bit keys.

    `now` arguments are event times in seconds; they drive expiry and LRU eviction. Left out,
    they default to the wall clock.
    """

    @property
    def config(self) -> TableConfig: ...

    def __len__(self) -> int: ...

    def lookup(self, keys: np.ndarray, now: float | None = None) -> np.ndarray:
        """Rows for uint64 `keys` [n] -> float32 [n, dim], for training.

        Keys admitted by the frequency filter get rows (new ones initialised); the others get
        the default vector (zeros) until they have been seen `min_count` times.
        """
        ...

    def get(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows for keys without counting or creating any: (float32 [n, dim], bool [n] found)."""
        ...

    def apply_gradients(self, keys: np.ndarray, grads: np.ndarray, now: float | None = None) -> None:
        """One optimizer step on the rows of `keys` [n] with `grads` [n, dim].

        Repeated keys' gradients add up; gradients of keys without a row are dropped.
        """
        ...

    def evict_expired(self, now: float) -> int:
        """Remove rows last used (looked up or updated) before `now - ttl_s`; return how many."""
        ...

    def delete(self, keys: np.ndarray) -> int:
        """Remove the rows of `keys` (erasure); return how many there were. The next drain
        carries them as evicted, as it does expired rows."""
        ...

    def drain_delta(self) -> TableDelta:
        """Rows changed (and keys removed) since the previous drain."""
        ...

    def stats(self) -> TableStats: ...


def pick_table(tables: Mapping[str, T], name: str) -> T:
    """`tables[name]`, or a KeyError that lists the tables there are (every `Store.table`)."""
    try:
        return tables[name]
    except KeyError:
        raise KeyError(f"no table {name!r} (tables: {sorted(tables)})") from None


class Store(Protocol):
    """Named embedding tables that live together: in this process, in a shard process, or sharded.

    Snapshots go to a directory as seen by whoever holds the tables (for a remote shard, its host).
    """

    def table(self, name: str) -> EmbeddingTable:
        """The table `name`.

        Raises:
            KeyError: no such table.
        """
        ...

    @property
    def configs(self) -> list[TableConfig]: ...

    def save(self, directory: str | Path) -> None:
        """Snapshot every table atomically into `directory`."""
        ...

    def restore(self, directory: str | Path) -> None:
        """Replace every table's contents with its snapshot in `directory`.

        Raises:
            FileNotFoundError: a table has no snapshot there.
            embedding_store.snapshot.CorruptSnapshot: a snapshot is damaged (nothing is loaded).
            ValueError: a snapshot was taken with a different table config or shard layout.
        """
        ...

    def close(self) -> None: ...
