"""The last step of ranking: blend the ranker's logit with how popular each candidate is now,
how close it is to what the user just picked, and how well it fits the user's taste.

The ranker is trained with BCE against sampled negatives, so its logit says how much more
likely this user picks the item than the sampling distribution would; it says little about
what is popular this week. The blend scores a candidate as the weighted sum of its `FEATURES`:

    a * ranker logit + b * log(trending count + eps) + c * co-visitation
        + d * attribute affinity + e * attribute lift

- co-visitation: the score of the user's recent items for the candidate, in [0, 1]
  (`retrieval.covisit.HistoryScores`);
- attribute affinity: the share of the user's recent items that carry the candidate's
  attributes (as the catalogue describes them now), in [0, 1]
  (`ranking.scorer.attribute_affinity`);
- attribute lift: the naive Bayes log-likelihood ratio of the candidate's attributes under the
  user's taste profile, counted over all their positives, against everyone's (`ranking.profile`).

Two sets of weights, by where the user is (`returning`, from the time since their last
positive against `session_gap_s`):

- in a session (or new): `weights`, learned online the way serving uses them — for a positive
  (user, item) whose item is among the candidates serving would offer (trending and
  co-visited items), a softmax over those candidates, cross-entropy on the chosen one;
- back after a gap: `returning`, fixed (a setting, `trainer.return_blend`). What a returning
  user picks over their next visits is not what the stream's next positive says: every
  objective tried online on MovieLens-100K (every positive; positives after 30 minutes away;
  one per user and step) learned large ranker and co-visitation weights that lost 10-25% of
  recall@20 on both the inner and the outer time split of `bench.peers` against the weights
  chosen on the inner split, which are the default (`docs/limits.md`).

No value is tuned on evaluation data.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

TRENDING_EPS = 1e-3  # added to trending counts before the log: items nobody chose lately stay finite
FEATURES = ("ranker logit", "log trending count", "co-visitation", "attribute affinity", "attribute lift")
RETURN_WEIGHTS = (0.2, 1.0, 0.5, 0.5, 0.3)
"""The default weights of a returning user's features: chosen on the inner split of
`bench.peers`' history (`python -m bench.peers --tune-return-blend`)."""


def blend_features(
    logits: torch.Tensor,
    trending: torch.Tensor,
    covisit: torch.Tensor | None = None,
    affinity: torch.Tensor | None = None,
    lift: torch.Tensor | None = None,
) -> torch.Tensor:
    """The `FEATURES` [..., 5] of candidates, each input of the shape of `logits` (none: zeros)."""
    zeros = torch.zeros_like(logits)
    parts = [covisit, affinity, lift]
    return torch.stack(
        [logits, torch.log(trending + TRENDING_EPS), *(zeros if p is None else p.to(logits.dtype) for p in parts)], -1
    )


class ScoreBlend(nn.Module):
    """Final candidate scores from their `FEATURES`; see the module docstring.

    Args:
        returning: the weights of a returning user's features (fixed).
        session_gap_s: time since a user's last positive after which they count as returning.

    Example:
        >>> blend = ScoreBlend()
        >>> popular = blend_features(torch.tensor([[0.0, 1.0]]), torch.tensor([[10.0, 0.0]]))
        >>> blend(popular).argmax().item()
        0
        >>> close = blend_features(torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([[0.0, 1.0]]))
        >>> blend(close).argmax().item(), blend(close, torch.tensor([True])).argmax().item()
        (1, 1)
    """

    def __init__(self, returning: Sequence[float] = RETURN_WEIGHTS, session_gap_s: float = 1800.0) -> None:
        super().__init__()
        if len(returning) != len(FEATURES):
            raise ValueError(f"returning: {len(FEATURES)} weights ({', '.join(FEATURES)}), got {list(returning)}")
        self.weights = nn.Parameter(torch.ones(len(FEATURES)))
        self.register_buffer("returning", torch.tensor(list(returning), dtype=torch.float32))
        self.register_buffer("session_gap_s", torch.tensor(float(session_gap_s), dtype=torch.float64))

    def forward(self, features: torch.Tensor, returning: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [u, c] of candidates' features [u, c, F] (`blend_features`); `returning`
        [u] picks the returning weights for those users (none: the learned ones for all)."""
        weights = self.weights.expand(features.shape[0], -1)
        if returning is not None:
            weights = torch.where(returning[:, None], self.get_buffer("returning"), weights)
        return (features * weights[:, None, :]).sum(-1)

    def is_returning(self, gap_s: np.ndarray) -> torch.Tensor:
        """bool [u]: which users, `gap_s` [u] after their last positive (NaN: none yet), are back."""
        threshold = float(self.get_buffer("session_gap_s"))
        return torch.from_numpy(np.nan_to_num(np.asarray(gap_s, np.float64), nan=0.0) >= threshold)

    def loss(self, features: torch.Tensor, valid: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Sum over rows of -log softmax of the `target` column among the `valid` ones, under the
        learned weights: [n, c, F] features, [n, c] valid, [n] target."""
        scores = self(features).masked_fill(~valid, float("-inf"))
        return torch.nn.functional.cross_entropy(scores, target, reduction="sum")
