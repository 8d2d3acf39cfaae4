"""Per-row optimizers for sparse embedding rows: SGD, Adagrad, row-wise Adagrad and lazy Adam.

Only the rows a batch touches are updated ("lazy"), and each row keeps its own optimizer state
in one float32 array beside the rows, `state_width(name, dim)` columns per row:

- ``sgd``: no state.
- ``adagrad``: one accumulator per element.
- ``rowwise_adagrad``: one accumulator per row, the mean of the squared gradient (TorchRec's
  ROWWISE_ADAGRAD): 4 bytes per row instead of 4 per element, nearly the same quality.
- ``adam``: first and second moments per element plus the row's own step count, so bias
  correction follows how often *this* row was updated, not the global step.

Gradients of repeated keys in one batch are summed before the step, as a dense layer would.
"""

from __future__ import annotations

import numba
import numpy as np

from embedding_store.hash_index import PARALLEL_LOCK

OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "adam")
_CODES = {name: code for code, name in enumerate(OPTIMIZERS)}


def state_width(optimizer: str, dim: int) -> int:
    """Columns of optimizer state per row."""
    return {"sgd": 0, "adagrad": dim, "rowwise_adagrad": 1, "adam": 2 * dim + 1}[optimizer]


def initial_state(optimizer: str, dim: int, initial_accumulator: float) -> np.ndarray:
    """The state row a new embedding row starts with: float32 [state_width]."""
    state = np.zeros(state_width(optimizer, dim), dtype=np.float32)
    if optimizer in ("adagrad", "rowwise_adagrad"):
        state[:] = initial_accumulator
    return state


@numba.njit(cache=True)
def _sum_by_row(
    ids: np.ndarray, grads: np.ndarray, slot_of_row: np.ndarray, uniq: np.ndarray, summed: np.ndarray
) -> int:
    """Sum the gradients of equal row ids (ids < 0 are skipped); return the number of distinct rows.

    `slot_of_row` is a scratch array over all row ids holding -1; it is left as it was found.
    """
    n_uniq = 0
    dim = grads.shape[1]
    for i in range(len(ids)):
        row = ids[i]
        if row < 0:
            continue
        j = slot_of_row[row]
        if j < 0:
            j = n_uniq
            slot_of_row[row] = j
            uniq[j] = row
            n_uniq += 1
            for d in range(dim):
                summed[j, d] = grads[i, d]
        else:
            for d in range(dim):
                summed[j, d] += grads[i, d]
    for j in range(n_uniq):
        slot_of_row[uniq[j]] = -1
    return n_uniq


@numba.njit(cache=True, parallel=True)
def _step(
    code: int,
    rows: np.ndarray,
    state: np.ndarray,
    uniq: np.ndarray,
    summed: np.ndarray,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    dim = rows.shape[1]
    for j in numba.prange(len(uniq)):
        r = uniq[j]
        g = summed[j]
        if code == 0:  # sgd
            for d in range(dim):
                rows[r, d] -= lr * g[d]
        elif code == 1:  # adagrad
            for d in range(dim):
                state[r, d] += g[d] * g[d]
                rows[r, d] -= lr * g[d] / (np.sqrt(state[r, d]) + eps)
        elif code == 2:  # rowwise_adagrad
            sq = 0.0
            for d in range(dim):
                sq += g[d] * g[d]
            state[r, 0] += sq / dim
            scale = lr / (np.sqrt(state[r, 0]) + eps)
            for d in range(dim):
                rows[r, d] -= scale * g[d]
        else:  # adam: state = [m (dim), v (dim), steps]
            t = state[r, 2 * dim] + 1.0
            state[r, 2 * dim] = t
            c1 = 1.0 - beta1**t
            c2 = 1.0 - beta2**t
            for d in range(dim):
                m = beta1 * state[r, d] + (1.0 - beta1) * g[d]
                v = beta2 * state[r, dim + d] + (1.0 - beta2) * g[d] * g[d]
                state[r, d] = m
                state[r, dim + d] = v
                rows[r, d] -= lr * (m / c1) / (np.sqrt(v / c2) + eps)


class RowOptimizer:
    """Applies one optimizer's step to the rows a batch touched.

    Args:
        optimizer: one of `OPTIMIZERS`.
        learning_rate, beta1, beta2, eps: the usual hyper-parameters (betas only for Adam).

    Example:
        >>> opt = RowOptimizer("sgd", learning_rate=0.5)
        >>> rows, state = np.ones((3, 2), np.float32), np.zeros((3, 0), np.float32)
        >>> touched = opt.apply(rows, state, np.array([2, 0, 2]), np.ones((3, 2), np.float32))
        >>> touched.tolist(), rows[:, 0].tolist()
        ([2, 0], [0.5, 1.0, 0.0])
    """

    def __init__(
        self, optimizer: str, learning_rate: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8
    ) -> None:
        if optimizer not in _CODES:
            raise ValueError(f"optimizer: must be one of {OPTIMIZERS}, got {optimizer!r}")
        self.optimizer = optimizer
        self._code = _CODES[optimizer]
        self._params = (float(learning_rate), float(beta1), float(beta2), float(eps))
        self._slot_of_row = np.full(0, -1, dtype=np.int64)

    def apply(self, rows: np.ndarray, state: np.ndarray, ids: np.ndarray, grads: np.ndarray) -> np.ndarray:
        """Step the rows `ids` [n] (ids < 0 skipped) with `grads` [n, dim]; return the distinct ids touched."""
        if len(self._slot_of_row) < len(rows):
            self._slot_of_row = np.full(len(rows), -1, dtype=np.int64)
        uniq = np.empty(len(ids), dtype=np.int64)
        summed = np.empty(grads.shape, dtype=np.float32)  # [n, dim] -> first n_uniq rows used
        n = _sum_by_row(ids, grads, self._slot_of_row, uniq, summed)
        with PARALLEL_LOCK:
            _step(self._code, rows, state, uniq[:n], summed[:n], *self._params)
        return uniq[:n]
