"""The gateway's model thread: batching, deadlines, backpressure and failure isolation."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future

import pytest

from services.errors import DeadlineExceeded, Unavailable
from services.gateway.batcher import RecommendBatcher
from services.serving import Recommendation, Request, ScoredItem


class Model:
    """Answers each request with its own user id; blocks while `gate` is clear; fails on "bad"."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.batches: list[list[str]] = []

    def __call__(self, requests: Sequence[Request]) -> list[Recommendation]:
        self.gate.wait()
        self.batches.append([r.user_id for r in requests])
        if any(r.user_id == "bad" for r in requests):
            raise ValueError("bad user")
        return [Recommendation(r.user_id, 1, [ScoredItem(r.user_id, float(r.k))]) for r in requests]


def busy_batcher(max_batch: int, max_queue: int) -> tuple[Model, RecommendBatcher, Future[Recommendation]]:
    """A batcher whose model thread is busy with a first call ("busy") until `model.gate` is set."""
    model = Model()
    batcher = RecommendBatcher(model, max_batch=max_batch, max_queue=max_queue)
    model.gate.clear()
    busy = batcher.submit(Request("busy", 1), 5)
    while not busy.running():
        pass
    return model, batcher, busy


def test_calls_queued_while_the_model_is_busy_are_answered_together_and_in_order() -> None:
    model, batcher, busy = busy_batcher(max_batch=4, max_queue=100)
    queued = [batcher.submit(Request(f"u{i}", i), 5) for i in range(1, 7)]
    model.gate.set()
    answers = [f.result(5) for f in [busy, *queued]]
    assert [a.request_id for a in answers] == ["busy"] + [f"u{i}" for i in range(1, 7)]
    assert [a.items[0].score for a in answers[1:]] == [float(i) for i in range(1, 7)]
    assert model.batches == [["busy"], ["u1", "u2", "u3", "u4"], ["u5", "u6"]]
    batcher.close()


def test_a_full_queue_refuses_and_expired_calls_are_not_computed() -> None:
    model, batcher, busy = busy_batcher(max_batch=8, max_queue=2)
    expired = batcher.submit(Request("late", 1), 0.0)  # its deadline passes while it waits
    waiting = batcher.submit(Request("ok", 1), 5)
    with pytest.raises(Unavailable, match="already waiting"):
        batcher.submit(Request("one-too-many", 1), 5)
    model.gate.set()
    assert busy.result(5).request_id == "busy" and waiting.result(5).request_id == "ok"
    with pytest.raises(DeadlineExceeded):
        expired.result(5)
    assert all("late" not in b for b in model.batches)
    batcher.close()


def test_one_failing_call_does_not_fail_the_others_of_its_batch() -> None:
    model, batcher, busy = busy_batcher(max_batch=8, max_queue=100)
    good, bad, other = (batcher.submit(Request(u, 1), 5) for u in ("good", "bad", "other"))
    model.gate.set()
    assert good.result(5).request_id == "good" and other.result(5).request_id == "other"
    with pytest.raises(ValueError, match="bad user"):
        bad.result(5)
    assert busy.result(5).request_id == "busy"
    batcher.close()


def test_the_model_thread_runs_on_its_configured_openmp_threads_and_leaves_other_threads_theirs() -> None:
    """An OpenMP thread count belongs to the thread that sets it: the limit is set in the model
    thread (set on the main thread at start-up, it never reached the model thread, whose idle
    Faiss OpenMP worker spun a core away from the event loops)."""
    import faiss
    import torch

    seen: list[tuple[int, int]] = []

    def model(requests: Sequence[Request]) -> list[Recommendation]:
        seen.append((torch.get_num_threads(), faiss.omp_get_max_threads()))
        return [Recommendation(r.user_id, 1, []) for r in requests]

    before = (torch.get_num_threads(), faiss.omp_get_max_threads())
    batcher = RecommendBatcher(model, max_batch=4, max_queue=10, threads=1)
    batcher.submit(Request("u", 1), 5).result(5)
    batcher.close()
    assert seen == [(1, 1)]
    assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == before  # this thread keeps its own
    if before[0] > 1:  # where there is more than one core, a batcher without a limit keeps the default
        unlimited = RecommendBatcher(model, max_batch=4, max_queue=10)
        unlimited.submit(Request("u", 1), 5).result(5)
        unlimited.close()
        assert seen[-1] == before
