"""Serving parameter stores, chosen by URL scheme: `memory://`, `redis://HOST:PORT[/DB]` or
`redis-cluster://HOST:PORT[,HOST:PORT...]`."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse, urlunparse

import numpy as np

from services.serving_store.base import ServingStore, VersionGap
from services.serving_store.memory import MemoryServingStore

ROW_DTYPES = ("float16", "float32")
SCHEMES = ("redis", "rediss", "redis-cluster")  # besides memory://


def open_serving_store(url: str) -> ServingStore:
    """Open the serving store at `url`.

    - `memory://` — in-process (embedded mode).
    - `redis://HOST:PORT[/DB][?prefix=NAME]` — a Redis server; keys live under NAME
      (default "freshrec").
    - `redis-cluster://HOST:PORT[,HOST:PORT...][?prefix=NAME]` — a Redis Cluster reached
      through any of the nodes given (redis-py's cluster client); the same layout, its
      tables spread over the cluster's slots.

    Both take `row_dtype=float16` (default: half the bytes per synced and served row) or
    `row_dtype=float32` (exact rows) as a query parameter.

    Raises:
        ValueError: unknown scheme or row dtype (the message names the URL).
    """
    parsed = urlparse(url)
    query = parse_qs(parsed.query)
    row_dtype = query.get("row_dtype", ["float16"])[0]
    if row_dtype not in ROW_DTYPES:
        raise ValueError(f"serving store URL {url!r}: row_dtype must be one of {ROW_DTYPES}, got {row_dtype!r}")
    if parsed.scheme == "memory":
        return MemoryServingStore(row_dtype=np.dtype(row_dtype))
    if parsed.scheme in SCHEMES:
        from services.serving_store.redis import RedisServingStore

        prefix = query.get("prefix", ["freshrec"])[0]
        return RedisServingStore(
            urlunparse(parsed._replace(query="")),
            prefix=prefix,
            row_dtype=np.dtype(row_dtype),
            cluster=parsed.scheme == "redis-cluster",
        )
    raise ValueError(
        f"serving store URL {url!r}: unknown scheme {parsed.scheme!r} (use memory://, redis:// or redis-cluster://)"
    )


__all__ = ["MemoryServingStore", "ServingStore", "VersionGap", "open_serving_store"]
