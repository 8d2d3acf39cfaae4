"""The two models the trainer learns online, over tables of one embedding store.

- Retrieval: `TwoTower` on tables "user" and "item" (what serving searches with Faiss), trained
  on positive pairs with in-batch sampled softmax and logQ correction.
- Ranking: `DinDcnRanker` on tables "rank_id" (user and item ids; history items share the item
  rows) and "rank_attr" (attribute values), trained with BCE on labelled examples; its dense
  parameters use Adam.

Sparse gradients go back to the store per distinct key (autograd sums repeated keys); every
loss is a sum over examples, so a row gets the same step whatever the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from embedding_store import EmbeddingTable, Store, TableConfig, TableDelta
from ranking.din_dcn import DinDcnRanker
from retrieval.two_tower import TwoTower, in_batch_softmax_loss
from trainer.catalog import ItemCatalog
from trainer.config import TrainerConfig
from trainer.features import Features, FeatureState

TABLES = ("user", "item", "rank_id", "rank_attr")


def table_configs(config: TrainerConfig) -> list[TableConfig]:
    """The store tables the trainer needs, from its settings."""
    item_dim = TwoTower(config.dim).item_dim
    dims = {"user": config.dim, "item": item_dim, "rank_id": config.rank_dim, "rank_attr": config.rank_dim}
    return [config.table(name, dims[name], config.seed + n) for n, name in enumerate(TABLES)]


@dataclass(frozen=True)
class RankingBatch:
    """Scores of one ranking step: probabilities [n] (before the step) and the mean BCE."""

    probs: np.ndarray
    loss: float


def _columns(items: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position of each key in `items` (distinct uint64), and whether it is there at all."""
    order = np.argsort(items)
    at = np.minimum(np.searchsorted(items, keys, sorter=order), max(len(items) - 1, 0))
    cols = order[at] if len(items) else np.zeros(len(keys), dtype=np.int64)
    return cols, items[cols] == keys if len(items) else np.zeros(len(keys), dtype=bool)


class _Rows:
    """Rows of one table for a set of keys, as a leaf tensor whose gradient goes back per key."""

    def __init__(self, table: EmbeddingTable, keys: np.ndarray) -> None:
        self.table = table
        self.keys, inverse = np.unique(keys, return_inverse=True)
        self.rows = torch.from_numpy(table.get(self.keys)[0]).requires_grad_()  # [unique, dim]
        self._inverse = torch.from_numpy(inverse.reshape(keys.shape))

    def gather(self) -> torch.Tensor:
        return self.rows[self._inverse]  # [...keys.shape, dim]

    def step(self, now: float) -> None:
        if self.rows.grad is not None:
            real = self.keys != 0  # key 0 is padding
            self.table.apply_gradients(self.keys[real], self.rows.grad.numpy()[real], now)


class OnlineModels:
    """Retrieval and ranking models with their tables and optimizer; see the module docstring.

    Args:
        config: trainer settings (dims, learning rates).
        store: holds the `TABLES`.
        catalog: item popularity (logQ correction) and the item list (evaluation).
        features: attributes and histories.
    """

    def __init__(self, config: TrainerConfig, store: Store, catalog: ItemCatalog, features: FeatureState) -> None:
        self.config = config
        self.store = store
        self.catalog = catalog
        self.features = features
        self.two_tower = TwoTower(config.dim)
        torch.manual_seed(config.seed)
        self.ranker = DinDcnRanker(config.rank_dim, dense_features=2)
        self.dense_optimizer = torch.optim.Adam(self.ranker.parameters(), lr=config.dense_learning_rate)
        self.users, self.items = store.table("user"), store.table("item")
        self.rank_ids, self.rank_attrs = store.table("rank_id"), store.table("rank_attr")

    def sight(self, user_keys: np.ndarray, item_keys: np.ndarray, now: float) -> None:
        """Count one sighting of each event's user, item and attributes (frequency filter; creates admitted rows)."""
        self.users.lookup(user_keys, now)
        self.items.lookup(item_keys, now)
        self.rank_ids.lookup(np.concatenate([user_keys, item_keys]), now)
        attrs = np.concatenate(
            [self.features.user_attributes(user_keys).ravel(), self.features.item_attributes(item_keys).ravel()]
        )
        if (attrs != 0).any():
            self.rank_attrs.lookup(attrs[attrs != 0], now)

    def retrieval_step(self, user_keys: np.ndarray, item_keys: np.ndarray, now: float, learn: bool = True) -> float:
        """One in-batch softmax step on positive pairs; returns the mean loss (NaN under 2 pairs)."""
        if len(user_keys) < 2:
            return float("nan")
        history = self.features.histories(user_keys)
        sampled = self.catalog.sample(self.config.retrieval_negatives, uniform_share=1.0)
        users = _Rows(self.users, user_keys)
        items = _Rows(self.items, np.concatenate([item_keys, sampled, history.ravel()]))
        item_rows = items.gather()
        n, m = len(item_keys), len(sampled)
        user_vecs = self._user_tower(users.gather(), item_rows[n + m :].view(*history.shape, -1), history)
        # log of each item's expected count among the negatives: n draws by popularity, m uniform draws
        log_q = torch.from_numpy(np.log(n * self.catalog.share(item_keys)).astype(np.float32))
        sampled_log_q = torch.full((m,), float(np.log(max(m, 1) / max(len(self.catalog), 1))))
        loss = in_batch_softmax_loss(
            self.two_tower.encode_users(user_vecs),
            self.two_tower.encode_items(item_rows[:n]),
            item_keys,
            log_q,
            user_keys,
            sampled=(self.two_tower.encode_items(item_rows[n : n + m]), sampled, sampled_log_q),
        )
        if learn:
            loss.backward()
            users.step(now)
            items.step(now)
        return float(loss.item()) / len(user_keys)

    def serving_users(self, delta: TableDelta) -> TableDelta:
        """The user rows serving searches with: each changed user's tower output (id row + history)."""
        if not len(delta.keys):
            return delta
        history = self.features.histories(delta.keys)
        history_rows = torch.from_numpy(self.items.get(history.ravel())[0]).view(*history.shape, -1)
        with torch.no_grad():
            vectors = self._user_tower(torch.from_numpy(delta.rows), history_rows, history).numpy()
        return TableDelta(delta.table, delta.keys, vectors, delta.evicted, delta.version)

    def _user_tower(self, user_rows: torch.Tensor, history_rows: torch.Tensor, history: np.ndarray) -> torch.Tensor:
        """The user's id row plus the mean of its history items' rows (bias column dropped): [n, dim]."""
        mask = torch.from_numpy(history != 0).to(user_rows.dtype).unsqueeze(-1)  # [n, h, 1]
        pooled = (history_rows[..., : self.config.dim] * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return user_rows + pooled

    def rank_logits(
        self, user_keys: np.ndarray, item_keys: np.ndarray, f: Features
    ) -> tuple[torch.Tensor, list[_Rows]]:
        """Ranker logits [n] for aligned pairs, and the row sets that feed them (for the backward step)."""
        ids = _Rows(self.rank_ids, np.concatenate([user_keys, item_keys, f.history.ravel()]))
        attrs = _Rows(self.rank_attrs, np.concatenate([f.user_attrs.ravel(), f.item_attrs.ravel()]))
        n = len(user_keys)
        id_rows, attr_rows = ids.gather(), attrs.gather()
        split = n * f.user_attrs.shape[1]
        logits = self.ranker(
            id_rows[:n],
            id_rows[n : 2 * n],
            attr_rows[:split].view(n, f.user_attrs.shape[1], -1),
            torch.from_numpy(f.user_attrs != 0),
            attr_rows[split:].view(n, f.item_attrs.shape[1], -1),
            torch.from_numpy(f.item_attrs != 0),
            id_rows[2 * n :].view(n, f.history.shape[1], -1),
            torch.from_numpy(f.history != 0),
            self._item_counts(item_keys),
        )
        return logits, [ids, attrs]

    def _item_counts(self, item_keys: np.ndarray) -> torch.Tensor:
        """The ranker's dense features: log(1 + trending count), log(1 + all-time count) per item: [n, 2]."""
        trending, total = self.catalog.counts(item_keys)
        return torch.from_numpy(np.log1p(np.stack([trending, total], axis=1)).astype(np.float32))

    def ranking_step(
        self, user_keys: np.ndarray, item_keys: np.ndarray, labels: np.ndarray, now: float, learn: bool = True
    ) -> RankingBatch:
        """Score labelled pairs (progressive: before the step), then one BCE step if `learn`."""
        f = self.features.batch(user_keys, item_keys)
        logits, rows = self.rank_logits(user_keys, item_keys, f)
        probs = torch.sigmoid(logits).detach().numpy()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.from_numpy(labels), reduction="sum")
        if learn:
            self.dense_optimizer.zero_grad()
            loss.backward()
            for r in rows:
                r.step(now)
            for p in self.ranker.parameters():  # dense: mean over the batch, as Adam expects
                if p.grad is not None:
                    p.grad /= len(labels)
            self.dense_optimizer.step()
        return RankingBatch(probs, float(loss.item()) / len(labels))

    @torch.no_grad()
    def recommend(
        self, user_keys: np.ndarray, k: int, exclude: list[set[int]], candidates: int = 100, mode: str = "ranked"
    ) -> list[np.ndarray]:
        """Top-k item keys per user, leaving out `exclude`, as serving would order them (for evaluation).

        "ranked": the two-tower's best `candidates` over every known item plus the `candidates`
        trending ones, ordered by the ranker; users the model knows nothing of (no row, no
        history) get the trending list. "two_tower": the two-tower's own top k.
        "trending": the trending list for everyone.
        """
        trending = self.catalog.popular(candidates + max((len(s) for s in exclude), default=0))[0]
        trending_lists = [np.array([i for i in trending.tolist() if i not in s][:k], np.uint64) for s in exclude]
        if mode == "trending":
            return trending_lists
        items = self.catalog.all_items()
        item_vecs = torch.from_numpy(self.items.get(items)[0])  # [m, dim + 1]
        history = self.features.histories(user_keys)
        history_rows = torch.from_numpy(self.items.get(history.ravel())[0]).view(*history.shape, -1)
        user_rows = torch.from_numpy(self.users.get(user_keys)[0])
        user_vecs = self.two_tower.encode_users(self._user_tower(user_rows, history_rows, history))  # [u, dim + 1]
        scores = (user_vecs @ item_vecs.T).numpy()  # [u, m]
        seen_keys = np.fromiter((key for s in exclude for key in s), dtype=np.uint64)
        seen_rows = np.repeat(np.arange(len(exclude)), [len(s) for s in exclude])
        seen_cols, known = _columns(items, seen_keys)
        scores[seen_rows[known], seen_cols[known]] = -np.inf
        if mode == "two_tower":
            return [items[t] for t in np.argsort(-scores, axis=1)[:, :k]]
        trending_cols, known = _columns(items, trending[:candidates])
        trending_cols = trending_cols[known]
        scores[:, trending_cols] = np.where(np.isfinite(scores[:, trending_cols]), np.inf, -np.inf)
        top = np.argsort(-scores, axis=1)[:, : candidates + len(trending_cols)]  # [u, c]
        cand = items[top]
        c = cand.shape[1]
        u = np.repeat(user_keys, c)
        # per-user features once, repeated over that user's candidates
        f = Features(
            np.repeat(self.features.user_attributes(user_keys), c, axis=0),
            self.features.item_attributes(cand.ravel()),
            np.repeat(history, c, axis=0),
        )
        logits, _ = self.rank_logits(u, cand.ravel(), f)
        # The ranker learned log(p(item | user) / q(item)) against sampled negatives q: add log q
        # back, and move from all-time to current popularity by log(trending / all-time count)
        # (constant factors change no user's order).
        log_q = np.log(self.catalog.negative_probability(cand.ravel(), self.config.uniform_negatives))
        trend, total = self.catalog.counts(cand.ravel())
        drift = np.log(trend + 1e-3) - np.log(total + 1e-3)
        logits = logits.numpy().reshape(cand.shape) + (log_q + drift).reshape(cand.shape)
        logits[np.take_along_axis(scores, top, 1) == -np.inf] = -np.inf  # excluded items stay out
        order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
        cold = ~self.users.get(user_keys)[1] & (history == 0).all(axis=1)
        return [trending_lists[r] if cold[r] else c[o] for r, (c, o) in enumerate(zip(cand, order, strict=True))]

    def drain_unserved(self) -> None:
        """Drop the ranking tables' deltas (not synced to serving yet) so their change logs stay empty."""
        self.rank_ids.drain_delta()
        self.rank_attrs.drain_delta()
