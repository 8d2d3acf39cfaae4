"""The last step of ranking: blend the ranker's logit with how popular each candidate is now.

The ranker is trained with BCE against sampled negatives, so its logit says how much more
likely this user picks the item than the sampling distribution would; it says little about
what is popular this week. The blend scores a candidate as

    a * ranker logit + b * log(trending count + eps)

and learns `a` and `b` the way serving uses them: for a positive (user, item) whose item is
among the trending candidates serving would offer, a softmax over those candidates,
cross-entropy on the chosen one. Two parameters, trained online beside the ranker (no value
is tuned on evaluation data).
"""

from __future__ import annotations

import torch
from torch import nn

TRENDING_EPS = 1e-3  # added to trending counts before the log: items nobody chose lately stay finite


class ScoreBlend(nn.Module):
    """Final candidate score from the ranker logit and the item's trending count.

    Example:
        >>> blend = ScoreBlend()
        >>> blend(torch.tensor([0.0, 1.0]), torch.tensor([10.0, 0.0])).argmax().item()
        0
    """

    def __init__(self) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.tensor([1.0, 1.0]))

    def forward(self, logits: torch.Tensor, trending: torch.Tensor) -> torch.Tensor:
        """Scores of the same shape as `logits` (ranker logits) and `trending` (decayed counts)."""
        return self.weights[0] * logits + self.weights[1] * torch.log(trending + TRENDING_EPS)

    def loss(
        self,
        logits: torch.Tensor,
        trending: torch.Tensor,
        valid: torch.Tensor,
        target: torch.Tensor,
    ) -> torch.Tensor:
        """Sum over rows of -log softmax of the `target` column among the `valid` ones: [n, c] inputs, [n] target."""
        scores = self(logits, trending).masked_fill(~valid, float("-inf"))
        return torch.nn.functional.cross_entropy(scores, target, reduction="sum")
