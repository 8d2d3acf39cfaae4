"""Redis serving store: current rows in bucketed hashes, versions in a Redis Stream; on one
Redis server or a Redis Cluster (redis-py's cluster client), with the same layout.

Layout under a key prefix P (default "freshrec"); `{...}` is a Redis Cluster hash tag, which
puts every key with the same tag in one slot:

- `{P}:version`: the latest version; `{P}:deltas`: stream with one entry `<version>-0` per
  version, field `m` the encoded message, trimmed to about `retention` entries;
- `{P}:popular`, `{P}:popular_scores`: the popular list (uint64 keys, float32 scores);
  `{P}:dense`: the latest dense parameters (npz bytes); `{P}:clock`: the trainer's event
  time and the trending half-life (2 float64); `{P}:schema`: each ranking table's
  "<numpy dtype>:<width>"; `{P}:publish-lock`: held by the publishing trainer;
- `P:users:{b}`, `P:items:{b}`, `P:names:{b}`, `P:catalogue:{b}`, `P:table:<name>:{b}`:
  hashes from 8-byte little-endian key to row bytes (fp16 embeddings by default), item id
  or catalogue record (JSON, `trainer.items`; tombstones of deleted items kept), split into
  `BUCKETS` buckets by key (b = key mod `BUCKETS`) so a cluster spreads the tables;
- `P:seen:<user key hex>`: sorted set of the user's item keys by version, trimmed to the newest `max_seen`;
- channel `P:published`: the number of each new version, published with it.

A publish holds the publish lock (trainer workers publish one at a time), writes the rows,
then sets the version and appends the stream entry in one MULTI/EXEC on the `{P}` slot. So
the rows of every version up to `{P}:version` are in the hashes, and a stream entry is never
half there. A snapshot reads the version first and the rows after: it may already hold rows of
the next versions, which the replica then applies again from the stream (a version sets rows
to values, so applying it twice changes nothing; a seen list may repeat items, harmless for
a recency list). A publisher that dies between the rows and the version leaves rows no
version announces; replicas that bootstrap later have them, replicas that follow the stream
get them the next time those rows change.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import redis
from redis.cluster import ClusterNode, RedisCluster

from embedding_store.base import TableDelta
from embedding_store.keys import feature_keys
from services.serving_store import codec
from services.serving_store.base import VersionGap
from services.serving_store.state import MAX_SEEN
from trainer.items import ItemRecord, UserRecord
from trainer.sync import SyncMessage

BUCKETS = 64  # hashes per table
log = logging.getLogger(__name__)
LOCK_TIMEOUT_S = 60.0  # a publisher that dies holding the lock holds it this long


@contextlib.contextmanager
def _kept(lock: Any) -> Iterator[None]:
    """Hold `lock` past its timeout while the body runs: a thread renews it every third of it
    (a publish of a large version can outlast the timeout, which only guards against a
    publisher that died holding the lock)."""
    done = threading.Event()

    def renew() -> None:
        while not done.wait(LOCK_TIMEOUT_S / 3):
            try:
                lock.reacquire()
            except redis.exceptions.RedisError as e:  # the publish checks ownership before its version
                log.warning("could not renew the publish lock: %s", e)
                return

    thread = threading.Thread(target=renew, name="publish-lock", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _field(keys: np.ndarray) -> list[bytes]:
    data = np.ascontiguousarray(keys, dtype="<u8").tobytes()
    return [data[i : i + 8] for i in range(0, len(data), 8)]


def _keys(fields: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(fields), dtype="<u8").astype(np.uint64)


def _by_bucket(keys: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(bucket, positions of `keys` in it) for each bucket that has keys."""
    buckets = (np.asarray(keys, dtype=np.uint64) % np.uint64(BUCKETS)).astype(np.int64)
    order = np.argsort(buckets, kind="stable")
    bounds = np.flatnonzero(np.diff(buckets[order])) + 1
    for part in np.split(order, bounds) if len(order) else []:
        yield int(buckets[part[0]]), part


def connect(url: str, cluster: bool) -> redis.Redis | RedisCluster:
    """A client for `redis://HOST:PORT[/DB]`, or for the Redis Cluster reachable through any
    of `HOST:PORT[,HOST:PORT...]` (the rest of the nodes are discovered)."""
    if not cluster:
        return redis.Redis.from_url(url)
    netloc = url.split("://", 1)[1].split("/", 1)[0]
    nodes = [ClusterNode(host, int(port)) for host, port in (a.rsplit(":", 1) for a in netloc.split(",") if a)]
    return RedisCluster(startup_nodes=nodes)


class RedisServingStore:
    """Serving store on a Redis server or a Redis Cluster.

    Args:
        url: redis://HOST:PORT[/DB], or with `cluster` any node(s) of the cluster,
            HOST:PORT[,HOST:PORT...] after the scheme.
        prefix: key prefix P (see the module docstring).
        retention: approximate number of versions kept in the stream.
        max_seen: recent items kept per user.
        row_dtype: float16 (default) or float32 embedding rows.
        cluster: talk to a Redis Cluster (redis-py's `RedisCluster`).

    Raises:
        redis.ConnectionError: from any call while Redis is unreachable.
    """

    def __init__(
        self,
        url: str,
        prefix: str = "freshrec",
        retention: int = 1000,
        max_seen: int = MAX_SEEN,
        row_dtype: np.dtype | None = None,
        cluster: bool = False,
    ) -> None:
        self.row_dtype = np.dtype(row_dtype or np.float16)
        self._redis = connect(url, cluster)
        self._p = prefix
        self._retention = retention
        self._max_seen = max_seen

    def _meta(self, name: str) -> str:
        return f"{{{self._p}}}:{name}"

    def _bucket(self, table: str, bucket: int) -> str:
        return f"{self._p}:{table}:{{{bucket}}}"

    def publish(self, message: SyncMessage) -> int:
        lock = self._redis.lock(
            self._meta("publish-lock"), timeout=LOCK_TIMEOUT_S, blocking_timeout=LOCK_TIMEOUT_S, thread_local=False
        )  # not thread-local: `_kept` renews it from a thread of its own
        with lock, _kept(lock):
            message.version = int(self._redis.get(self._meta("version")) or 0) + 1
            with self._redis.pipeline(transaction=False) as pipe:
                self._write_rows(pipe, message)
                pipe.execute()
            if not lock.owned():  # expired under us: another publisher may have taken this version
                raise redis.exceptions.LockNotOwnedError(f"publish lock lost while writing version {message.version}")
            with self._redis.pipeline(transaction=True) as pipe:
                self._write_version(pipe, message)
                pipe.execute()
        self._redis.publish(f"{self._p}:published", message.version)  # for listeners other than replicas
        return message.version

    def _hset(self, pipe: Any, table: str, keys: np.ndarray, values: list[Any]) -> None:
        fields = _field(keys)
        for bucket, at in _by_bucket(keys):
            pipe.hset(self._bucket(table, bucket), mapping={fields[i]: values[i] for i in at.tolist()})

    def _hdel(self, pipe: Any, table: str, keys: np.ndarray) -> None:
        fields = _field(keys)
        for bucket, at in _by_bucket(keys):
            pipe.hdel(self._bucket(table, bucket), *(fields[i] for i in at.tolist()))

    def _write_rows(self, pipe: Any, m: SyncMessage) -> None:
        if len(m.erased_users):  # first: what the message says of them afterwards is a new user's
            self._hdel(pipe, "users", m.erased_users)
            for name in self._redis.hkeys(self._meta("schema")):
                text = name.decode() if isinstance(name, bytes) else str(name)
                self._hdel(pipe, f"table:{text}", m.erased_users)
            self._hdel(pipe, "user_records", m.erased_users)
            for user in m.erased_users.tolist():
                pipe.delete(f"{self._p}:seen:{user:016x}")
        for table, delta in (("users", m.users), ("items", m.items)):
            if len(delta.evicted):
                self._hdel(pipe, table, delta.evicted)
            if len(delta.keys):
                self._hset(pipe, table, delta.keys, list(map(bytes, delta.rows.astype(self.row_dtype))))
        if len(m.items.evicted):
            self._hdel(pipe, "names", m.items.evicted)
        if m.item_names:
            keys = np.fromiter(m.item_names.keys(), dtype=np.uint64, count=len(m.item_names))
            self._hset(pipe, "names", keys, list(m.item_names.values()))
        if m.user_records:
            keys = feature_keys("user", list(m.user_records))
            self._hset(pipe, "user_records", keys, [r.to_json() for r in m.user_records.values()])
        if m.catalogue:
            keys = feature_keys("item", list(m.catalogue))
            self._hset(pipe, "catalogue", keys, [r.to_json() for r in m.catalogue.values()])
        for user, items in m.seen_by_user():
            # a sorted set by version: an item seen again moves up instead of taking a second place
            key = f"{self._p}:seen:{user:016x}"
            pipe.zadd(key, dict.fromkeys(_field(items), m.version))
            pipe.zremrangebyrank(key, 0, -self._max_seen - 1)
        for name, delta in m.tables.items():
            if len(delta.evicted):
                self._hdel(pipe, f"table:{name}", delta.evicted)
            if len(delta.keys):
                rows = np.ascontiguousarray(codec.stored_rows(delta.rows, self.row_dtype))
                self._hset(pipe, f"table:{name}", delta.keys, list(map(bytes, rows)))

    def _write_version(self, pipe: Any, m: SyncMessage) -> None:
        """Everything on the `{P}` slot: one transaction."""
        for name, delta in m.tables.items():
            if len(delta.keys):
                rows = codec.stored_rows(delta.rows[:1], self.row_dtype)
                pipe.hset(self._meta("schema"), name, f"{rows.dtype.str}:{rows.shape[1]}")
        if m.dense:
            pipe.set(self._meta("dense"), codec.encode_arrays(m.dense))
        if m.clock_s or m.trending_half_life_s:
            pipe.set(self._meta("clock"), np.array([m.clock_s, m.trending_half_life_s], dtype="<f8").tobytes())
        if len(m.popular_keys):
            pipe.set(self._meta("popular"), np.ascontiguousarray(m.popular_keys, dtype="<u8").tobytes())
            pipe.set(self._meta("popular_scores"), np.ascontiguousarray(m.popular_scores, dtype="<f4").tobytes())
        pipe.set(self._meta("version"), m.version)
        encoded = codec.encode(m, self.row_dtype)
        m.encoded_bytes = len(encoded)
        pipe.xadd(self._meta("deltas"), {"m": encoded}, id=f"{m.version}-0", maxlen=self._retention, approximate=True)

    def latest_version(self) -> int:
        return int(self._redis.get(self._meta("version")) or 0)

    def _hgetall(self, table: str) -> dict[bytes, bytes]:
        """Every bucket of `table`, merged."""
        with self._redis.pipeline(transaction=False) as pipe:
            for bucket in range(BUCKETS):
                pipe.hgetall(self._bucket(table, bucket))
            parts: list[dict[bytes, bytes]] = pipe.execute()
        return {k: v for part in parts for k, v in part.items()}

    def snapshot(self) -> SyncMessage:
        with self._redis.pipeline(transaction=True) as pipe:  # the version first: the rows hold at least it
            for key in ("version", "popular", "popular_scores", "dense", "clock"):
                pipe.get(self._meta(key))
            pipe.hgetall(self._meta("schema"))
            version, popular, popular_scores, dense, clock, schema = pipe.execute()
        users, items, names_map, catalogue, user_records = (
            self._hgetall(t) for t in ("users", "items", "names", "catalogue", "user_records")
        )
        names = sorted(schema)
        tables = [self._hgetall(f"table:{name.decode()}") for name in names]
        seen_users: list[np.ndarray] = []
        seen_items: list[np.ndarray] = []
        seen_keys = list(self._redis.scan_iter(match=f"{self._p}:seen:*", count=1000))
        for start in range(0, len(seen_keys), 1000):  # one round trip per 1,000 users
            chunk = seen_keys[start : start + 1000]
            with self._redis.pipeline(transaction=False) as pipe:
                for key in chunk:
                    pipe.zrange(key, 0, -1)
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
                name.decode(): self._table(name.decode(), mapping, schema[name])
                for name, mapping in zip(names, tables, strict=True)
            },
            dense=codec.decode_arrays(dense) if dense else {},
            catalogue={r.item_id: r for r in map(ItemRecord.from_json, catalogue.values())},
            user_records={r.user_id: r for r in map(UserRecord.from_json, user_records.values())},
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
        reply: Any = self._redis.xread({self._meta("deltas"): f"{version}-0"}, count=1000, block=block_ms)
        if not reply:
            return []
        entries = reply[0][1]
        messages = [codec.decode(fields[b"m"]) for _, fields in entries]
        if messages and messages[0].version != version + 1:
            raise VersionGap(f"version {version + 1} is no longer retained (oldest is {messages[0].version})")
        return messages

    def close(self) -> None:
        self._redis.close()
