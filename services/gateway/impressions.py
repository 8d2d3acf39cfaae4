"""Impressions written back: every list the gateway serves becomes impression events on the
log (user, item, the list's `request_id`, position), so the joiner labels what was really
shown and a click that carries the `request_id` joins to it.

One log record per list (`trainer.events.served_record`; the trainer reads it as one
impression event per item), written off the request path, by one thread, in batches: a
recommendation call never waits for the log. While the log is down or slower than the calls,
up to `max_pending` lists wait; past that the oldest are dropped and counted (`freshrec_impressions_dropped_total`): an
impression lost costs one negative example, a recommendation call held up costs its caller.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

from services import metrics
from services.serving import Recommendation
from trainer.eventlog.base import EventLog, LogUnavailable
from trainer.events import served_record

log = logging.getLogger(__name__)


def served_of(user_id: str, rec: Recommendation, now_ms: int, experiment: str = "") -> tuple[str, bytes]:
    """(key, log record) of one served list: one record for all its impressions
    (`trainer.events.served_record`, keyed by the user like their events); an experiment's
    impressions carry it and the arm in their context."""
    context = {"experiment": experiment, "arm": rec.arm} if experiment and rec.arm else None
    return user_id, served_record(user_id, rec.request_id, [i.item_id for i in rec.items], now_ms, context)


class ImpressionWriter:
    """Appends the impressions of served lists to `event_log` on a thread of its own.

    Args:
        event_log: where they go (the events topic).
        max_pending: most lists waiting; past it the oldest are dropped.
        retry_s: wait after the log refused a batch before trying again.
    """

    def __init__(self, event_log: EventLog, max_pending: int = 10_000, retry_s: float = 1.0) -> None:
        self._log = event_log
        self._pending: collections.deque[tuple[str, Recommendation, int, str]] = collections.deque()
        self._max_pending = max_pending
        self._retry_s = retry_s
        self._cond = threading.Condition()
        self._closed = False
        self._busy = False  # a batch is being written
        self._thread = threading.Thread(target=self._run, name="impressions", daemon=True)
        self._thread.start()

    def add(self, user_id: str, rec: Recommendation, experiment: str = "") -> None:
        """Queue one served list (returns at once)."""
        if not rec.items:
            return
        with self._cond:
            if len(self._pending) >= self._max_pending:
                _, dropped, _, _ = self._pending.popleft()
                metrics.IMPRESSIONS_DROPPED.inc(len(dropped.items))
            self._pending.append((user_id, rec, int(time.time() * 1000), experiment))
            self._cond.notify()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued list is written (checks, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._pending or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.05))
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                batch = list(self._pending)
                self._pending.clear()
                self._busy = True
            records = [served_of(user, rec, at, experiment) for user, rec, at, experiment in batch]
            shown = sum(len(rec.items) for _, rec, _, _ in batch)
            try:
                self._log.append_keyed(records)
                metrics.IMPRESSIONS_WRITTEN.inc(shown)
            except LogUnavailable as e:
                log.warning("impressions not written (%s); retrying in %.0f s", e, self._retry_s)
                with self._cond:  # back in front, in order; the bound still holds
                    self._pending.extendleft(reversed(batch))
                    while len(self._pending) > self._max_pending:
                        metrics.IMPRESSIONS_DROPPED.inc(len(self._pending.popleft()[1].items))
                time.sleep(self._retry_s)
            except Exception:  # whatever happens, serving goes on; these impressions are lost
                log.exception("impressions of %d lists could not be written", len(batch))
                metrics.IMPRESSIONS_DROPPED.inc(shown)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (up to `timeout_s`), then stop the thread."""
        self.flush(timeout_s)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
