"""The online training loop: poll events, build examples, score them, train, commit offsets."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedding_store import DenseParameters, LocalDense, Store, TableDelta, feature_keys, open_dense, open_store
from ranking.explore import ITEM_FEEDBACK, ItemFeedback
from trainer.catalog import ItemCatalog
from trainer.checkpoint import load_latest, save_checkpoint
from trainer.clock import ModelClock
from trainer.config import TrainerConfig
from trainer.dedup import RecentEvents
from trainer.evaluation import StreamingAUC
from trainer.eventlog.base import DeadLetter, LogConsumer, LogRecord, LogUnavailable
from trainer.events import SERVED_PREFIX, Event, InvalidEvent, served_events
from trainer.features import FeatureConfig, FeatureState
from trainer.items import USER_PREFIX, ItemRecord, UserRecord, erased_user, is_catalogue_record, is_erase_record
from trainer.joiner import Joiner, JoinerConfig
from trainer.models import TABLES, USER_TABLES, OnlineModels, table_configs
from trainer.sync import SyncMessage, now_ms

log = logging.getLogger(__name__)
LAG_INTERVAL_S = 5.0  # how often the trainer asks the log for its consumer lag
CONTENT_REFRESH = 30  # every how many syncs all content rows are computed again


@dataclass(frozen=True)
class StepResult:
    """What one training step did.

    Args:
        events: events trained on (decoded from the polled records, duplicates dropped).
        invalid: records that could not be decoded (skipped, counted).
        examples: labelled examples trained on (positives, negatives, sampled negatives).
        loss: mean BCE loss of the step (NaN if there were no examples).
        duplicates: redelivered events dropped (`trainer.dedup`).
        failures: attempts of this step that raised (a retry and the bisection's halves count).
        poisoned: events the supervisor dead-lettered because training on them raised.
    """

    events: int
    invalid: int
    examples: int
    loss: float
    duplicates: int = 0
    failures: int = 0
    poisoned: int = 0


@dataclass(frozen=True)
class TrainerHealth:
    """What readiness reports of a trainer.

    Args:
        last_step_age_s: seconds since a poll last consumed records, or found none waiting.
        step_running_s: how long the step in progress has run (0 between steps).
        lag: records of its partitions not yet read (refreshed every LAG_INTERVAL_S).
        problem: why the trainer is not making progress ("" when it is).
    """

    last_step_age_s: float
    step_running_s: float
    lag: int
    problem: str


class _StoreDown(ConnectionError):
    """A step could not reach the store; the events (deduplicated) wait for it."""

    def __init__(self, events: list[Event], sources: list[LogRecord | None], cause: ConnectionError) -> None:
        super().__init__(str(cause))
        self.events, self.sources, self.cause = events, sources, cause


@dataclass
class _Supervised:
    """What the attempts of one supervised step added up to (`Trainer.train_events`)."""

    events: int = 0
    examples: int = 0
    failures: int = 0
    losses: list[float] = field(default_factory=list)
    weights: list[int] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)

    def poisoned(self, culprit: tuple[Event, LogRecord | None], error: Exception) -> None:
        """`culprit` raised on its own: it goes to the dead letters with the error as reason."""
        event, record = culprit
        log.error("dead-lettering event %s: training on it raised %r", event.event_id, error)
        record = record or LogRecord(-1, -1, event.to_json(), 0)
        self.dead.append(DeadLetter(record, f"training failed: {type(error).__name__}: {error}"[:500]))

    def add(self, trained: tuple[int, int, float]) -> None:
        events, examples, loss = trained
        self.events += events
        self.examples += examples
        if examples and np.isfinite(loss):
            self.losses.append(loss)
            self.weights.append(examples)


def _pair_ids(users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """One uint64 per (user, item) pair, for set tests on pairs (a collision only drops a negative)."""
    with np.errstate(over="ignore"):
        return users * np.uint64(0x9E3779B97F4A7C15) ^ items


class Trainer:
    """Train the retrieval and ranking models online from a consumer of the event log.

    Each step decodes a batch of events and feeds the joiner, which labels impressions with
    the actions on them (positives at once, negatives when their window closes, late clicks
    as late positives) and passes actions without impressions (ratings) through as positives;
    those get `negatives` sampled label-0 items each (popularity^0.75 mixed with uniform). Then:
    one sighting per event for the frequency filter; a retrieval step (two-tower, in-batch
    softmax with logQ correction) on the positives; a ranking step (DIN + DCN-v2, BCE) on all
    labelled examples, each scored *before* the step (progressive AUC and log loss); the
    users' histories grow by the positives. Offsets are committed only for events reflected in
    saved state: with `checkpoint_dir` set, after each checkpoint (every
    `checkpoint_interval_s`, and at stop) — a restart resumes from the newest checkpoint and
    the log replays the rest; without, after each step. Either way a crash replays events
    rather than losing them (at-least-once training); see `trainer.checkpoint`.

    Args:
        config: trainer settings.
        consumer: member of the trainer's consumer group.
        store: the embedding store holding `trainer.models.TABLES` (default: opened from
            `config.store_url`).
        on_step: called after each step (metrics).
        dead_letter: where undecodable records go with their reasons (`EventLog.dead_letter`);
            without it they are only logged and counted.
        dense: where the dense parameters live (default: `embedding_store.open_dense`
            of `config.store_url` when the store is opened from it, else this process).

    Several trainers in one consumer group are data-parallel workers: each trains on the
    partitions it is assigned (a user's events stay in one partition, so users' histories,
    joins and dedup stay with one worker), on the shared store shards and dense service. Each
    publishes the user rows of the users it trained (a user vector needs the history only
    the owner has) and whatever item and ranker rows it drains from the shards.

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
        dead_letter: Callable[[Sequence[DeadLetter]], None] | None = None,
        dense: DenseParameters | None = None,
    ) -> None:
        self.config = config
        self._consumer = consumer
        self.dense: DenseParameters = dense or (open_dense(config.store_url) if store is None else LocalDense())
        self.store = store or open_store(config.store_url, table_configs(config))
        self.catalog = ItemCatalog(config.seed, config.trending_half_life_s, traffic_share=1 / config.workers)
        self.features = FeatureState(FeatureConfig(config.history_length, config.max_feature_entities))
        self.joiner = Joiner(JoinerConfig(config.join_window_s, config.join_max_pending, config.join_max_closed))
        self.models = OnlineModels(config, self.store, self.catalog, self.features, self.dense)
        self.users, self.items = self.models.users, self.models.items
        self.learning = True  # False: score and keep features, but change no parameter (a frozen model)
        self.clock = ModelClock(config.max_clock_jump_s)  # what expiry and trending run on
        self._next_expiry = time.monotonic() + config.expiry_interval_s
        self._next_dense_sync = 0.0  # the first sync carries the dense parameters
        self.auc = StreamingAUC()
        self.retrieval_loss = float("nan")
        self.blend_loss = float("nan")
        self.events_trained = 0
        self.lag = 0  # records of its partitions the trainer has not read (refreshed every LAG_INTERVAL_S)
        self._next_lag = 0.0
        self.invalid_records = 0
        self.duplicates = 0  # redelivered events dropped (same event_id within `dedup_window`)
        self.recent = RecentEvents(config.dedup_window)
        self._on_step = on_step
        self._dead_letter = dead_letter
        self._seen: list[tuple[np.ndarray, np.ndarray]] = []
        self._trained_users: list[np.ndarray] = []  # user keys trained on since the last sync
        self.partitions: list[int] = []  # the log partitions this trainer is assigned
        self._accepted: list[np.ndarray] = []  # acceptance times (ms) of events trained since the last sync
        self._rng = np.random.default_rng(config.seed)
        self._lock = threading.Lock()  # between training steps and sync collection
        self._offsets: dict[int, int] = {}  # per partition: the offset after the last record trained on
        self.last_checkpoint_s = 0.0  # unix time of the newest checkpoint written or resumed from
        self.checkpoints_written = 0
        self.checkpoint_extras: Callable[[], dict[str, bytes]] | None = None  # more files for each checkpoint
        self._next_checkpoint = time.monotonic() + config.checkpoint_interval_s
        self.step_failures = 0  # step attempts that raised (each retried or bisected)
        # a batch whose step found the store unavailable: (records, deduplicated events, their records)
        self._held: tuple[list[LogRecord], list[Event], list[LogRecord | None]] | None = None
        self._unsent: SyncMessage | None = None  # drained by a `collect_sync` that failed
        self._catalogue: dict[str, ItemRecord] = {}  # catalogue records read since the last sync
        # keys of catalogued items with attributes and no trained row: served by content rows
        # (`OnlineModels.content_rows`); those whose row no sync has sent yet
        self._content: OrderedDict[int, None] = OrderedDict()
        self._content_new: set[int] = set()
        self._syncs = 0  # sync messages collected (content rows are refreshed every CONTENT_REFRESH)
        self._erased: list[np.ndarray] = []  # keys of users erased since the last sync
        self._erase_later: list[str] = []  # erasures read while a store shard was away
        self._user_records: dict[str, UserRecord] = {}  # user records read since the last sync
        # per (experiment, arm): [impressions labelled, clicks among them] (`services.experiments`)
        self.experiment_counts: dict[tuple[str, str], list[int]] = {}
        self.feedback = ItemFeedback()  # per item: labelled impressions and clicks (exploration)
        self._undrained_users: TableDelta | None = None  # user rows drained by a failed sync
        self._progress_at = time.monotonic()  # last poll that consumed records or found none waiting
        self._step_started: float | None = None
        if config.checkpoint_dir:
            state = load_latest(Path(config.checkpoint_dir), self.store)
            if state is not None:
                self.load_state_dict(state)

    def poll_and_train(self) -> StepResult:
        """Poll one batch from the log, train on it, commit its offsets.

        A step that cannot reach its store (`ConnectionError`: a store shard or the dense
        service is down) raises, and the batch is held: the next call trains it again before
        it polls anything new, so an outage delays events instead of losing them.
        """
        if self._held is not None:
            records, events, sources = self._held
            self._step_started = time.monotonic()
            try:
                with self._lock:
                    result = self._supervise(events, sources, 0, 0)
                self._held = None
            finally:
                self._step_started = None
            if self._on_step:
                self._on_step(result)
            log.info("trained the %d events held while the store was unavailable", result.events)
            return self._advance(records, result)
        records = self._consumer.poll(self.config.batch_size, self.config.poll_timeout_s)
        # records the state already reflects (resumed from a checkpoint whose offsets were not
        # committed before a crash) are skipped: each event counts once in the state
        records = [r for r in records if r.offset >= self._offsets.get(r.partition, 0)]
        partitions = self._consumer.assignment()
        if partitions != self.partitions:
            # a rebalance: a partition another worker took is no longer ours to skip or commit
            # (its records up to the offsets committed after our last step are trained; the
            # new owner reads on from there)
            self._offsets = {p: o for p, o in self._offsets.items() if p in partitions}
            log.info("assigned partitions %s (were %s)", partitions, self.partitions)
            self.partitions = partitions
        if time.monotonic() >= self._next_lag:  # on this thread: a Kafka consumer is not thread-safe
            self.lag = self._consumer.lag()
            self._next_lag = time.monotonic() + LAG_INTERVAL_S
            if self.lag == 0:
                self._progress_at = time.monotonic()
        self._step_started = time.monotonic()
        try:
            result = self.train_records(records)
        except _StoreDown as down:  # held: trained again on the next call
            self._held = (records, down.events, down.sources)
            raise ConnectionError(f"store unavailable; {len(records)} records held: {down.cause}") from down.cause
        finally:
            self._step_started = None
        return self._advance(records, result)

    def _advance(self, records: list[LogRecord], result: StepResult) -> StepResult:
        """After `records` are trained: move the offsets on; commit or checkpoint."""
        if records:
            self._progress_at = time.monotonic()
        for r in records:
            self._offsets[r.partition] = max(self._offsets.get(r.partition, 0), r.offset + 1)
        if not self.config.checkpoint_dir:
            if records:
                self._consumer.commit(dict(self._offsets))
        elif time.monotonic() >= self._next_checkpoint:
            try:
                self.checkpoint()
            except Exception:  # keep training; offsets stay uncommitted until a checkpoint succeeds
                log.exception("checkpoint failed; retrying in %.0f s", self.config.checkpoint_interval_s)
                self._next_checkpoint = time.monotonic() + self.config.checkpoint_interval_s
        return result

    def checkpoint(self) -> Path | None:
        """Write a checkpoint (`trainer.checkpoint`), then commit the offsets it reflects; on
        the training thread (a Kafka consumer is not thread-safe). None without `checkpoint_dir`."""
        if not self.config.checkpoint_dir:
            return None
        with self._lock:
            state = self.state_dict()
            extra = self.checkpoint_extras() if self.checkpoint_extras else None
            path = save_checkpoint(
                Path(self.config.checkpoint_dir), self.store, state, self.config.checkpoints_kept, extra
            )
        self.last_checkpoint_s = state["written_at"]
        self.checkpoints_written += 1
        self._next_checkpoint = time.monotonic() + self.config.checkpoint_interval_s
        if state["offsets"]:
            try:
                self._consumer.commit(state["offsets"])
            except LogUnavailable as e:  # harmless: records the state has are skipped if read again
                log.warning("offsets of checkpoint %s not committed (%s); the next checkpoint commits", path.name, e)
        return path

    def state_dict(self) -> dict[str, Any]:
        """Everything but the store's tables that training and the next sync depend on."""
        return {
            "written_at": time.time(),
            "offsets": dict(self._offsets),
            "clock": self.clock,
            "events_trained": self.events_trained,
            "invalid_records": self.invalid_records,
            "duplicates": self.duplicates,
            "recent": self.recent,
            "models": self.models.state_dict(),
            "catalog": self.catalog,
            "features": self.features,
            "joiner": self.joiner,
            "auc": self.auc,
            "seen": list(self._seen),
            "trained_users": list(self._trained_users),
            "rng": self._rng.bit_generator.state,
            "catalogue": {**(self._unsent.catalogue if self._unsent else {}), **self._catalogue},
            "content": dict(self._content),
            "content_new": list(self._content_new),
            "experiment_counts": {k: list(v) for k, v in self.experiment_counts.items()},
            "feedback": self.feedback,
            "erase_later": list(self._erase_later),
            "user_records": {**(self._unsent.user_records if self._unsent else {}), **self._user_records},
            "erased": [*([self._unsent.erased_users] if self._unsent else []), *self._erased],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()` (the store is restored separately). The catalog,
        features, joiner and AUC are updated in place: the models hold references to them."""
        self._offsets = dict(state["offsets"])
        self.clock = state["clock"]
        self.events_trained = state["events_trained"]
        self.invalid_records = state["invalid_records"]
        self.duplicates = state["duplicates"]
        self.recent = state["recent"]
        self.models.load_state_dict(state["models"])
        for name in ("catalog", "features", "joiner", "auc"):
            vars(getattr(self, name)).update(vars(state[name]))
        self._seen = list(state["seen"])
        self._trained_users = list(state.get("trained_users", []))  # absent from older checkpoints
        self._rng.bit_generator.state = state["rng"]
        self._catalogue = dict(state.get("catalogue", {}))  # absent from older checkpoints
        self._content = OrderedDict.fromkeys(state.get("content", {}))
        self._content_new = set(state.get("content_new", []))
        self._erased = list(state.get("erased", []))
        self._erase_later = list(state.get("erase_later", []))
        self._user_records = dict(state.get("user_records", {}))
        self.experiment_counts = {k: list(v) for k, v in state.get("experiment_counts", {}).items()}
        self.feedback = state.get("feedback", ItemFeedback())
        self.last_checkpoint_s = state["written_at"]

    def health(self) -> TrainerHealth:
        """Progress as readiness sees it (`stall_after_s`); safe from any thread."""
        now, started = time.monotonic(), self._step_started
        running = now - started if started is not None else 0.0
        age = now - self._progress_at
        problem = ""
        if running > self.config.stall_after_s:
            problem = f"a training step has run for {running:.0f} s"
        elif self._held is not None and age > self.config.stall_after_s:
            problem = f"the store has been unavailable for {age:.0f} s ({len(self._held[0])} records held)"
        elif self.lag > 0 and age > self.config.stall_after_s:
            problem = f"no records consumed for {age:.0f} s while {self.lag} wait"
        return TrainerHealth(age, running, self.lag, problem)

    def train_records(self, records: list[LogRecord]) -> StepResult:
        """Decode `records` and train on them (records that do not decode, or are stamped more
        than `max_clock_skew_s` ahead of this clock, are dead-lettered instead). Besides events
        the log holds the gateway's own records (`trainer.items`, `trainer.events`): an item's
        catalogue record and a user's attributes set features now and go to serving with the
        next sync; a served list is read as its impression events; an erasure is done after
        the batch's events (held while a store shard is away)."""
        events: list[Event] = []
        accepted_ms: list[int] = []
        sources: list[LogRecord] = []
        dead: list[DeadLetter] = []
        skew_ms = int(self.config.max_clock_skew_s * 1000)
        erase: list[str] = []
        for record in records:
            try:
                if is_catalogue_record(record.value):  # not an event: passed on with the next sync
                    item = ItemRecord.from_log(record.value)
                    with self._lock:
                        self._catalogue[item.item_id] = item
                        key = int(feature_keys("item", [item.item_id])[0])
                        if not item.deleted and (item.attributes or item.categories):
                            categories = {"category": "|".join(item.categories)} if item.categories else {}
                            attributes = {**item.attributes, **categories}
                            self.features.set_item_attributes(key, attributes)
                            self._content[key] = None
                            self._content.move_to_end(key)
                            self._content_new.add(key)
                            while len(self._content) > self.config.max_feature_entities:
                                self._content_new.discard(self._content.popitem(last=False)[0])
                        else:
                            self._content.pop(key, None)
                            self._content_new.discard(key)
                    continue
                if record.value.startswith(USER_PREFIX):  # a user's attributes: features now, serving next sync
                    user = UserRecord.from_log(record.value)
                    with self._lock:
                        self.features.set_user_attributes(
                            int(feature_keys("user", [user.user_id])[0]), dict(user.attributes)
                        )
                        self._user_records[user.user_id] = user
                    continue
                if is_erase_record(record.value):  # after this batch's events (the user's included)
                    erase.append(erased_user(record.value))
                    continue
                if record.value.startswith(SERVED_PREFIX):  # a served list: its impressions
                    shown = served_events(record.value, max_skew_ms=skew_ms)
                    events.extend(shown)
                    accepted_ms.extend([record.timestamp_ms] * len(shown))
                    sources.extend([record] * len(shown))
                    continue
                events.append(Event.from_json(record.value, max_skew_ms=skew_ms))
                accepted_ms.append(record.timestamp_ms)
                sources.append(record)
            except InvalidEvent as e:
                dead.append(DeadLetter(record, f"{e.field}: {e.message}" if e.field else e.message))
                log.warning("dead-lettering undecodable record p%d@%d: %s", record.partition, record.offset, e)
            except Exception as e:  # whatever a record holds, it must not stop training
                dead.append(DeadLetter(record, f"undecodable: {type(e).__name__}"))
                log.exception("dead-lettering record p%d@%d", record.partition, record.offset)
        self._send_dead_letters(dead)
        self._erase_later.extend(erase)  # kept if the step finds the store away and holds the batch
        result = self.train_events(events, len(dead), np.array(accepted_ms, dtype=np.int64), sources)
        while self._erase_later:  # erasures a store outage held up go first
            try:
                self.erase_user(self._erase_later[0])
            except ConnectionError as e:  # the store is away: tried again with the next batch
                log.warning("erasure of a user held until the store answers: %s", e)
                break
            self._erase_later.pop(0)
        return result

    def erase_user(self, user_id: str) -> None:
        """Forget a user: their rows in every table that holds user keys (every shard), their
        history, attributes, recent-item window and open impressions, and what the next sync
        would have said of them; the next sync tells serving to drop their row, seen list and
        features. The next checkpoint holds none of it (older ones, until they rotate out, do)."""
        key = feature_keys("user", [user_id])
        with self._lock:
            removed = sum(self.store.table(name).delete(key) for name in USER_TABLES)
            self.features.forget_users(key)
            self.models.covisit.forget_users(key)
            self.models.profiles.forget_users(key)
            pending = self.joiner.forget_user(user_id)
            self._seen = [(u[u != key[0]], i[u != key[0]]) for u, i in self._seen]
            self._trained_users = [u[u != key[0]] for u in self._trained_users]
            self._erased.append(key)
            self._user_records.pop(user_id, None)
        log.info("erased a user: %d rows, %d open impressions", removed, pending)

    def _send_dead_letters(self, dead: list[DeadLetter]) -> None:
        if dead and self._dead_letter is not None:
            try:
                self._dead_letter(dead)
            except LogUnavailable as e:  # still counted and logged; training goes on
                log.warning("could not dead-letter %d records: %s", len(dead), e)

    def train_events(
        self,
        events: list[Event],
        invalid: int = 0,
        accepted_ms: np.ndarray | None = None,
        records: list[LogRecord] | None = None,
    ) -> StepResult:
        """One supervised step on decoded events (what `train_records` does after decoding;
        replays call it directly).

        A step that raises is retried once; if it raises again the events are split in
        halves, and halves in halves, until the events that make it raise are found: those
        are dead-lettered with the exception as their reason, the others trained. No
        exception of a step ends training. A step is not a transaction: what an attempt did
        before it raised (say, the catalogue's counts) stays, as with any at-least-once
        replay; `events_trained` counts each event once, when a step trains it.

        Args:
            accepted_ms: when the log accepted each event; the next sync message carries a
                sample of them, so serving can measure freshness.
            records: the log record of each event (what a dead letter carries; without,
                the event's JSON stands in for it).
        """
        with self._lock:
            result = self._train(events, invalid, records)
            if accepted_ms is not None and len(accepted_ms):
                self._accepted.append(accepted_ms[accepted_ms > 0])
        if self._on_step:
            self._on_step(result)
        return result

    def _train(self, events: list[Event], invalid: int, records: list[LogRecord] | None) -> StepResult:
        self.invalid_records += invalid
        first = self.recent.first_seen([e.event_id for e in events])
        duplicates = int((~first).sum())
        if duplicates:
            self.duplicates += duplicates
            events = [e for e, keep in zip(events, first.tolist(), strict=True) if keep]
            if records is not None:
                records = [r for r, keep in zip(records, first.tolist(), strict=True) if keep]
        if not events:
            return StepResult(0, invalid, 0, float("nan"), duplicates)
        sources: list[LogRecord | None] = list(records) if records is not None else [None] * len(events)
        return self._supervise(events, sources, invalid, duplicates)

    def _supervise(
        self, events: list[Event], sources: list[LogRecord | None], invalid: int, duplicates: int
    ) -> StepResult:
        """`_step` on `events` with a retry, then a bisection; see `train_events`."""
        outcome = _Supervised()
        try:
            self._attempt(events, sources, outcome)
        except ConnectionError as e:  # the store, not the data: the whole batch waits for it
            self.step_failures += outcome.failures + 1
            raise _StoreDown(events, sources, e) from e
        self.step_failures += outcome.failures
        if outcome.dead:
            self._send_dead_letters(outcome.dead)
        loss = float(np.average(outcome.losses, weights=outcome.weights)) if sum(outcome.weights) else float("nan")
        return StepResult(
            outcome.events, invalid, outcome.examples, loss, duplicates, outcome.failures, len(outcome.dead)
        )

    def _attempt(self, events: list[Event], sources: list[LogRecord | None], outcome: _Supervised) -> None:
        """One step, a retry if it raises, then a bisection; a `ConnectionError` passes through."""
        if (error := self._try(events, outcome)) is None:
            return
        log.warning("training step of %d events failed (%r); retrying once", len(events), error)
        if (error := self._try(events, outcome)) is None:
            return
        log.error(
            "training step of %d events failed twice; looking for the events at fault", len(events), exc_info=error
        )
        batch = list(zip(events, sources, strict=True))
        if len(batch) == 1:
            outcome.poisoned(batch[0], error)
        else:
            self._bisect(batch, outcome)

    def _bisect(self, batch: list[tuple[Event, LogRecord | None]], outcome: _Supervised) -> None:
        """Train each half of `batch` that trains; dead-letter the single events that raise."""
        for half in (batch[: len(batch) // 2], batch[len(batch) // 2 :]):
            if not half or (error := self._try([e for e, _ in half], outcome)) is None:
                continue
            if len(half) > 1:
                self._bisect(half, outcome)
            else:
                outcome.poisoned(half[0], error)

    def _try(self, events: list[Event], outcome: _Supervised) -> Exception | None:
        """One `_step` into `outcome`; the exception it raised (counted), None if it trained.
        A `ConnectionError` (the store is away) is raised on."""
        try:
            outcome.add(self._step(events))
        except ConnectionError:
            raise
        except Exception as e:
            outcome.failures += 1
            log.debug("step of %d events raised", len(events), exc_info=True)
            return e
        return None

    def _step(self, events: list[Event]) -> tuple[int, int, float]:
        """Train on deduplicated events: (events, examples, loss). A step that raises takes
        back the seen pairs and users it queued for the next sync (its events may be
        dead-lettered: serving must not list them as seen)."""
        queued = len(self._seen), len(self._trained_users)
        try:
            return self._train_step(events)
        except Exception:
            del self._seen[queued[0] :], self._trained_users[queued[1] :]
            raise

    def _train_step(self, events: list[Event]) -> tuple[int, int, float]:
        stamps = np.fromiter((e.timestamp_ms for e in events), dtype=np.float64, count=len(events)) / 1000.0
        now = self.clock.advance(stamps)
        user_keys = feature_keys("user", (e.user_id for e in events))
        item_keys = feature_keys("item", (e.item_id for e in events))
        positive = np.fromiter((e.is_positive for e in events), dtype=bool, count=len(events))
        labelled = positive | np.fromiter((e.type == "skip" for e in events), dtype=bool, count=len(events))
        times = self.clock.at(stamps)  # each event's model time
        self.blend_loss = self.models.blend_step(
            user_keys[positive], item_keys[positive], times[positive], learn=self.learning
        )
        # each event decays from its own time: a batch from a lagging partition is older than the clock
        self.catalog.observe(item_keys, [e.item_id for e in events], positive.astype(np.float64), times)
        self.features.observe(events, user_keys, item_keys)
        self._seen.append((user_keys[labelled], item_keys[labelled]))  # what exclude_seen leaves out
        self._trained_users.append(user_keys)
        if self.learning:
            self.models.sight(user_keys, item_keys, now)

        examples = self.joiner.push(events)
        if not examples:
            self.events_trained += len(events)
            return len(events), 0, float("nan")
        arms = [(x, x.event.context) for x in examples if x.event.type == "impression" and "arm" in x.event.context]
        u = feature_keys("user", (x.event.user_id for x in examples))
        i = feature_keys("item", (x.event.item_id for x in examples))
        y = np.fromiter((x.label for x in examples), dtype=np.float32, count=len(examples))
        unjoined = np.fromiter((x.source == "unjoined" and x.label > 0 for x in examples), dtype=bool)
        neg_u, neg_i = self._sample_negatives(u[unjoined], i[unjoined])
        u_all, i_all = np.concatenate([u, neg_u]), np.concatenate([i, neg_i])
        y_all = np.concatenate([y, np.zeros(len(neg_i), dtype=np.float32)])
        ranked = self.models.ranking_step(u_all, i_all, y_all, now, learn=self.learning)  # before retrieval learns
        pos = y > 0
        self.retrieval_loss = self.models.retrieval_step(u[pos], i[pos], now, learn=self.learning)
        self.auc.update(ranked.probs, y_all)  # scored before the step: progressive evaluation
        self.features.add_history(u[pos], i[pos])
        stamped = np.fromiter((x.event.timestamp_ms for x in examples), np.float64, len(examples)) / 1000.0
        self.models.profiles.observe(u[pos], self.features.item_attributes(i[pos]), self.clock.at(stamped[pos]))
        if self.learning:
            self.models.covisit.observe(u[pos], i[pos], now)
        if self.learning and time.monotonic() >= self._next_expiry:
            self.expire()
        shown = [x for x in examples if x.event.type == "impression"]
        if shown:
            labels = np.fromiter((x.label for x in shown), dtype=np.float64, count=len(shown))
            self.feedback.observe(feature_keys("item", (x.event.item_id for x in shown)), labels)
        for example, context in arms:  # an experiment's labelled impressions and their clicks
            counts = self.experiment_counts.setdefault((context.get("experiment", ""), context["arm"]), [0, 0])
            counts[0] += 1
            counts[1] += int(example.label > 0)
        self.events_trained += len(events)  # last: a step that raised counts none of them
        return len(events), len(y_all), ranked.loss

    def _sample_negatives(self, users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`negatives` sampled items per positive pair without impressions, minus accidental hits."""
        neg_items = self.catalog.sample(len(users) * self.config.negatives, self.config.uniform_negatives)
        neg_users = np.repeat(users, self.config.negatives)[: len(neg_items)]
        # Drop accidental hits: a sampled negative the same user chose in this batch.
        hit = np.isin(_pair_ids(neg_users, neg_items), _pair_ids(users, items))
        return neg_users[~hit], neg_items[~hit]

    def expire(self) -> int:
        """Evict rows whose TTL ran out by the model clock (`trainer.clock`); return how many
        (the next sync carries them)."""
        self._next_expiry = time.monotonic() + self.config.expiry_interval_s
        evicted = sum(self.store.table(name).evict_expired(self.clock.now_s) for name in TABLES)
        if evicted:
            log.info("expired %d rows unused for %.0f s of model time", evicted, self.config.ttl_s)
        return evicted

    def collect_sync(self) -> SyncMessage | None:
        """Changes since the previous call, as one sync message (None if nothing changed).

        What a call drained before it failed (a store shard went away mid-way) is not lost:
        it goes out with the next call's message."""
        with self._lock:
            seen, accepted, trained_users = self._seen, self._accepted, self._trained_users
            self._seen, self._accepted, self._trained_users = [], [], []
            catalogue, self._catalogue = self._catalogue, {}
            erased, self._erased = self._erased, []
            user_records, self._user_records = self._user_records, {}
            partial = SyncMessage(
                users=TableDelta.empty("user"),
                items=TableDelta.empty("item"),
                seen_users=np.concatenate([s[0] for s in seen]) if seen else np.zeros(0, np.uint64),
                seen_items=np.concatenate([s[1] for s in seen]) if seen else np.zeros(0, np.uint64),
                accepted_ms=self._sample(np.concatenate(accepted) if accepted else np.zeros(0, np.int64)),
                catalogue=catalogue,
                erased_users=np.unique(np.concatenate(erased)) if erased else np.zeros(0, np.uint64),
                user_records=user_records,
                clock_s=self.catalog.clock_s,
                trending_half_life_s=self.catalog.half_life_s,
                created_ms=now_ms(),
            )
            try:
                partial.users = self._serving_users(trained_users)
                partial.items = self._with_content(self.items.drain_delta())
                for table in self.models.ranking_deltas():
                    partial.tables[table.table] = table
                partial.tables[ITEM_FEEDBACK] = TableDelta(ITEM_FEEDBACK, *self.feedback.drain())
                partial.popular_keys, partial.popular_scores = self.catalog.popular(self.config.popular_items)
                # names again with every row that goes out: serving forgets an evicted item's
                # name, and the item may come back (its key must never be served as its id)
                partial.item_names = {**self.catalog.names(partial.items.keys), **self.catalog.drain_new_names()}
                if time.monotonic() >= self._next_dense_sync:
                    partial.dense = self.models.dense_state()
                    self._next_dense_sync = time.monotonic() + self.config.dense_sync_interval_s
            except Exception:  # what was drained goes out with the next call's message
                self._unsent = partial if self._unsent is None else self._unsent.then(partial)
                raise
            message = partial if self._unsent is None else self._unsent.then(partial)
            self._unsent = None
        return None if message.is_empty() else message

    def _with_content(self, items: TableDelta) -> TableDelta:
        """`items` (the drained item rows) plus the content rows of catalogued items that have
        attributes and still no trained row: of those new since the last sync every time, of
        all of them every CONTENT_REFRESH syncs (the rows they are the mean of move as the model
        learns). An item found with a row of its own leaves the set: its row goes out as any
        other's. Between refreshes only the new items are looked at, not the whole set."""
        self._syncs += 1
        if self._syncs % CONTENT_REFRESH == 0:
            keys = np.fromiter(self._content, np.uint64, len(self._content))
        else:
            keys = np.fromiter(self._content_new, np.uint64, len(self._content_new))
        self._content_new = set()
        if not len(keys):
            return items
        trained = self.items.get(keys)[1]
        for key in keys[trained].tolist():
            self._content.pop(key, None)
        content, rows = self.models.content_rows(keys[~trained & ~np.isin(keys, items.evicted)])
        if not len(content):
            return items
        rows = rows.astype(items.rows.dtype if len(items.keys) else rows.dtype)
        return TableDelta(
            items.table,
            np.concatenate([items.keys, content]),
            np.concatenate([items.rows.reshape(-1, rows.shape[1]), rows]),
            items.evicted,
            items.version,
        )

    def _serving_users(self, trained: list[np.ndarray]) -> TableDelta:
        """The serving vectors of the users trained on since the last sync (those admitted), and
        every eviction drained from the store. Other changed user rows are another worker's
        to publish: their vectors need histories only that worker has. Rows another worker
        drained first are read from the store. If this fails, the drained rows and the users
        are kept for the next call."""
        drained = self.users.drain_delta()
        if self._undrained_users is not None:  # drained by a call that failed after it
            drained, self._undrained_users = self._undrained_users.then(drained), None
        try:
            users = np.unique(np.concatenate(trained)) if trained else np.zeros(0, np.uint64)
            mine = np.isin(drained.keys, users)
            elsewhere = users[~np.isin(users, drained.keys)]
            rows, found = self.users.get(elsewhere)  # not admitted, or drained by another worker
            keys = np.concatenate([drained.keys[mine], elsewhere[found]])
            rows = np.concatenate([drained.rows[mine], rows[found]])
            evicted = drained.evicted[~np.isin(drained.evicted, keys)]  # re-admitted since the drain
            return self.models.serving_users(TableDelta(drained.table, keys, rows, evicted, drained.version))
        except Exception:
            self._undrained_users = drained
            self._trained_users[:0] = trained  # their rows are read again next time
            raise

    def _sample(self, accepted_ms: np.ndarray) -> np.ndarray:
        """At most `freshness_samples` of the acceptance times, uniformly (percentiles stay unbiased)."""
        if len(accepted_ms) <= self.config.freshness_samples:
            return accepted_ms
        return self._rng.choice(accepted_ms, self.config.freshness_samples, replace=False)

    def run(self, stop: threading.Event) -> None:
        """Train until `stop` is set, then leave the consumer group; a log outage, or any other
        error outside a step, is retried, not fatal. The store stays open for a last sync;
        `close()` it after."""
        while not stop.is_set():
            try:
                self.poll_and_train()
            except LogUnavailable as e:
                log.warning("event log unavailable: %s; retrying", e)
                stop.wait(1.0)
            except ConnectionError as e:  # a store shard is away: the batch is held (`poll_and_train`)
                log.warning("%s; retrying in 1 s", e)
                stop.wait(1.0)
            except Exception:  # whatever went wrong, training goes on (readiness tells if it stalls)
                self.step_failures += 1
                log.exception("trainer poll failed; retrying in 1 s")
                stop.wait(1.0)
        try:
            self.checkpoint()  # what was trained since the last one is kept, its offsets committed
        except Exception:
            log.exception("final checkpoint failed; the log replays from the previous one")
        self._consumer.close()  # its partitions go to the other members now

    def close(self) -> None:
        """Leave the consumer group (if `run` has not) and close the store and the dense parameters."""
        self._consumer.close()
        self.store.close()
        self.dense.close()
