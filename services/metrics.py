"""Prometheus series of every freshrec process (all prefixed `freshrec_`)."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator

import grpc
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from embedding_store import TableStats
from services import heap

log = logging.getLogger(__name__)

REQUESTS = Counter(
    "freshrec_requests_total", "Gateway requests by transport, method and outcome", ["transport", "method", "code"]
)
REQUEST_LATENCY = Histogram(
    "freshrec_request_latency_seconds",
    "Gateway request latency",
    ["transport", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
RECOMMEND_BATCH = Histogram(
    "freshrec_recommend_batch_size",
    "Recommendation calls answered by one ranker forward pass",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
RECOMMEND_QUEUE = Gauge("freshrec_recommend_queue", "Recommendation calls waiting for the model thread")
EVENTS_ACCEPTED = Counter("freshrec_events_accepted_total", "Events acknowledged by the gateway", ["transport"])
EVENTS_REJECTED = Counter("freshrec_events_rejected_total", "Events rejected by validation", ["field"])
IMPRESSIONS_WRITTEN = Counter("freshrec_impressions_written_total", "Impressions of served lists written to the log")
IMPRESSIONS_DROPPED = Counter(
    "freshrec_impressions_dropped_total", "Impressions of served lists dropped (the log was down or too slow)"
)
EXPERIMENT_IMPRESSIONS = Counter(
    "freshrec_experiment_impressions_total",
    "Impressions of an experiment arm's lists that the joiner labelled",
    ["experiment", "arm"],
)
EXPERIMENT_CLICKS = Counter(
    "freshrec_experiment_clicks_total", "Positive labels among those impressions", ["experiment", "arm"]
)
CATALOGUE_CHANGES = Counter("freshrec_catalogue_changes_total", "Item records and deletions logged by the gateway")

TRAINER_EVENTS = Counter("freshrec_trainer_events_total", "Events the trainer has trained on")
TRAINER_INVALID = Counter("freshrec_trainer_invalid_records_total", "Log records the trainer could not decode")
TRAINER_DUPLICATES = Counter(
    "freshrec_trainer_duplicate_events_total", "Redelivered events dropped (an event_id already trained on)"
)
TRAINER_STEP_FAILURES = Counter(
    "freshrec_trainer_step_failures_total",
    "Training steps (and polls) that raised: each retried, or split to dead-letter the events at fault",
)
TRAINER_EXAMPLES = Counter("freshrec_trainer_examples_total", "Labelled examples trained on")
TRAINER_LOSS = Gauge("freshrec_trainer_loss", "BCE loss of the latest training step")
TRAINER_AUC = Gauge("freshrec_trainer_progressive_auc", "Progressive (score-before-train) AUC since start")
TRAINER_LOGLOSS = Gauge("freshrec_trainer_progressive_logloss", "Progressive (score-before-train) log loss since start")
TRAINER_LAG = Gauge("freshrec_trainer_consumer_lag", "Records of the trainer's partitions it has not read yet")
TRAINER_PARTITIONS = Gauge(
    "freshrec_trainer_partitions", "Event-log partitions this trainer worker is assigned in its consumer group"
)
JOINER_PENDING = Gauge(
    "freshrec_joiner_pending_impressions", "Impressions waiting in the join window for an action (bounded by time)"
)
JOINER_CLOSED = Gauge(
    "freshrec_joiner_closed_impressions",
    "Closed impressions remembered to recognise late actions (bounded by the joiner's max_closed)",
)
TRAINER_RETRIEVAL_LOSS = Gauge("freshrec_trainer_retrieval_loss", "In-batch softmax loss of the latest step")
TRAINER_CHECKPOINT_AGE = Gauge(
    "freshrec_trainer_checkpoint_age_seconds",
    "Seconds since the newest checkpoint (since the trainer started, before its first; NaN with checkpoints off)",
)
TRAINER_CHECKPOINTS = Counter("freshrec_trainer_checkpoints_total", "Checkpoints the trainer has written")

SYNC_VERSION = Gauge("freshrec_sync_published_version", "Latest version published by the trainer")
SYNC_ROWS = Counter("freshrec_sync_rows_total", "Rows published to the serving store", ["table"])
SYNC_BYTES = Counter("freshrec_sync_bytes_total", "Encoded bytes of the versions published (fp16 rows by default)")
SERVING_VERSION = Gauge("freshrec_serving_version", "Model version the serving replica answers with")
FRESHNESS_BUCKETS = (
    0.1,
    0.2,
    0.3,
    0.4,
    0.5,
    0.6,
    0.7,
    0.8,
    0.9,
    1.0,
    1.25,
    1.5,
    1.75,
    2.0,
    2.5,
    3.0,
    4.0,
    5.0,
    7.5,
    10.0,
    30.0,
    60.0,
)
FRESHNESS = Histogram(
    "freshrec_freshness_seconds",
    "Time from an event's acceptance by the log to the first version a serving replica serves with it in",
    buckets=FRESHNESS_BUCKETS,
)


class GrpcObserver(grpc.ServerInterceptor):
    """Counts and times every unary call of a gRPC server into `freshrec_requests_total` and
    `freshrec_request_latency_seconds` (label `transport`), by method and status code."""

    def __init__(self, transport: str) -> None:
        self._transport = transport

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner, method = handler.unary_unary, handler_call_details.method.rsplit("/", 1)[-1]

        def observed(request: object, context: grpc.ServicerContext) -> object:
            start, failed = time.perf_counter(), True
            try:
                response = inner(request, context)
                failed = False
                return response
            finally:
                code = context.code() or (grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK)
                REQUESTS.labels(self._transport, method, code.name).inc()
                REQUEST_LATENCY.labels(self._transport, method).observe(time.perf_counter() - start)

        return grpc.unary_unary_rpc_method_handler(
            observed, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


class StoreCollector(Collector):
    """Embedding-store series, read from the stores' own counters at scrape time.

    Processes register what they hold with `watch(source)`, where `source()` returns the
    stats of every table (or shard slice) it holds; stats of the same table name add up.
    """

    def __init__(self) -> None:
        self._sources: list[Callable[[], list[TableStats]]] = []
        self._lock = threading.Lock()

    def watch(self, source: Callable[[], list[TableStats]]) -> None:
        with self._lock:
            self._sources.append(source)

    def unwatch(self, source: Callable[[], list[TableStats]]) -> None:
        with self._lock:
            if source in self._sources:
                self._sources.remove(source)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            sources = list(self._sources)
        totals: dict[str, TableStats] = {}
        for source in sources:
            try:
                for s in source():
                    totals[s.table] = totals[s.table] + s if s.table in totals else s
            except Exception as e:  # a remote shard that is down must not break the whole scrape
                log.debug("store stats unavailable: %s", e)
                continue
        ids = GaugeMetricFamily("freshrec_store_ids", "Rows in an embedding table", labels=["table"])
        size = GaugeMetricFamily("freshrec_store_bytes", "Memory held by an embedding table", labels=["table"])
        admissions = CounterMetricFamily("freshrec_store_admissions", "Rows created", labels=["table"])
        filtered = CounterMetricFamily(
            "freshrec_store_filtered_lookups", "Lookups answered with the default vector", labels=["table"]
        )
        evictions = CounterMetricFamily("freshrec_store_evictions", "Rows removed", labels=["table", "reason"])
        for name, s in sorted(totals.items()):
            ids.add_metric([name], s.ids)
            size.add_metric([name], s.bytes)
            admissions.add_metric([name], s.admissions)
            filtered.add_metric([name], s.filtered_lookups)
            evictions.add_metric([name, "expired"], s.evicted_expired)
            evictions.add_metric([name, "capacity"], s.evicted_capacity)
        yield from (ids, size, admissions, filtered, evictions)


STORE = StoreCollector()
REGISTRY.register(STORE)


class MemoryCollector(Collector):
    """What the process' memory holds, read at scrape time: the C heap's bytes in use and
    freed-but-kept (jemalloc's or glibc's statistics; absent elsewhere), and the objects
    `gc.freeze()` took out of the cyclic collector's reach (`services.node` freezes the
    served state)."""

    def collect(self) -> Iterator[Metric]:
        frozen = GaugeMetricFamily("freshrec_gc_frozen_objects", "Objects frozen out of the cyclic collector")
        frozen.add_metric([], gc.get_freeze_count())
        yield frozen
        held = heap.info()
        if held is not None:
            family = GaugeMetricFamily(
                "freshrec_heap_bytes",
                "C heap bytes in use, and freed but kept by the allocator (jemalloc or glibc)",
                labels=["state", "allocator"],
            )
            family.add_metric(["in_use", held.allocator], held.in_use)
            family.add_metric(["free", held.allocator], held.free)
            yield family


REGISTRY.register(MemoryCollector())
