"""Redis serving store: current rows in hashes, versions in a Redis Stream.

Layout under a key prefix P (default "freshrec"):

- `P:version`: the latest version;
- `P:users`, `P:items`: hashes from 8-byte little-endian key to row bytes (fp16 by default);
- `P:names`: hash from item key to item id;
- `P:seen:<user key hex>`: list of the user's recent item keys, trimmed to `max_seen`;
- `P:popular`, `P:popular_scores`: the popular list (uint64 keys, float32 scores);
- `P:table:<name>`: the ranking service's tables (`SyncMessage.tables`), hashes from key to
  row bytes; `P:schema` maps each table name to "<numpy dtype>:<width>" of its rows;
- `P:dense`: the latest dense parameters (npz bytes); `P:clock`: the trainer's event time and
  the trending half-life (2 float64);
- `P:deltas`: stream with one entry `<version>-0` per version, field `m` the encoded message,
  trimmed to about `retention` entries;
- channel `P:published`: the number of each new version, published with it.

One publish is one MULTI/EXEC transaction guarded by WATCH on `P:version`, so readers never
see half a version and concurrent publishers cannot both claim one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import redis

from embedding_store.base import TableDelta
from services.serving_store import codec
from services.serving_store.base import VersionGap
from trainer.sync import SyncMessage


def _field(keys: np.ndarray) -> list[bytes]:
    data = np.ascontiguousarray(keys, dtype="<u8").tobytes()
    return [data[i : i + 8] for i in range(0, len(data), 8)]


def _keys(fields: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(fields), dtype="<u8").astype(np.uint64)


class RedisServingStore:
    """Serving store on a Redis server.

    Args:
        url: redis://HOST:PORT[/DB]; the query parameter `prefix` sets the key prefix.
        retention: approximate number of versions kept in the stream.
        max_seen: recent items kept per user.
        row_dtype: float16 (default) or float32 embedding rows.

    Raises:
        redis.ConnectionError: from any call while Redis is unreachable.
    """

    def __init__(
        self,
        url: str,
        prefix: str = "freshrec",
        retention: int = 1000,
        max_seen: int = 200,
        row_dtype: np.dtype | None = None,
    ) -> None:
        self.row_dtype = np.dtype(row_dtype or np.float16)
        self._redis = redis.Redis.from_url(url)
        self._p = prefix
        self._retention = retention
        self._max_seen = max_seen

    def _k(self, name: str) -> str:
        return f"{self._p}:{name}"

    def publish(self, message: SyncMessage) -> int:
        vkey = self._k("version")
        while True:
            with self._redis.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(vkey)
                    current: Any = pipe.get(vkey)  # immediate-mode read while watching
                    message.version = int(current or 0) + 1
                    pipe.multi()
                    self._write(pipe, message)
                    pipe.execute()
                    return message.version
                except redis.WatchError:
                    continue

    def _write(self, pipe: redis.client.Pipeline, m: SyncMessage) -> None:
        for table, delta in (("users", m.users), ("items", m.items)):
            if len(delta.evicted):
                pipe.hdel(self._k(table), *_field(delta.evicted))
            if len(delta.keys):
                rows = delta.rows.astype(self.row_dtype)
                pipe.hset(self._k(table), mapping=dict(zip(_field(delta.keys), map(bytes, rows), strict=True)))
        if len(m.items.evicted):
            pipe.hdel(self._k("names"), *_field(m.items.evicted))
        if m.item_names:
            keys = np.fromiter(m.item_names.keys(), dtype=np.uint64, count=len(m.item_names))
            pipe.hset(self._k("names"), mapping=dict(zip(_field(keys), m.item_names.values(), strict=True)))
        for user, items in m.seen_by_user():
            key = self._k(f"seen:{user:016x}")
            pipe.rpush(key, *_field(items))
            pipe.ltrim(key, -self._max_seen, -1)
        for name, delta in m.tables.items():
            key = self._k(f"table:{name}")
            if len(delta.evicted):
                pipe.hdel(key, *_field(delta.evicted))
            if len(delta.keys):
                rows = np.ascontiguousarray(codec.stored_rows(delta.rows, self.row_dtype))
                pipe.hset(self._k("schema"), name, f"{rows.dtype.str}:{rows.shape[1]}")
                pipe.hset(key, mapping=dict(zip(_field(delta.keys), map(bytes, rows), strict=True)))
        if m.dense:
            pipe.set(self._k("dense"), codec.encode_arrays(m.dense))
        if m.clock_s or m.trending_half_life_s:
            pipe.set(self._k("clock"), np.array([m.clock_s, m.trending_half_life_s], dtype="<f8").tobytes())
        if len(m.popular_keys):
            pipe.set(self._k("popular"), np.ascontiguousarray(m.popular_keys, dtype="<u8").tobytes())
            pipe.set(self._k("popular_scores"), np.ascontiguousarray(m.popular_scores, dtype="<f4").tobytes())
        pipe.set(self._k("version"), m.version)
        encoded = codec.encode(m, self.row_dtype)
        m.encoded_bytes = len(encoded)
        pipe.xadd(self._k("deltas"), {"m": encoded}, id=f"{m.version}-0", maxlen=self._retention, approximate=True)
        pipe.publish(self._k("published"), m.version)  # for listeners other than replicas (they block on the stream)

    def latest_version(self) -> int:
        return int(self._redis.get(self._k("version")) or 0)

    def snapshot(self) -> SyncMessage:
        schema: dict[bytes, bytes] = self._redis.hgetall(self._k("schema"))  # type: ignore[assignment]
        while True:  # one transaction over everything but the seen lists; again if a table appeared
            names = sorted(schema)
            with self._redis.pipeline(transaction=True) as pipe:
                for key in ("version", "popular", "popular_scores", "dense", "clock"):
                    pipe.get(self._k(key))
                for key in ("users", "items", "names", "schema"):
                    pipe.hgetall(self._k(key))
                for name in names:
                    pipe.hgetall(self._k(f"table:{name.decode()}"))
                version, popular, popular_scores, dense, clock, users, items, names_map, now_schema, *tables = (
                    pipe.execute()
                )
            if sorted(now_schema) == names:
                break
            schema = now_schema
        # Seen lists are read after the transaction; they may already hold items of a later
        # version, which the replica then sees twice (a history is a recency list, so harmless).
        seen_users: list[np.ndarray] = []
        seen_items: list[np.ndarray] = []
        seen_keys = list(self._redis.scan_iter(match=self._k("seen:*"), count=1000))
        for start in range(0, len(seen_keys), 1000):  # one round trip per 1,000 users
            chunk = seen_keys[start : start + 1000]
            with self._redis.pipeline(transaction=False) as pipe:
                for key in chunk:
                    pipe.lrange(key, 0, -1)
                lists: list[Any] = pipe.execute()
            for key, raw_items in zip(chunk, lists, strict=True):
                items_of_user = _keys(raw_items)
                seen_users.append(np.full(len(items_of_user), int(key.rsplit(b":", 1)[1], 16), dtype=np.uint64))
                seen_items.append(items_of_user)
        return SyncMessage(
            users=self._table("user", users, f"{self.row_dtype.str}:0".encode()),
            items=self._table("item", items, f"{self.row_dtype.str}:0".encode()),
            item_names={
                int(k): v.decode("utf-8")
                for k, v in zip(_keys(list(names_map)).tolist(), names_map.values(), strict=True)
            },
            seen_users=np.concatenate(seen_users) if seen_users else np.zeros(0, np.uint64),
            seen_items=np.concatenate(seen_items) if seen_items else np.zeros(0, np.uint64),
            popular_keys=np.frombuffer(popular or b"", dtype="<u8").astype(np.uint64),
            popular_scores=np.frombuffer(popular_scores or b"", dtype="<f4").astype(np.float32),
            tables={
                name.decode(): self._table(name.decode(), mapping, now_schema[name])
                for name, mapping in zip(names, tables, strict=True)
            },
            dense=codec.decode_arrays(dense) if dense else {},
            clock_s=float(np.frombuffer(clock, dtype="<f8")[0]) if clock else 0.0,
            trending_half_life_s=float(np.frombuffer(clock, dtype="<f8")[1]) if clock else 0.0,
            version=int(version or 0),
            full=True,
        )

    @staticmethod
    def _table(name: str, mapping: dict[bytes, bytes], schema: bytes) -> TableDelta:
        """A hash of key -> row bytes as a delta; `schema` is "<dtype>:<width>" (fp16 rows come back float32)."""
        dtype_text, width_text = schema.decode().split(":")
        dtype, width = np.dtype(dtype_text), int(width_text)
        keys = _keys(list(mapping))
        if not len(keys):
            return TableDelta(name, keys, np.zeros((0, max(width, 1)), np.float32 if dtype == np.float16 else dtype))
        rows = np.frombuffer(b"".join(mapping.values()), dtype=dtype).reshape(len(keys), width or -1)
        return TableDelta(name, keys, rows.astype(np.float32 if dtype == np.float16 else dtype.newbyteorder("=")))

    def read_since(self, version: int, timeout_s: float) -> list[SyncMessage]:
        block_ms = max(1, int(timeout_s * 1000))
        reply: Any = self._redis.xread({self._k("deltas"): f"{version}-0"}, count=1000, block=block_ms)
        if not reply:
            return []
        entries = reply[0][1]
        messages = [codec.decode(fields[b"m"]) for _, fields in entries]
        if messages and messages[0].version != version + 1:
            raise VersionGap(f"version {version + 1} is no longer retained (oldest is {messages[0].version})")
        return messages

    def close(self) -> None:
        self._redis.close()
