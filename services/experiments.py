"""A/B experiments: users split into arms by a stable hash, each arm a variant of the lists.

Configured as JSON in `server.experiments` (env FRESHREC_EXPERIMENTS), for example::

    {"ranking-2026-12": {"model":   {"weight": 50},
                         "popular": {"weight": 50, "ranking": "trending"},
                         "diverse": {"weight": 10, "diversity": 0.5}}}

A call that names an experiment (`"experiment": "ranking-2026-12"`) is answered as its user's
arm says, and the answer names the arm. A user's arm depends only on the experiment's name,
the user id and the arms' weights (`embedding_store.keys.feature_key` of the two, not Python's
salted `hash`), so every gateway puts a user in the same arm. The impressions written back
carry the experiment and the arm in their context; the trainer counts, per arm, the
impressions the joiner labelled and the clicks among them (`freshrec_experiment_impressions_total`,
`freshrec_experiment_clicks_total`): their ratio is the arm's click-through rate.

An arm may set `ranking` ("model", the default, or "trending": the trending list, the usual
baseline) and `diversity` (0-1, as a request's own).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from embedding_store.keys import feature_key

ARM_FIELDS = frozenset({"weight", "ranking", "diversity"})
RANKINGS = ("model", "trending")


@dataclass(frozen=True)
class Arm:
    """One variant: its name, share of users (relative weight) and what it changes."""

    name: str
    weight: float
    ranking: str = "model"
    diversity: float | None = None  # None: the request's own


class Experiments:
    """The configured experiments; `arm` assigns a user.

    Raises:
        ValueError: the JSON is malformed; the message names the experiment, arm and field.

    Example:
        >>> e = Experiments('{"x": {"a": {"weight": 1}, "b": {"weight": 1, "ranking": "trending"}}}')
        >>> e.arm("x", "u1").name == e.arm("x", "u1").name
        True
    """

    def __init__(self, text: str = "") -> None:
        self._arms: dict[str, list[Arm]] = {}
        if not text.strip():
            return
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise ValueError(f"server.experiments: not JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError("server.experiments: must be an object of experiments")
        for name, arms in raw.items():
            where = f"server.experiments.{name}"
            if not isinstance(arms, dict) or not arms:
                raise ValueError(f"{where}: must be an object of one or more arms")
            self._arms[name] = [_arm(f"{where}.{arm}", arm, body) for arm, body in sorted(arms.items())]
            if not sum(a.weight for a in self._arms[name]) > 0:
                raise ValueError(f"{where}: the arms' weights must not all be 0")

    def __contains__(self, experiment: str) -> bool:
        return experiment in self._arms

    def names(self) -> list[str]:
        return sorted(self._arms)

    def arms(self, experiment: str) -> list[Arm]:
        """The arms of `experiment`, by name (KeyError if there is no such experiment)."""
        return list(self._arms[experiment])

    def arm(self, experiment: str, user_id: str) -> Arm:
        """The user's arm of `experiment` (KeyError if there is no such experiment)."""
        arms = self._arms[experiment]
        point = feature_key(f"experiment:{experiment}", user_id) / 2**64 * sum(a.weight for a in arms)
        for arm in arms:
            point -= arm.weight
            if point < 0:
                return arm
        return arms[-1]


def _arm(where: str, name: str, body: Any) -> Arm:
    if not isinstance(body, dict):
        raise ValueError(f"{where}: must be an object")
    unknown = sorted(set(body) - ARM_FIELDS)
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown field (expected {sorted(ARM_FIELDS)})")
    weight = body.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{where}.weight: must be a number >= 0, got {weight!r}")
    ranking = body.get("ranking", "model")
    if ranking not in RANKINGS:
        raise ValueError(f"{where}.ranking: must be one of {list(RANKINGS)}, got {ranking!r}")
    diversity = body.get("diversity")
    if diversity is not None and (
        isinstance(diversity, bool) or not isinstance(diversity, int | float) or not 0 <= diversity <= 1
    ):
        raise ValueError(f"{where}.diversity: must be a number in [0, 1], got {diversity!r}")
    return Arm(name, float(weight), ranking, None if diversity is None else float(diversity))
