"""The online training loop: poll events, build examples, score them, train, commit offsets."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from embedding_store import Store, feature_keys, open_store
from retrieval.two_tower import TwoTower
from trainer.catalog import ItemCatalog
from trainer.config import TrainerConfig
from trainer.evaluation import StreamingAUC
from trainer.eventlog.base import LogConsumer, LogRecord, LogUnavailable
from trainer.events import Event, InvalidEvent
from trainer.sync import SyncMessage, now_ms

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepResult:
    """What one training step did.

    Args:
        events: events decoded from the polled records.
        invalid: records that could not be decoded (skipped, counted).
        examples: labelled examples trained on (positives, negatives, sampled negatives).
        loss: mean BCE loss of the step (NaN if there were no examples).
    """

    events: int
    invalid: int
    examples: int
    loss: float


def _pair_ids(users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """One uint64 per (user, item) pair, for set tests on pairs (a collision only drops a negative)."""
    with np.errstate(over="ignore"):
        return users * np.uint64(0x9E3779B97F4A7C15) ^ items


class Trainer:
    """Train the two-tower model online from a consumer of the event log.

    Each step decodes a batch of events, turns positives (click, like, share, purchase,
    rating) into label-1 examples and skips into label-0 examples, adds `negatives`
    popularity-sampled label-0 items per positive (the data carries no impressions yet),
    scores every example *before* training on it (progressive AUC), takes one optimizer step
    on the embedding rows, and only then commits the consumed offsets — so a crash replays
    events rather than losing them (at-least-once training).

    Args:
        config: trainer settings.
        consumer: member of the trainer's consumer group.
        store: the embedding store holding tables "user" and "item" (default: opened from
            `config.store_url`).
        on_step: called after each step (metrics).

    Example:
        >>> from trainer.eventlog import MemoryLog
        >>> event_log = MemoryLog()
        >>> event_log.append([Event("e1", "u1", "i1", "click", 1)])
        >>> trainer = Trainer(TrainerConfig(), event_log.consumer("g"))
        >>> trainer.poll_and_train().events
        1
    """

    def __init__(
        self,
        config: TrainerConfig,
        consumer: LogConsumer,
        store: Store | None = None,
        on_step: Callable[[StepResult], None] | None = None,
    ) -> None:
        self.config = config
        self._consumer = consumer
        self.model = TwoTower(config.dim)

        self.store = store or open_store(
            config.store_url,
            [config.table("user", config.dim, config.seed), config.table("item", self.model.item_dim, config.seed + 1)],
        )
        self.users = self.store.table("user")
        self.items = self.store.table("item")
        self.event_time_s = 0.0  # latest event time trained on: the clock of expiry
        self._next_expiry = time.monotonic() + config.expiry_interval_s
        self.catalog = ItemCatalog(seed=config.seed)
        self.auc = StreamingAUC()
        self.events_trained = 0
        self.invalid_records = 0
        self._on_step = on_step
        self._seen: list[tuple[np.ndarray, np.ndarray]] = []
        self._lock = threading.Lock()  # between training steps and sync collection

    def poll_and_train(self) -> StepResult:
        """Poll one batch from the log, train on it, commit its offsets."""
        records = self._consumer.poll(self.config.batch_size, self.config.poll_timeout_s)
        result = self.train_records(records)
        if records:
            offsets: dict[int, int] = {}
            for r in records:
                offsets[r.partition] = max(offsets.get(r.partition, 0), r.offset + 1)
            self._consumer.commit(offsets)
        return result

    def train_records(self, records: list[LogRecord]) -> StepResult:
        events: list[Event] = []
        invalid = 0
        for record in records:
            try:
                events.append(Event.from_json(record.value))
            except InvalidEvent as e:
                invalid += 1
                log.warning("skipping undecodable record p%d@%d: %s", record.partition, record.offset, e)
        with self._lock:
            result = self._train(events, invalid)
        if self._on_step:
            self._on_step(result)
        return result

    def _train(self, events: list[Event], invalid: int) -> StepResult:
        self.invalid_records += invalid
        if not events:
            return StepResult(0, invalid, 0, float("nan"))
        now = self.event_time_s = max(self.event_time_s, max(e.timestamp_ms for e in events) / 1000.0)
        user_keys = feature_keys("user", (e.user_id for e in events))
        item_keys = feature_keys("item", (e.item_id for e in events))
        positive = np.fromiter((e.is_positive for e in events), dtype=bool, count=len(events))
        skipped = np.fromiter((e.type == "skip" for e in events), dtype=bool, count=len(events))
        self.catalog.observe(item_keys, [e.item_id for e in events], positive.astype(np.float64))
        labelled = positive | skipped
        self._seen.append((user_keys[labelled], item_keys[labelled]))  # what exclude_seen leaves out

        n_neg = int(positive.sum()) * self.config.negatives
        neg_items = self.catalog.sample(n_neg, self.config.uniform_negatives)
        neg_users = np.repeat(user_keys[positive], self.config.negatives)[: len(neg_items)]
        # Drop accidental hits: a sampled negative the same user clicked in this batch.
        hit = np.isin(_pair_ids(neg_users, neg_items), _pair_ids(user_keys[positive], item_keys[positive]))
        neg_users, neg_items = neg_users[~hit], neg_items[~hit]
        u = np.concatenate([user_keys[labelled], neg_users])
        i = np.concatenate([item_keys[labelled], neg_items])
        y = np.concatenate([positive[labelled], np.zeros(len(neg_items), dtype=bool)]).astype(np.float32)
        self.events_trained += len(events)
        if not len(y):
            return StepResult(len(events), invalid, 0, float("nan"))

        # Each event is one sighting of its user and item for the frequency filter, which admits
        # them (creating rows) once seen `min_count` times; the examples then only read rows, so
        # a user repeated across its sampled negatives is not counted again.
        self.users.lookup(user_keys, now)
        self.items.lookup(item_keys, now)
        user_rows = torch.from_numpy(self.users.get(u)[0]).requires_grad_()  # [n, dim]; zeros if not admitted
        item_rows = torch.from_numpy(self.items.get(i)[0]).requires_grad_()  # [n, dim + 1], bias last
        logits = self.model(user_rows, item_rows)  # [n]
        self.auc.update(torch.sigmoid(logits).detach().numpy(), y)  # scored before training
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.from_numpy(y))
        loss.backward()
        assert user_rows.grad is not None and item_rows.grad is not None
        # Sum (not mean) of per-example losses per row: rows get the same step whatever the batch size.
        scale = float(len(y))
        self.users.apply_gradients(u, user_rows.grad.numpy() * scale, now)
        self.items.apply_gradients(i, item_rows.grad.numpy() * scale, now)
        if time.monotonic() >= self._next_expiry:
            self.expire()
        return StepResult(len(events), invalid, len(y), float(loss.item()))

    def expire(self) -> int:
        """Evict rows whose TTL ran out by the latest event time; return how many (the next sync carries them)."""
        self._next_expiry = time.monotonic() + self.config.expiry_interval_s
        evicted = self.users.evict_expired(self.event_time_s) + self.items.evict_expired(self.event_time_s)
        if evicted:
            log.info("expired %d rows older than %.0f s of event time", evicted, self.config.ttl_s)
        return evicted

    def collect_sync(self) -> SyncMessage | None:
        """Changes since the previous call, as one sync message (None if nothing changed)."""
        with self._lock:
            seen = self._seen
            self._seen = []
            popular_keys, popular_scores = self.catalog.popular(self.config.popular_items)
            message = SyncMessage(
                users=self.users.drain_delta(),
                items=self.items.drain_delta(),
                item_names=self.catalog.drain_new_names(),
                seen_users=np.concatenate([s[0] for s in seen]) if seen else np.zeros(0, np.uint64),
                seen_items=np.concatenate([s[1] for s in seen]) if seen else np.zeros(0, np.uint64),
                popular_keys=popular_keys,
                popular_scores=popular_scores,
                created_ms=now_ms(),
            )
        return None if message.is_empty() else message

    def run(self, stop: threading.Event) -> None:
        """Train until `stop` is set, then leave the consumer group; a log outage is retried, not fatal."""
        while not stop.is_set():
            try:
                self.poll_and_train()
            except LogUnavailable as e:
                log.warning("event log unavailable: %s; retrying", e)
                stop.wait(1.0)
        self.close()

    def close(self) -> None:
        """Leave the consumer group (its partitions go to the other members) and close the store."""
        self._consumer.close()
        self.store.close()
