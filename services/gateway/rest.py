"""REST edge of the gateway (FastAPI). Model code and log writes never run on the event loop:
recommendation calls are awaited from the gateway's model thread (`services.gateway.batcher`),
other handlers are plain `def`s that FastAPI runs in its own thread pool."""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services import metrics
from services.errors import FreshrecError, ResourceExhausted, Unavailable
from services.gateway.auth import bearer
from services.gateway.core import EventResult, Gateway
from trainer.events import MAX_CONTEXT_ENTRIES, MAX_ID_LENGTH

log = logging.getLogger(__name__)


ItemId = Annotated[str, Path(min_length=1, max_length=MAX_ID_LENGTH)]
UserId = Annotated[str, Path(min_length=1, max_length=MAX_ID_LENGTH)]


class EventBody(BaseModel):
    """One event as the OpenAPI spec shows it. Not used to validate: the gateway validates each
    event of a batch on its own (`trainer.events.parse_event`), so one bad event does not fail
    the others."""

    model_config = ConfigDict(extra="forbid")

    event_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH, description="idempotency key")
    user_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    item_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    type: Literal["impression", "click", "like", "share", "purchase", "rating", "dwell", "skip"]
    timestamp_ms: int = Field(default=0, ge=0, lt=1 << 53, description="0 or absent: time of acceptance")
    request_id: str | None = Field(default=None, description="the recommendation that showed the item")
    position: int | None = Field(default=None, ge=0, le=10_000, description="where in that recommendation (0 first)")
    value: float | None = Field(default=None, ge=-1e9, le=1e9, description="required for rating and dwell")
    context: dict[str, str] = Field(default_factory=dict, max_length=MAX_CONTEXT_ENTRIES)


class EventsRequest(BaseModel):
    events: list[Any] = Field(
        description="Events to ingest; each is validated on its own.",
        json_schema_extra={"items": EventBody.model_json_schema()},
    )


class EventError(BaseModel):
    field: str
    message: str


class EventResultBody(BaseModel):
    index: int
    status: str = Field(description="accepted or rejected")
    error: EventError | None = None


class EventsResponse(BaseModel):
    accepted: int
    rejected: int
    results: list[EventResultBody]


class FilterBody(BaseModel):
    """Which items the list may hold (applied before the top k is cut)."""

    model_config = ConfigDict(extra="forbid")  # a filter this server does not apply is refused, not ignored
    exclude_items: list[str] = Field(default_factory=list, description="never these items (at most 1,000)")
    categories: list[str] = Field(default_factory=list, description="only items in one of these categories")
    exclude_categories: list[str] = Field(default_factory=list, description="no item in any of these categories")
    attributes: dict[str, str] = Field(default_factory=dict, description="only items with these attribute values")


class ItemBody(BaseModel):
    """An item of the catalogue as PUT takes it (validated by `trainer.items.parse_item`)."""

    model_config = ConfigDict(extra="forbid")
    attributes: dict[str, str] = Field(default_factory=dict, description="free-form string attributes")
    categories: list[str] = Field(default_factory=list)
    hidden: bool = Field(default=False, description="kept, but in no list until put again without it")
    available_until_ms: int | None = Field(default=None, description="in no list after this time")


class UserBody(BaseModel):
    """A user's attributes as PUT takes them (validated by `trainer.items.parse_user`)."""

    model_config = ConfigDict(extra="forbid")
    attributes: dict[str, str] = Field(default_factory=dict, description='e.g. {"gender": "F", "genres": "A|B"}')


class ItemsBatchRequest(BaseModel):
    items: list[Any] = Field(
        description="Items to put, each with its item_id; each is validated on its own (at most 1,000).",
        json_schema_extra={"items": ItemBody.model_json_schema()},
    )


class ItemResponse(BaseModel):
    item_id: str
    attributes: dict[str, str]
    categories: list[str]
    hidden: bool
    available_until_ms: int | None
    updated_ms: int = Field(description="when the gateway accepted the record")


class ItemPage(BaseModel):
    items: list[ItemResponse]
    next_cursor: str | None = Field(description="the cursor of the next page; null after the last")


class Accepted(BaseModel):
    item_id: str
    status: str = Field(description="accepted: served everywhere from the next sync")


class RecommendRequest(BaseModel):
    user_id: str = Field(min_length=1, max_length=256)
    k: int | None = Field(default=None, ge=1, description="number of items (server default when absent)")
    exclude_seen: bool = True
    context: dict[str, str] = Field(default_factory=dict)
    filter: FilterBody = Field(default_factory=FilterBody)
    page_token: str = Field(default="", description="the previous page's next_page_token")
    diversity: float = Field(default=0.0, ge=0.0, le=1.0, description="0: by score; up to 1: items unlike each other")
    write_back: bool = Field(default=True, description="log the list's items as impressions (for the joiner)")
    experiment: str = Field(default="", description="an A/B experiment: answered by the user's arm")
    exploration: float = Field(default=0.0, ge=0.0, le=1.0, description="share of slots for items with little data")


class ScoredItemBody(BaseModel):
    item_id: str
    score: float
    reason: str = Field(
        description=(
            "the source that put the item there: covisit, taste, ann, trending, content, exploration or catalogue"
        )
    )


class RecommendResponse(BaseModel):
    request_id: str
    model_version: int
    items: list[ScoredItemBody]
    next_page_token: str | None = Field(description="the token of the next page; null when there is none")
    arm: str | None = Field(description="the experiment arm that answered; null without an experiment")


class SimilarResponse(BaseModel):
    model_version: int
    items: list[ScoredItemBody]


class ErrorDetail(BaseModel):
    code: str = Field(
        description="InvalidArgument, NotFound, Unauthenticated, PermissionDenied, ResourceExhausted, ..."
    )
    message: str = Field(description="what is wrong, naming the field or argument")


class ErrorResponse(BaseModel):
    """Every error answer of the REST API."""

    error: ErrorDetail


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": what}
    for status, what in {
        401: "no API key, or an unknown one (when keys are on)",
        403: "the key lacks the call's scope",
        404: "no such item or user (similar items, the catalogue, users)",
        413: "the body is over server.max_body_bytes",
        422: "a bad argument or body, named in the message",
        429: "over server.rate_limit_per_s for this key (Retry-After)",
        503: "the event log or the model cannot take the call now (Retry-After)",
    }.items()
}
"""The error answers every /v1 operation may give, declared in the OpenAPI spec (FastAPI would
otherwise declare its own validation-error body, which this app never sends)."""


def _results(results: list[EventResult]) -> list[EventResultBody]:
    return [
        EventResultBody(index=r.index, status="accepted")
        if r.accepted
        else EventResultBody(index=r.index, status="rejected", error=EventError(field=r.field, message=r.message))
        for r in results
    ]


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class _Observe:
    """Counts and times every request by route and status (plain ASGI: Starlette's
    `BaseHTTPMiddleware` costs a task and a stream per request)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def observe_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observe_status)
        finally:
            method = getattr(scope.get("route"), "path", "unmatched")  # the router sets the matched route
            metrics.REQUESTS.labels("rest", method, str(status)).inc()
            metrics.REQUEST_LATENCY.labels("rest", method).observe(time.perf_counter() - start)


class _LimitBody:
    """Refuses request bodies over `max_bytes` with 413 before the app sees them (declared
    lengths at once; chunked bodies once they pass the limit).

    The rest of a refused body is read and dropped before the answer (up to `DRAIN_BYTES`):
    a plain client (urllib, requests, curl) sends its whole body before it reads a response,
    and a server that closed the connection under it would show it a reset instead of the 413.
    A client that sent `Expect: 100-continue` is answered at once (it sends nothing until told).
    """

    DRAIN_BYTES = 256 * 1024 * 1024

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) <= self.max_bytes:
            await self.app(scope, receive, send)
            return
        # a client waiting for 100 Continue sends nothing more: answer at once
        more = b"100-continue" not in headers.get(b"expect", b"").lower()
        if declared is None:  # chunked: read up to the limit, then hand the body on
            chunks, size, more = [], 0, True
            while more and size <= self.max_bytes:
                message = await receive()
                if message["type"] != "http.request":
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                more = message.get("more_body", False)
            if size <= self.max_bytes:
                body, sent = b"".join(chunks), False

                async def replay() -> Message:
                    nonlocal sent
                    if sent:
                        return await receive()
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}

                await self.app(scope, replay, send)
                return
        drained = 0
        while more and drained <= self.DRAIN_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return
            drained += len(message.get("body", b""))
            more = message.get("more_body", False)
        response = _error(413, "PayloadTooLarge", f"request body over {self.max_bytes} bytes", {"Connection": "close"})
        await response(scope, receive, send)


def create_app(gateway: Gateway) -> FastAPI:
    """The REST application for `gateway`."""
    about: dict[str, Any] = {
        "title": "freshrec",
        "version": "0.1.0",
        "description": "Online-training recommendations.",
    }
    if gateway.config.docs:  # Swagger UI at /docs and ReDoc at /redoc from fastapi-offline's assets, no CDN
        app = FastAPIOffline(**about, static_url="/docs-assets")
    else:
        app = FastAPI(**about, openapi_url=None, docs_url=None, redoc_url=None)

    @app.exception_handler(FreshrecError)
    async def _freshrec_error(request: Request, exc: FreshrecError) -> JSONResponse:
        headers = {"Retry-After": "1"} if isinstance(exc, Unavailable | ResourceExhausted) else None
        return _error(exc.http_status, type(exc).__name__, str(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in exc.errors()]
        return _error(422, "InvalidArgument", "; ".join(problems) or "invalid request")

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {400: "InvalidArgument", 404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "Error")
        return _error(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return _error(500, "Internal", "internal error")

    app.add_middleware(_LimitBody, max_bytes=gateway.config.max_body_bytes)
    app.add_middleware(_Observe)

    def authorize(request: Request, scope: str) -> None:
        presented = bearer(request.headers.get("authorization"), request.headers.get("x-api-key"))
        gateway.guard.check(presented, scope)

    @app.post("/v1/events", responses=ERRORS, response_model=EventsResponse)
    def ingest(body: EventsRequest, request: Request) -> EventsResponse:
        """Append a batch of events (scope ingest). Each event is validated alone: bad ones are rejected with the
        field named, the good ones of the batch kept; 503 with Retry-After when the log cannot take the batch."""
        authorize(request, "ingest")
        result = gateway.ingest(body.events, transport="rest")
        return EventsResponse(accepted=result.accepted, rejected=result.rejected, results=_results(result.results))

    @app.post("/v1/recommendations", responses=ERRORS, response_model=RecommendResponse)
    async def recommend(body: RecommendRequest, request: Request) -> Response:
        """The user's top k (scope recommend), with filters, paging, diversity, exploration and an A/B arm; each
        item names the source that put it there. The list is written back as impressions unless write_back is
        false."""
        authorize(request, "recommend")
        f = body.filter
        rec = await gateway.recommend(
            body.user_id,
            body.k,
            body.exclude_seen,
            exclude_items=f.exclude_items,
            categories=f.categories,
            exclude_categories=f.exclude_categories,
            attributes=f.attributes,
            page_token=body.page_token,
            diversity=body.diversity,
            write_back=body.write_back,
            experiment=body.experiment,
            exploration=body.exploration,
        )
        answer = RecommendResponse(
            request_id=rec.request_id,
            model_version=rec.model_version,
            next_page_token=rec.next_page_token or None,
            arm=rec.arm or None,
            items=[ScoredItemBody(item_id=i.item_id, score=i.score, reason=i.reason) for i in rec.items],
        )
        # serialised here: FastAPI would validate the model a second time (the hot path's CPU)
        return Response(answer.model_dump_json(), media_type="application/json")

    @app.get("/v1/items/{item_id:path}/similar", responses=ERRORS, response_model=SimilarResponse)
    def similar(request: Request, item_id: str, k: int | None = Query(default=None, ge=1)) -> SimilarResponse:
        """Items like this one (scope recommend): its co-visited items first, then its neighbours in the item index."""
        authorize(request, "recommend")
        version, items = gateway.similar_items(item_id, k)
        return SimilarResponse(
            model_version=version,
            items=[ScoredItemBody(item_id=i.item_id, score=i.score, reason=i.reason) for i in items],
        )

    @app.put("/v1/items/{item_id:path}", responses=ERRORS, response_model=Accepted, status_code=202)
    def put_item(item_id: ItemId, body: ItemBody, request: Request) -> Accepted:
        """Create or replace an item in the catalogue (scope catalogue); served everywhere from the next sync."""
        authorize(request, "catalogue")
        record = gateway.put_item(item_id, body.model_dump())
        return Accepted(item_id=record.item_id, status="accepted")

    @app.post("/v1/items:batch", responses=ERRORS, response_model=EventsResponse, status_code=202)
    def put_items(body: ItemsBatchRequest, request: Request) -> EventsResponse:
        """Put up to 1,000 items (scope catalogue), each validated alone as events are."""
        authorize(request, "catalogue")
        results = gateway.put_items(body.items)
        accepted = sum(r.accepted for r in results)
        return EventsResponse(accepted=accepted, rejected=len(results) - accepted, results=_results(results))

    @app.get("/v1/items/{item_id:path}", responses=ERRORS, response_model=ItemResponse)
    def get_item(item_id: ItemId, request: Request) -> ItemResponse:
        """The item as serving holds it (404 before the sync that brings it)."""
        authorize(request, "recommend")
        _, record = gateway.get_item(item_id)
        return ItemResponse(**record.to_dict())

    @app.get("/v1/items", responses=ERRORS, response_model=ItemPage)
    def list_items(
        request: Request, cursor: str = "", limit: int | None = Query(default=None, ge=1, le=1000)
    ) -> ItemPage:
        """The catalogue in item-id order, a page at a time (next_cursor)."""
        authorize(request, "recommend")
        records, after = gateway.list_items(cursor, limit)
        return ItemPage(items=[ItemResponse(**r.to_dict()) for r in records], next_cursor=after or None)

    @app.delete("/v1/items/{item_id:path}", responses=ERRORS, response_model=Accepted, status_code=202)
    def delete_item(item_id: ItemId, request: Request) -> Accepted:
        """Remove an item from the index and every list (scope catalogue)."""
        authorize(request, "catalogue")
        return Accepted(item_id=gateway.delete_item(item_id).item_id, status="accepted")

    @app.put("/v1/users/{user_id:path}", responses=ERRORS, status_code=202)
    def put_user(user_id: UserId, body: UserBody, request: Request) -> dict[str, str]:
        """Set a user's attributes (scope catalogue): their features from the trainer's next read."""
        authorize(request, "catalogue")
        return {"user_id": gateway.put_user(user_id, body.model_dump()).user_id, "status": "accepted"}

    @app.get("/v1/users/{user_id:path}", responses=ERRORS)
    def get_user(user_id: UserId, request: Request) -> dict[str, Any]:
        """The user's record as serving holds it (404 without one)."""
        authorize(request, "recommend")
        _, record = gateway.get_user(user_id)
        return record.to_dict()

    @app.delete("/v1/users/{user_id:path}", responses=ERRORS, status_code=202)
    def delete_user(user_id: UserId, request: Request) -> dict[str, str]:
        """Erase a user (scope catalogue): the trainer deletes their rows, history and attributes; their next
        list is a cold user's."""
        authorize(request, "catalogue")
        gateway.delete_user(user_id)
        return {"user_id": user_id, "status": "accepted"}

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        """Readiness: 503 with a reason until a model version exists, or while the trainer, the sync publisher or
        the serving store is not doing its job."""
        ready, body = gateway.readiness()
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        """Prometheus metrics of this process."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
