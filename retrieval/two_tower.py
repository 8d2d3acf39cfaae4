"""Two-tower retrieval model over collisionless id embeddings."""

from __future__ import annotations

import torch
from torch import nn


class TwoTower(nn.Module):
    """Score a (user, item) pair as the inner product of their tower outputs.

    In this first version each tower is the id embedding itself (no dense layers), so the
    serving tier can use synced rows directly as query and index vectors; `encode_users`
    and `encode_items` are the one place serving and training share that mapping.

    Example:
        >>> model = TwoTower()
        >>> model(torch.ones(2, 4), torch.ones(2, 4)).tolist()
        [4.0, 4.0]
    """

    def encode_users(self, user_rows: torch.Tensor) -> torch.Tensor:
        return user_rows  # [batch, dim] -> [batch, dim]

    def encode_items(self, item_rows: torch.Tensor) -> torch.Tensor:
        return item_rows  # [batch, dim] -> [batch, dim]

    def forward(self, user_rows: torch.Tensor, item_rows: torch.Tensor) -> torch.Tensor:
        """Logits for aligned pairs: [batch, dim] x [batch, dim] -> [batch]."""
        return (self.encode_users(user_rows) * self.encode_items(item_rows)).sum(dim=-1)
