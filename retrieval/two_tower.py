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
    def user_queries(user_rows: np.ndarray) -> np.ndarray:
        """Serving-side `encode_users`: float32 [u, dim] -> [u, dim + 1] (the bias column)."""
        return np.hstack([user_rows, np.ones((len(user_rows), 1))]).astype(np.float32)

    def forward(self, user_rows: torch.Tensor, item_rows: torch.Tensor) -> torch.Tensor:
        """Logits for aligned pairs: [batch, dim] x [batch, dim + 1] -> [batch]."""
        return (self.encode_users(user_rows) * self.encode_items(item_rows)).sum(dim=-1)


def in_batch_softmax_loss(
    user_vecs: torch.Tensor,
    item_vecs: torch.Tensor,
    item_keys: np.ndarray,
    log_q: torch.Tensor,
    user_keys: np.ndarray | None = None,
    sampled: tuple[torch.Tensor, np.ndarray, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sampled softmax over the batch's items, with logQ correction (Yi et al., RecSys 2019).

    Each positive pair's item is the target and the other positives' items are its negatives.
    Popular items turn up as in-batch negatives more often than a uniform sample would, which
    would push their scores down; subtracting log q (the item's chance to be drawn) from its
    logit corrects that. An item that appears twice in the batch is not its own negative, and
    neither is another positive of the same user (with `user_keys`): a user who clicked three
    items in one batch must not be pushed away from two of them for each click. `sampled` adds
    items drawn from another distribution as shared negatives (mixed negative sampling, Yang et
    al. 2020), so that items rarely clicked also meet negatives.

    Args:
        user_vecs: [n, d] encoded users of the positive pairs.
        item_vecs: [n, d] encoded items, aligned with the users.
        item_keys: uint64 [n] item keys (to find repeats).
        log_q: [n] log sampling probability of each item.
        user_keys: uint64 [n] user keys (to find a user's other positives), optional.
        sampled: ([m, d] encoded items, uint64 [m] their keys, [m] their log sampling probability).

    Returns:
        The summed cross-entropy (a scalar).

    Example:
        >>> u = torch.eye(2); v = torch.eye(2) * 10
        >>> float(in_batch_softmax_loss(u, v, np.array([1, 2], np.uint64), torch.zeros(2))) < 0.001
        True
    """
    logits = user_vecs @ item_vecs.T - log_q.unsqueeze(0)  # [n, n]
    hide = item_keys[:, None] == item_keys[None, :]
    if user_keys is not None:
        hide |= user_keys[:, None] == user_keys[None, :]
    np.fill_diagonal(hide, False)
    if sampled is not None:
        vecs, keys, sampled_log_q = sampled
        logits = torch.cat([logits, user_vecs @ vecs.T - sampled_log_q.unsqueeze(0)], dim=1)  # [n, n + m]
        hide = np.concatenate([hide, item_keys[:, None] == keys[None, :]], axis=1)  # accidental hits
    logits = logits.masked_fill(torch.from_numpy(hide), float("-inf"))
    return nn.functional.cross_entropy(logits, torch.arange(len(item_keys)), reduction="sum")
