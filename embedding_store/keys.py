"""Stable 64-bit feature keys: a hash of (feature slot, raw value).

The key is BLAKE2b with an 8-byte digest, personalised by the slot name, so the same raw
value in two slots ("user" 42 and "item" 42) gives unrelated keys, and keys are the same in
every process and every run (unlike Python's salted `hash`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np


def _person(slot: str) -> bytes:
    """BLAKE2b's personalisation for `slot`: its UTF-8 bytes when they fit the 16 allowed, else
    a 16-byte digest of them (cutting would give slots that share a prefix the same keys)."""
    raw = slot.encode("utf-8")
    return raw if len(raw) <= 16 else hashlib.blake2b(raw, digest_size=16).digest()


def feature_key(slot: str, value: str) -> int:
    """Return the unsigned 64-bit key of `value` in feature slot `slot`.

    Example:
        >>> feature_key("item", "42") == feature_key("item", "42")
        True
    """
    digest = hashlib.blake2b(value.encode("utf-8"), digest_size=8, person=_person(slot))
    return int.from_bytes(digest.digest(), "little")


def feature_keys(slot: str, values: Iterable[str]) -> np.ndarray:
    """Vector form of `feature_key`: a uint64 array with one key per value."""
    person = _person(slot)
    joined = b"".join(hashlib.blake2b(v.encode("utf-8"), digest_size=8, person=person).digest() for v in values)
    return np.frombuffer(joined, dtype="<u8").astype(np.uint64)
