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

The same counts retrieve: a user's *taste attributes* are those of their profile with the
largest lift (`taste_attributes`), and the trainer publishes each attribute's most trending
items (`ATTRIBUTE_ITEMS`, uint64 [n], 0-padded), a candidate source that finds the items of a
taste no other source reaches (a documentary fan's documentaries), and the pool similar items
are chosen from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from embedding_store.keys import feature_key

USER_PROFILE = "user_profile"
USER_PROFILE_COUNTS = "user_profile_counts"
ATTRIBUTE_COUNTS = "attribute_counts"
ATTRIBUTE_ITEMS = "attribute_items"
TASTE_ATTRIBUTES = 2
"""Attributes of a user's taste whose items are candidates (`taste_attributes`)."""
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


def taste_attributes(
    profile_keys: np.ndarray,
    profile_counts: np.ndarray,
    profile_totals: np.ndarray,
    log_shares: np.ndarray,
    n: int = TASTE_ATTRIBUTES,
    prior: float = PRIOR,
) -> list[np.ndarray]:
    """Each user's most distinctive attributes (at most `n`, picked at least twice, more than
    everyone picks them), best first: by P(a | u) * log(P(a | u) / P(a)), each attribute's term
    of the divergence of the user's taste from everyone's — how often they pick it times how
    much more than everyone (the lift alone would put an attribute of 3 picks in 10 that is
    rare overall above one of 10 in 10).

    Args:
        profile_keys: uint64 [u, p]; profile_counts: float [u, p]; profile_totals: float [u]
            (as `attribute_lift`).
        log_shares: float [u, p] natural log of each profile attribute's share of all
            positives (NaN: unknown).

    Example:
        >>> keys, counts = np.array([[7, 8, 9, 6]], np.uint64), np.array([[8.0, 2.0, 1.0, 3.0]])
        >>> shares = np.log(np.array([[0.1, 0.5, 0.01, 0.01]]))  # 8 common, 6 and 9 rare
        >>> [a.tolist() for a in taste_attributes(keys, counts, np.array([10.0]), shares, n=3)]
        [[7, 6]]
    """
    usable = (profile_keys != 0) & np.isfinite(log_shares) & (profile_counts >= 2)
    shares = np.where(usable, log_shares, 0.0)
    totals = np.asarray(profile_totals, np.float64)[:, None]
    posterior = (profile_counts + prior * np.exp(shares)) / (totals + prior)
    lift = np.log(posterior) - shares
    term = np.where(usable & (lift > 0), posterior * lift, -np.inf)
    best = np.argsort(-term, axis=1, kind="stable")[:, :n]
    return [profile_keys[r, b[np.isfinite(term[r, b])]] for r, b in enumerate(best)]


@dataclass(frozen=True)
class Profiles:
    """The taste profiles of u users, from the trainer's counts or serving's synced tables.

    Args:
        keys: uint64 [u, p] attribute keys (0 = padding); counts: float [u, p] their counts.
        totals: float [u] each user's positives (0: no profile).
        last_s: float [u] model time of each user's last positive (NaN: none).
        shares: attribute keys [n] -> natural log of their shares of all positives [n] (NaN:
            unknown; `attribute_shares`).
    """

    keys: np.ndarray
    counts: np.ndarray
    totals: np.ndarray
    last_s: np.ndarray
    shares: Callable[[np.ndarray], np.ndarray]

    def lift(self, item_attrs: np.ndarray) -> np.ndarray:
        """`attribute_lift` [u, c] of candidates whose attribute keys are `item_attrs` [u, c, b]."""
        return attribute_lift(self.keys, self.counts, self.totals, item_attrs, self._shares_of(item_attrs))

    def taste(self, n: int = TASTE_ATTRIBUTES) -> list[np.ndarray]:
        """`taste_attributes` of each user."""
        return taste_attributes(self.keys, self.counts, self.totals, self._shares_of(self.keys), n)

    def _shares_of(self, attrs: np.ndarray) -> np.ndarray:
        """`shares` of an array of attribute keys (each distinct key looked up once; 0, the
        padding, is NaN)."""
        keys, at = np.unique(attrs, return_inverse=True)
        shares = np.full(len(keys), np.nan)
        shares[keys != 0] = self.shares(keys[keys != 0])
        return shares[at].reshape(attrs.shape)

    def taste_items(self, attribute_items: Callable[[np.ndarray], np.ndarray]) -> list[np.ndarray]:
        """Each user's candidates of their taste: the `ATTRIBUTE_ITEMS` rows of their taste
        attributes (`attribute_items`: keys [a] -> uint64 [a, m], zeros for unknown ones),
        taken in turn, best first, distinct.

        Example:
            >>> rows = {7: [1, 2, 3], 9: [2, 5, 0]}
            >>> def lookup(keys):
            ...     return np.array([rows.get(k, [0, 0, 0]) for k in keys.tolist()], np.uint64).reshape(len(keys), 3)
            >>> p = Profiles(np.zeros((1, 1), np.uint64), np.zeros((1, 1)), np.ones(1), np.zeros(1), np.log)
            >>> p.taste_items(lookup)  # no taste attribute: nothing
            [array([], dtype=uint64)]
            >>> _taken_in_turn(lookup(np.array([7, 9], np.uint64))).tolist()
            [1, 2, 5, 3]
        """
        return [_taken_in_turn(attribute_items(attrs)) for attrs in self.taste()]


def _taken_in_turn(rows: np.ndarray) -> np.ndarray:
    """The keys of rows [a, m] (0 = padding) taken in turn (each row's first, then each row's
    second, ...), each once."""
    flat = rows.T.ravel()
    flat = flat[flat != 0]
    return flat[np.sort(np.unique(flat, return_index=True)[1])]
