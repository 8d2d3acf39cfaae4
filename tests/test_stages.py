"""The serving stages as services: a gateway's remote retrieval + ranking answer exactly as its
own replica would, and the stage contract's errors reach the caller with their codes."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from embedding_store import feature_keys
from proto import serving_pb2 as spb
from proto import serving_pb2_grpc as spb_grpc
from services.errors import InvalidArgument, NotFound, Unavailable
from services.serving import Request, ServingReplica
from services.serving_store import MemoryServingStore
from services.stages import RemoteStages, serve_stage
from tests.local_servers import free_port
from tests.test_ranking import trained


@pytest.fixture(scope="module")
def stages() -> Iterator[tuple[ServingReplica, RemoteStages, list[int]]]:
    """A trained model in a serving store; a replica of it in process, and a retrieval and a
    ranking service, each with a replica of its own (as in a cluster)."""
    trainer = trained()
    store = MemoryServingStore()
    message = trainer.collect_sync()
    assert message is not None and message.dense
    store.publish(message)
    replicas = [ServingReplica(store, candidates=20) for _ in range(3)]
    for replica in replicas:
        replica.catch_up()
    servers = [serve_stage("retrieval", replicas[1], "127.0.0.1:0"), serve_stage("ranking", replicas[2], "127.0.0.1:0")]
    ports = [port for _, port in servers]
    remote = RemoteStages(f"grpc://127.0.0.1:{ports[0]}", f"grpc://127.0.0.1:{ports[1]}")
    yield replicas[0], remote, ports
    remote.close()
    for server, _ in servers:
        server.stop(grace=None)


def test_remote_stages_answer_as_the_local_replica(stages: tuple[ServingReplica, RemoteStages, list[int]]) -> None:
    local, remote, _ = stages
    requests = [Request(f"u{u}", 10, exclude) for u in range(12) for exclude in (True, False)]
    requests.append(Request("nobody-knows-me", 5))  # cold: trending items
    top = [i.item_id for i in local.recommend_batch([Request("u3", 10)])[0].items]
    requests.append(Request("u3", 10, exclude_items=tuple(top[:4])))  # the filter travels to both stages
    remote_answers = remote.recommend_batch(requests)
    local_answers = local.recommend_batch(requests)
    assert len(remote_answers) == len(requests)
    for r, mine, theirs in zip(requests, local_answers, remote_answers, strict=True):
        assert [(i.item_id, i.reason) for i in theirs.items] == [(i.item_id, i.reason) for i in mine.items], r
        assert not set(r.exclude_items) & {i.item_id for i in theirs.items}
        np.testing.assert_allclose([i.score for i in theirs.items], [i.score for i in mine.items], rtol=1e-6)
        assert theirs.model_version == mine.model_version == local.version and len(theirs.items) == r.k
    assert len({a.request_id for a in remote_answers}) == len(requests)
    status = remote.status()
    assert (status.ready, status.model_version) == (True, local.version) and 0 <= status.store_age_s < 60
    version, similar = remote.similar_items("i3", 5)
    assert (version, similar) == local.similar_items("i3", 5)


def test_ranking_drops_seen_candidates_it_is_handed(stages: tuple[ServingReplica, RemoteStages, list[int]]) -> None:
    """Retrieval removed seen items on its version; ranking removes them again on its own."""
    local, _, _ = stages
    user = Request("u1", 10, exclude_seen=True)
    state = local._state  # what the replica serves from
    seen = list(state.seen[int(feature_keys("user", ["u1"])[0])])
    assert len(seen) >= 3
    candidates = local.candidates_batch([user])[1][0]
    handed = np.concatenate([np.array(seen, np.uint64), candidates])
    answer = local.rank_batch([user], [handed])[0]
    assert not {state.names[k] for k in seen} & {i.item_id for i in answer.items}
    assert [i.item_id for i in answer.items] == [i.item_id for i in local.recommend_batch([user])[0].items]


def test_stage_errors_keep_their_codes(stages: tuple[ServingReplica, RemoteStages, list[int]]) -> None:
    _, remote, ports = stages
    with pytest.raises(NotFound, match="no-such-item"):
        remote.similar_items("no-such-item", 5)
    with grpc.insecure_channel(f"127.0.0.1:{ports[1]}") as channel:
        ranking = spb_grpc.RankingStub(channel)
        calls = [spb.Call(user_id="u1", k=5, exclude_seen=True)]
        with pytest.raises(grpc.RpcError) as bad_bytes:
            ranking.Rank(spb.RankRequest(calls=calls, candidates=[b"\x01" * 7]))
        assert bad_bytes.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "candidates[0]" in bad_bytes.value.details()
        with pytest.raises(grpc.RpcError) as unequal:
            ranking.Rank(spb.RankRequest(calls=calls, candidates=[]))
        assert unequal.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(InvalidArgument, match=r"calls\[0\]\.k"):
        remote.recommend_batch([Request("u1", 0)])


def test_unreachable_stages_are_unavailable() -> None:
    port = free_port()  # nothing listens here
    remote = RemoteStages(f"grpc://127.0.0.1:{port}", f"grpc://127.0.0.1:{port}", timeout_s=0.5)
    try:
        with pytest.raises(Unavailable, match="retrieval service"):
            remote.recommend_batch([Request("u1", 5)])
        assert not remote.status().ready
    finally:
        remote.close()
