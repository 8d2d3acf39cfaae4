"""Redelivered events are trained on once: `RecentEvents` against a reference model, and the
trainer with a batch that a client sent twice."""

from __future__ import annotations

from collections import deque

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_ranking import events
from trainer.config import TrainerConfig
from trainer.dedup import RecentEvents
from trainer.eventlog import MemoryLog
from trainer.loop import Trainer


@settings(max_examples=200, deadline=None)
@given(
    window=st.integers(1, 6),
    batches=st.lists(st.lists(st.sampled_from("abcdefghij"), max_size=8), max_size=12),
)
def test_recent_events_match_a_window_of_distinct_ids(window: int, batches: list[list[str]]) -> None:
    recent = RecentEvents(window)
    remembered: deque[str] = deque()  # the reference: the last `window` distinct new ids, oldest first
    for batch in batches:
        expected = []
        for event_id in batch:
            new = event_id not in remembered
            expected.append(new)
            if new:
                remembered.append(event_id)
        got = recent.first_seen(batch).tolist()
        while len(remembered) > window:
            remembered.popleft()
        assert got == expected, (batch, list(remembered))


def test_a_batch_sent_twice_is_trained_once() -> None:
    log = MemoryLog()
    batch = events(300)
    log.append(batch)
    log.append(batch[100:200])  # the client retried part of it: same event ids
    log.append(events(50, seed=9))
    trainer = Trainer(TrainerConfig(batch_size=128), log.consumer("g"))
    steps = [trainer.poll_and_train() for _ in range(6)]
    assert sum(s.events for s in steps) == trainer.events_trained == 350
    assert sum(s.duplicates for s in steps) == trainer.duplicates == 100


def test_the_window_allocates_nothing_as_it_fills() -> None:
    """The index is sized for the whole window up front: ids streaming through (and pushing
    the oldest out) never grow it, so the trainer's memory is flat once it runs."""
    recent = RecentEvents(window=5_000)
    before = recent._index.nbytes
    for start in range(0, 20_000, 500):  # four windows' worth, in trainer-sized batches
        assert recent.first_seen([f"e{i}" for i in range(start, start + 500)]).all()
    assert recent._index.nbytes == before
