"""The last step of ranking: blend the ranker's logit with how popular each candidate is now
and with how close it is to what the user just picked.

The ranker is trained with BCE against sampled negatives, so its logit says how much more
likely this user picks the item than the sampling distribution would; it says little about
what is popular this week. The blend scores a candidate as

    a * ranker logit + b * log(trending count + eps) + c * co-visitation + d * attribute affinity

(the co-visitation score of the user's recent items for the candidate, in [0, 1]:
`retrieval.covisit.HistoryScores`; the share of the user's recent items that carry the
candidate's attributes, in [0, 1]: `ranking.scorer.attribute_affinity`) and learns the four
weights the way serving uses them: for a positive (user, item) whose item is among the
candidates serving would offer (trending and co-visited items), a softmax over those
candidates, cross-entropy on the chosen one. Four parameters, trained online beside the
ranker (no value is tuned on evaluation data).
"""

from __future__ import annotations

import torch
from torch import nn

TRENDING_EPS = 1e-3  # added to trending counts before the log: items nobody chose lately stay finite


class ScoreBlend(nn.Module):
    """Final candidate score from the ranker logit, the item's trending count, its
    co-visitation score and its attribute affinity.

    Example:
        >>> blend = ScoreBlend()
        >>> blend(torch.tensor([0.0, 1.0]), torch.tensor([10.0, 0.0])).argmax().item()
        0
        >>> blend(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0])).argmax().item()
        1
    """

    def __init__(self) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.tensor([1.0, 1.0, 1.0, 1.0]))

    def forward(
        self,
        logits: torch.Tensor,
        trending: torch.Tensor,
        covisit: torch.Tensor | None = None,
        affinity: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores of the same shape as `logits` (ranker logits), `trending` (decayed counts),
        `covisit` (co-visitation scores) and `affinity` (attribute affinity); none: zeros."""
        score = self.weights[0] * logits + self.weights[1] * torch.log(trending + TRENDING_EPS)
        if covisit is not None:
            score = score + self.weights[2] * covisit
        return score if affinity is None else score + self.weights[3] * affinity

    def loss(
        self,
        logits: torch.Tensor,
        trending: torch.Tensor,
        covisit: torch.Tensor | None,
        affinity: torch.Tensor | None,
        valid: torch.Tensor,
        target: torch.Tensor,
    ) -> torch.Tensor:
        """Sum over rows of -log softmax of the `target` column among the `valid` ones: [n, c] inputs, [n] target."""
        scores = self(logits, trending, covisit, affinity).masked_fill(~valid, float("-inf"))
        return torch.nn.functional.cross_entropy(scores, target, reduction="sum")
