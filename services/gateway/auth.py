"""API keys and per-key rate limits at the gateway's edges.

Keys come from `server.api_keys` (FRESHREC_API_KEYS): entries separated by ";", each
`scopes:secret` with scopes from "ingest", "recommend", "catalogue" (item writes), "admin" separated by ",", e.g.
`ingest:9f2c...;recommend,ingest:77ab...;admin:c0de...`. "admin" grants every scope. Empty
(the embedded default) turns authentication off. Clients send the key as
`Authorization: Bearer <key>` (or `X-API-Key: <key>`) over REST and as gRPC metadata
`authorization: Bearer <key>` (or `x-api-key`). A presented key is compared with every
configured secret in constant time (`hmac.compare_digest`, no early exit), and neither errors
nor logs ever contain a secret: keys are named `key1`, `key2`, ... by their position.

Rate limits (`server.rate_limit_per_s`, 0 = off): a token bucket per key (one shared bucket
when authentication is off) holding up to one second of calls; past it a call gets
`ResourceExhausted` (HTTP 429 with Retry-After, gRPC RESOURCE_EXHAUSTED) and does nothing.
"""

from __future__ import annotations

import hmac
import threading
import time
from dataclasses import dataclass

from services.errors import PermissionDenied, ResourceExhausted, Unauthenticated

SCOPES = ("ingest", "recommend", "catalogue", "admin")


@dataclass(frozen=True)
class ApiKey:
    name: str  # key1, key2, ...: what errors, logs and metrics may show
    secret: bytes
    scopes: frozenset[str]


def parse_api_keys(spec: str) -> list[ApiKey]:
    """The keys of a `server.api_keys` value.

    Raises:
        ValueError: a malformed entry or an unknown scope (the message never holds a secret).
    """
    keys = []
    for i, entry in enumerate(filter(None, (e.strip() for e in spec.split(";"))), start=1):
        scopes, sep, secret = entry.partition(":")
        names = frozenset(s.strip() for s in scopes.split(",") if s.strip())
        if not sep or not names or len(secret) < 8:
            raise ValueError(f"server.api_keys: entry {i} must be 'scopes:secret' with a secret of 8+ characters")
        unknown = sorted(names - set(SCOPES))
        if unknown:
            raise ValueError(f"server.api_keys: entry {i} has unknown scope {unknown[0]!r} (expected {SCOPES})")
        keys.append(ApiKey(f"key{i}", secret.encode(), names))
    return keys


def bearer(authorization: str | None, api_key: str | None) -> str | None:
    """The key a client presented: `Authorization: Bearer <key>` or `X-API-Key: <key>`."""
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return api_key


class Guard:
    """Authenticates calls, checks their scope and applies the rate limit.

    Args:
        keys: the configured keys (none: authentication off).
        rate_per_s: calls per second per key (0: no limit).
    """

    def __init__(self, keys: list[ApiKey], rate_per_s: float = 0.0) -> None:
        self._keys = keys
        self._rate = rate_per_s
        self._buckets: dict[str, tuple[float, float]] = {}  # key name -> (tokens, at)
        self._lock = threading.Lock()

    def check(self, presented: str | None, scope: str) -> str:
        """The calling key's name ("anonymous" with authentication off).

        Raises:
            Unauthenticated: no key, or not a configured one.
            PermissionDenied: the key lacks `scope`.
            ResourceExhausted: the key is over its rate limit.
        """
        name = "anonymous"
        if self._keys:
            if not presented:
                raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
            given, match = presented.encode(), None
            for key in self._keys:  # every secret compared, in constant time each
                if hmac.compare_digest(key.secret, given):
                    match = key
            if match is None:
                raise Unauthenticated("unknown API key")
            if scope not in match.scopes and "admin" not in match.scopes:
                raise PermissionDenied(f"API key {match.name} lacks the {scope!r} scope")
            name = match.name
        if self._rate > 0:
            self._take(name)
        return name

    def _take(self, name: str) -> None:
        now, burst = time.monotonic(), max(self._rate, 1.0)
        with self._lock:
            tokens, at = self._buckets.get(name, (burst, now))
            tokens = min(burst, tokens + (now - at) * self._rate)
            if tokens < 1.0:
                self._buckets[name] = (tokens, now)
                raise ResourceExhausted(f"rate limit of {self._rate:g} calls/s for API key {name} exceeded")
            self._buckets[name] = (tokens - 1.0, now)
