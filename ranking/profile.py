"""Taste profiles: how much more a user picks an attribute (a genre, a year, a category) than
everyone does, and what that says of a candidate.

A user's profile counts the attribute keys of the items they picked (all their positives, not
only the recent ones); the population's counts are the same over every user's positives. A
candidate is scored by its attributes' naive Bayes log-likelihood ratio, the *attribute lift*:

    lift(u, i) = sum over the attributes a of i of  log( P(a | u) / P(a) )
    P(a | u)   = (n_u(a) + prior * P(a)) / (n_u + prior)      P(a) = count(a) / positives

with n_u(a) the user's positives that carry a and n_u all their positives. The prior (`PRIOR`
pseudo-positives, chosen on the inner split of `bench.peers`' history among 5 and 20) pulls a
short profile towards the population (no evidence: lift 0), so a user with ten horror films
gets a large lift for horror and a user who picks every genre about as everyone does gets
lifts near 0 — what distinguishes a user's taste, not what is popular, which the trending
counts already say. An attribute the population has never picked carries no evidence and
adds nothing.

The trainer keeps the counts (`trainer.profiles`); they reach serving as three synced feature
tables: `USER_PROFILE` (uint64 [slots] attribute keys, 0 = padding), `USER_PROFILE_COUNTS`
(float64 [slots + 2]: their counts, the user's positives in all, and the model time of their
last positive, which picks the blend's weights: `ranking.blend`) and `ATTRIBUTE_COUNTS`
(float64 [1]: the population's count of each attribute; the row of `POPULATION_KEY` holds all
positives, the denominator).
"""

from __future__ import annotations

import numpy as np

from embedding_store.keys import feature_key

USER_PROFILE = "user_profile"
USER_PROFILE_COUNTS = "user_profile_counts"
ATTRIBUTE_COUNTS = "attribute_counts"
PRIOR = 5.0
POPULATION_KEY = np.uint64(feature_key("freshrec.population", "positives"))
"""The `ATTRIBUTE_COUNTS` row that counts every positive (a slot no attribute uses)."""


def attribute_shares(counts: np.ndarray, found: np.ndarray, population: float) -> np.ndarray:
    """Natural log of each attribute's share of all positives, NaN for an attribute never counted.

    Args:
        counts: float [n] population counts (`ATTRIBUTE_COUNTS` rows), found: bool [n] whether
            each attribute has a row; population: all positives.

    Example:
        >>> attribute_shares(np.array([5.0, 0.0, 3.0]), np.array([True, True, False]), 10.0).round(3).tolist()
        [-0.693, nan, nan]
    """
    usable = found & (counts > 0) & (population > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(usable, np.log(np.maximum(counts, 1e-300) / max(population, 1e-300)), np.nan)


def attribute_lift(
    profile_keys: np.ndarray,
    profile_counts: np.ndarray,
    profile_totals: np.ndarray,
    item_attrs: np.ndarray,
    log_shares: np.ndarray,
    prior: float = PRIOR,
) -> np.ndarray:
    """The attribute lift [u, c] of u users for their c candidates each (module docstring).

    Args:
        profile_keys: uint64 [u, p] attribute keys of each user's profile (0 = padding).
        profile_counts: float [u, p] their counts.
        profile_totals: float [u] each user's positives in all (0: no profile, lift 0).
        item_attrs: uint64 [u, c, b] the candidates' attribute keys (0 = padding).
        log_shares: float [u, c, b] natural log of each of those attributes' share of all
            positives (`attribute_shares`; NaN: unknown, no evidence).
        prior: pseudo-positives of the population's taste in every profile (> 0).

    Example:
        >>> keys = np.array([[7, 8]], np.uint64)  # 9 of 10 positives carry 7, 1 carries 8
        >>> attrs = np.array([[[7], [8], [9]]], np.uint64)
        >>> shares = np.log(np.full((1, 3, 1), 0.5))  # each half of everyone's positives
        >>> lift = attribute_lift(keys, np.array([[9.0, 1.0]]), np.array([10.0]), attrs, shares, 10.0)
        >>> [round(float(x), 3) for x in lift[0]]  # (9 + 5) / 20 / 0.5, (1 + 5) / 20 / 0.5, 5 / 20 / 0.5
        [0.336, -0.511, -0.693]
    """
    u, c = item_attrs.shape[:2]
    out = np.zeros((u, c))
    usable = (item_attrs != 0) & np.isfinite(log_shares)
    for r in np.flatnonzero(np.asarray(profile_totals) > 0).tolist():
        present = profile_keys[r] != 0
        order = np.argsort(profile_keys[r][present])
        keys, counts = profile_keys[r][present][order], np.asarray(profile_counts[r], np.float64)[present][order]
        attrs = item_attrs[r]
        picked = np.zeros(attrs.shape)
        if len(keys):
            at = np.minimum(np.searchsorted(keys, attrs), len(keys) - 1)
            picked = np.where(keys[at] == attrs, counts[at], 0.0)
        shares = np.where(usable[r], log_shares[r], 0.0)
        terms = np.log(picked + prior * np.exp(shares)) - shares - np.log(float(profile_totals[r]) + prior)
        out[r] = np.where(usable[r], terms, 0.0).sum(axis=1)
    return out
