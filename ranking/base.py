"""The ranker interface."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Ranker(Protocol):
    """Score the candidates of one request; higher is better."""

    def score(self, user_vector: np.ndarray, candidate_vectors: np.ndarray) -> np.ndarray:
        """user_vector [dim], candidate_vectors [k, dim] -> scores [k]."""
        ...
