"""The trainer's model clock: event time with the long silences between bursts cut short.

Expiry, LRU order and the trending decay all run on this clock. Plain event time would let
one jump wreck the model: a replay of last year's history followed by live traffic moves
event time forward by a year at once, and every row trained during the replay would be
older than any TTL, every trending count decayed to nothing. Yet no user did anything in
that year; the model has simply not heard from them. So the clock follows event time
while events keep coming, and a gap of more than `max_jump_s` between the newest event so
far and a newer one advances it by `max_jump_s` only. Rows then expire after `ttl_s` of
*traffic* without them (a row trained last during the replay lives on while live traffic
runs for the TTL without it), and trending counts decay through the time events spanned.

Events older than the newest one never move the clock back (it is a running maximum). Each
such late event still has its own model time (`at`): its event time less the silences cut
short before it, so an event that a lagging partition delivers late decays from when it
happened, not from when it arrived.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MAX_CUTS = 1000
"""Cut gaps remembered for `ModelClock.at` (an event older than all of them is mapped by the oldest)."""


@dataclass
class ModelClock:
    """Map event times (seconds) onto the model's clock.

    Args:
        max_jump_s: the most one gap in event time advances the clock (inf: plain event time).

    Attributes:
        event_s: the newest event time seen (seconds since the epoch), 0 before any.
        now_s: the model clock at that event.

    Example:
        >>> clock = ModelClock(max_jump_s=3600)
        >>> clock.advance(1000.0), clock.advance(1060.0)
        (1000.0, 1060.0)
        >>> clock.advance(1060.0 + 365 * 86400)  # a year of silence counts as an hour
        4660.0
        >>> clock.advance(10.0)  # a late event: the clock stays
        4660.0
    """

    max_jump_s: float = 86400.0
    event_s: float = 0.0
    now_s: float = 0.0
    # (event time from which it holds, event time - model time), one per gap cut short, oldest first
    cuts: list[tuple[float, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.max_jump_s > 0:
            raise ValueError(f"max_jump_s: must be > 0, got {self.max_jump_s}")

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("cuts", [])  # clocks checkpointed before cuts were kept have none

    def advance(self, event_s: float | np.ndarray) -> float:
        """Move to the newest of `event_s` (one time, or a batch's times) and what came before;
        return the model clock. A batch's times are walked in order, so only a real silence
        (no event at all for longer than `max_jump_s`) is cut short: a batch that lands well
        after the previous one, its events spread over the time between, is no silence."""
        times = np.asarray(event_s, dtype=np.float64).ravel()
        times = np.unique(times[np.isfinite(times) & (times > self.event_s)])  # sorted
        if not len(times):
            return self.now_s
        if self.event_s == 0.0:  # the first event: the clock starts at event time
            self.now_s = self.event_s = float(times[0])
        gaps = np.diff(times, prepend=self.event_s)
        excess = np.maximum(gaps - self.max_jump_s, 0.0)
        if excess.any():
            offset = (self.event_s - self.now_s) + np.cumsum(excess)
            cut = np.flatnonzero(excess)
            self.cuts.extend(zip(times[cut].tolist(), offset[cut].tolist(), strict=True))
            del self.cuts[:-MAX_CUTS]
        self.now_s += float(np.minimum(gaps, self.max_jump_s).sum())
        self.event_s = float(times[-1])
        return self.now_s

    def at(self, event_s: np.ndarray) -> np.ndarray:
        """Model times of events already seen (after `advance` with their newest): each event
        time less the silences cut short before it; an event inside a cut silence gets the
        model time of its end.

        Example:
            >>> clock = ModelClock(max_jump_s=3600)
            >>> _ = clock.advance(1000.0), clock.advance(5000.0), clock.advance(5000.0 + 365 * 86400)
            >>> clock.now_s, clock.at(np.array([5000.0 + 365 * 86400, 5000.0 + 60, 5000.0, 1000.0])).tolist()
            (8200.0, [8200.0, 4660.0, 4600.0, 1000.0])
        """
        times = np.asarray(event_s, dtype=np.float64)
        cuts = self.cuts
        if not cuts:
            return np.minimum(times, self.now_s)  # the clock started at event time: no offset yet
        starts = np.array([c[0] for c in cuts])
        offsets = np.array([0.0, *(c[1] for c in cuts)])
        return np.minimum(times - offsets[np.searchsorted(starts, times, side="right")], self.now_s)
