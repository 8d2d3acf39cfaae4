"""Serving parameter stores, chosen by URL scheme: `memory://` or `redis://HOST:PORT[/DB]`."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse, urlunparse

from services.serving_store.base import ServingStore, VersionGap
from services.serving_store.memory import MemoryServingStore


def open_serving_store(url: str) -> ServingStore:
    """Open the serving store at `url`.

    - `memory://` — in-process (embedded mode).
    - `redis://HOST:PORT[/DB][?prefix=NAME]` — a Redis server; keys live under NAME
      (default "freshrec").

    Raises:
        ValueError: unknown scheme (the message names the URL).
    """
    parsed = urlparse(url)
    if parsed.scheme == "memory":
        return MemoryServingStore()
    if parsed.scheme in ("redis", "rediss"):
        from services.serving_store.redis import RedisServingStore

        prefix = parse_qs(parsed.query).get("prefix", ["freshrec"])[0]
        return RedisServingStore(urlunparse(parsed._replace(query="")), prefix=prefix)
    raise ValueError(f"serving store URL {url!r}: unknown scheme {parsed.scheme!r} (use memory:// or redis://)")


__all__ = ["MemoryServingStore", "ServingStore", "VersionGap", "open_serving_store"]
