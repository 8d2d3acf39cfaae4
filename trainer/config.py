"""Trainer settings (one section of the process config in `services.config`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from embedding_store import TableConfig
from embedding_store.base import EVICTION_POLICIES
from embedding_store.optimizers import OPTIMIZERS
from ranking.blend import FEATURES, RETURN_WEIGHTS


@dataclass(frozen=True)
class TrainerConfig:
    """How the online trainer learns and publishes.

    Args:
        dim: embedding width of the user and item tables.
        learning_rate: step size of the embedding tables' optimizer.
        init_std: initial row scale.
        store_url: where the embedding tables live (`embedding_store.open_store`): `local://`,
            `local://?shards=N`, or `grpc://HOST:PORT[,HOST:PORT...]` for store-shard processes.
        optimizer: per-row optimizer of the tables (`embedding_store.optimizers.OPTIMIZERS`).
        min_count: times a user or item must be seen before it gets its own row (frequency filter).
        ttl_s: rows not updated for this long, in event time, are expired; 0 keeps them until the
            row cap evicts them.
        max_rows: hard cap on the rows of each table; a full table evicts by `eviction`.
        eviction: "lru" or "lfu".
        expiry_interval_s: how often (wall clock) the trainer runs expiry.
        rank_dim: embedding width of the ranking model's tables.
        dense_learning_rate: Adam step size of the ranking model's dense layers.
        history_length: recent positive items per user fed to the ranker.
        max_feature_entities: users (and, separately, items) whose attributes and history the
            trainer keeps; the least recently seen are forgotten first.
        join_window_s: how long an impression waits for an action before it is a negative.
        join_max_pending: most impressions waiting in that window (about 110 bytes each,
            reserved at start); past it the oldest close early as negatives.
        join_max_closed: most closed impressions remembered to recognise a late action
            (about 45 bytes each, reserved at start).
        trending_half_life_s: half-life (event time) of the trending score cold users get.
        retrieval_negatives: items drawn uniformly per step as extra negatives of the in-batch
            softmax (mixed negative sampling).
        negatives: popularity-sampled negatives per positive event (data without impressions).
        uniform_negatives: share of sampled negatives drawn uniformly over items instead of by
            popularity (0 by default: popular negatives are the hard ones the ranker must tell
            apart; the final blend with trending counts keeps rare items from the top of lists).
        batch_size: most events per training step.
        poll_timeout_s: how long one poll of the log waits for events.
        sparse_sync_interval_s: the most time between publishes of changed rows to the serving
            store.
        sparse_sync_min_interval_s: the least time between them: a step that trained rows is
            published as soon as this much has passed since the previous publish
            (`trainer.sync.SyncPublisher`).
        dense_sync_interval_s: how often the ranker's dense parameters go with them (the first
            sync always carries them).
        freshness_samples: most acceptance times of trained events one sync message carries
            (a uniform sample), from which replicas measure freshness.
        group_id: consumer group of the trainer on the event log.
        popular_items: length of the popular-items list published for cold users.
        blend_users: positive pairs per step that train the final blend of ranker logit and
            trending count (`ranking.blend`); 0 freezes the blend.
        blend_candidates: trending items each of those pairs competes with (and as many
            co-visited ones).
        covisit_window: earlier positives of the same user each positive is paired with in
            the co-visitation counts (`retrieval.covisit`).
        covisit_neighbours: neighbours kept and served per item.
        covisit_half_life_s: model time after which a co-visited pair counts half.
        covisit_max_items: items with co-visitation counts (the least counted go first); each
            holds at most 4 x `covisit_neighbours` partners (about 90 bytes each in memory).
        profile_slots: attribute keys kept in each user's taste profile (`trainer.profiles`).
        attribute_items: the most trending items of each attribute that serving keeps: the
            candidates of a user's taste attributes and the pool of similar items
            (`ranking.profile`).
        attribute_items_interval_s: how often (wall clock) those lists are computed again and
            published (every item's attributes are sorted by their trending counts).
        session_gap_s: model time after a user's last positive from which they count as
            returning: the blend then scores their candidates with `return_blend` instead of
            the weights it learns (`ranking.blend`), and their positives do not train those.
        return_blend: the blend's weights for returning users, one per feature (ranker logit,
            log trending count, co-visitation, attribute affinity, attribute lift); the
            default was chosen on the inner split of `bench.peers`' history.
        content_basis: trending items whose rows give a catalogued item without a trained row
            its retrieval row (`OnlineModels.content_rows`: the mean row of the items that
            share its attributes).
        seed: seed of row initialisation and negative sampling.
        dedup_window: distinct event ids remembered to drop redelivered copies
            (`trainer.dedup`); a copy arriving after that many other events is trained again.
        checkpoint_dir: where the trainer writes checkpoints (`trainer.checkpoint`) and resumes
            from the newest at start; "" disables them (offsets are then committed after each
            step). With remote store shards the path is the shards' too (a shared volume).
        checkpoint_interval_s: how often (wall clock) a checkpoint is written.
        checkpoints_kept: complete checkpoints kept on disk (older ones are deleted).
        workers: trainer processes sharing `group_id` as data-parallel workers. Above 1 the
            store must be `grpc://` store shards (their tables and the dense parameters on the
            first are what the workers share) and `checkpoint_dir` empty: a worker restoring
            the shared shards from its checkpoint would undo the other workers' training.
            Workers commit offsets after each step instead (at-least-once, as without
            checkpoints); the shards keep the state.

        max_clock_skew_s: records whose `timestamp_ms` is further ahead of the trainer's clock
            are dead-lettered (the gateway refuses them already; another producer may not).
        max_clock_jump_s: the most one gap in event time advances the model clock that
            expiry and trending run on (`trainer.clock`): a replay of history followed by
            live traffic keeps its rows and trending counts.
        stall_after_s: readiness calls the trainer stuck when a step has run this long, or
            no event was trained for this long while its partitions had records waiting.

    Raises:
        ValueError: a value is out of range; the message names the field.
    """

    dim: int = 32
    learning_rate: float = 0.2
    init_std: float = 0.1
    store_url: str = "local://"
    optimizer: str = "rowwise_adagrad"
    min_count: int = 1
    ttl_s: float = 90 * 86400.0
    max_rows: int = 5_000_000
    eviction: str = "lru"
    expiry_interval_s: float = 60.0
    rank_dim: int = 16
    dense_learning_rate: float = 0.003
    history_length: int = 20
    max_feature_entities: int = 1_000_000
    join_window_s: float = 300.0
    join_max_pending: int = 262_144
    join_max_closed: int = 262_144
    trending_half_life_s: float = 3 * 86400.0
    retrieval_negatives: int = 128
    negatives: int = 4
    uniform_negatives: float = 0.0
    batch_size: int = 512
    poll_timeout_s: float = 0.2
    sparse_sync_interval_s: float = 1.0
    sparse_sync_min_interval_s: float = 0.2
    dense_sync_interval_s: float = 60.0
    freshness_samples: int = 1000
    group_id: str = "freshrec-trainer"
    popular_items: int = 200
    blend_users: int = 32
    blend_candidates: int = 100
    covisit_window: int = 20
    covisit_neighbours: int = 50
    covisit_half_life_s: float = 7 * 86400.0
    covisit_max_items: int = 100_000
    profile_slots: int = 32
    attribute_items: int = 100
    attribute_items_interval_s: float = 10.0
    session_gap_s: float = 1800.0
    return_blend: tuple[float, ...] = RETURN_WEIGHTS
    content_basis: int = 2000
    seed: int = 0
    dedup_window: int = 200_000
    checkpoint_dir: str = ""
    checkpoint_interval_s: float = 30.0
    checkpoints_kept: int = 2
    workers: int = 1
    max_clock_skew_s: float = 300.0
    max_clock_jump_s: float = 86400.0
    stall_after_s: float = 60.0

    def __post_init__(self) -> None:
        checks = {
            "dim": 1 <= self.dim <= 4096,
            "learning_rate": self.learning_rate > 0,
            "init_std": self.init_std >= 0,
            "store_url": bool(self.store_url),
            "optimizer": self.optimizer in OPTIMIZERS,
            "min_count": 1 <= self.min_count <= 255,
            "ttl_s": self.ttl_s >= 0,
            "max_rows": self.max_rows >= 1,
            "eviction": self.eviction in EVICTION_POLICIES,
            "expiry_interval_s": self.expiry_interval_s > 0,
            "rank_dim": 1 <= self.rank_dim <= 1024,
            "dense_learning_rate": self.dense_learning_rate > 0,
            "history_length": 1 <= self.history_length <= 1000,
            "max_feature_entities": self.max_feature_entities >= 1,
            "join_window_s": self.join_window_s > 0,
            "join_max_pending": self.join_max_pending >= 1,
            "join_max_closed": self.join_max_closed >= 1,
            "trending_half_life_s": self.trending_half_life_s > 0,
            "retrieval_negatives": 0 <= self.retrieval_negatives <= 100_000,
            "negatives": 0 <= self.negatives <= 1000,
            "uniform_negatives": 0.0 <= self.uniform_negatives <= 1.0,
            "batch_size": self.batch_size >= 1,
            "poll_timeout_s": self.poll_timeout_s >= 0,
            "sparse_sync_interval_s": self.sparse_sync_interval_s > 0,
            "sparse_sync_min_interval_s": self.sparse_sync_min_interval_s >= 0,
            "dense_sync_interval_s": self.dense_sync_interval_s > 0,
            "freshness_samples": self.freshness_samples >= 0,
            "group_id": bool(self.group_id),
            "popular_items": self.popular_items >= 1,
            "blend_users": 0 <= self.blend_users <= 100_000,
            "blend_candidates": 1 <= self.blend_candidates <= 100_000,
            "covisit_window": 1 <= self.covisit_window <= 1000,
            "covisit_neighbours": 1 <= self.covisit_neighbours <= 10_000,
            "covisit_half_life_s": self.covisit_half_life_s > 0,
            "covisit_max_items": self.covisit_max_items >= 1,
            "profile_slots": 1 <= self.profile_slots <= 1000,
            "attribute_items": 1 <= self.attribute_items <= 10_000,
            "attribute_items_interval_s": self.attribute_items_interval_s > 0,
            "session_gap_s": self.session_gap_s > 0,
            "return_blend": len(self.return_blend) == len(FEATURES) and all(map(math.isfinite, self.return_blend)),
            "content_basis": 1 <= self.content_basis <= 1_000_000,
            "checkpoint_interval_s": self.checkpoint_interval_s > 0,
            "dedup_window": self.dedup_window >= 1,
            "checkpoints_kept": self.checkpoints_kept >= 1,
            "workers": self.workers >= 1,
            "max_clock_skew_s": self.max_clock_skew_s >= 0,
            "max_clock_jump_s": self.max_clock_jump_s > 0,
            "stall_after_s": self.stall_after_s > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"trainer.{name}: invalid value {getattr(self, name)!r}")
        if self.workers > 1 and not self.store_url.startswith("grpc://"):
            raise ValueError(
                f"trainer.workers: {self.workers} workers share their tables through grpc:// store shards, "
                f"got store_url {self.store_url!r}"
            )
        if self.workers > 1 and self.checkpoint_dir:
            raise ValueError(
                "trainer.workers: workers of a group do not checkpoint (restoring the shared shards would "
                "undo the other workers' training); leave trainer.checkpoint_dir empty"
            )

    def table(self, name: str, dim: int, seed: int) -> TableConfig:
        """The embedding-table config these settings give a table `name` of width `dim`."""
        return TableConfig(
            name,
            dim,
            optimizer=self.optimizer,
            learning_rate=self.learning_rate,
            init_scale=self.init_std,
            min_count=self.min_count,
            filter_capacity=min(self.max_rows, 10_000_000),
            ttl_s=self.ttl_s or None,
            max_rows=self.max_rows,
            eviction=self.eviction,
            seed=seed,
        )
