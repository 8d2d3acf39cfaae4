"""A serving replica: follows the serving store version by version and answers requests."""

from __future__ import annotations

import bisect
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from embedding_store.keys import feature_key, feature_keys
from embedding_store.row_map import RowMap
from ranking.base import Ranker
from ranking.dot import DotProductRanker
from ranking.explore import ITEM_FEEDBACK, MAX_IMPRESSIONS, thompson
from ranking.profile import (
    ATTRIBUTE_COUNTS,
    ATTRIBUTE_ITEMS,
    POPULATION_KEY,
    USER_PROFILE,
    USER_PROFILE_COUNTS,
    Profiles,
    attribute_shares,
)
from ranking.scorer import (
    ITEM_ATTRS,
    ITEM_COUNTS,
    RANK_ATTR_TABLE,
    RANK_ID_TABLE,
    USER_ATTRS,
    USER_HISTORY,
    Candidates,
    CandidateScorer,
    attribute_affinity,
)
from retrieval.candidates import distinct, interleave
from retrieval.covisit import COVISIT_ITEMS, COVISIT_SCORES, HistoryScores, covisit_lookup
from retrieval.index import IndexConfig, ItemIndex, top_k
from retrieval.two_tower import TwoTower
from services.errors import NotFound
from services.serving_store.base import ServingStore, VersionGap
from services.serving_store.state import ServingState
from trainer.catalog import ItemCatalog
from trainer.items import ItemRecord, UserRecord
from trainer.sync import SyncMessage

log = logging.getLogger(__name__)
FILTER_EXACT_ITEMS = 20_000
"""A filtered request scores up to this many allowed items exactly, not through the index."""
FILTER_OVERFETCH = 8
"""A filter that allows more items searches the index this many times deeper than it keeps."""
ALLOWED_CACHE = 256
"""Filters whose allowed items a replica keeps computed (until the catalogue changes)."""
DIVERSITY_POOL = 4
"""A request with `diversity` picks its k items from the ranker's top DIVERSITY_POOL x k."""
"""A filter that allows more items searches the index this many times deeper than it keeps."""


@dataclass(frozen=True)
class ScoredItem:
    item_id: str
    score: float
    reason: str = ""  # the source that put it there: "covisit", "taste", "ann", "trending", "content", ...


@dataclass(frozen=True)
class Recommendation:
    """One answer: its id (for impressions), the model version it used, the items."""

    request_id: str
    model_version: int
    items: list[ScoredItem]
    next_page_token: str = ""  # set by the gateway: the token of the list's next page
    arm: str = ""  # set by the gateway: the experiment arm that answered ("" without one)


@dataclass(frozen=True)
class ServingStatus:
    """What /readyz reports.

    Args:
        ready: the model is loaded (bootstrapped from the serving store).
        model_version: the version answering calls.
        store_age_s: seconds since the serving store last answered (a replica keeps serving its
            last version while the store is down; this says how stale that may be). NaN before
            the first answer.
    """

    ready: bool
    model_version: int
    store_age_s: float


class Recommender(Protocol):
    """What a gateway answers recommendation calls with: a local `ServingReplica`, or the
    remote retrieval and ranking services (`services.stages.RemoteStages`)."""

    def recommend_batch(self, requests: Sequence[Request]) -> list[Recommendation]: ...

    def similar_items(self, item_id: str, k: int) -> tuple[int, list[ScoredItem]]: ...

    def catalogue_item(self, item_id: str) -> tuple[int, ItemRecord | None]: ...

    def catalogue_page(self, after: str, limit: int) -> list[ItemRecord]: ...

    def user_record(self, user_id: str) -> tuple[int, UserRecord | None]: ...

    def status(self) -> ServingStatus: ...


class ServingReplica:
    """Apply versions from a serving store to local state and a Faiss index; serve from them.

    Each version is applied under the replica's lock, and requests read under the same lock,
    so no request ever sees half a version.

    One request: user vector -> top `candidates` from the item index, merged with the top
    `candidates` co-visited items of the user's recent items (`retrieval.covisit`: a user's
    first events drive it before the user has a row) and the top `candidates` trending items
    (seen items removed when asked), taken in turn up to 2 x `candidates` -> the DIN + DCN-v2
    ranker and its blend with trending counts and co-visitation scores (`ranking.scorer`, the
    same code the trainer evaluates with) order them -> top k. Until the first dense
    parameters arrive, candidates from the index are ordered by `ranker` (inner product by
    default). Users the model knows nothing of (no vector, no history), and any shortfall,
    get the trending items the trainer published.

    Args:
        store: where versions come from.
        ranker: orders candidates while no dense parameters have arrived.
        candidates: how many items each source (index, co-visitation, trending) hands to ranking.
        on_apply: called with each applied message (metrics).
        index: the kind of item index (`retrieval.index`).
    """

    def __init__(
        self,
        store: ServingStore,
        ranker: Ranker | None = None,
        candidates: int = 100,
        on_apply: Callable[[SyncMessage], None] | None = None,
        index: IndexConfig | None = None,
    ) -> None:
        self._index_config = index or IndexConfig()
        self._store = store
        self._ranker = ranker or DotProductRanker()
        self._candidates_per_source = candidates
        self._on_apply = on_apply
        self._state = ServingState(dtype=store.row_dtype)
        self._index: ItemIndex | None = None
        self._scorer: CandidateScorer | None = None
        self._lock = threading.RLock()
        self.bootstrapped = threading.Event()
        self._store_seen_s = 0.0  # unix time the store last answered a read
        self._blocked_indexed = np.zeros(0, np.uint64)  # the blocked items the index leaves out
        self._rng = np.random.default_rng()  # exploration's draws
        # (catalogue version, categories, attributes) -> the filter's allowed keys
        self._allowed_cache: dict[tuple[int, tuple[str, ...], tuple[tuple[str, str], ...]], np.ndarray] = {}
        self._rng_lock = threading.Lock()
        self._explore_cache: tuple[tuple[int, int], np.ndarray, np.ndarray] | None = None  # (versions, pool, rows)

    @property
    def version(self) -> int:
        return self._state.version

    def status(self) -> ServingStatus:
        age = time.time() - self._store_seen_s if self._store_seen_s else float("nan")
        return ServingStatus(self.bootstrapped.is_set(), self.version, age)

    def bootstrap(self) -> None:
        """Load the store's current state, replacing everything local."""
        self.apply(self._store.snapshot())
        self._store_seen_s = time.time()
        self.bootstrapped.set()

    def apply(self, message: SyncMessage) -> None:
        with self._lock:
            self._state.apply(message)
            if message.full:
                self._index = None
            items = self._state.items
            if items is not None:
                if self._index is None:
                    self._index = ItemIndex(items.dim, self._index_config)
                    keys, rows = items.items()
                    self._blocked_indexed = np.zeros(0, np.uint64)  # a new index holds every row
                else:
                    keys = message.items.keys
                    rows, _ = items.get(keys)
                    self._index.remove(message.items.evicted)
                self._index.upsert(keys, rows.astype(np.float32))
                self._index.remove(keys[np.isin(keys, self._blocked_indexed)])  # a blocked item's new row
                self._sync_blocked()
                self._index.publish()
            if message.dense:
                try:
                    self._scorer = CandidateScorer.from_dense(self._state.dense)
                except ValueError:  # keep ranking with the previous parameters
                    log.exception("version %d: unusable dense parameters", message.version)
            elif message.full:
                self._scorer = None
        if self._on_apply:
            self._on_apply(message)

    def wait_for_index(self) -> None:
        """Return once a running item-index rebuild has been swapped in (checks, benchmarks)."""
        index = self._index
        if index is not None:
            index.publish(wait=True)

    def snapshot(self) -> SyncMessage:
        """Everything this replica serves from, as one full message (for checks and debugging)."""
        with self._lock:
            return self._state.to_message()

    def catch_up(self, timeout_s: float = 0.0) -> int:
        """Apply every version the store has past ours; returns how many were applied."""
        if not self.bootstrapped.is_set():
            self.bootstrap()
        try:
            messages = self._store.read_since(self.version, timeout_s)
        except VersionGap as e:
            log.warning("%s; bootstrapping again", e)
            self.bootstrap()
            return 1
        self._store_seen_s = time.time()
        for message in messages:
            self.apply(message)
        return len(messages)

    def run(self, stop: threading.Event, poll_s: float = 0.5) -> None:
        """Tail the store until `stop` is set; store outages are retried."""
        while not stop.is_set():
            try:
                self.catch_up(timeout_s=poll_s)
            except Exception:
                log.exception("serving replica could not read the store; retrying")
                stop.wait(1.0)

    def recommend(self, user_id: str, k: int, exclude_seen: bool = True) -> Recommendation:
        """Top `k` items for `user_id` (trending items for a user the model has not seen)."""
        return self.recommend_batch([Request(user_id, k, exclude_seen)])[0]

    def recommend_batch(self, requests: Sequence[Request]) -> list[Recommendation]:
        """Answer several requests with one index search and one ranker forward pass, each
        as `recommend` would alone: the retrieval stage, then the ranking stage, on one
        version and one lookup of the users' rows."""
        with self._lock:
            batch = self._users_of(requests)
            return self._answers(batch, requests, self._candidates(batch))

    def candidates_batch(self, requests: Sequence[Request]) -> tuple[int, list[np.ndarray]]:
        """The retrieval stage: (model version, each request's candidate item keys). A user's
        candidates are the top `candidates` of the item index for the user's vector, the top
        `candidates` co-visited items of the user's recent items and the top `candidates`
        trending items, seen items removed when asked; none for a user the model knows nothing
        of."""
        with self._lock:
            return self._state.version, self._candidates(self._users_of(requests))

    def rank_batch(self, requests: Sequence[Request], candidates: Sequence[np.ndarray]) -> list[Recommendation]:
        """The ranking stage: order each request's candidates (uint64 keys, from
        `candidates_batch` here or on another replica) with one ranker forward pass, keep the
        top k, fill a shortfall with trending items. Seen items are removed again when asked
        (another replica's version may know fewer of them)."""
        with self._lock:
            batch = self._users_of(requests)
            cands = [batch.keep(i, np.asarray(c, np.uint64)) for i, c in enumerate(candidates)]
            return self._answers(batch, requests, cands)

    def _users_of(self, requests: Sequence[Request]) -> _Users:
        """What both stages need of the requests' users, looked up once (call under the lock)."""
        state = self._state
        self._sync_blocked()
        users = feature_keys("user", [r.user_id for r in requests])
        seen = [
            _left_out(state.seen.get(int(u)) if r.exclude_seen else None, r, self._excluded(r))
            for u, r in zip(users, requests, strict=True)
        ]
        allowed = [self._allowed(r) for r in requests]
        trending_only = [r.trending_only for r in requests]
        if state.users is None:
            vectors, found = np.zeros((len(users), 0), np.float32), np.zeros(len(users), bool)
        else:
            vectors, found = state.users.get(users)
        history = self._table_rows(USER_HISTORY, users)
        covisit = None
        if COVISIT_ITEMS in state.tables and COVISIT_SCORES in state.tables:
            covisit = HistoryScores(covisit_lookup(state.tables[COVISIT_ITEMS], state.tables[COVISIT_SCORES]), history)
        left_out = [np.unique(s) for s in seen]
        queries = TwoTower.user_queries(vectors)
        profiles = self._profiles(users) if ATTRIBUTE_ITEMS in state.tables else None
        by_attribute = state.tables.get(ATTRIBUTE_ITEMS)
        tastes = (
            [np.zeros(0, np.uint64)] * len(users)
            if profiles is None or by_attribute is None
            else profiles.taste_items(lambda attrs: by_attribute.get(attrs)[0])
        )
        return _Users(users, seen, found, queries, history, covisit, tastes, allowed, trending_only, left_out)

    def _excluded(self, request: Request) -> np.ndarray:
        """Keys of the items no list may hold now (hidden, deleted, expired: kept out of the
        index too) and of those in the request's excluded categories."""
        blocked = self._state.blocked
        if not request.exclude_categories:
            return blocked
        members = [self._state.by_category.get(c, set()) for c in request.exclude_categories]
        excluded = np.fromiter(set().union(*members), dtype=np.uint64)
        return np.concatenate([blocked, excluded])

    def _allowed(self, request: Request) -> np.ndarray | None:
        """Sorted keys of the catalogued items the request's categories and attributes allow
        (None: the request does not restrict them); cached per filter until the catalogue changes."""
        if not request.filtered:
            return None
        state = self._state
        key = (state.catalogue_version, request.categories, request.attributes)
        cached = self._allowed_cache.get(key)
        if cached is not None:
            return cached
        if len(self._allowed_cache) >= ALLOWED_CACHE or next(iter(self._allowed_cache), key)[0] != key[0]:
            self._allowed_cache.clear()
        if request.categories:
            keys: set[int] = set().union(*(state.by_category.get(c, set()) for c in request.categories))
        else:
            keys = {key for key, record in state.records.items() if not record.deleted}
        if request.attributes:
            wanted = request.attributes
            keys = {k for k in keys if all(state.records[k].attributes.get(a) == v for a, v in wanted)}
        allowed = self._allowed_cache[key] = np.sort(np.fromiter(keys, dtype=np.uint64, count=len(keys)))
        return allowed

    def _sync_blocked(self) -> None:
        """Bring the item index in line with the catalogue (call under the lock): items that
        became hidden, deleted or expired leave it, items un-hidden come back."""
        blocked = self._state.blocked_now()
        if blocked is self._blocked_indexed:
            return
        before, self._blocked_indexed = self._blocked_indexed, blocked
        if self._index is None or self._state.items is None:
            return
        self._index.remove(np.setdiff1d(blocked, before))
        back = np.setdiff1d(before, blocked)
        rows, found = self._state.items.get(back)
        if found.any():
            self._index.upsert(back[found], rows[found].astype(np.float32))
        self._index.publish()

    def _candidates(self, batch: _Users) -> list[np.ndarray]:
        state, none = self._state, np.zeros(0, np.uint64)
        out = [none] * len(batch.keys)
        if state.users is None or state.items is None or self._index is None:
            return out
        seen = batch.seen
        # a user without a row (history only) searches nothing: only the item biases would count
        known = np.flatnonzero(batch.found | batch.history.any(axis=1))
        unfiltered = np.array([a is None for a in batch.allowed], dtype=bool)
        searched = np.flatnonzero(batch.found & unfiltered)  # a filtered request searches its own items
        depth = self._candidates_per_source + max(len(seen[i]) for i in searched) if len(searched) else 0
        ann = {  # each user's own depth, as if searched alone
            i: found_items[: self._candidates_per_source + len(seen[i])]
            for i, (found_items, _) in zip(
                searched.tolist(), self._index.search_batch(batch.queries[searched], depth), strict=True
            )
        }
        n = self._candidates_per_source
        for i in known.tolist():
            if batch.trending_only[i]:
                continue  # filled from the trending list by `_answers`
            filtered = batch.allowed[i] is not None
            if filtered and batch.found[i]:
                ann_items = self._search_allowed(batch, i, n)
            else:
                ann_items = batch.keep(i, ann.get(i, none))[:n]
            covisited = batch.keep(i, batch.covisit.top(i, n + len(seen[i]))[0])[:n] if batch.covisit else none
            taste = batch.keep(i, batch.tastes[i])[:n]
            trending = state.popular_keys if filtered else self._trending_candidates(seen[i])
            popular = batch.keep(i, trending)[:n]
            out[i] = interleave([ann_items, covisited, taste, popular], 2 * n)  # the ranker scores 2n
        return out

    def _search_allowed(self, batch: _Users, i: int, n: int) -> np.ndarray:
        """The top `n` items of request `i`'s filter by inner product with the user's query:
        exact over the allowed items' rows when there are at most `FILTER_EXACT_ITEMS` of
        them, else the index searched `FILTER_OVERFETCH` times as deep and filtered."""
        state, allowed = self._state, batch.allowed[i]
        assert allowed is not None and state.items is not None and self._index is not None
        eligible = batch.keep(i, allowed)
        if len(eligible) <= FILTER_EXACT_ITEMS:
            rows, found = state.items.get(eligible)
            eligible, rows = eligible[found], rows[found]
            return top_k(eligible, rows.astype(np.float32) @ batch.queries[i], n)[0]
        depth = FILTER_OVERFETCH * (n + len(batch.seen[i]))
        found_items = self._index.search_batch(batch.queries[i : i + 1], depth)[0][0]
        return batch.keep(i, found_items)[:n]

    def _answers(
        self, batch: _Users, requests: Sequence[Request], candidates: list[np.ndarray]
    ) -> list[Recommendation]:
        """Rank each request's candidates, fill a shortfall with trending items, name the items."""
        state = self._state
        answers = []
        pools = [r.k if not r.diversity else DIVERSITY_POOL * r.k for r in requests]
        ranked = self._ranked(batch, candidates, pools)
        for i, ((keys, scores), r) in enumerate(zip(ranked, requests, strict=True)):
            keys, scores = _named(state.names, keys, scores)
            if r.diversity:
                keys, scores = self._diversify(keys, scores, r.k, r.diversity)
            reasons = self._reasons(batch, i, keys)
            if len(keys) < r.k:
                keys, scores, filled = self._fill(batch, i, keys, scores, r.k)
                reasons += filled
            if r.exploration:
                keys, scores, reasons = self._explore(batch, i, keys, scores, reasons, r)
            items = [
                ScoredItem(state.names[key], float(score), reason)
                for key, score, reason in zip(keys.tolist(), scores.tolist(), reasons, strict=True)
            ]
            answers.append(Recommendation(uuid.uuid4().hex, state.version, items))
        return answers

    def _diversify(self, keys: np.ndarray, scores: np.ndarray, k: int, weight: float) -> tuple[np.ndarray, np.ndarray]:
        """`k` of the ranked `keys` by maximal marginal relevance: each next item maximises
        (1 - weight) x its score (scaled to [0, 1] over the pool) - weight x its largest
        similarity with the items already chosen. Scores stay the ranker's."""
        if len(keys) <= 1 or self._state.items is None:
            return keys[:k], scores[:k]
        similarity = self._similarity(keys)
        span = float(scores.max() - scores.min())
        relevance = (scores - scores.min()) / span if span > 0 else np.ones(len(scores), np.float32)
        chosen = [int(np.argmax(scores))]
        nearest = similarity[chosen[0]].copy()  # each item's largest similarity with the chosen ones
        left = np.ones(len(keys), bool)
        left[chosen[0]] = False
        while len(chosen) < min(k, len(keys)):
            gain = np.where(left, (1 - weight) * relevance - weight * nearest, -np.inf)
            pick = int(np.argmax(gain))
            chosen.append(pick)
            left[pick] = False
            nearest = np.maximum(nearest, similarity[pick])
        return keys[chosen], scores[chosen]

    def _similarity(self, keys: np.ndarray) -> np.ndarray:
        """Pairwise similarity [n, n] of items: the cosine of their vectors, averaged with the
        Jaccard similarity of their attribute sets (categories, genres, ...) where either has
        attributes: what a user calls "more of the same" is both."""
        assert self._state.items is not None
        vectors = self._state.items.get(keys)[0].astype(np.float32)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        cosine = vectors @ vectors.T
        attrs = self._table_rows(ITEM_ATTRS, keys)
        values, at = np.unique(attrs, return_inverse=True)
        onehot = np.zeros((len(keys), len(values)), np.float32)
        np.put_along_axis(onehot, at.reshape(attrs.shape), 1.0, axis=1)
        onehot[:, values == 0] = 0.0  # padding
        shared = onehot @ onehot.T
        sizes = onehot.sum(axis=1)
        union = sizes[:, None] + sizes[None, :] - shared
        if not union.any():
            return cosine
        jaccard = np.divide(shared, union, out=np.zeros_like(shared), where=union > 0)
        return np.where(union > 0, (cosine + jaccard) / 2, cosine)

    def _ranked(
        self, batch: _Users, candidates: list[np.ndarray], ks: list[int]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """(keys, scores) of the ranked top k of each user's candidates [u]."""
        state, none = self._state, (np.zeros(0, np.uint64), np.zeros(0, np.float32))
        out = [none] * len(batch.keys)
        rows = [i for i, c in enumerate(candidates) if len(c)]
        if not rows or state.users is None or state.items is None:
            return out
        if self._scorer is None:  # no ranker yet: inner product (or `ranker`)
            for i in rows:
                scores = self._ranker.score(batch.queries[i], state.items.get(candidates[i])[0])
                out[i] = top_k(candidates[i], scores, ks[i])
            return out
        width = max(len(candidates[i]) for i in rows)
        cand = np.zeros((len(rows), width), np.uint64)  # padded with key 0, masked below
        valid = np.arange(width) < np.array([len(candidates[i]) for i in rows])[:, None]
        cand[valid] = np.concatenate([candidates[i] for i in rows])
        covisit = np.stack([batch.covisit.of(i, cand[row]) for row, i in enumerate(rows)]) if batch.covisit else None
        scores = self._score(batch.keys[rows], batch.history[rows], cand, batch.queries[rows], covisit)
        scores = np.where(valid, scores, -np.inf)
        for row, i in enumerate(rows):
            out[i] = top_k(cand[row][valid[row]], scores[row][valid[row]], ks[i])
        return out

    def _score(
        self, users: np.ndarray, history: np.ndarray, cand: np.ndarray, queries: np.ndarray, covisit: np.ndarray | None
    ) -> np.ndarray:
        """The scorer's scores [u, c] of users' [u] candidates [u, c], from the synced features
        (`covisit`: the co-visitation scores [u, c] of the users' histories for them)."""
        state = self._state
        assert self._scorer is not None and state.items is not None
        flat = cand.ravel()
        counts = self._table_rows(ITEM_COUNTS, flat)
        known = counts.any(axis=1)
        trending: np.ndarray = np.where(
            known, ItemCatalog.trending_at(counts[:, 0], state.clock_s, state.trending_half_life_s), 0.0
        ).reshape(cand.shape)
        total: np.ndarray = counts[:, 1].reshape(cand.shape)
        if ITEM_COUNTS in state.tables and state.records and not known.all():
            # a catalogued item no one has acted on yet (found by its content row) is ranked as
            # if as popular as the user's median candidate: no counts is no evidence, not no
            # interest (log 0 would bury it); the ranker and its attribute lift tell it
            # apart. An uncatalogued item with events but no positive one keeps its zero count.
            new: np.ndarray = np.asarray(~known & _member(flat, state.catalogued())).reshape(cand.shape)
            counted: np.ndarray = np.asarray(known).reshape(cand.shape)
            for row in np.flatnonzero(new.any(axis=1) & counted.any(axis=1)).tolist():
                trending[row, new[row]] = np.median(trending[row, counted[row]])
                total[row, new[row]] = np.median(total[row, counted[row]])
        item_rows = state.items.get(flat)[0].reshape(*cand.shape, state.items.dim)
        item_attrs = self._table_rows(ITEM_ATTRS, flat)
        history_attrs = self._table_rows(ITEM_ATTRS, history.ravel()).reshape(*history.shape, item_attrs.shape[1])
        profiles = self._profiles(users)
        candidates = Candidates(
            users,
            self._table_rows(USER_ATTRS, users),
            history,
            cand,
            item_attrs,
            trending,
            total,
            np.einsum("ucd,ud->uc", item_rows, queries),
            covisit,
            attribute_affinity(history_attrs, item_attrs.reshape(*cand.shape, -1)),
            None if profiles is None else profiles.lift(item_attrs.reshape(*cand.shape, -1)),
            None if profiles is None else state.clock_s - profiles.last_s,
        )
        empty = RowMap(self._scorer.ranker.dim)  # a table with no rows synced yet
        ids, attrs = state.tables.get(RANK_ID_TABLE, empty), state.tables.get(RANK_ATTR_TABLE, empty)
        return self._scorer.score(ids, attrs, candidates)

    def _profiles(self, users: np.ndarray) -> Profiles | None:
        """The users' taste profiles from the synced tables (`ranking.profile`); None before
        any was synced."""
        tables = self._state.tables
        if not {USER_PROFILE, USER_PROFILE_COUNTS, ATTRIBUTE_COUNTS} <= tables.keys():
            return None
        counts_table = tables[ATTRIBUTE_COUNTS]
        population_row, found = counts_table.get(np.array([POPULATION_KEY], np.uint64))
        population = float(population_row[0, 0]) if found[0] else 0.0

        def shares(attrs: np.ndarray) -> np.ndarray:
            rows, known = counts_table.get(attrs)
            return attribute_shares(rows[:, 0], known, population)

        counts = tables[USER_PROFILE_COUNTS].get(users)[0]
        last_s = np.where(counts[:, -2] > 0, counts[:, -1], np.nan)
        return Profiles(tables[USER_PROFILE].get(users)[0], counts[:, :-2], counts[:, -2], last_s, shares)

    def _table_rows(self, name: str, keys: np.ndarray) -> np.ndarray:
        """Rows of a synced feature table (zeros, one column, while it has none)."""
        table = self._state.tables.get(name)
        if table is None:
            return np.zeros((len(keys), 1), dtype=np.float64 if name == ITEM_COUNTS else np.uint64)
        return table.get(keys)[0]

    def _trending_candidates(self, left_out: np.ndarray) -> np.ndarray:
        """The trending list deep enough to give `candidates` items once `left_out` is removed."""
        return self._state.popular_keys[: self._candidates_per_source + len(left_out)]

    def _reasons(self, batch: _Users, i: int, keys: np.ndarray) -> list[str]:
        """The source of each of user `i`'s ranked items (from the candidate sources): an item
        the user's recent items co-visit is "covisit" (the explanation a user can check), else
        "taste" if it is among the items of their taste attributes (a genre they pick far more
        than everyone does: `ranking.profile`), else "trending" if it is among the trending
        candidates, else "content" if it is catalogued
        and nobody has acted on it yet (the index found it by the row its attributes gave it),
        else "ann". Derived from the state, so a ranking stage that got its candidates from
        another process names them the same way."""
        covisited = batch.covisit.of(i, keys) > 0 if batch.covisit else np.zeros(len(keys), bool)
        taste = np.isin(keys, batch.tastes[i])
        trending = np.isin(keys, self._trending_candidates(batch.seen[i]))
        untouched: np.ndarray = np.zeros(len(keys), bool)
        if ITEM_COUNTS in self._state.tables and self._state.records:
            untouched = (self._table_rows(ITEM_COUNTS, keys).sum(axis=1) == 0) & _member(keys, self._state.catalogued())
        return [
            "covisit" if c else "taste" if a else "trending" if t else "content" if u else "ann"
            for c, a, t, u in zip(
                covisited.tolist(), taste.tolist(), trending.tolist(), untouched.tolist(), strict=True
            )
        ]

    def _explore(
        self, batch: _Users, i: int, keys: np.ndarray, scores: np.ndarray, reasons: list[str], r: Request
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Give round(k x exploration) slots (at least one) — the list's last ones — to items
        with little data (`ranking.explore`): catalogued items and items with few labelled
        impressions, that the request may hold and the list does not hold already. Their score
        is their posterior mean click-through rate, their reason "exploration"."""
        slots = max(1, round(r.k * r.exploration))
        pool, feedback = self._exploration_pool()
        eligible = batch.may_hold(i, pool) & ~np.isin(pool, keys)
        pool, feedback = pool[eligible], feedback[eligible]
        if not len(pool):
            return keys, scores, reasons
        with self._rng_lock:
            picked = thompson(feedback, slots, self._rng)
        draws = (feedback[picked, 1] + 1) / (feedback[picked, 0] + 2)  # the posterior mean, as the score
        keep = min(len(keys), r.k - len(picked))
        return (
            np.concatenate([keys[:keep], pool[picked]]),
            np.concatenate([scores[:keep], draws.astype(np.float32)]),
            reasons[:keep] + ["exploration"] * len(picked),
        )

    def _exploration_pool(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys [n], impressions and clicks [n, 2]) of the named items with little data —
        catalogued, or with fewer than MAX_IMPRESSIONS labelled impressions —, computed once
        per version (call under the lock), not once per request."""
        state = self._state
        if self._explore_cache is not None and self._explore_cache[0] == (state.version, state.catalogue_version):
            return self._explore_cache[1], self._explore_cache[2]
        table = state.tables.get(ITEM_FEEDBACK)
        pool = state.catalogued()
        if table is not None:
            keys, rows = table.items()
            pool = np.union1d(pool, keys[rows[:, 0] < MAX_IMPRESSIONS])
        pool, _ = _named(state.names, pool, np.zeros(len(pool), np.float32))
        feedback = self._table_rows(ITEM_FEEDBACK, pool) if table is not None else np.zeros((len(pool), 2))
        self._explore_cache = ((state.version, state.catalogue_version), pool, feedback)
        return pool, feedback

    def _fill(
        self, batch: _Users, i: int, keys: np.ndarray, scores: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Request `i`'s list made up to `k` items: first the trending items it may hold
        (scored by their share of the trending counts, reason "trending"), then the catalogued
        items it may hold (those its filter allows), those with the most events first (score 0,
        reason "catalogue"): a filter that leaves k eligible items gets k, and an item put in
        the catalogue is listed before its first event. Returns keys, scores and the reasons of
        the items added."""
        state = self._state
        popular, counts = _named(state.names, state.popular_keys, state.popular_scores)
        eligible = batch.may_hold(i, popular) & ~np.isin(popular, keys)
        popular, counts = popular[eligible], counts[eligible]
        total = float(state.popular_scores.sum()) or 1.0
        extra = k - len(keys)
        keys = np.concatenate([keys, popular[:extra]])
        scores = np.concatenate([scores, (counts[:extra] / total).astype(np.float32)])
        reasons = ["trending"] * min(extra, len(popular))
        allowed = batch.allowed[i]
        if len(keys) < k and (allowed is not None or state.records):
            rest = batch.keep(i, allowed if allowed is not None else state.catalogued())
            rest = rest[~np.isin(rest, keys)]  # catalogued items all have names (their records')
            order = np.argsort(-self._table_rows(ITEM_COUNTS, rest)[:, 0], kind="stable")
            rest = rest[order][: k - len(keys)]
            keys = np.concatenate([keys, rest])
            scores = np.concatenate([scores, np.zeros(len(rest), np.float32)])
            reasons += ["catalogue"] * len(rest)
        return keys, scores, reasons

    def catalogue_item(self, item_id: str) -> tuple[int, ItemRecord | None]:
        """(version, the item's catalogue record, a tombstone if deleted; None if it has none)."""
        with self._lock:
            return self._state.version, self._state.catalogue.get(item_id)

    def user_record(self, user_id: str) -> tuple[int, UserRecord | None]:
        """(version, the attributes a client put for the user, None without)."""
        with self._lock:
            return self._state.version, self._state.user_records.get(feature_key("user", user_id))

    def catalogue_page(self, after: str, limit: int) -> list[ItemRecord]:
        """Up to `limit` catalogued items (not deleted) with ids after `after`, in id order."""
        with self._lock:
            ids = self._state.catalogue_ids()
            start = bisect.bisect_right(ids, after) if after else 0
            out = []
            for item_id in ids[start:]:
                record = self._state.catalogue[item_id]
                if not record.deleted:
                    out.append(record)
                    if len(out) == limit:
                        break
            return out

    def similar_items(self, item_id: str, k: int) -> tuple[int, list[ScoredItem]]:
        """Items like `item_id`; (model version, items).

        The pool: its co-visitation neighbours (items users pick together with it), the items
        whose vectors are nearest to its own, and the most trending items of each of its
        attributes (`ranking.profile.ATTRIBUTE_ITEMS`). An item with attributes orders the pool
        by the mean of two similarities in [0, 1]: co-visitation (its cosine of counts over the
        item's best one) and the Jaccard similarity of the attribute sets — what a user calls
        "more like this" is both, as for diversity (`_similarity`). An item without attributes
        lists its co-visitation neighbours best first, then the nearest vectors. Reasons:
        "covisit" for a co-visited item, "content" for one found by its attributes, "ann".

        Raises:
            NotFound: the item has neither neighbours, nor a vector, nor attributes shared by
                any item yet.
        """
        item = np.array([feature_key("item", item_id)], dtype=np.uint64)
        none = np.zeros(0, np.uint64), np.zeros(0, np.float32)
        with self._lock:
            state = self._state
            self._sync_blocked()
            blocked = state.blocked
            co_keys, co_scores = none
            if COVISIT_ITEMS in state.tables and COVISIT_SCORES in state.tables:
                neighbours, found = state.tables[COVISIT_ITEMS].get(item)
                if found[0]:
                    scores = state.tables[COVISIT_SCORES].get(item)[0][0]
                    present = (neighbours[0] != 0) & (scores > 0) & ~np.isin(neighbours[0], blocked)
                    co_keys, co_scores = _named(state.names, neighbours[0][present], scores[present].astype(np.float32))
            attrs = self._table_rows(ITEM_ATTRS, item)[0]
            attrs = attrs[attrs != 0]
            by_attribute = state.tables.get(ATTRIBUTE_ITEMS)
            alike = len(attrs) > 0 and by_attribute is not None  # ordered by co-visitation and attributes
            ann_keys, ann_scores = none
            vectors, found = (None, np.zeros(1, bool)) if state.items is None else state.items.get(item)
            if found[0] and self._index is not None and vectors is not None and (alike or len(co_keys) < k):
                cand, near = self._index.search(vectors[0], k + 1 + len(co_keys))
                keep = (cand != item[0]) & ~np.isin(cand, co_keys) & ~np.isin(cand, blocked)
                ann_keys, ann_scores = _named(state.names, cand[keep], near[keep].astype(np.float32))
            if alike:
                assert by_attribute is not None
                pool = by_attribute.get(attrs)[0].ravel()
                pool = np.unique(pool[(pool != 0) & (pool != item[0]) & ~np.isin(pool, blocked)])
                content = _named(state.names, pool, np.zeros(len(pool), np.float32))[0]
                keys = distinct(np.concatenate([co_keys, ann_keys, content]))
                co = np.zeros(len(keys))
                co[: len(co_keys)] = co_scores / co_scores.max() if len(co_keys) else 0.0
                jaccard = _jaccard(attrs, self._table_rows(ITEM_ATTRS, keys))
                scores = ((co + jaccard) / 2).astype(np.float32)
                order = np.argsort(-scores, kind="stable")[:k]
                why = np.where(co > 0, "covisit", np.where(np.isin(keys, content), "content", "ann"))
                keys, scores, reasons = keys[order], scores[order], why[order].tolist()
            else:
                keys = np.concatenate([co_keys, ann_keys])[:k]
                scores = np.concatenate([co_scores, ann_scores])[:k]
                reasons = ["covisit" if n < len(co_keys) else "ann" for n in range(len(keys))]
            if not len(keys) and not found[0]:
                raise NotFound(f"item {item_id!r} is unknown to the model")
            names = state.names
            items = [
                ScoredItem(names[key], float(s), reason)
                for key, s, reason in zip(keys.tolist(), scores.tolist(), reasons, strict=True)
            ]
            return state.version, items


@dataclass(frozen=True)
class _Users:
    """The users of a batch of requests, as both serving stages need them."""

    keys: np.ndarray  # uint64 [u]
    seen: list[np.ndarray]  # each request's items to leave out (none unless it excludes seen)
    found: np.ndarray  # bool [u]: the user has a vector
    queries: np.ndarray  # [u, dim + 1] two-tower queries (zeros without a vector)
    history: np.ndarray  # [u, h] recent item keys
    covisit: HistoryScores | None  # the histories' co-visitation scores (None before any are synced)
    tastes: list[np.ndarray]  # each user's items of their taste attributes (`Profiles.taste_items`)
    allowed: list[np.ndarray | None]  # each request's eligible items, sorted (None: any not left out)
    trending_only: list[bool]  # the request wants the trending list only
    left_out: list[np.ndarray]  # `seen`, sorted and distinct (what `keep` searches)

    def keep(self, i: int, items: np.ndarray) -> np.ndarray:
        """`items` without request `i`'s left-out ones, and only its allowed ones."""
        return items[self.may_hold(i, items)]

    def may_hold(self, i: int, items: np.ndarray) -> np.ndarray:
        """bool [n]: which of `items` request `i`'s list may hold (binary searches in the
        sorted arrays: no hashing of a large allowed list on every call)."""
        mask = ~_member(items, self.left_out[i])
        allowed = self.allowed[i]
        return mask if allowed is None else mask & _member(items, allowed)


@dataclass(frozen=True)
class Request:
    """One recommendation request (validated by the gateway)."""

    user_id: str
    k: int
    exclude_seen: bool = True
    exclude_items: tuple[str, ...] = ()  # never in the list (`filter.exclude_items`)
    categories: tuple[str, ...] = ()  # only items in one of these categories (`filter.categories`)
    exclude_categories: tuple[str, ...] = ()  # no item in any of these (`filter.exclude_categories`)
    attributes: tuple[tuple[str, str], ...] = ()  # only items with these attribute values (`filter.attributes`)
    diversity: float = 0.0  # 0: by score; up to 1: each item unlike those above it (MMR over item vectors)
    trending_only: bool = False  # the trending list (an experiment's baseline arm), filters and seen applied
    exploration: float = 0.0  # share of the k slots for items with little data (Thompson sampling)

    @property
    def filtered(self) -> bool:
        """Whether the request allows only some items (categories or attributes)."""
        return bool(self.categories or self.attributes)


def _named(names: dict[int, str], keys: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The items whose raw ids serving knows: an internal key never leaves as an item id."""
    known = np.fromiter((key in names for key in keys.tolist()), dtype=bool, count=len(keys))
    return (keys, scores) if known.all() else (keys[known], scores[known])


def _left_out(history: np.ndarray | None, request: Request, excluded: np.ndarray) -> np.ndarray:
    """The items a request's list must not hold: the user's seen items (when it excludes them),
    the items its filter excludes, and `excluded` (hidden, deleted, expired items and those of
    its excluded categories)."""
    parts = [history if history is not None else np.zeros(0, np.uint64), excluded]
    if request.exclude_items:
        parts.append(feature_keys("item", request.exclude_items))
    parts = [p for p in parts if len(p)]
    return np.concatenate(parts) if len(parts) > 1 else parts[0] if parts else np.zeros(0, np.uint64)


def _jaccard(attrs: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Jaccard similarity [n] of one attribute set `attrs` (distinct keys) with each row of
    `others` [n, b] (attribute keys, 0 = padding).

    Example:
        >>> _jaccard(np.array([1, 2], np.uint64), np.array([[1, 2], [2, 3], [0, 0]], np.uint64)).tolist()
        [1.0, 0.3333333333333333, 0.0]
    """
    present = others != 0
    shared = (np.isin(others, attrs) & present).sum(axis=1)
    sizes = np.array([len(np.unique(row[row != 0])) for row in others])
    union = len(attrs) + sizes - shared
    return np.divide(shared, union, out=np.zeros(len(others)), where=union > 0)


def _member(items: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """bool [n]: which of `items` are in `sorted_keys` (sorted, distinct)."""
    if not len(sorted_keys) or not len(items):
        return np.zeros(len(items), bool)
    at = np.minimum(np.searchsorted(sorted_keys, items), len(sorted_keys) - 1)
    return sorted_keys[at] == items
