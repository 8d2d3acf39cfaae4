"""gRPC edge of the gateway, with the standard health-checking and reflection services."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from proto import freshrec_pb2 as pb
from proto import freshrec_pb2_grpc as pb_grpc
from services import metrics
from services.errors import FreshrecError
from services.gateway import pb as adapt
from services.gateway.core import Gateway

log = logging.getLogger(__name__)
T = TypeVar("T")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Gateway"].full_name
MAX_MESSAGE_BYTES = 8 * 1024 * 1024


class GatewayServicer(pb_grpc.GatewayServicer):
    """Maps each RPC onto `Gateway`; freshrec errors become their gRPC status codes."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def _call(self, method: str, context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
        start = time.perf_counter()
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:  # the caller has given up already: do no work
            metrics.REQUESTS.labels("grpc", method, grpc.StatusCode.DEADLINE_EXCEEDED.name).inc()
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"{method}: deadline exceeded before it started")
        code = grpc.StatusCode.OK
        try:
            return fn()
        except FreshrecError as e:
            code = e.grpc_code
            context.abort(code, str(e))
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("unhandled error in %s", method)
            context.abort(code, "internal error")
        finally:
            metrics.REQUESTS.labels("grpc", method, code.name).inc()
            metrics.REQUEST_LATENCY.labels("grpc", method).observe(time.perf_counter() - start)
        raise AssertionError("unreachable: abort raises")

    def Ingest(self, request: pb.IngestRequest, context: grpc.ServicerContext) -> pb.IngestResponse:
        return self._call(
            "Ingest",
            context,
            lambda: adapt.ingest_to_pb(
                self._gateway.ingest([adapt.event_from_pb(e) for e in request.events], transport="grpc")
            ),
        )

    def Recommend(self, request: pb.RecommendRequest, context: grpc.ServicerContext) -> pb.RecommendResponse:
        # the caller's deadline, within the server's own limit (no deadline reads as a far-off one)
        timeout = min(context.time_remaining() or math.inf, self._gateway.config.request_timeout_s)
        return self._call(
            "Recommend",
            context,
            lambda: adapt.recommendation_to_pb(
                self._gateway.recommend(request.user_id, request.k, adapt.exclude_seen(request), timeout)
            ),
        )

    def SimilarItems(self, request: pb.SimilarItemsRequest, context: grpc.ServicerContext) -> Any:
        def run() -> pb.SimilarItemsResponse:
            version, items = self._gateway.similar_items(request.item_id, request.k)
            return pb.SimilarItemsResponse(model_version=version, items=adapt.items_to_pb(items))

        return self._call("SimilarItems", context, run)


def create_server(gateway: Gateway, address: str, workers: int = 8) -> tuple[grpc.Server, int]:
    """A started-ready (not yet started) gRPC server bound to `address`; returns it and its port."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    pb_grpc.add_GatewayServicer_to_server(GatewayServicer(gateway), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"gRPC server could not bind {address}")
    return server, port
