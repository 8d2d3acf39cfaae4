"""The embedding-table interface, its config, and the delta it hands to parameter sync."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class TableConfig:
    """Settings of one embedding table.

    Args:
        name: table name, used in deltas and metrics ("user", "item").
        dim: embedding width.
        learning_rate: row-wise Adagrad step size.
        initial_accumulator: starting value of each row's Adagrad accumulator. Zero makes the
            first step of every new row a full `learning_rate` step whatever its gradient,
            which lets rows seen once jump as far as rows seen a thousand times.
        init_std: rows start as N(0, init_std^2).
        initial_rows: rows to reserve up front; tables grow past it.
        seed: seed of the row initialiser.

    Raises:
        ValueError: a value is out of range; the message names the field.
    """

    name: str
    dim: int = 32
    learning_rate: float = 0.05
    initial_accumulator: float = 0.1
    init_std: float = 0.05
    initial_rows: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name: must not be empty")
        if not 1 <= self.dim <= 4096:
            raise ValueError(f"dim: must be in [1, 4096], got {self.dim}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate: must be > 0, got {self.learning_rate}")
        if not self.initial_accumulator >= 0:
            raise ValueError(f"initial_accumulator: must be >= 0, got {self.initial_accumulator}")
        if not self.init_std >= 0:
            raise ValueError(f"init_std: must be >= 0, got {self.init_std}")
        if self.initial_rows < 1:
            raise ValueError(f"initial_rows: must be >= 1, got {self.initial_rows}")


@dataclass(frozen=True)
class TableDelta:
    """Rows of one table changed since the previous drain.

    Args:
        table: the table's name.
        keys: uint64 [n] keys whose rows changed.
        rows: float32 [n, dim] current values of those rows.
        evicted: uint64 [m] keys removed since the previous drain.
    """

    table: str
    keys: np.ndarray
    rows: np.ndarray
    evicted: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))

    def __len__(self) -> int:
        return len(self.keys) + len(self.evicted)

    @classmethod
    def empty(cls, table: str, dim: int = 1) -> TableDelta:
        """A delta with no rows."""
        return cls(table, np.zeros(0, dtype=np.uint64), np.zeros((0, dim), dtype=np.float32))


class EmbeddingTable(Protocol):
    """A collisionless table of trainable rows addressed by 64-bit keys."""

    @property
    def config(self) -> TableConfig: ...

    def __len__(self) -> int: ...

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Rows for uint64 `keys` [n] -> float32 [n, dim]; absent keys get new initialised rows."""
        ...

    def apply_gradients(self, keys: np.ndarray, grads: np.ndarray) -> None:
        """One optimizer step on the rows of `keys` [n] with `grads` [n, dim]; repeated keys add up."""
        ...

    def drain_delta(self) -> TableDelta:
        """Rows changed (and keys removed) since the previous drain."""
        ...
