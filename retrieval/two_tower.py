"""Two-tower retrieval model over collisionless id embeddings."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class TwoTower(nn.Module):
    """Score a (user, item) pair as the inner product of their tower outputs.

    Each tower is its id embedding (no dense layers yet). The item table is one column wider
    than the user table: its last column is the item's bias, which absorbs popularity so that
    the other columns can describe taste. The user tower appends a constant 1, so that

        logit = <encode_users(u), encode_items(v)> = <u, v[:-1]> + v[-1]

    stays a plain inner product that a Faiss index can search. Training and serving both go
    through `encode_users` / `encode_items`.

    Args:
        dim: width of the user embedding (item rows are `dim + 1`).

    Example:
        >>> model = TwoTower(dim=2)
        >>> model(torch.ones(1, 2), torch.tensor([[1.0, 2.0, -3.0]])).tolist()
        [0.0]
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    @property
    def item_dim(self) -> int:
        return self.dim + 1

    @staticmethod
    def encode_users(user_rows: torch.Tensor) -> torch.Tensor:
        ones = torch.ones(*user_rows.shape[:-1], 1, dtype=user_rows.dtype)
        return torch.cat([user_rows, ones], dim=-1)  # [batch, dim] -> [batch, dim + 1]

    @staticmethod
    def encode_items(item_rows: torch.Tensor) -> torch.Tensor:
        return item_rows  # [batch, dim + 1]

    @staticmethod
    def user_query(user_row: np.ndarray) -> np.ndarray:
        """Serving-side `encode_users` for one row: [dim] -> [dim + 1]."""
        return np.append(user_row.astype(np.float32), np.float32(1.0))

    def forward(self, user_rows: torch.Tensor, item_rows: torch.Tensor) -> torch.Tensor:
        """Logits for aligned pairs: [batch, dim] x [batch, dim + 1] -> [batch]."""
        return (self.encode_users(user_rows) * self.encode_items(item_rows)).sum(dim=-1)
