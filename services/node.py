"""One freshrec process: the gateway role, the trainer role, or both (embedded `up`)."""

from __future__ import annotations

import gc
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import faiss
import grpc
import torch
import uvicorn
from prometheus_client import start_http_server

from embedding_store import TableStats
from services import heap, metrics
from services.config import Config
from services.experiments import Experiments
from services.gateway.core import ComponentHealth, Gateway
from services.gateway.grpc_server import GrpcEdge
from services.gateway.rest import create_app
from services.serving import ServingReplica
from services.serving_store import MemoryServingStore, codec, open_serving_store
from services.stages import STAGES, RemoteStages, serve_stage
from trainer.checkpoint import latest_file
from trainer.eventlog import open_log
from trainer.loop import StepResult, Trainer
from trainer.models import TABLES
from trainer.sync import SyncMessage, SyncPublisher

log = logging.getLogger(__name__)
SERVING_SNAPSHOT = "serving.bin"  # the embedded serving store's state, in each trainer checkpoint

TRIM_S = 10.0  # how often freed heap memory is handed back to the system (`_trim_heap`)
REFREEZE_S = 600.0  # how often the served state is collected once and frozen again (`Node._on_apply`)

ROLES = frozenset({"gateway", "trainer", "retrieval", "ranking"})


class Node:
    """Wire the parts of one process from its config and run them on background threads.

    Args:
        config: the process configuration.
        roles: "gateway" (REST + gRPC + serving replica, or the remote stages when
            `server.retrieval_url`/`ranking_url` are set) and/or "trainer" (trainer + sync);
            or one serving stage, "retrieval" or "ranking" (a replica served over gRPC on
            `server.grpc_port`, `services.stages`).

    Example:
        >>> from services.config import load_config
        >>> ports = {"server.host": "127.0.0.1", "server.http_port": 0, "server.grpc_port": 0}
        >>> node = Node(load_config(env={}, overrides=ports))
        >>> node.start()
        >>> node.http_port > 0 and node.grpc_port > 0
        True
        >>> node.stop()
    """

    def __init__(self, config: Config, roles: Iterable[str] = ("gateway", "trainer")) -> None:
        self.config = config
        self.roles = frozenset(roles)
        if not self.roles or not self.roles <= ROLES:
            raise ValueError(f"roles: expected a subset of {sorted(ROLES)}, got {sorted(self.roles)}")
        self.stage = next(iter(self.roles & set(STAGES)), None)
        if self.stage is not None and len(self.roles) > 1:
            raise ValueError(f"roles: a {self.stage} service runs alone, got {sorted(self.roles)}")
        memory_store = config.serving_store_url.startswith("memory://")
        if self.stage and memory_store:
            raise ValueError(f"serving_store_url: a {self.stage} service follows a shared store (redis://...)")
        if not self.stage and config.embedded != memory_store:
            # One process can share in-process parts, two cannot: mixing would silently split state.
            raise ValueError("log_url/serving_store_url: memory:// must be used for both or neither (file:// log: too)")
        if "trainer" in self.roles and config.log_url.startswith("memory://") and config.trainer.checkpoint_dir:
            # a checkpoint's offsets point into a log that dies with the process
            raise ValueError("trainer.checkpoint_dir: checkpoints need a durable event log (kafka:// or file://)")
        # a stage reads only the serving store: it never opens the event log
        self.log = None if self.stage else open_log(config.log_url, partitions=config.log_partitions)
        self.store = open_serving_store(config.serving_store_url)
        checkpoints = Path(config.trainer.checkpoint_dir) if config.trainer.checkpoint_dir else None
        if isinstance(self.store, MemoryServingStore) and checkpoints is not None:
            # embedded: the serving state lives in this process; it is checkpointed with the
            # trainer and comes back from the newest checkpoint that has it
            saved = latest_file(checkpoints, SERVING_SNAPSHOT)
            if saved is not None:
                self.store.restore(codec.decode(saved.read_bytes()))
        self._stop = threading.Event()
        self._sync_stop = threading.Event()  # set once the trainer has stopped: the last sync has all it trained
        self._trainer_thread: threading.Thread | None = None
        self._sync_thread: threading.Thread | None = None
        self._stopped = False
        self._refreeze_at = 0.0  # the first applied version freezes the state
        self._threads: list[threading.Thread] = []
        self.http_port = 0
        self.grpc_port = 0
        self._http: uvicorn.Server | None = None
        self._grpc: GrpcEdge | None = None

        self.trainer: Trainer | None = None
        self._started_s = time.time()
        self._checkpoints_counted = 0
        self._failures_counted = 0
        self._arms_counted: dict[tuple[str, str], tuple[int, int]] = {}  # exported per experiment arm
        self.publisher: SyncPublisher | None = None
        if "trainer" in self.roles:
            assert self.log is not None
            self.trainer = Trainer(
                config.trainer,
                self.log.consumer(config.trainer.group_id),
                on_step=self._on_step,
                dead_letter=self.log.dead_letter,
            )
            self._refuse_a_mix(config)
            experiments = Experiments(config.server.experiments)
            for experiment in experiments.names():  # each configured arm's series, from 0
                for arm in experiments.arms(experiment):
                    metrics.EXPERIMENT_IMPRESSIONS.labels(experiment, arm.name)
                    metrics.EXPERIMENT_CLICKS.labels(experiment, arm.name)
            if isinstance(self.store, MemoryServingStore) and checkpoints is not None:
                store = self.store
                self.trainer.checkpoint_extras = lambda: {
                    SERVING_SNAPSHOT: codec.encode(store.snapshot(), store.row_dtype)
                }
            metrics.STORE.watch(self._store_stats)
            self.publisher = SyncPublisher(
                self.trainer.collect_sync,
                self.store,
                config.trainer.sparse_sync_interval_s,
                on_publish=self._on_publish,
                stall_after_s=config.trainer.stall_after_s,
                min_interval_s=config.trainer.sparse_sync_min_interval_s,
            )
        self.replica: ServingReplica | None = None
        self.gateway: Gateway | None = None
        self.remote: RemoteStages | None = None
        self._stage_server: grpc.Server | None = None
        if self.stage or ("gateway" in self.roles and not config.server.remote_stages):
            self.replica = ServingReplica(
                self.store, candidates=config.server.candidates, on_apply=self._on_apply, index=config.index
            )
            if "trainer" not in self.roles and config.server.torch_threads:
                # small batches: one thread per forward pass and per search beats threads that
                # wake, spin and take the cores from the REST and gRPC event loops. This sets the
                # process' defaults (MKL's) and this thread's; an OpenMP count is per thread, so
                # the model thread sets its own (`RecommendBatcher`, in a trainer's process too)
                torch.set_num_threads(config.server.torch_threads)
                faiss.omp_set_num_threads(config.server.torch_threads)
        if "gateway" in self.roles:
            assert self.log is not None
            if config.server.remote_stages:
                server = config.server
                self.remote = RemoteStages(server.retrieval_url, server.ranking_url, server.request_timeout_s)
            recommender = self.remote or self.replica
            assert recommender is not None
            components = {"trainer": self._trainer_health, "sync": self._sync_health} if self.trainer else {}
            self.gateway = Gateway(config.server, self.log, recommender, components)

    def _refuse_a_mix(self, config: Config) -> None:
        """A trainer that starts from empty tables must not publish into a serving store that
        holds an earlier trainer's model: replicas would serve old rows beside new ones."""
        assert self.trainer is not None
        fresh = self.trainer.last_checkpoint_s == 0 and config.trainer.store_url.startswith("local://")
        if not fresh or isinstance(self.store, MemoryServingStore):
            return
        try:
            version = self.store.latest_version()
        except Exception as e:  # the store is down: the trainer waits for it; nothing to compare yet
            log.warning("serving store unavailable at start (%s); not checked for an earlier model", e)
            return
        if version > 0:
            self.trainer.close()
            if self.log is not None:
                self.log.close()
            self.store.close()
            raise ValueError(
                f"serving_store_url: {config.serving_store_url} already holds version {version} of an earlier "
                f"trainer's model, but this trainer starts with empty tables (no checkpoint in "
                f"{config.trainer.checkpoint_dir or 'trainer.checkpoint_dir, which is not set'}): point "
                "trainer.checkpoint_dir at that trainer's checkpoints, or start from an empty serving store"
            )

    def _trainer_health(self) -> ComponentHealth:
        assert self.trainer is not None
        alive = self._trainer_thread is not None and self._trainer_thread.is_alive()
        health = self.trainer.health()
        detail = {
            "alive": alive,
            "last_step_age_s": round(health.last_step_age_s, 3),
            "step_running_s": round(health.step_running_s, 3),
            "lag": health.lag,
            "step_failures": self.trainer.step_failures,
        }
        problem = health.problem if alive or self._trainer_thread is None else "the training thread has died"
        return ComponentHealth(problem, detail)

    def _sync_health(self) -> ComponentHealth:
        assert self.publisher is not None
        alive = self._sync_thread is not None and self._sync_thread.is_alive()
        problem = self.publisher.health() if alive or self._sync_thread is None else "the sync thread has died"
        return ComponentHealth(problem, {"alive": alive, "pending": self.publisher.pending})

    def _on_step(self, step: StepResult) -> None:
        assert self.trainer is not None
        if step.events and self.publisher is not None:
            self.publisher.nudge()  # its rows go out once the least sync interval allows
        metrics.TRAINER_EVENTS.inc(step.events)
        metrics.TRAINER_INVALID.inc(step.invalid)
        metrics.TRAINER_DUPLICATES.inc(step.duplicates)
        metrics.TRAINER_STEP_FAILURES.inc(self.trainer.step_failures - self._failures_counted)
        self._failures_counted = self.trainer.step_failures
        metrics.TRAINER_LAG.set(self.trainer.lag)
        metrics.TRAINER_PARTITIONS.set(len(self.trainer.partitions))
        metrics.JOINER_PENDING.set(self.trainer.joiner.pending)
        metrics.JOINER_CLOSED.set(self.trainer.joiner.closed)
        if self.config.trainer.checkpoint_dir:
            since = self.trainer.last_checkpoint_s or self._started_s
            metrics.TRAINER_CHECKPOINT_AGE.set(max(time.time() - since, 0.0))
            metrics.TRAINER_CHECKPOINTS.inc(self.trainer.checkpoints_written - self._checkpoints_counted)
            self._checkpoints_counted = self.trainer.checkpoints_written
        else:
            metrics.TRAINER_CHECKPOINT_AGE.set(float("nan"))
        metrics.TRAINER_EXAMPLES.inc(step.examples)
        for (experiment, arm), (shown, clicked) in self.trainer.experiment_counts.items():
            before = self._arms_counted.get((experiment, arm), (0, 0))
            metrics.EXPERIMENT_IMPRESSIONS.labels(experiment, arm).inc(shown - before[0])
            metrics.EXPERIMENT_CLICKS.labels(experiment, arm).inc(clicked - before[1])
            self._arms_counted[(experiment, arm)] = (shown, clicked)
        if step.examples:
            metrics.TRAINER_LOSS.set(step.loss)
            metrics.TRAINER_AUC.set(self.trainer.auc.value())
            metrics.TRAINER_LOGLOSS.set(self.trainer.auc.log_loss())
            metrics.TRAINER_RETRIEVAL_LOSS.set(self.trainer.retrieval_loss)

    def _store_stats(self) -> list[TableStats]:
        assert self.trainer is not None
        return [self.trainer.store.table(name).stats() for name in TABLES]

    def _on_publish(self, message: SyncMessage) -> None:
        metrics.SYNC_VERSION.set(message.version)
        metrics.SYNC_ROWS.labels("user").inc(len(message.users.keys))
        metrics.SYNC_ROWS.labels("item").inc(len(message.items.keys))
        for name, delta in message.tables.items():
            metrics.SYNC_ROWS.labels(name).inc(len(delta.keys))
        metrics.SYNC_BYTES.inc(message.encoded_bytes)  # what the stream holds per version

    def _on_apply(self, message: SyncMessage) -> None:
        # The served state (rows, names, seen lists) is millions of long-lived objects; left
        # to the cyclic collector, each full collection walks all of them and stalls every
        # request for hundreds of ms. Frozen, the collector skips them (reference counting
        # still frees what a later version replaces). Frozen objects are never collected,
        # cycles among them included. So each freeze first collects what is not frozen yet
        # (only what was made since the last one: short), lest the garbage cycles made since
        # then become permanent; and every REFREEZE_S the state is thawed for that collection,
        # so cycles that became garbage once frozen live at most that long.
        now = time.monotonic()
        if now >= self._refreeze_at:
            self._refreeze_at = now + REFREEZE_S
            gc.unfreeze()
        gc.collect()
        gc.freeze()
        metrics.SERVING_VERSION.set(message.version)
        if len(message.accepted_ms):
            now_ms = time.time() * 1000
            for age_ms in (now_ms - message.accepted_ms).tolist():
                metrics.FRESHNESS.observe(max(age_ms, 0.0) / 1000)

    def _trim_heap(self) -> None:
        """Every TRIM_S until the node stops, hand the heap's free pages back to the system
        (glibc `malloc_trim`; only started on glibc, `heap.trims()`), on a thread of its own
        that holds no lock of ours (ctypes lets the GIL go for the call).

        Training steps, syncs and requests allocate and free tensors and arrays of many sizes
        from several threads; glibc keeps the freed pages, scattered among live ones, so the
        resident size crept up under steady load (about 45 MB per 100,000 events, measured
        in-process with bench.soak's workload) though the live data did not grow. The trim
        held back only part of it; the long-running roles now run on jemalloc (`heap`).
        """
        while not self._stop.wait(TRIM_S):
            heap.trim()

    def _spawn(self, name: str, target: Callable[..., object], *args: object) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

    def start(self) -> None:
        """Start every part of the roles; returns once the servers listen."""
        if heap.trims():
            self._spawn("trim", self._trim_heap)
        if self.trainer is not None and self.publisher is not None:
            self._trainer_thread = self._spawn("trainer", self.trainer.run, self._stop)
            self._sync_thread = self._spawn("sync", self.publisher.run, self._sync_stop)
            if "gateway" not in self.roles and self.config.metrics_port:
                start_http_server(self.config.metrics_port)
        if self.replica is not None:
            try:
                self.replica.bootstrap()
            except Exception as e:  # serve (cold) and keep retrying in the replica thread; /readyz says 503
                log.warning("serving store unavailable at start (%s); retrying in the background", e)
            self._spawn("replica", self.replica.run, self._stop)
        if self.stage is not None and self.replica is not None:
            address = f"{self.config.server.host}:{self.config.server.grpc_port}"
            self._stage_server, self.grpc_port = serve_stage(self.stage, self.replica, address)
            if self.config.metrics_port:
                start_http_server(self.config.metrics_port)
            log.info("%s service: gRPC on %s:%d", self.stage, self.config.server.host, self.grpc_port)
        if self.gateway is not None:
            host = self.config.server.host
            self._grpc = GrpcEdge(self.gateway, f"{host}:{self.config.server.grpc_port}")
            self.grpc_port = self._grpc.port
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, self.config.server.http_port))
            self.http_port = sock.getsockname()[1]
            self._http = uvicorn.Server(
                uvicorn.Config(create_app(self.gateway), log_level="warning", lifespan="off", access_log=False)
            )
            self._spawn("http", self._http.run, [sock])
            while not self._http.started and self._threads[-1].is_alive():
                self._stop.wait(0.02)
            log.info("REST on %s:%d, gRPC on %s:%d", host, self.http_port, host, self.grpc_port)

    def wait(self) -> None:
        """Block until `request_stop()` or `stop()` (or Ctrl-C in the caller)."""
        self._stop.wait()

    def request_stop(self) -> None:
        """Ask the node to stop (safe from a signal handler); `wait()` then returns."""
        self._stop.set()

    def stop(self) -> None:
        """Stop every part and close the log and the store; calling it again does nothing."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        if self._http is not None:
            self._http.should_exit = True
        if self._grpc is not None:
            self._grpc.stop(grace=1.0)
        if self._stage_server is not None:
            self._stage_server.stop(grace=1.0).wait()
        if self.gateway is not None:
            self.gateway.close()
        if self.remote is not None:
            self.remote.close()
        if self._trainer_thread is not None:
            self._trainer_thread.join(timeout=30)
        self._sync_stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        if self.trainer is not None:
            self.trainer.close()
        metrics.STORE.unwatch(self._store_stats)
        if self.log is not None:
            self.log.close()
        self.store.close()
