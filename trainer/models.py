"""The two models the trainer learns online, over tables of one embedding store.

- Retrieval: `TwoTower` on tables "user" and "item" (what serving searches with Faiss), trained
  on positive pairs with in-batch sampled softmax and logQ correction.
- Ranking: `DinDcnRanker` on tables "rank_id" (user and item ids; history items share the item
  rows) and "rank_attr" (attribute values), trained with BCE on labelled examples; its dense
  parameters use Adam.
- Taste profiles: `TasteProfiles` counts the attributes of each user's picks and everyone's;
  a candidate's attribute lift (`ranking.profile`) is a feature of the final blend.
- Co-visitation: `CoVisitation` counts which items users pick close together (per event,
  decayed); its neighbour lists are a candidate source and a feature of the final blend.

Sparse gradients go back to the store per distinct key (autograd sums repeated keys); every
loss is a sum over examples, so a row gets the same step whatever the batch size.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from embedding_store import EmbeddingTable, Store, TableConfig, TableDelta
from embedding_store.dense import DenseParameters, LocalDense
from embedding_store.row_map import RowMap
from ranking.blend import ScoreBlend
from ranking.din_dcn import DinDcnRanker
from ranking.profile import ATTRIBUTE_ITEMS
from ranking.scorer import (
    DENSE_FEATURES,
    ITEM_ATTRS,
    ITEM_COUNTS,
    RANK_ATTR_TABLE,
    RANK_ID_TABLE,
    USER_ATTRS,
    USER_HISTORY,
    Candidates,
    CandidateScorer,
    attribute_affinity,
    dense_features,
    ranker_logits,
)
from retrieval.candidates import distinct, interleave
from retrieval.covisit import COVISIT_ITEMS, COVISIT_SCORES, CoVisitation, HistoryScores
from retrieval.two_tower import TwoTower, in_batch_softmax_loss
from trainer.catalog import ItemCatalog
from trainer.config import TrainerConfig
from trainer.features import Features, FeatureState
from trainer.profiles import TasteProfiles

TABLES = ("user", "item", RANK_ID_TABLE, RANK_ATTR_TABLE)
USER_TABLES = ("user", RANK_ID_TABLE)
"""The tables that hold rows keyed by a user's key (what erasing a user deletes from)."""


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


class DenseModule:
    """A torch module whose parameters are stepped where they live (`embedding_store.dense`):
    after a backward pass, `step()` sends the gradient and loads the parameters it gets back.

    Args:
        name: the vector's name in `dense`.
        module: holds the parameters (its initial values register the vector if it is new).
        dense: the backend (in process, or the first store shard's service).
        learning_rate: Adam step size of a vector this registers.
    """

    def __init__(self, name: str, module: torch.nn.Module, dense: DenseParameters, learning_rate: float) -> None:
        self.name = name
        self.module = module
        self.learning_rate = learning_rate
        self._dense = dense
        self.version = 0  # Adam steps of the vector when it was last loaded, by every worker
        self.pull()

    def _params(self) -> list[torch.nn.Parameter]:
        return list(self.module.parameters())

    def pull(self) -> None:
        """Load the current values (after a restore, or to start from another worker's)."""
        initial = torch.nn.utils.parameters_to_vector(self._params()).detach().numpy()
        self._load(self._dense.register(self.name, initial, self.learning_rate))

    def _load(self, values: np.ndarray) -> None:
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(torch.from_numpy(values.copy()), self._params())

    def zero_grad(self) -> None:
        self.module.zero_grad(set_to_none=True)

    def step(self) -> None:
        grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self._params()])
        values, self.version = self._dense.step(self.name, grad.numpy())
        self._load(values)


class OnlineModels:
    """Retrieval and ranking models with their tables and optimizer; see the module docstring.

    Args:
        config: trainer settings (dims, learning rates).
        store: holds the `TABLES`.
        catalog: item popularity (logQ correction) and the item list (evaluation).
        features: attributes and histories.
        dense: where the ranker's and the blend's dense parameters live (default: this process).
    """

    def __init__(
        self,
        config: TrainerConfig,
        store: Store,
        catalog: ItemCatalog,
        features: FeatureState,
        dense: DenseParameters | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.catalog = catalog
        self.features = features
        self.two_tower = TwoTower(config.dim)
        torch.manual_seed(config.seed)
        self.ranker = DinDcnRanker(config.rank_dim, dense_features=DENSE_FEATURES)
        self.blend = ScoreBlend(config.return_blend, config.session_gap_s)
        self.dense = dense or LocalDense()
        self.dense_ranker = DenseModule("ranker", self.ranker, self.dense, config.dense_learning_rate)
        # "blend" held the four weights of the blend before it had five features: a new name,
        # so that a checkpoint or a store shard holding that vector starts this one afresh
        self.dense_blend = DenseModule("blend5", self.blend, self.dense, 0.01)
        self._rng = np.random.default_rng(config.seed)
        self.users, self.items = store.table("user"), store.table("item")
        self.rank_ids, self.rank_attrs = store.table("rank_id"), store.table("rank_attr")
        self._next_covisit_drain = 0.0  # monotonic time the next sync may drain neighbour lists
        self._next_attribute_items = 0.0  # monotonic time the next sync may publish `attribute_items`
        self._published_attribute_items = RowMap(config.attribute_items, np.uint64)  # what serving holds
        self.covisit = CoVisitation(
            window=config.covisit_window,
            neighbours=config.covisit_neighbours,
            half_life_s=config.covisit_half_life_s,
            max_users=config.max_feature_entities,
            max_items=config.covisit_max_items,
        )
        self.profiles = TasteProfiles(config.profile_slots, config.max_feature_entities)

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

    def content_rows(self, item_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Retrieval rows for items that have attributes but no trained row (catalogued before
        their first event), so that the index finds them for the users whose taste they fit:
        the mean, over the item's attribute keys, of the mean row of the `content_basis` most
        trending items that carry that key (bias column included: a new item starts as a
        typical item of its kind). Returns (keys that got a row, float32 rows); an item none
        of whose attributes a basis item shares gets none."""
        none = np.zeros(0, np.uint64), np.zeros((0, self.two_tower.item_dim), np.float32)
        attrs = self.features.item_attributes(np.asarray(item_keys, np.uint64))
        basis = self.catalog.popular(self.config.content_basis)[0]
        if not len(item_keys) or not attrs.any() or not len(basis):
            return none
        rows, found = self.items.get(basis)
        basis_rows, basis_attrs = rows[found].astype(np.float64), self.features.item_attributes(basis[found])
        wanted = np.unique(attrs[attrs != 0])
        # every (basis item, attribute value) pair whose value is wanted, summed per value
        owner = np.repeat(np.arange(len(basis_attrs)), basis_attrs.shape[1])
        flat = basis_attrs.ravel()
        pick = np.isin(flat, wanted)
        slot = np.searchsorted(wanted, flat[pick])
        sums = np.zeros((len(wanted), rows.shape[1]))
        np.add.at(sums, slot, basis_rows[owner[pick]])
        counts = np.bincount(slot, minlength=len(wanted)).astype(np.float64)
        at = np.searchsorted(wanted, attrs)  # [n, b] each attribute's prototype (padding: masked)
        usable = (attrs != 0) & (counts[np.minimum(at, len(wanted) - 1)] > 0)
        prototypes = sums / np.maximum(counts, 1)[:, None]
        weight = usable.sum(axis=1)
        vectors = (prototypes[np.minimum(at, len(wanted) - 1)] * usable[..., None]).sum(axis=1)
        got = weight > 0
        if not got.any():
            return none
        return np.asarray(item_keys, np.uint64)[got], (vectors[got] / weight[got, None]).astype(np.float32)

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
        self, user_keys: np.ndarray, item_keys: np.ndarray, f: Features, retrieval: np.ndarray
    ) -> tuple[torch.Tensor, list[_Rows]]:
        """Ranker logits [n] for aligned pairs with their two-tower scores [n], and the row sets
        that feed them (for the backward step)."""
        ids = _Rows(self.rank_ids, np.concatenate([user_keys, item_keys, f.history.ravel()]))
        attrs = _Rows(self.rank_attrs, np.concatenate([f.user_attrs.ravel(), f.item_attrs.ravel()]))
        trending, total = self.catalog.counts(item_keys)
        logits = ranker_logits(  # each pair as one user with one item
            self.ranker,
            ids.gather(),
            attrs.gather(),
            f.user_attrs,
            f.item_attrs,
            f.history,
            dense_features(trending, total, retrieval),
        )[:, 0]
        return logits, [ids, attrs]

    def ranking_step(
        self,
        user_keys: np.ndarray,
        item_keys: np.ndarray,
        labels: np.ndarray,
        now: float,
        learn: bool = True,
    ) -> RankingBatch:
        """Score labelled pairs (progressive: before the step), then one BCE step if `learn`.

        Run it before the batch's `retrieval_step`: the pairs' two-tower scores, one of the
        ranker's inputs, must not yet have learned from these very pairs.
        """
        f = self.features.batch(user_keys, item_keys)
        logits, rows = self.rank_logits(user_keys, item_keys, f, self._pair_scores(user_keys, item_keys, f.history))
        probs = torch.sigmoid(logits).detach().numpy()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.from_numpy(labels), reduction="sum")
        if learn:
            self.dense_ranker.zero_grad()
            loss.backward()
            for r in rows:
                r.step(now)
            for p in self.ranker.parameters():  # dense: mean over the batch, as Adam expects
                if p.grad is not None:
                    p.grad /= len(labels)
            self.dense_ranker.step()
        return RankingBatch(probs, float(loss.item()) / len(labels))

    def blend_step(
        self, user_keys: np.ndarray, item_keys: np.ndarray, times_s: np.ndarray, learn: bool = True
    ) -> float:
        """Score positive pairs (at model times `times_s`) against the candidates serving would
        offer and train the blend's learned weights, those of users in a session.

        Up to `blend_users` of the pairs whose users are in a session (their previous positive
        less than `session_gap_s` before; or none), each a softmax over its user's candidates: the
        `blend_candidates` trending items and as many co-visited ones (`HistoryScores` of the
        user's recent items), the user's recent items left out, the pair's item as the target;
        pairs whose item is not among them are skipped (serving could not rank it). Call it
        before the pairs are counted in the catalogue, the co-visitation and the taste
        profiles, so an item's own event lifts neither its trending count, nor its
        co-visitation score, nor its attribute lift. Returns the mean
        cross-entropy (NaN when there is nothing to score).
        """
        width = self.config.blend_candidates
        popular = self.catalog.popular(width)[0]
        in_session = np.flatnonzero(
            ~self.blend.is_returning(times_s - self._previous_positive(user_keys, times_s)).numpy()
        )
        n = min(len(in_session), self.config.blend_users)
        if n == 0 or not len(popular):
            return float("nan")
        pick = in_session[np.sort(self._rng.choice(len(in_session), n, replace=False))]
        users, targets = user_keys[pick], item_keys[pick]
        history = self.features.histories(users)
        covisit = HistoryScores(self.covisit.neighbour_rows, history)
        rows, positives, kept = [], [], []
        for r in range(n):
            cand = distinct(np.concatenate([popular, covisit.top(r, width)[0]]))
            at = np.flatnonzero(cand == targets[r])
            if len(at):
                rows.append(cand)
                positives.append(int(at[0]))
                kept.append(r)
        if not kept:
            return float("nan")
        users, history = users[kept], history[kept]
        cand = np.zeros((len(kept), max(len(c) for c in rows)), np.uint64)  # padded with key 0, masked below
        valid = np.arange(cand.shape[1]) < np.array([len(c) for c in rows])[:, None]
        cand[valid] = np.concatenate(rows)
        valid &= ~(cand[:, :, None] == history[:, None, :]).any(axis=2)  # what serving would exclude
        positive = np.array(positives)
        valid[np.arange(len(kept)), positive] = True
        counts, totals = (c.reshape(cand.shape) for c in self.catalog.counts(cand.ravel()))
        with torch.no_grad():
            item_rows = torch.from_numpy(self.items.get(cand.ravel())[0]).view(*cand.shape, -1)
            retrieval = torch.einsum("ucd,ud->uc", item_rows, self.user_vectors(users, history))
        co = np.stack([covisit.of(r, cand[j]) for j, r in enumerate(kept)])
        cand_attrs = self.features.item_attributes(cand.ravel())
        affinity = attribute_affinity(self._history_attributes(history), cand_attrs.reshape(*cand.shape, -1))
        lift = self.profiles.profiles(users).lift(cand_attrs.reshape(*cand.shape, -1))
        batch = Candidates(
            users,
            self.features.user_attributes(users),
            history,
            cand,
            cand_attrs,
            counts,
            totals,
            retrieval.numpy(),
            co,
            affinity,
            lift,
        )
        logits = CandidateScorer(self.ranker, self.blend).logits(self.rank_ids, self.rank_attrs, batch)
        loss = self.blend.loss(batch.features(logits), torch.from_numpy(valid), torch.from_numpy(positive))
        if learn:
            self.dense_blend.zero_grad()
            (loss / len(kept)).backward()
            self.dense_blend.step()
        return float(loss.item()) / len(kept)

    def attribute_items(self) -> TableDelta:
        """`ranking.profile.ATTRIBUTE_ITEMS`: each attribute's `attribute_items` most trending
        items that carry it (items with no positive left out), 0-padded rows."""
        width = self.config.attribute_items
        items, attrs = self.features.item_attribute_pairs()
        trending = self.catalog.counts(items)[0]
        counted = trending > 0
        items, attrs, trending = items[counted], attrs[counted], trending[counted]
        order = np.lexsort((-trending, attrs))  # by attribute, then most trending first
        items, attrs = items[order], attrs[order]
        keys, start = np.unique(attrs, return_index=True)
        rank = np.arange(len(attrs)) - np.repeat(start, np.diff(np.append(start, len(attrs))))
        top = rank < width
        rows = np.zeros((len(keys), width), np.uint64)
        rows[np.searchsorted(keys, attrs[top]), rank[top]] = items[top]
        return TableDelta(ATTRIBUTE_ITEMS, keys, rows)

    def _previous_positive(self, user_keys: np.ndarray, times_s: np.ndarray) -> np.ndarray:
        """Model time [n] of each positive's user's positive before it (NaN: none), for positives
        in order: the one before it in the same batch, else the last one counted."""
        previous = self.profiles.profiles(user_keys).last_s
        order = np.argsort(user_keys, kind="stable")
        again = np.flatnonzero(user_keys[order][1:] == user_keys[order][:-1]) + 1  # not a user's first here
        previous[order[again]] = np.asarray(times_s, np.float64)[order[again - 1]]
        return previous

    def _history_attributes(self, history: np.ndarray) -> np.ndarray:
        """uint64 [u, h, a] attribute keys of the history items [u, h] (as serving's table, `max_attributes` wide)."""
        width = self.features.config.max_attributes
        return self.features.item_attributes(history.ravel(), width).reshape(*history.shape, width)

    def user_vectors(self, user_keys: np.ndarray, history: np.ndarray) -> torch.Tensor:
        """The two-tower's query vectors [u, dim + 1] of users with their histories [u, h]."""
        history_rows = torch.from_numpy(self.items.get(history.ravel())[0]).view(*history.shape, -1)
        user_rows = torch.from_numpy(self.users.get(user_keys)[0])
        return self.two_tower.encode_users(self._user_tower(user_rows, history_rows, history))

    def _pair_scores(self, user_keys: np.ndarray, item_keys: np.ndarray, history: np.ndarray) -> np.ndarray:
        """Two-tower scores [n] of aligned (user, item) pairs, the users with their histories [n, h]."""
        with torch.no_grad():
            users = self.user_vectors(user_keys, history)
            return (users * torch.from_numpy(self.items.get(item_keys)[0])).sum(-1).numpy()

    @torch.no_grad()
    def recommend(
        self, user_keys: np.ndarray, k: int, exclude: list[set[int]], candidates: int = 100, mode: str = "ranked"
    ) -> list[np.ndarray]:
        """Top-k item keys per user, leaving out `exclude`, as serving would order them (for evaluation).

        "ranked": serving's candidates — each user's best `candidates` unseen items of the
        two-tower (exact, over every known item), of co-visitation, of their taste attributes
        (`ranking.profile.Profiles.taste_items`) and of the trending list,
        taken in turn up to 2 x `candidates` (`retrieval.candidates.interleave`, as
        `services.serving` merges them) — ordered by `CandidateScorer` (ranker, then blend);
        users the model knows nothing of (no row, no history) get the trending list.
        "two_tower": the two-tower's own top k. "trending": the trending list for everyone.
        """
        trending = self.catalog.popular(candidates + max((len(s) for s in exclude), default=0))[0]
        unseen_trending = [np.array([i for i in trending.tolist() if i not in s], np.uint64) for s in exclude]
        trending_lists = [t[:k] for t in unseen_trending]
        if mode == "trending":
            return trending_lists
        items = self.catalog.all_items()
        item_vecs = torch.from_numpy(self.items.get(items)[0])  # [m, dim + 1]
        history = self.features.histories(user_keys)
        scores = (self.user_vectors(user_keys, history) @ item_vecs.T).numpy()  # [u, m]
        retrieval = scores.copy()
        seen_keys = np.fromiter((key for s in exclude for key in s), dtype=np.uint64)
        seen_rows = np.repeat(np.arange(len(exclude)), [len(s) for s in exclude])
        seen_cols, known = _columns(items, seen_keys)
        scores[seen_rows[known], seen_cols[known]] = -np.inf
        if mode == "two_tower":
            return [items[t] for t in np.argsort(-scores, axis=1)[:, :k]]
        best = np.argsort(-scores, axis=1)[:, :candidates]  # [u, candidates]
        has_row = self.users.get(user_keys)[1]  # as in serving, a user without a row searches nothing
        covisit = HistoryScores(self.covisit.neighbour_rows, history)
        profiles = self.profiles.profiles(user_keys)
        by_attribute = self.attribute_items()
        lookup = RowMap(by_attribute.rows.shape[1], np.uint64)
        lookup.upsert(by_attribute.keys, by_attribute.rows)
        tastes = profiles.taste_items(lambda attrs: lookup.get(attrs)[0])
        lists = []
        for r, left_out in enumerate(exclude):
            ann = items[best[r][np.isfinite(scores[r, best[r]])]] if has_row[r] else items[:0]
            near = covisit.top(r, candidates + len(left_out))[0].tolist()
            covisited = np.fromiter((i for i in near if i not in left_out), dtype=np.uint64)[:candidates]
            taste = np.fromiter((i for i in tastes[r].tolist() if i not in left_out), dtype=np.uint64)[:candidates]
            sources = [ann, covisited, taste, unseen_trending[r][:candidates]]
            lists.append(interleave(sources, 2 * candidates))
        width = max(1, *(len(c) for c in lists))
        cand = np.zeros((len(lists), width), np.uint64)  # [u, c], padded past each user's list
        valid = np.zeros(cand.shape, bool)
        for r, c in enumerate(lists):
            cand[r, : len(c)], valid[r, : len(c)] = c, True
        cols, in_catalog = _columns(items, cand.ravel())
        rows = np.repeat(np.arange(len(lists)), width)
        pair_scores = np.where(in_catalog, retrieval[rows, cols], 0.0).reshape(cand.shape).astype(np.float32)
        counts, totals = self.catalog.counts(cand.ravel())
        cand_attrs = self.features.item_attributes(cand.ravel())
        batch = Candidates(
            user_keys,
            self.features.user_attributes(user_keys),
            history,
            cand,
            cand_attrs,
            counts.reshape(cand.shape),
            totals.reshape(cand.shape),
            pair_scores,
            covisit.matrix(cand),
            attribute_affinity(self._history_attributes(history), cand_attrs.reshape(*cand.shape, -1)),
            profiles.lift(cand_attrs.reshape(*cand.shape, -1)),
            self.catalog.clock_s - profiles.last_s,
        )
        logits = CandidateScorer(self.ranker, self.blend).score(self.rank_ids, self.rank_attrs, batch)
        logits[~valid] = -np.inf  # the padding never ranks
        order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
        cold = ~has_row & (history == 0).all(axis=1)
        return [
            trending_lists[r] if cold[r] else c[o][valid[r, o]]
            for r, (c, o) in enumerate(zip(cand, order, strict=True))
        ]

    def state_dict(self) -> dict[str, Any]:
        """Dense parameters with their optimizer state (in-process ones; a remote dense
        service is saved with its store shard) and the sampling generator (checkpoints; the
        sparse rows are the store's)."""
        return {
            "dense": self.dense.state_dict(),
            "rng": self._rng.bit_generator.state,
            "covisit": self.covisit.state_dict(),
            "profiles": self.profiles.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`, after the store (and a remote dense service) was restored."""
        self.dense.load_state_dict(state["dense"])
        self.dense_ranker.pull()
        self.dense_blend.pull()
        self._rng.bit_generator.state = state["rng"]
        if "covisit" in state:  # checkpoints written before co-visitation have none
            self.covisit.load_state_dict(state["covisit"])
        if "profiles" in state:  # nor those written before taste profiles
            self.profiles.load_state_dict(state["profiles"])

    def dense_state(self) -> dict[str, np.ndarray]:
        """Copies of the ranker's and the blend's dense parameters, for serving."""
        return CandidateScorer.dense_state(self.ranker, self.blend)

    def ranking_deltas(self) -> Iterator[TableDelta]:
        """What changed for the ranking service since the previous call, one table at a time
        (a drain that fails leaves those before it with the caller): the ranker's rows, the
        attributes and histories of changed users and items, changed item counts and changed
        co-visitation neighbour lists (those at most once per `sparse_sync_interval_s`), the
        changed taste profiles and population attribute counts, and the changed lists of each
        attribute's most trending items (those at most once per `attribute_items_interval_s`;
        `ranking.profile`)."""
        yield self.rank_ids.drain_delta()
        yield self.rank_attrs.drain_delta()
        users, items = self.features.drain_changed()
        width = self.features.config.max_attributes
        count_keys, counts = self.catalog.drain_counts()
        yield TableDelta(USER_ATTRS, users, self.features.user_attributes(users, width))
        yield TableDelta(USER_HISTORY, users, self.features.histories(users, self.config.history_length))
        yield TableDelta(ITEM_ATTRS, items, self.features.item_attributes(items, width))
        yield TableDelta(ITEM_COUNTS, count_keys, counts)
        yield from self.profiles.drain()
        # neighbour lists are recomputed per changed item (the costliest part of a sync), so at
        # most once per `sparse_sync_interval_s` however often rows are published: a user's
        # new history goes out with every sync, the lists of the items in it change slowly
        if time.monotonic() >= self._next_covisit_drain:
            self._next_covisit_drain = time.monotonic() + self.config.sparse_sync_interval_s
            items, neighbours, scores, forgotten = self.covisit.drain()
            yield TableDelta(COVISIT_ITEMS, items, neighbours, forgotten)
            yield TableDelta(COVISIT_SCORES, items, scores, forgotten)
        # every attribute's list is recomputed (a sort of every (item, attribute) pair: a few ms
        # for MovieLens, about a second for 10M pairs), so at most once per
        # `attribute_items_interval_s`: what trends within an attribute changes slowly
        if time.monotonic() >= self._next_attribute_items:
            self._next_attribute_items = time.monotonic() + self.config.attribute_items_interval_s
            yield self._changed_attribute_items()

    def _changed_attribute_items(self) -> TableDelta:
        """`attribute_items()` less the rows serving holds already (and the attributes no item
        carries any more, as evicted): a list that did not change is not sent again."""
        now, published = self.attribute_items(), self._published_attribute_items
        before, found = published.get(now.keys)
        changed = ~found | (before != now.rows).any(axis=1)
        gone = np.setdiff1d(published.items()[0], now.keys)
        published.delete(gone)
        published.upsert(now.keys[changed], now.rows[changed])
        return TableDelta(ATTRIBUTE_ITEMS, now.keys[changed], now.rows[changed], gone)
