"""Micro-batching of recommendation calls.

One model thread answers every recommendation call of the process. Calls that arrive while it
is busy queue up, and it answers all of them (up to `max_batch`) with one index search and one
ranker forward pass (`ServingReplica.recommend_batch`). Under light load each call runs alone
with no added wait; under heavy load the per-call cost falls as batches grow. Only this thread
runs model code, so the REST and gRPC event loops never wait on the model or
compete with it for the interpreter lock beyond handing calls over.

A call whose deadline passes while it waits is answered with `DeadlineExceeded` and not
computed; a full queue refuses new calls with `Unavailable` (backpressure instead of latency
without bound).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import threadpoolctl

from services import metrics
from services.errors import DeadlineExceeded, Unavailable
from services.serving import Recommendation, Request

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Call:
    request: Request
    deadline: float  # time.monotonic() after which the caller no longer waits
    future: Future[Recommendation]


class RecommendBatcher:
    """Queue recommendation calls for one model thread that answers them in batches.

    Args:
        answer: computes the answers of a batch, in order (`ServingReplica.recommend_batch`).
        max_batch: most calls per batch.
        max_queue: most calls waiting; `submit` refuses more.
        threads: threads of the OpenMP pools (torch's, Faiss') that the model thread's forward
            passes and searches run on; 0 keeps the libraries' defaults (one per core). Set in
            the model thread itself: an OpenMP thread count belongs to the thread that sets it
            (threads started later, this one included, do not inherit it), so a limit set at
            start-up on the main thread never reached this one, and a trainer beside it in the
            same process keeps its own.
    """

    def __init__(
        self,
        answer: Callable[[Sequence[Request]], list[Recommendation]],
        max_batch: int,
        max_queue: int,
        threads: int = 0,
    ) -> None:
        self._answer = answer
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._threads = threads
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="model", daemon=True)
        self._thread.start()

    def submit(self, request: Request, timeout_s: float) -> Future[Recommendation]:
        """Queue one call; its future holds the answer or the error.

        Raises:
            Unavailable: `max_queue` calls are already waiting.
        """
        if self._queue.qsize() >= self._max_queue:
            raise Unavailable(f"{self._max_queue} recommendation calls are already waiting; retry later")
        future: Future[Recommendation] = Future()
        self._queue.put(_Call(request, time.monotonic() + timeout_s, future))
        return future

    def close(self) -> None:
        """Stop the model thread once the calls already queued are answered."""
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        if self._threads:
            threadpoolctl.threadpool_limits(self._threads, user_api="openmp")
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    call = self._queue.get_nowait()
                except queue.Empty:
                    break
                if call is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(call)
            metrics.RECOMMEND_QUEUE.set(self._queue.qsize())
            self._answer_batch(batch)

    def _answer_batch(self, batch: list[_Call]) -> None:
        now = time.monotonic()
        live = []
        for call in batch:
            if not call.future.set_running_or_notify_cancel():
                continue  # the caller gave up
            if now > call.deadline:
                call.future.set_exception(DeadlineExceeded("recommendation call timed out while queued"))
                continue
            live.append(call)
        if not live:
            return
        metrics.RECOMMEND_BATCH.observe(len(live))
        try:
            answers = self._answer([call.request for call in live])
        except Exception as e:
            if len(live) == 1:
                log.exception("recommendation call failed")
                live[0].future.set_exception(e)
                return
            for call in live:  # one bad call must not fail the others: answer each alone
                try:
                    call.future.set_result(self._answer([call.request])[0])
                except Exception as alone:
                    log.exception("recommendation call failed")
                    call.future.set_exception(alone)
            return
        for call, answer in zip(live, answers, strict=True):
            call.future.set_result(answer)
