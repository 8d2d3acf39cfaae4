"""The ranking model: target attention over the user's history (DIN) + explicit crossing (DCN-v2).

Inputs are embedding rows looked up from the embedding store (ids, attributes, history items);
the model holds only dense parameters. Per example:

1. Attribute embeddings are mean-pooled per side (user, item), ignoring padding.
2. DIN: each history item h is scored against the target item t by a small MLP over
   [h, t, h - t, h * t]; the softmax over the valid positions weights the history into one
   interest vector, so the same history says different things about different targets.
3. DCN-v2: x0 = [user, item, user attrs, item attrs, interest, user * item, dense features]
   (such as the item's log trending and all-time counts); cross layers
   x_{l+1} = x0 * (W_l x_l + b_l) + x_l build explicit feature crosses, a deep MLP runs beside
   them, and a linear layer over both gives the click logit.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _masked_mean(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[..., k, d] rows, [..., k] bool mask -> [..., d] mean over the valid rows (zeros if none)."""
    weights = mask.to(rows.dtype).unsqueeze(-1)
    return (rows * weights).sum(dim=-2) / weights.sum(dim=-2).clamp(min=1.0)


class DinDcnRanker(nn.Module):
    """Click-probability model over sparse embeddings; see the module docstring.

    Args:
        dim: embedding width of every input row.
        cross_layers: DCN-v2 cross layers.
        hidden: widths of the deep tower.
        attention_hidden: width of DIN's attention MLP.
        dense_features: number of dense (real-valued) inputs per example.

    Example:
        >>> m = DinDcnRanker(dim=4)
        >>> n, a, h = 3, 2, 5
        >>> rows = lambda *s: torch.randn(*s, 4)
        >>> m(rows(n), rows(n), rows(n, a), torch.ones(n, a, dtype=torch.bool), rows(n, a),
        ...   torch.ones(n, a, dtype=torch.bool), rows(n, h), torch.zeros(n, h, dtype=torch.bool)).shape
        torch.Size([3])
    """

    def __init__(
        self,
        dim: int,
        cross_layers: int = 2,
        hidden: tuple[int, ...] = (128, 64),
        attention_hidden: int = 64,
        dense_features: int = 0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.attention = nn.Sequential(nn.Linear(4 * dim, attention_hidden), nn.ReLU(), nn.Linear(attention_hidden, 1))
        width = 6 * dim + dense_features
        self.cross = nn.ModuleList(nn.Linear(width, width) for _ in range(cross_layers))
        layers: list[nn.Module] = []
        last = width
        for h in hidden:
            layers += [nn.Linear(last, h), nn.ReLU()]
            last = h
        self.deep = nn.Sequential(*layers)
        self.out = nn.Linear(width + last, 1)

    def interest(self, target: torch.Tensor, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """DIN target attention: [..., d] target, [..., h, d] history, [..., h] mask -> [..., d].

        The attention MLP's first layer over [h, t, h - t, h * t] is applied as
        (W_h + W_d) h + (W_t - W_d) t + W_p (h * t): the same function and gradients without
        building the [..., h, 4d] input, and a history shared by many targets (one user's
        candidates at serving time, leading size 1) is projected once.
        """
        first, second = self.attention[0], self.attention[2]
        assert isinstance(first, nn.Linear) and isinstance(second, nn.Linear)
        w_h, w_t, w_d, w_p = first.weight.split(self.dim, dim=1)
        hidden = (
            F.linear(history, w_h + w_d)
            + F.linear(target, w_t - w_d, first.bias).unsqueeze(-2)
            + F.linear(history * target.unsqueeze(-2), w_p)
        )  # [..., h, attention_hidden]
        scores = second(torch.relu(hidden)).squeeze(-1).masked_fill(~mask, float("-inf"))  # [..., h]
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows without history: all -inf -> 0
        return (weights.unsqueeze(-2) @ history).squeeze(-2)

    def forward(
        self,
        user: torch.Tensor,
        item: torch.Tensor,
        user_attrs: torch.Tensor,
        user_attr_mask: torch.Tensor,
        item_attrs: torch.Tensor,
        item_attr_mask: torch.Tensor,
        history: torch.Tensor,
        history_mask: torch.Tensor,
        dense: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Click logits [...] from [..., d] ids, [..., a|b|h, d] attributes/history, their [..., .]
        masks and [..., dense_features] dense inputs.

        Leading dimensions broadcast: one user's inputs with leading shape [u, 1] score against
        items [u, c] without being repeated c times.
        """
        parts = [
            user,
            item,
            _masked_mean(user_attrs, user_attr_mask),
            _masked_mean(item_attrs, item_attr_mask),
            self.interest(item, history, history_mask),
            user * item,
            *([] if dense is None else [dense]),
        ]
        lead = torch.broadcast_shapes(*(p.shape[:-1] for p in parts))
        x0 = torch.cat([p.expand(*lead, p.shape[-1]) for p in parts], dim=-1)  # [..., 6d + dense_features]
        x = x0
        for layer in self.cross:
            x = x0 * layer(x) + x
        return self.out(torch.cat([x, self.deep(x0)], dim=-1)).squeeze(-1)
