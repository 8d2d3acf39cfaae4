"""Merging candidate lists from several sources (index, co-visitation, trending)."""

from __future__ import annotations

import numpy as np


def distinct(keys: np.ndarray) -> np.ndarray:
    """`keys` without repeats, in order of first appearance.

    Example:
        >>> distinct(np.array([3, 1, 3, 2, 1], np.uint64)).tolist()
        [3, 1, 2]
    """
    return keys[np.sort(np.unique(keys, return_index=True)[1])]


def interleave(sources: list[np.ndarray], n: int) -> np.ndarray:
    """The first `n` distinct keys taking the sources in turn (each source's best first), so
    the ranker scores a fixed number of candidates whatever the number of sources, and each
    source gets its best ones in.

    Example:
        >>> a, b = np.array([1, 2, 3], np.uint64), np.array([2, 9], np.uint64)
        >>> interleave([a, b], 4).tolist()
        [1, 2, 9, 3]
    """
    if not any(len(s) for s in sources):
        return np.zeros(0, np.uint64)
    turn = np.concatenate([np.arange(len(s)) * len(sources) + k for k, s in enumerate(sources)])
    return distinct(np.concatenate(sources)[np.argsort(turn, kind="stable")])[:n]
