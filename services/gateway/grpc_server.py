"""gRPC edge of the gateway (grpc.aio on an event loop of its own), with the standard
health-checking and reflection services.

Recommendation calls await the gateway's model thread (`services.gateway.batcher`) on the
loop, so no thread waits per call; ingestion and similar-item calls, which block on the log
or the replica's lock, run on the loop's default thread pool.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from proto import freshrec_pb2 as pb
from proto import freshrec_pb2_grpc as pb_grpc
from services import metrics
from services.errors import FreshrecError
from services.gateway import pb as adapt
from services.gateway.auth import bearer
from services.gateway.core import Gateway

log = logging.getLogger(__name__)
T = TypeVar("T")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Gateway"].full_name
MAX_MESSAGE_BYTES = 8 * 1024 * 1024


class GatewayServicer(pb_grpc.GatewayServicer):
    """Maps each RPC onto `Gateway`; freshrec errors become their gRPC status codes."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    async def _call(
        self, method: str, scope: str, context: grpc.aio.ServicerContext, fn: Callable[[], Awaitable[T]]
    ) -> T:
        start = time.perf_counter()
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:  # the caller has given up already: do no work
            metrics.REQUESTS.labels("grpc", method, grpc.StatusCode.DEADLINE_EXCEEDED.name).inc()
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"{method}: deadline exceeded before it started")
        code = grpc.StatusCode.OK
        try:
            metadata = {m.key: m.value for m in context.invocation_metadata() or () if isinstance(m.value, str)}
            self._gateway.guard.check(bearer(metadata.get("authorization"), metadata.get("x-api-key")), scope)
            return await fn()
        except FreshrecError as e:
            code = e.grpc_code
            await context.abort(code, str(e))
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("unhandled error in %s", method)
            await context.abort(code, "internal error")
        finally:
            metrics.REQUESTS.labels("grpc", method, code.name).inc()
            metrics.REQUEST_LATENCY.labels("grpc", method).observe(time.perf_counter() - start)
        raise AssertionError("unreachable: abort raises")

    async def Ingest(self, request: pb.IngestRequest, context: grpc.aio.ServicerContext) -> pb.IngestResponse:
        def run() -> pb.IngestResponse:
            events = [adapt.event_from_pb(e) for e in request.events]
            return adapt.ingest_to_pb(self._gateway.ingest(events, transport="grpc"))

        return await self._call("Ingest", "ingest", context, lambda: asyncio.to_thread(run))

    async def Recommend(self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext) -> pb.RecommendResponse:
        async def run() -> pb.RecommendResponse:
            deadline = context.time_remaining()  # the caller's (none: a far-off one)
            rec = await self._gateway.recommend(
                request.user_id,
                request.k,
                adapt.exclude_seen(request),
                deadline,
                exclude_items=list(request.filter.exclude_items),
                categories=list(request.filter.categories),
                exclude_categories=list(request.filter.exclude_categories),
                attributes=dict(request.filter.attributes),
                page_token=request.page_token,
                diversity=request.diversity,
                write_back=request.write_back if request.HasField("write_back") else True,
                experiment=request.experiment,
                exploration=request.exploration,
            )
            return adapt.recommendation_to_pb(rec)

        return await self._call("Recommend", "recommend", context, run)

    async def SimilarItems(self, request: pb.SimilarItemsRequest, context: grpc.aio.ServicerContext) -> Any:
        def run() -> pb.SimilarItemsResponse:
            version, items = self._gateway.similar_items(request.item_id, request.k)
            return pb.SimilarItemsResponse(model_version=version, items=adapt.items_to_pb(items))

        return await self._call("SimilarItems", "recommend", context, lambda: asyncio.to_thread(run))

    async def PutItem(self, request: pb.PutItemRequest, context: grpc.aio.ServicerContext) -> Any:
        def run() -> pb.PutItemResponse:
            raw = adapt.item_from_pb(request.item)
            record = self._gateway.put_item(raw.pop("item_id"), raw)
            return pb.PutItemResponse(item_id=record.item_id)

        return await self._call("PutItem", "catalogue", context, lambda: asyncio.to_thread(run))

    async def PutItems(self, request: pb.PutItemsRequest, context: grpc.aio.ServicerContext) -> Any:
        def run() -> pb.PutItemsResponse:
            results = self._gateway.put_items([adapt.item_from_pb(i) for i in request.items])
            accepted = sum(r.accepted for r in results)
            return pb.PutItemsResponse(
                accepted=accepted, rejected=len(results) - accepted, results=adapt.results_to_pb(results)
            )

        return await self._call("PutItems", "catalogue", context, lambda: asyncio.to_thread(run))

    async def GetItem(self, request: pb.GetItemRequest, context: grpc.aio.ServicerContext) -> Any:
        def run() -> pb.GetItemResponse:
            version, record = self._gateway.get_item(request.item_id)
            return pb.GetItemResponse(model_version=version, item=adapt.item_to_pb(record))

        return await self._call("GetItem", "recommend", context, lambda: asyncio.to_thread(run))

    async def ListItems(self, request: pb.ListItemsRequest, context: grpc.aio.ServicerContext) -> Any:
        def run() -> pb.ListItemsResponse:
            records, cursor = self._gateway.list_items(request.cursor, request.limit)
            return pb.ListItemsResponse(items=[adapt.item_to_pb(r) for r in records], next_cursor=cursor)

        return await self._call("ListItems", "recommend", context, lambda: asyncio.to_thread(run))

    async def DeleteItem(self, request: pb.DeleteItemRequest, context: grpc.aio.ServicerContext) -> Any:
        def run() -> pb.DeleteItemResponse:
            return pb.DeleteItemResponse(item_id=self._gateway.delete_item(request.item_id).item_id)

        return await self._call("DeleteItem", "catalogue", context, lambda: asyncio.to_thread(run))

    async def PutUser(self, request: pb.PutUserRequest, context: grpc.aio.ServicerContext) -> Any:
        def run() -> pb.PutUserResponse:
            body = {"attributes": dict(request.user.attributes)}
            return pb.PutUserResponse(user_id=self._gateway.put_user(request.user.user_id, body).user_id)

        return await self._call("PutUser", "catalogue", context, lambda: asyncio.to_thread(run))

    async def GetUser(self, request: pb.GetUserRequest, context: grpc.aio.ServicerContext) -> Any:
        def run() -> pb.GetUserResponse:
            version, record = self._gateway.get_user(request.user_id)
            user = pb.User(user_id=record.user_id, attributes=dict(record.attributes), updated_ms=record.updated_ms)
            return pb.GetUserResponse(model_version=version, user=user)

        return await self._call("GetUser", "recommend", context, lambda: asyncio.to_thread(run))

    async def DeleteUser(self, request: pb.DeleteUserRequest, context: grpc.aio.ServicerContext) -> Any:
        def run() -> pb.DeleteUserResponse:
            self._gateway.delete_user(request.user_id)
            return pb.DeleteUserResponse(user_id=request.user_id)

        return await self._call("DeleteUser", "catalogue", context, lambda: asyncio.to_thread(run))


class GrpcEdge:
    """The gateway's gRPC server on a thread running its own event loop.

    Args:
        gateway: what the RPCs call.
        address: "host:port" to bind (port 0: a free one; `port` tells which).

    Raises:
        OSError: the address cannot be bound.
    """

    def __init__(self, gateway: Gateway, address: str) -> None:
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: grpc.aio.Server | None = None
        self._stopped = threading.Event()
        self._grace = 1.0
        self._done: asyncio.Event | None = None
        ready = threading.Event()
        failure: list[BaseException] = []

        async def serve() -> None:
            server = grpc.aio.server(
                options=[
                    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ]
            )
            pb_grpc.add_GatewayServicer_to_server(GatewayServicer(gateway), server)
            health_servicer = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
            for name in ("", SERVICE_NAME):
                await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
            reflection.enable_server_reflection(
                (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
                server,
            )
            port = server.add_insecure_port(address)
            if port == 0:
                raise OSError(f"gRPC server could not bind {address}")
            await server.start()
            self._server, self.port = server, port
            self._done = asyncio.Event()
            ready.set()
            await self._done.wait()
            await server.stop(self._grace)

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(serve())
            except BaseException as e:  # reported to the constructor if it happens while starting
                failure.append(e)
                ready.set()
            finally:
                self._stopped.set()

        self._thread = threading.Thread(target=run, name="grpc", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0] if isinstance(failure[0], OSError) else OSError(f"gRPC server failed: {failure[0]}")

    def stop(self, grace: float = 1.0) -> None:
        """Finish calls in flight (up to `grace` seconds), then close the server and its loop."""
        if self._server is not None and not self._stopped.is_set():
            self._grace = grace
            assert self._done is not None
            self._loop.call_soon_threadsafe(self._done.set)
        self._thread.join(timeout=grace + 5)
