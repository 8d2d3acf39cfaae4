"""Progressive (predict-then-train) evaluation: streaming AUC and log loss."""

from __future__ import annotations

import numpy as np


class StreamingAUC:
    """AUC and log loss over every example scored so far, in constant memory.

    Scores are bucketed into `bins` equal-width bins of predicted probability; the AUC is
    the Mann-Whitney statistic over the bins (ties within a bin count one half), exact up to
    the bin width.

    Args:
        bins: number of probability buckets.

    Example:
        >>> auc = StreamingAUC()
        >>> auc.update(np.array([0.9, 0.8, 0.1]), np.array([1, 1, 0]))
        >>> auc.value()
        1.0
    """

    def __init__(self, bins: int = 1000) -> None:
        self._bins = bins
        self._pos = np.zeros(bins, dtype=np.int64)
        self._neg = np.zeros(bins, dtype=np.int64)
        self._loss_sum = 0.0
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    def update(self, probs: np.ndarray, labels: np.ndarray) -> None:
        """Add examples: predicted probabilities [n] and 0/1 labels [n]."""
        probs = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
        labels = np.asarray(labels) > 0.5
        idx = np.minimum((probs * self._bins).astype(np.int64), self._bins - 1)
        self._pos += np.bincount(idx[labels], minlength=self._bins)
        self._neg += np.bincount(idx[~labels], minlength=self._bins)
        self._loss_sum += float(-np.sum(np.where(labels, np.log(probs), np.log(1 - probs))))
        self._count += len(probs)

    def value(self) -> float:
        """AUC so far; NaN until both classes were seen."""
        n_pos, n_neg = self._pos.sum(), self._neg.sum()
        if n_pos == 0 or n_neg == 0:
            return float("nan")
        neg_below = np.cumsum(self._neg) - self._neg  # negatives in strictly lower bins
        wins = np.sum(self._pos * (neg_below + 0.5 * self._neg))
        return float(wins / (n_pos * n_neg))

    def log_loss(self) -> float:
        return self._loss_sum / self._count if self._count else float("nan")

    def copy(self) -> StreamingAUC:
        out = StreamingAUC(self._bins)
        out.add(self)
        return out

    def add(self, other: StreamingAUC) -> None:
        """Count `other`'s examples too (same bins)."""
        self._pos += other._pos
        self._neg += other._neg
        self._loss_sum += other._loss_sum
        self._count += other._count

    def since(self, earlier: StreamingAUC) -> StreamingAUC:
        """The examples added after `earlier` (a `copy()` of this one taken before)."""
        out = StreamingAUC(self._bins)
        out._pos, out._neg = self._pos - earlier._pos, self._neg - earlier._neg
        out._loss_sum, out._count = self._loss_sum - earlier._loss_sum, self._count - earlier._count
        return out
