"""The joiner: impressions and the actions on them become labelled examples.

An impression (an item shown to a user, reported with the `request_id` of the recommendation
that showed it) waits in a window. A positive action on the same (user, item) inside the window
makes it a positive example at once; an explicit skip makes it a negative at once; an
impression nobody acted on becomes a negative when its window closes. Time is event time: the
window of an impression shown at t closes once an event later than t + window has been seen.

Late actions — a click that arrives after its impression's window closed and its negative was
emitted — still become positives (marked late): the negative was trained on and cannot be taken
back, but the positive is not lost. Actions on items never impressed (ratings, or clients that do
not report impressions) become positives marked unjoined; the trainer pairs those with sampled
negatives.

Memory is bounded: at most `max_pending` open impressions (the oldest are closed early, as
negatives, when more arrive) and `max_closed` closed ones remembered for late actions, each as
one 64-bit key of its (user, item) pair (BLAKE2b; ~70 bytes an entry, a third of what a pair of
strings took).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from embedding_store.keys import feature_key
from trainer.events import Event

SOURCES = ("joined", "window_closed", "late", "unjoined", "forced_close")


@dataclass(frozen=True)
class JoinerConfig:
    """Settings of the joiner.

    Args:
        window_s: how long an impression waits for an action (event time).
        max_pending: most impressions waiting at once.
        max_closed: most closed impressions remembered to recognise late actions.

    Raises:
        ValueError: a value is out of range; the message names the field.
    """

    window_s: float = 300.0
    max_pending: int = 1_000_000
    max_closed: int = 1_000_000

    def __post_init__(self) -> None:
        for name in ("window_s", "max_pending", "max_closed"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Example:
    """One labelled (user, item) pair.

    Args:
        event: the event the example stands for: the impression for joined and closed ones,
            the action for late and unjoined ones.
        label: 1.0 positive, 0.0 negative.
        source: how it was labelled, one of `SOURCES`.
    """

    event: Event
    label: float
    source: str


@dataclass
class JoinerStats:
    """Counts of examples by source, and actions that labelled nothing new."""

    examples: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))
    duplicate_actions: int = 0
    duplicate_impressions: int = 0


class Joiner:
    """Turns a stream of events into labelled examples (see the module docstring).

    Args:
        config: window and memory bounds.

    Example:
        >>> j = Joiner(JoinerConfig(window_s=60))
        >>> shown = [Event(f"s{i}", "u", f"i{i}", "impression", 0, request_id="r") for i in (1, 2)]
        >>> [(e.event.item_id, e.label) for e in j.push(shown + [Event("c", "u", "i1", "click", 5_000)])]
        [('i1', 1.0)]
        >>> [(e.event.item_id, e.label, e.source) for e in j.push([Event("x", "v", "i9", "impression", 61_000)])]
        [('i2', 0.0, 'window_closed')]
    """

    def __init__(self, config: JoinerConfig | None = None) -> None:
        self.config = config or JoinerConfig()
        self._pending: OrderedDict[tuple[str, str], Event] = OrderedDict()  # by arrival ~ event time
        self._closed: dict[int, bool] = {}  # pair key -> it ended positive; oldest first
        self.watermark_ms = 0
        self.stats = JoinerStats()

    @property
    def pending(self) -> int:
        """Impressions waiting for an action."""
        return len(self._pending)

    @property
    def closed(self) -> int:
        """Closed impressions remembered to recognise late actions."""
        return len(self._closed)

    def push(self, events: list[Event]) -> list[Example]:
        """Add events (in log order); return the examples they complete, in order."""
        out: list[Example] = []
        for event in events:
            if event.timestamp_ms > self.watermark_ms:
                self.watermark_ms = event.timestamp_ms
                self._close_expired(out)
            key = (event.user_id, event.item_id)
            if event.type == "impression":
                if key in self._pending:
                    self.stats.duplicate_impressions += 1
                    continue
                self._closed.pop(_pair(key), None)  # shown again: a new chance
                self._pending[key] = event
                if len(self._pending) > self.config.max_pending:
                    _, oldest = self._pending.popitem(last=False)
                    self._close(oldest, "forced_close", out)
            elif event.is_positive or event.type == "skip":
                label = 1.0 if event.is_positive else 0.0
                shown = self._pending.pop(key, None)
                if shown is not None:
                    self._emit(Example(shown, label, "joined"), out)
                    self._remember_closed(key, positive=bool(label))
                elif (closed := self._closed.get(_pair(key))) is not None:
                    if label and not closed:  # the window closed with a negative
                        self._emit(Example(event, label, "late"), out)
                        self._remember_closed(key, positive=True)
                    else:
                        self.stats.duplicate_actions += 1  # that impression already has its label
                else:
                    self._emit(Example(event, label, "unjoined"), out)
            # other types (dwell without a join rule) carry no label
        return out

    def forget_user(self, user_id: str) -> int:
        """Drop a user's open impressions (erasure); how many there were. Closed ones are kept
        only as keys of (user, item) pairs, which no longer name the user once the items do not."""
        mine = [key for key in self._pending if key[0] == user_id]
        for key in mine:
            del self._pending[key]
        return len(mine)

    def _close_expired(self, out: list[Example]) -> None:
        horizon = self.watermark_ms - int(self.config.window_s * 1000)
        while self._pending:
            key, shown = next(iter(self._pending.items()))
            if shown.timestamp_ms >= horizon:
                break
            del self._pending[key]
            self._close(shown, "window_closed", out)

    def _close(self, shown: Event, source: str, out: list[Example]) -> None:
        self._emit(Example(shown, 0.0, source), out)
        self._remember_closed((shown.user_id, shown.item_id), positive=False)

    def _remember_closed(self, key: tuple[str, str], positive: bool) -> None:
        pair = _pair(key)
        self._closed.pop(pair, None)  # remembered again: now the newest
        self._closed[pair] = positive
        while len(self._closed) > self.config.max_closed:
            del self._closed[next(iter(self._closed))]

    def __setstate__(self, state: dict[str, object]) -> None:
        """A joiner pickled before closed pairs were keys (checkpoints of older versions)."""
        closed = state.get("_closed")
        if closed and isinstance(next(iter(closed)), tuple):  # type: ignore[call-overload]
            state["_closed"] = {_pair(k): v for k, v in closed.items()}  # type: ignore[attr-defined]
        self.__dict__.update(state)

    def _emit(self, example: Example, out: list[Example]) -> None:
        self.stats.examples[example.source] += 1
        out.append(example)


def _pair(key: tuple[str, str]) -> int:
    """The 64-bit key of a (user, item) pair (the unit separator keeps "a"+"bc" from "ab"+"c")."""
    return feature_key("joined", f"{key[0]}\x1f{key[1]}")
