"""Dense parameters shared by trainer workers: named flat float32 vectors stepped by Adam
where they live.

Sparse rows are sharded by key; dense layers (the ranker's MLPs, the blend) are small and
every example touches all of them, so they live whole in one place and every worker
exchanges gradients for parameters with it:

- `LocalDense` — in the trainer's process (one trainer, `local://` stores);
- `RemoteDense` — the dense service of the first store shard (`grpc://` stores), which holds
  a `LocalDense` (`embedding_store.remote.ShardServicer`). Each worker's `step` sends its
  gradient and gets the parameters back after the server's Adam step: asynchronous data
  parallelism (a worker's gradient may be computed on parameters a few steps old, as with a
  Monolith / Downpour parameter server), with one optimizer state and one version counter.

Both backends run the same `DenseAdam`, so a worker gets the same numbers from either.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from embedding_store.snapshot import load_snapshot, save_snapshot

DENSE_SNAPSHOT = "dense.npz"  # file name in a store snapshot directory


class DenseAdam:
    """Adam on one flat float32 vector, step for step as `torch.optim.Adam` (no weight decay).

    Args:
        values: initial parameters [n].
        learning_rate: step size.
    """

    def __init__(self, values: np.ndarray, learning_rate: float, betas: tuple[float, float] = (0.9, 0.999)) -> None:
        self.values = np.array(values, dtype=np.float32).ravel()
        self.learning_rate = float(learning_rate)
        self.betas = betas
        self.eps = 1e-8
        self.m = np.zeros_like(self.values)
        self.v = np.zeros_like(self.values)
        self.steps = 0

    def step(self, grad: np.ndarray) -> None:
        if grad.shape != self.values.shape:
            raise ValueError(f"gradient: expected {self.values.shape[0]} values, got {grad.shape}")
        b1, b2 = self.betas
        self.steps += 1
        self.m *= b1
        self.m += (1 - b1) * grad
        self.v *= b2
        self.v += (1 - b2) * grad * grad
        denom = np.sqrt(self.v) / np.sqrt(1 - b2**self.steps) + self.eps
        self.values -= (self.learning_rate / (1 - b1**self.steps)) * self.m / denom

    def arrays(self) -> dict[str, np.ndarray]:
        return {"values": self.values, "m": self.m, "v": self.v}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], learning_rate: float, steps: int) -> DenseAdam:
        adam = cls(arrays["values"], learning_rate)
        adam.m, adam.v, adam.steps = arrays["m"].copy(), arrays["v"].copy(), steps
        return adam


class DenseParameters(Protocol):
    """Named dense parameter vectors and their optimizer, local or remote."""

    def register(self, name: str, initial: np.ndarray, learning_rate: float) -> np.ndarray:
        """Create `name` from `initial` unless it exists (another worker or a restored
        snapshot made it); return its current values (float32 [n]).

        Raises:
            ValueError: `name` exists with another size.
        """
        ...

    def step(self, name: str, grad: np.ndarray) -> tuple[np.ndarray, int]:
        """Apply one Adam step with `grad`; return the new values and the vector's version
        (its number of steps, counted over all workers)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Optimizer state for a trainer checkpoint; empty where the state is saved elsewhere
        (the remote service is saved with its store shard)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class LocalDense:
    """Dense parameters in this process (thread-safe: the store shard's service shares one)."""

    def __init__(self) -> None:
        self._vectors: dict[str, DenseAdam] = {}
        self._lock = threading.Lock()

    def register(self, name: str, initial: np.ndarray, learning_rate: float) -> np.ndarray:
        with self._lock:
            vector = self._vectors.get(name)
            if vector is None:
                vector = self._vectors[name] = DenseAdam(initial, learning_rate)
            elif vector.values.shape[0] != np.asarray(initial).size:
                raise ValueError(
                    f"dense parameters {name!r}: registered with {vector.values.shape[0]} values, "
                    f"asked for {np.asarray(initial).size}"
                )
            return vector.values.copy()

    def step(self, name: str, grad: np.ndarray) -> tuple[np.ndarray, int]:
        with self._lock:
            vector = self._vectors.get(name)
            if vector is None:
                raise KeyError(f"dense parameters {name!r} are not registered")
            vector.step(np.asarray(grad, dtype=np.float32))
            return vector.values.copy(), vector.steps

    def names(self) -> list[str]:
        return sorted(self._vectors)

    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                name: {"arrays": {k: a.copy() for k, a in v.arrays().items()}, "lr": v.learning_rate, "steps": v.steps}
                for name, v in self._vectors.items()
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with self._lock:
            self._vectors = {name: DenseAdam.from_arrays(s["arrays"], s["lr"], s["steps"]) for name, s in state.items()}

    def save(self, directory: str | Path) -> None:
        """Write every vector and its optimizer state to `directory/dense.npz` atomically."""
        state = self.state_dict()
        arrays = {f"{name}/{k}": a for name, s in state.items() for k, a in s["arrays"].items()}
        meta = {name: {"lr": s["lr"], "steps": s["steps"]} for name, s in state.items()}
        save_snapshot(Path(directory) / DENSE_SNAPSHOT, arrays, meta)

    def restore(self, directory: str | Path) -> None:
        """Load `directory/dense.npz` if it exists (a snapshot from before any dense
        parameters has none; the vectors are then left as they are)."""
        path = Path(directory) / DENSE_SNAPSHOT
        if not path.exists():
            return
        arrays, meta = load_snapshot(path)
        self.load_state_dict(
            {
                name: {"arrays": {k: arrays[f"{name}/{k}"] for k in ("values", "m", "v")}, **m}
                for name, m in meta.items()
            }
        )

    def close(self) -> None:
        pass
