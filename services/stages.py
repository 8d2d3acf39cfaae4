"""The serving stages as cluster services: `freshrec retrieval` and `freshrec ranking`.

Each is a process with its own `ServingReplica` following the serving store, serving one stage
over gRPC (`proto/serving.proto`): retrieval answers `Candidates` (the item index and trending
items, seen removed) and `SimilarItems`; ranking answers `Rank` (the ranker's order, the top k,
trending fill). A gateway configured with `server.retrieval_url` and `server.ranking_url`
(FRESHREC_RETRIEVAL_URL / FRESHREC_RANKING_URL, `grpc://host:port`) keeps no replica of its
own: its model thread sends each batch of calls to `RemoteStages`, one `Candidates` and one
`Rank` call per batch. Without them the gateway runs both stages in process on its replica
(`ServingReplica.recommend_batch`), which is the same code.

The two stages may briefly serve different versions (each applies versions as it reads them);
ranking drops seen items again and scores candidates it has no vector for with zeros, and the
answer's model version is the ranking replica's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import TypeVar

import grpc
import numpy as np

from proto import freshrec_pb2 as pb
from proto import serving_pb2 as spb
from proto import serving_pb2_grpc as spb_grpc
from services import metrics
from services.errors import FreshrecError, InvalidArgument, Unavailable
from services.gateway import pb as adapt
from services.gateway.grpc_server import MAX_MESSAGE_BYTES
from services.serving import Recommendation, Request, ScoredItem, ServingReplica, ServingStatus
from trainer.items import ItemRecord, UserRecord

log = logging.getLogger(__name__)
T = TypeVar("T")
STAGES = ("retrieval", "ranking")
_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
# a status code from a stage -> the error the gateway raises (the hierarchy maps them back at its edge)
_ERRORS = {cls.grpc_code: cls for cls in FreshrecError.__subclasses__()}


def _keys(raw: bytes, what: str) -> np.ndarray:
    if len(raw) % 8:
        raise InvalidArgument(f"{what}: item key bytes must be a multiple of 8, got {len(raw)}")
    return np.frombuffer(raw, dtype="<u8").astype(np.uint64)


def _requests(calls: Sequence[spb.Call]) -> list[Request]:
    for i, call in enumerate(calls):
        if not call.user_id:
            raise InvalidArgument(f"calls[{i}].user_id: is required")
        if call.k < 1:
            raise InvalidArgument(f"calls[{i}].k: must be >= 1, got {call.k}")
    return [
        Request(
            c.user_id,
            c.k,
            c.exclude_seen,
            tuple(c.exclude_items),
            tuple(c.categories),
            tuple(c.exclude_categories),
            tuple(sorted(c.attributes.items())),
            c.diversity,
            c.trending_only,
            c.exploration,
        )
        for c in calls
    ]


def _call(r: Request) -> spb.Call:
    return spb.Call(
        user_id=r.user_id,
        k=r.k,
        exclude_seen=r.exclude_seen,
        exclude_items=r.exclude_items,
        categories=r.categories,
        exclude_categories=r.exclude_categories,
        attributes=dict(r.attributes),
        diversity=r.diversity,
        trending_only=r.trending_only,
        exploration=r.exploration,
    )


def _answer(context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
    """Run one RPC; freshrec errors become their status codes, anything else INTERNAL."""
    try:
        return fn()
    except FreshrecError as e:
        context.abort(e.grpc_code, str(e))
    except Exception:
        log.exception("unhandled error in a serving stage")
        context.abort(grpc.StatusCode.INTERNAL, "internal error")
    raise AssertionError("unreachable: abort raises")


class RetrievalServicer(spb_grpc.RetrievalServicer):
    def __init__(self, replica: ServingReplica) -> None:
        self._replica = replica

    def Candidates(self, request: spb.StageRequest, context: grpc.ServicerContext) -> spb.CandidatesResponse:
        def run() -> spb.CandidatesResponse:
            version, candidates = self._replica.candidates_batch(_requests(request.calls))
            return spb.CandidatesResponse(model_version=version, items=[c.astype("<u8").tobytes() for c in candidates])

        return _answer(context, run)

    def SimilarItems(self, request: pb.SimilarItemsRequest, context: grpc.ServicerContext) -> pb.SimilarItemsResponse:
        def run() -> pb.SimilarItemsResponse:
            if not request.item_id or request.k < 1:
                raise InvalidArgument("item_id and k (>= 1) are required")
            version, items = self._replica.similar_items(request.item_id, request.k)
            return pb.SimilarItemsResponse(model_version=version, items=adapt.items_to_pb(items))

        return _answer(context, run)

    def CatalogueItem(self, request: spb.CatalogueItemRequest, context: grpc.ServicerContext) -> spb.CatalogueResponse:
        def run() -> spb.CatalogueResponse:
            version, record = self._replica.catalogue_item(request.item_id)
            return spb.CatalogueResponse(model_version=version, records=[record.to_json()] if record else [])

        return _answer(context, run)

    def UserRecord(self, request: spb.CatalogueItemRequest, context: grpc.ServicerContext) -> spb.CatalogueResponse:
        def run() -> spb.CatalogueResponse:
            version, record = self._replica.user_record(request.item_id)
            return spb.CatalogueResponse(model_version=version, records=[record.to_json()] if record else [])

        return _answer(context, run)

    def CataloguePage(self, request: spb.CataloguePageRequest, context: grpc.ServicerContext) -> spb.CatalogueResponse:
        def run() -> spb.CatalogueResponse:
            if request.limit < 1:
                raise InvalidArgument(f"limit: must be >= 1, got {request.limit}")
            records = self._replica.catalogue_page(request.after, request.limit)
            return spb.CatalogueResponse(model_version=self._replica.version, records=[r.to_json() for r in records])

        return _answer(context, run)

    def Status(self, request: spb.StatusRequest, context: grpc.ServicerContext) -> spb.StatusResponse:
        return _status(self._replica)


class RankingServicer(spb_grpc.RankingServicer):
    def __init__(self, replica: ServingReplica) -> None:
        self._replica = replica

    def Rank(self, request: spb.RankRequest, context: grpc.ServicerContext) -> spb.RankResponse:
        def run() -> spb.RankResponse:
            calls = _requests(request.calls)
            if len(request.candidates) != len(calls):
                raise InvalidArgument(f"candidates: {len(request.candidates)} lists for {len(calls)} calls")
            candidates = [_keys(raw, f"candidates[{i}]") for i, raw in enumerate(request.candidates)]
            answers = self._replica.rank_batch(calls, candidates)
            return spb.RankResponse(recommendations=[adapt.recommendation_to_pb(a) for a in answers])

        return _answer(context, run)

    def Status(self, request: spb.StatusRequest, context: grpc.ServicerContext) -> spb.StatusResponse:
        return _status(self._replica)


def _status(replica: ServingReplica) -> spb.StatusResponse:
    status = replica.status()
    return spb.StatusResponse(ready=status.ready, model_version=status.model_version, store_age_s=status.store_age_s)


def serve_stage(stage: str, replica: ServingReplica, address: str, workers: int = 4) -> tuple[grpc.Server, int]:
    """Start the gRPC server of one stage ("retrieval" or "ranking") on `address` (port 0:
    any free one); its calls are counted in the request metrics with transport=`stage`.

    Returns:
        (server, bound port); stop it with `server.stop(grace)`.
    """
    if stage not in STAGES:
        raise ValueError(f"stage: expected one of {STAGES}, got {stage!r}")
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=stage),
        options=_OPTIONS,
        interceptors=[metrics.GrpcObserver(stage)],
    )
    if stage == "retrieval":
        spb_grpc.add_RetrievalServicer_to_server(RetrievalServicer(replica), server)
    else:
        spb_grpc.add_RankingServicer_to_server(RankingServicer(replica), server)
    port = server.add_insecure_port(address)
    if not port:
        raise OSError(f"cannot bind the {stage} service to {address}")
    server.start()
    return server, port


def _target(url: str) -> str:
    if not url.startswith("grpc://") or not url[len("grpc://") :]:
        raise ValueError(f"stage url: expected grpc://HOST:PORT, got {url!r}")
    return url[len("grpc://") :]


class RemoteStages:
    """The gateway's side of remote stages: the same `recommend_batch` / `similar_items` /
    status as a local `ServingReplica`, answered by a retrieval and a ranking service.

    A stage that cannot be reached (or answers UNAVAILABLE) makes the call `Unavailable`
    (503 / UNAVAILABLE at the edge); its other errors pass through with their codes.

    Args:
        retrieval_url: grpc://HOST:PORT of a `freshrec retrieval` service.
        ranking_url: grpc://HOST:PORT of a `freshrec ranking` service.
        timeout_s: deadline of each stage call.
    """

    def __init__(self, retrieval_url: str, ranking_url: str, timeout_s: float = 2.0) -> None:
        self._timeout = timeout_s
        self._channels = [grpc.insecure_channel(_target(url), options=_OPTIONS) for url in (retrieval_url, ranking_url)]
        self._retrieval = spb_grpc.RetrievalStub(self._channels[0])
        self._ranking = spb_grpc.RankingStub(self._channels[1])

    def _rpc(self, stage: str, fn: Callable[..., T], request: object) -> T:
        try:
            return fn(request, timeout=self._timeout)
        except grpc.RpcError as e:
            code, details = e.code(), e.details()
            error = _ERRORS.get(code)
            if error is None or error is Unavailable:  # down, unreachable, or failing inside
                raise Unavailable(f"{stage} service: {code.name}: {details}") from None
            raise error(details) from None

    def recommend_batch(self, requests: Sequence[Request]) -> list[Recommendation]:
        calls = [_call(r) for r in requests]
        candidates = self._rpc("retrieval", self._retrieval.Candidates, spb.StageRequest(calls=calls))
        ranked = self._rpc("ranking", self._ranking.Rank, spb.RankRequest(calls=calls, candidates=candidates.items))
        return [adapt.recommendation_from_pb(a) for a in ranked.recommendations]

    def similar_items(self, item_id: str, k: int) -> tuple[int, list[ScoredItem]]:
        reply = self._rpc("retrieval", self._retrieval.SimilarItems, pb.SimilarItemsRequest(item_id=item_id, k=k))
        return reply.model_version, adapt.items_from_pb(reply.items)

    def catalogue_item(self, item_id: str) -> tuple[int, ItemRecord | None]:
        reply = self._rpc("retrieval", self._retrieval.CatalogueItem, spb.CatalogueItemRequest(item_id=item_id))
        return reply.model_version, ItemRecord.from_json(reply.records[0]) if reply.records else None

    def user_record(self, user_id: str) -> tuple[int, UserRecord | None]:
        reply = self._rpc("retrieval", self._retrieval.UserRecord, spb.CatalogueItemRequest(item_id=user_id))
        return reply.model_version, UserRecord.from_json(reply.records[0]) if reply.records else None

    def catalogue_page(self, after: str, limit: int) -> list[ItemRecord]:
        reply = self._rpc(
            "retrieval", self._retrieval.CataloguePage, spb.CataloguePageRequest(after=after, limit=limit)
        )
        return [ItemRecord.from_json(r) for r in reply.records]

    def status(self) -> ServingStatus:
        """Ready when both stages are; the ranking stage's version; the staler store age."""
        try:
            retrieval = self._retrieval.Status(spb.StatusRequest(), timeout=1.0)
            ranking = self._ranking.Status(spb.StatusRequest(), timeout=1.0)
        except grpc.RpcError:
            return ServingStatus(False, 0, float("nan"))
        ages = (retrieval.store_age_s, ranking.store_age_s)
        age = float("nan") if any(math.isnan(a) for a in ages) else max(ages)
        return ServingStatus(retrieval.ready and ranking.ready, ranking.model_version, age)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
