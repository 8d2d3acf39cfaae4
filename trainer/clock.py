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

Events older than the newest one never move the clock back (it is a running maximum).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


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

    def __post_init__(self) -> None:
        if not self.max_jump_s > 0:
            raise ValueError(f"max_jump_s: must be > 0, got {self.max_jump_s}")

    def advance(self, event_s: float) -> float:
        """Move to the newest of `event_s` and what came before; return the model clock."""
        if not math.isfinite(event_s) or event_s <= self.event_s:
            return self.now_s
        if self.event_s == 0.0:  # the first event: the clock starts at event time
            self.now_s = event_s
        else:
            self.now_s += min(event_s - self.event_s, self.max_jump_s)
        self.event_s = event_s
        return self.now_s
