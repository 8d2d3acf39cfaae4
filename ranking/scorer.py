"""The scorer: orders one request's candidates with the ranker and the final blend.

The same code runs in the trainer (evaluation) and in serving replicas, so what is measured
offline is what is served. It reads embedding rows through anything with
`get(keys) -> (rows, found)` — the trainer's store tables or serving's synced row maps — and
takes the features (attribute keys, histories, item counts) as arrays.

Dense parameters travel as a flat `{name: array}` dict (`dense_state`), which `from_dense`
turns back into a scorer: the sync format holds no pickled objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ranking.blend import ScoreBlend, blend_features
from ranking.din_dcn import DinDcnRanker

# Serving-side names of what the ranker reads (tables synced from the trainer).
RANK_ID_TABLE = "rank_id"  # user and item id rows (history items share the item rows)
RANK_ATTR_TABLE = "rank_attr"  # attribute value rows
USER_ATTRS = "user_attrs"  # uint64 [attribute slots]: each user's attribute keys (0 = padding)
USER_HISTORY = "user_history"  # uint64 [history length]: each user's recent positive items
ITEM_ATTRS = "item_attrs"  # uint64 [attribute slots]: each item's attribute keys
ITEM_COUNTS = "item_counts"  # float64 [2]: log2 trending count anchored in time, all-time count


class RowSource(Protocol):
    def get(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows [n, dim], found [n]) of keys [n]."""
        ...


DENSE_FEATURES = 3  # the ranker's real-valued inputs per pair (`dense_features`)


def dense_features(trending: np.ndarray, total: np.ndarray, retrieval: np.ndarray) -> torch.Tensor:
    """The ranker's dense inputs per pair: log(1 + the item's trending count), log(1 + its all-time
    count), and the two-tower score of the pair (what retrieval thinks of it): [n, 3]."""
    columns = [np.log1p(trending), np.log1p(total), retrieval]
    return torch.from_numpy(np.stack([np.ravel(c) for c in columns], axis=1).astype(np.float32))


@dataclass(frozen=True)
class Candidates:
    """What scoring needs about u users and their c candidates each.

    Args:
        users: uint64 [u].
        user_attrs: uint64 [u, a] attribute keys (0 = padding).
        history: uint64 [u, h] recent positive items (0 = padding).
        items: uint64 [u, c] candidate items.
        item_attrs: uint64 [u * c, b] attribute keys of `items.ravel()`.
        trending: float [u, c] trending (decayed) counts of the candidates.
        total: float [u, c] all-time counts.
        retrieval: float [u, c] two-tower scores (user vector . item vector).
        covisit: float [u, c] co-visitation scores of the users' histories for the candidates
            (`retrieval.covisit.HistoryScores.matrix`); none: zeros.
        affinity: float [u, c] how much the candidates' attributes are the users' recent
            items' attributes (`attribute_affinity`); none: zeros.
        lift: float [u, c] the candidates' attribute lift under the users' taste profiles
            (`ranking.profile.attribute_lift`); none: zeros.
        gap_s: float [u] model time since each user's last positive (NaN: none yet), which
            picks the blend's weights (`ranking.blend`); none: every user in a session.
    """

    users: np.ndarray
    user_attrs: np.ndarray
    history: np.ndarray
    items: np.ndarray
    item_attrs: np.ndarray
    trending: np.ndarray
    total: np.ndarray
    retrieval: np.ndarray
    covisit: np.ndarray | None = None
    affinity: np.ndarray | None = None
    lift: np.ndarray | None = None
    gap_s: np.ndarray | None = None

    def features(self, logits: torch.Tensor) -> torch.Tensor:
        """The blend's features [u, c, F] of these candidates, given the ranker's `logits` [u, c]."""

        def tensor(x: np.ndarray | None) -> torch.Tensor | None:
            return None if x is None else torch.from_numpy(np.asarray(x, dtype=np.float32))

        trending = torch.from_numpy(np.asarray(self.trending, dtype=np.float32))
        return blend_features(logits, trending, tensor(self.covisit), tensor(self.affinity), tensor(self.lift))


def attribute_affinity(history_attrs: np.ndarray, item_attrs: np.ndarray) -> np.ndarray:
    """How much each candidate's attributes are its user's: the mean, over the candidate's
    attribute keys, of the share of the user's recent items that carry that key; [u, c] in
    [0, 1] (0 for a candidate without attributes or a user without history).

    Args:
        history_attrs: uint64 [u, h, a] attribute keys of each user's recent items (0 = padding;
            an item with no key at all is padding too).
        item_attrs: uint64 [u, c, b] attribute keys of each user's candidates.

    Example:
        >>> history = np.array([[[1, 2], [1, 3]]], np.uint64)  # two items: genres {1, 2}, {1, 3}
        >>> attribute_affinity(history, np.array([[[1, 0], [2, 3], [4, 0]]], np.uint64)).tolist()
        [[1.0, 0.5, 0.0]]
    """
    u, c = item_attrs.shape[:2]
    out = np.zeros((u, c))
    for r in range(u):
        items = history_attrs[r][(history_attrs[r] != 0).any(axis=1)]
        if not len(items):
            continue
        keys, counts = np.unique(items[items != 0], return_counts=True)  # an item holds a key once
        cand = item_attrs[r]
        at = np.minimum(np.searchsorted(keys, cand), len(keys) - 1)
        share = np.where((keys[at] == cand) & (cand != 0), counts[at] / len(items), 0.0)
        present = (cand != 0).sum(axis=1)
        out[r] = np.where(present > 0, share.sum(axis=1) / np.maximum(present, 1), 0.0)
    return out


class CandidateScorer:
    """Ranker logits blended with trending counts, co-visitation and the user's taste
    (`ranking.blend`); see the module docstring.

    Args:
        ranker: the DIN + DCN-v2 model.
        blend: the final blend.
    """

    def __init__(self, ranker: DinDcnRanker, blend: ScoreBlend) -> None:
        self.ranker = ranker
        self.blend = blend

    @staticmethod
    def dense_state(ranker: DinDcnRanker, blend: ScoreBlend) -> dict[str, np.ndarray]:
        """Copies of every dense parameter, as float32 arrays named `ranker.*` and `blend.*`."""
        state = {f"ranker.{k}": v.detach().numpy().copy() for k, v in ranker.state_dict().items()}
        state.update({f"blend.{k}": v.detach().numpy().copy() for k, v in blend.state_dict().items()})
        return state

    @classmethod
    def from_dense(cls, state: dict[str, np.ndarray]) -> CandidateScorer:
        """Rebuild a scorer from `dense_state` (layer sizes read from the arrays' shapes).

        Raises:
            ValueError: the arrays do not describe a ranker and a blend.
        """
        try:
            ranker_state = {
                k[len("ranker.") :]: torch.from_numpy(v) for k, v in state.items() if k.startswith("ranker.")
            }
            blend_state = {k[len("blend.") :]: torch.from_numpy(v) for k, v in state.items() if k.startswith("blend.")}
            dim = ranker_state["attention.0.weight"].shape[1] // 4
            cross = sum(1 for k in ranker_state if k.startswith("cross.") and k.endswith(".weight"))
            width = ranker_state["cross.0.weight"].shape[0] if cross else ranker_state["out.weight"].shape[1]
            deep = [
                ranker_state[k].shape[0]
                for k in sorted(ranker_state)
                if k.startswith("deep.") and k.endswith(".weight")
            ]
            ranker = DinDcnRanker(
                dim,
                cross_layers=cross,
                hidden=tuple(deep),
                attention_hidden=ranker_state["attention.0.weight"].shape[0],
                dense_features=width - 6 * dim,
            )
            ranker.load_state_dict(ranker_state)
            blend = ScoreBlend()
            blend.load_state_dict(blend_state)
        except (KeyError, RuntimeError, IndexError) as e:
            raise ValueError(f"dense parameters do not describe a ranker and a blend: {e}") from e
        return cls(ranker, blend)

    @torch.inference_mode()
    def score(self, ids: RowSource, attrs: RowSource, c: Candidates) -> np.ndarray:
        """Final scores [u, c] (higher is better); rows missing from the sources count as zeros."""
        returning = None if c.gap_s is None else self.blend.is_returning(c.gap_s)
        return self.blend(c.features(self.logits(ids, attrs, c)), returning).numpy()

    def logits(self, ids: RowSource, attrs: RowSource, c: Candidates) -> torch.Tensor:
        """The ranker's logits [u, c] alone (what the blend is trained on), without autograd.

        Each user's rows (id, attributes, history) are looked up once and broadcast over its
        candidates, not repeated per candidate.
        """
        u, k = c.items.shape
        if not u or not k:
            return torch.zeros((u, k))
        id_keys = np.concatenate([c.users, c.items.ravel(), c.history.ravel()])
        attr_keys = np.concatenate([c.user_attrs.ravel(), c.item_attrs.ravel()])
        with torch.no_grad():
            return ranker_logits(
                self.ranker,
                torch.from_numpy(ids.get(id_keys)[0]),
                torch.from_numpy(attrs.get(attr_keys)[0]),
                c.user_attrs,
                c.item_attrs,
                c.history,
                dense_features(c.trending, c.total, c.retrieval),
            )


def ranker_logits(
    ranker: DinDcnRanker,
    id_rows: torch.Tensor,
    attr_rows: torch.Tensor,
    user_attrs: np.ndarray,
    item_attrs: np.ndarray,
    history: np.ndarray,
    dense: torch.Tensor,
) -> torch.Tensor:
    """Ranker logits [u, k] of u users and k items each (k = 1: aligned pairs). Each user's
    rows come once and are broadcast over its items.

    Args:
        id_rows: rows of the keys [users (u), items (u * k), history.ravel()] in that order.
        attr_rows: rows of the keys [user_attrs.ravel(), item_attrs.ravel()].
        user_attrs: uint64 [u, a] keys, 0 = padding; history: uint64 [u, h]; item_attrs:
            uint64 [u * k, b].
        dense: [u * k, DENSE_FEATURES] (`dense_features`).
    """
    u, d, split = len(user_attrs), id_rows.shape[1], user_attrs.size
    k = len(item_attrs) // max(u, 1)
    return ranker(
        id_rows[:u].view(u, 1, d),
        id_rows[u : u + u * k].view(u, k, d),
        attr_rows[:split].view(u, 1, user_attrs.shape[1], d),
        torch.from_numpy(user_attrs != 0).view(u, 1, -1),
        attr_rows[split:].view(u, k, item_attrs.shape[1], d),
        torch.from_numpy(item_attrs != 0).view(u, k, -1),
        id_rows[u + u * k :].view(u, 1, history.shape[1], d),
        torch.from_numpy(history != 0).view(u, 1, -1),
        dense.view(u, k, -1),
    )
