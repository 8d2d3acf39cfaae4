"""Prometheus series of every freshrec process (all prefixed `freshrec_`)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "freshrec_requests_total", "Gateway requests by transport, method and outcome", ["transport", "method", "code"]
)
REQUEST_LATENCY = Histogram(
    "freshrec_request_latency_seconds",
    "Gateway request latency",
    ["transport", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
EVENTS_ACCEPTED = Counter("freshrec_events_accepted_total", "Events acknowledged by the gateway", ["transport"])
EVENTS_REJECTED = Counter("freshrec_events_rejected_total", "Events rejected by validation", ["field"])

TRAINER_EVENTS = Counter("freshrec_trainer_events_total", "Events the trainer has trained on")
TRAINER_INVALID = Counter("freshrec_trainer_invalid_records_total", "Log records the trainer could not decode")
TRAINER_EXAMPLES = Counter("freshrec_trainer_examples_total", "Labelled examples trained on")
TRAINER_LOSS = Gauge("freshrec_trainer_loss", "BCE loss of the latest training step")
TRAINER_AUC = Gauge("freshrec_trainer_progressive_auc", "Progressive (score-before-train) AUC since start")
STORE_IDS = Gauge("freshrec_store_ids", "Rows in an embedding table", ["table"])

SYNC_VERSION = Gauge("freshrec_sync_published_version", "Latest version published by the trainer")
SYNC_ROWS = Counter("freshrec_sync_rows_total", "Rows published to the serving store", ["table"])
SERVING_VERSION = Gauge("freshrec_serving_version", "Model version the serving replica answers with")
