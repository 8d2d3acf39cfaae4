"""Collisionless embedding tables: every 64-bit feature key owns its own row.

- `keys`: stable 64-bit feature keys from (slot, raw value).
- `hash_index`: compiled open-addressing map from keys to dense row ids.
- `optimizers`: per-row SGD, Adagrad, row-wise Adagrad and lazy Adam.
- `frequency`: the count-min sketch behind the frequency filter.
- `snapshot`: atomic, checksummed snapshot files.
- `base`: the table and store interfaces, table config, deltas and stats.
- `local`: in-process tables and stores; `remote`: a shard served over gRPC and its client;
  `sharded`: N shards acting as one store.
- `row_map`: rows without optimizer state, for serving.
- `dense`: dense parameters shared by trainer workers, in process or on the first shard.

Stores are opened by URL with `open_store`, the dense parameters that go with them with
`open_dense`.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

from embedding_store.base import EmbeddingTable, Store, TableConfig, TableDelta, TableStats
from embedding_store.dense import DenseParameters, LocalDense
from embedding_store.hash_index import KeyIndex
from embedding_store.keys import feature_key, feature_keys
from embedding_store.local import LocalStore, LocalTable
from embedding_store.sharded import ShardedStore, ShardedTable, shard_config
from embedding_store.snapshot import CorruptSnapshot


def open_store(url: str, configs: list[TableConfig]) -> Store:
    """Open the embedding store at `url` holding tables `configs`.

    - `local://` — in this process; `local://?shards=N` splits each table into N in-process shards.
      A sharded table's `max_rows` and filter capacity are split between its shards
      (`embedding_store.sharded.shard_config`).
    - `grpc://HOST:PORT[,HOST:PORT...]` — one `freshrec store-shard` process per address, in
      shard order (the order is part of the layout).

    Raises:
        ValueError: unknown scheme or malformed URL (the message names the URL).
        embedding_store.remote.StoreUnavailable: a shard cannot be reached.
    """
    parsed = urlparse(url)
    if parsed.scheme == "local":
        try:
            shards = int(parse_qs(parsed.query).get("shards", ["1"])[0])
        except ValueError:
            raise ValueError(f"store URL {url!r}: shards must be an integer") from None
        if shards < 1:
            raise ValueError(f"store URL {url!r}: shards must be >= 1")
        if shards == 1:
            return LocalStore(configs)
        return ShardedStore(configs, [LocalStore([shard_config(c, shards, i) for c in configs]) for i in range(shards)])
    if parsed.scheme == "grpc":
        from embedding_store.remote import RemoteStore

        addresses = _shard_addresses(url)
        if len(addresses) == 1:
            return RemoteStore(addresses[0], configs)
        n = len(addresses)
        return ShardedStore(
            configs, [RemoteStore(a, [shard_config(c, n, i) for c in configs]) for i, a in enumerate(addresses)]
        )
    raise ValueError(f"store URL {url!r}: unknown scheme {parsed.scheme!r} (use local:// or grpc://)")


def open_dense(store_url: str) -> DenseParameters:
    """The dense parameters that go with the embedding store at `store_url`
    (`embedding_store.dense`): in this process for `local://`, the first shard's dense
    service for `grpc://HOST:PORT[,...]`."""
    if urlparse(store_url).scheme == "grpc":
        from embedding_store.remote import RemoteDense

        return RemoteDense(_shard_addresses(store_url)[0])
    return LocalDense()


def _shard_addresses(url: str) -> list[str]:
    """The shard addresses of a `grpc://HOST:PORT[,HOST:PORT...]` store URL, in shard order."""
    addresses = [a for a in urlparse(url).netloc.split(",") if a]
    if not addresses or any(":" not in a for a in addresses):
        raise ValueError(f"store URL {url!r}: expected grpc://HOST:PORT[,HOST:PORT...]")
    return addresses


__all__ = [
    "CorruptSnapshot",
    "DenseParameters",
    "EmbeddingTable",
    "KeyIndex",
    "LocalDense",
    "LocalStore",
    "LocalTable",
    "ShardedStore",
    "ShardedTable",
    "Store",
    "TableConfig",
    "TableDelta",
    "TableStats",
    "feature_key",
    "feature_keys",
    "open_dense",
    "open_store",
    "shard_config",
]
