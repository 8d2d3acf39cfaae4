"""The simplest ranker: the two-tower inner product, as a calibrated-free score."""

from __future__ import annotations

import numpy as np


class DotProductRanker:
    """Score candidates by their inner product with the user vector.

    Example:
        >>> DotProductRanker().score(np.ones(2), np.array([[1.0, 0.0], [2.0, 2.0]])).tolist()
        [1.0, 4.0]
    """

    def score(self, user_vector: np.ndarray, candidate_vectors: np.ndarray) -> np.ndarray:
        return candidate_vectors.astype(np.float32) @ user_vector.astype(np.float32)  # [k, dim] @ [dim] -> [k]
