"""Adapters between generated protobuf messages and freshrec's own types, for the gateway's
gRPC servicer and the serving-stage services (`services.stages`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from proto import freshrec_pb2 as pb
from services.gateway.core import EventResult, IngestResult
from services.serving import Recommendation, ScoredItem
from trainer.items import ItemRecord


def event_from_pb(event: pb.Event) -> dict[str, Any]:
    """A protobuf event as the raw mapping `parse_event` validates (unset fields left out)."""
    raw: dict[str, Any] = {
        "event_id": event.event_id,
        "user_id": event.user_id,
        "item_id": event.item_id,
        "type": event.type,
        "timestamp_ms": event.timestamp_ms,
    }
    if event.request_id:
        raw["request_id"] = event.request_id
    if event.HasField("value"):
        raw["value"] = event.value
    if event.HasField("position"):
        raw["position"] = event.position
    if event.context:
        raw["context"] = dict(event.context)
    return raw


def exclude_seen(request: pb.RecommendRequest) -> bool:
    """Unset means true, the same default as the REST API."""
    return request.exclude_seen if request.HasField("exclude_seen") else True


def results_to_pb(results: list[EventResult]) -> list[pb.EventResult]:
    return [
        pb.EventResult(
            index=r.index,
            accepted=r.accepted,
            error=None if r.accepted else pb.EventError(field=r.field, message=r.message),
        )
        for r in results
    ]


def ingest_to_pb(result: IngestResult) -> pb.IngestResponse:
    return pb.IngestResponse(accepted=result.accepted, rejected=result.rejected, results=results_to_pb(result.results))


def item_from_pb(item: pb.Item) -> dict[str, Any]:
    """A protobuf item as the raw mapping `parse_item` validates (with its `item_id`)."""
    raw: dict[str, Any] = {
        "item_id": item.item_id,
        "attributes": dict(item.attributes),
        "categories": list(item.categories),
        "hidden": item.hidden,
    }
    if item.HasField("available_until_ms"):
        raw["available_until_ms"] = item.available_until_ms
    return raw


def item_to_pb(record: ItemRecord) -> pb.Item:
    return pb.Item(
        item_id=record.item_id,
        attributes=dict(record.attributes),
        categories=list(record.categories),
        hidden=record.hidden,
        available_until_ms=record.available_until_ms,
        updated_ms=record.updated_ms,
    )


def items_to_pb(items: list[ScoredItem]) -> list[pb.ScoredItem]:
    return [pb.ScoredItem(item_id=i.item_id, score=i.score, reason=i.reason) for i in items]


def items_from_pb(items: Iterable[pb.ScoredItem]) -> list[ScoredItem]:
    return [ScoredItem(i.item_id, i.score, i.reason) for i in items]


def recommendation_from_pb(rec: pb.RecommendResponse) -> Recommendation:
    return Recommendation(rec.request_id, rec.model_version, items_from_pb(rec.items))


def recommendation_to_pb(rec: Recommendation) -> pb.RecommendResponse:
    return pb.RecommendResponse(
        request_id=rec.request_id,
        model_version=rec.model_version,
        items=items_to_pb(rec.items),
        next_page_token=rec.next_page_token,
        arm=rec.arm,
    )
