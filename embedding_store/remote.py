"""A store shard in its own process, served over gRPC, and the client that uses it as a `Store`.

The server (`serve_shard`, run by `freshrec store-shard`) holds a `LocalStore`; the client
(`RemoteStore`) sends it the table configs on connect and then forwards every table call. Arrays
travel as raw bytes (see `proto/store.proto`), so a batch of 65,536 keys and 64-wide rows is
one 16 MiB message, not 4 million protobuf floats.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from embedding_store.base import TableConfig, TableDelta, TableStats, pick_table
from embedding_store.dense import LocalDense
from embedding_store.local import LocalStore
from embedding_store.snapshot import CorruptSnapshot
from proto import store_pb2 as pb
from proto import store_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 512 * 1024 * 1024
_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
T = TypeVar("T")


class ShardRestarted(ConnectionError):
    """The shard answered, but without the tables it was opened with: it was restarted.
    `RemoteStore` opens them again (`RemoteDense` registers its parameters again on the
    KeyError of a step)."""


class StoreUnavailable(ConnectionError):
    """A remote shard cannot be reached."""


def _keys(data: bytes) -> np.ndarray:
    if len(data) % 8:
        raise ValueError(f"keys: {len(data)} bytes is not a whole number of uint64 keys")
    return np.frombuffer(data, dtype="<u8").astype(np.uint64)


def _floats(data: bytes, field: str) -> np.ndarray:
    if len(data) % 4:
        raise ValueError(f"{field}: {len(data)} bytes is not a whole number of float32 values")
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


def _rows(data: bytes, n: int, dim: int, field: str) -> np.ndarray:
    if len(data) != n * dim * 4:
        raise ValueError(f"{field}: expected {n} x {dim} float32 ({n * dim * 4} bytes), got {len(data)} bytes")
    return np.frombuffer(data, dtype="<f4").reshape(n, dim)


class ShardServicer(pb_grpc.StoreShardServicer):
    """Serves one `LocalStore`, created by the first `Open`, and the dense parameters of the
    trainer workers (`embedding_store.dense`; used on the first shard only)."""

    def __init__(self) -> None:
        self._store: LocalStore | None = None
        self._lock = threading.Lock()
        self.dense = LocalDense()

    def _call(self, context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except CorruptSnapshot as e:
            context.abort(grpc.StatusCode.DATA_LOSS, str(e))
        except (KeyError, FileNotFoundError) as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e).strip("'\""))
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        raise AssertionError("unreachable")  # context.abort raises

    def stats(self) -> list[TableStats]:
        """Stats of every table this shard holds (none before the first `Open`)."""
        store = self._store
        return [] if store is None else [store.table(c.name).stats() for c in store.configs]

    def _table(self, name: str) -> Any:
        if self._store is None:
            raise KeyError("no tables: call Open first")
        return self._store.table(name)

    def Open(self, request: pb.OpenRequest, context: grpc.ServicerContext) -> pb.OpenResponse:
        def run() -> pb.OpenResponse:
            configs = [TableConfig.from_dict(c) for c in json.loads(request.configs_json)]
            with self._lock:
                if self._store is None:
                    self._store = LocalStore(configs)
                    log.info("store shard opened tables %s", [c.name for c in configs])
                elif self._store.configs != configs:
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION, "shard already holds tables with other configs")
                return pb.OpenResponse(tables=[c.name for c in configs])

        return self._call(context, run)

    def Lookup(self, request: pb.KeysRequest, context: grpc.ServicerContext) -> pb.RowsResponse:
        def run() -> pb.RowsResponse:
            now = request.now if request.HasField("now") else None
            return pb.RowsResponse(rows=self._table(request.table).lookup(_keys(request.keys), now).tobytes())

        return self._call(context, run)

    def Get(self, request: pb.KeysRequest, context: grpc.ServicerContext) -> pb.RowsResponse:
        def run() -> pb.RowsResponse:
            rows, found = self._table(request.table).get(_keys(request.keys))
            return pb.RowsResponse(rows=rows.tobytes(), found=found.astype(np.uint8).tobytes())

        return self._call(context, run)

    def ApplyGradients(self, request: pb.GradientsRequest, context: grpc.ServicerContext) -> pb.ApplyGradientsResponse:
        def run() -> pb.ApplyGradientsResponse:
            table = self._table(request.table)
            keys = _keys(request.keys)
            grads = _rows(request.grads, len(keys), table.config.dim, "grads")
            table.apply_gradients(keys, grads, request.now if request.HasField("now") else None)
            return pb.ApplyGradientsResponse()

        return self._call(context, run)

    def EvictExpired(self, request: pb.EvictExpiredRequest, context: grpc.ServicerContext) -> pb.EvictExpiredResponse:
        return self._call(
            context, lambda: pb.EvictExpiredResponse(evicted=self._table(request.table).evict_expired(request.now))
        )

    def Delete(self, request: pb.KeysRequest, context: grpc.ServicerContext) -> pb.EvictExpiredResponse:
        return self._call(
            context,
            lambda: pb.EvictExpiredResponse(evicted=self._table(request.table).delete(_keys(request.keys))),
        )

    def DrainDelta(self, request: pb.TableRequest, context: grpc.ServicerContext) -> pb.DeltaResponse:
        def run() -> pb.DeltaResponse:
            d = self._table(request.table).drain_delta()
            return pb.DeltaResponse(
                keys=d.keys.tobytes(), rows=d.rows.tobytes(), evicted=d.evicted.tobytes(), version=d.version
            )

        return self._call(context, run)

    def Stats(self, request: pb.TableRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        def run() -> pb.StatsResponse:
            s = self._table(request.table).stats()
            return pb.StatsResponse(
                ids=s.ids,
                bytes=s.bytes,
                admissions=s.admissions,
                filtered_lookups=s.filtered_lookups,
                evicted_expired=s.evicted_expired,
                evicted_capacity=s.evicted_capacity,
            )

        return self._call(context, run)

    def Save(self, request: pb.SnapshotRequest, context: grpc.ServicerContext) -> pb.SnapshotResponse:
        def run() -> pb.SnapshotResponse:
            if self._store is None:
                raise KeyError("no tables: call Open first")
            self._store.save(request.directory)
            if self.dense.names():
                self.dense.save(request.directory)
            return pb.SnapshotResponse()

        return self._call(context, run)

    def Restore(self, request: pb.SnapshotRequest, context: grpc.ServicerContext) -> pb.SnapshotResponse:
        def run() -> pb.SnapshotResponse:
            if self._store is None:
                raise KeyError("no tables: call Open first")
            self._store.restore(request.directory)
            self.dense.restore(request.directory)
            return pb.SnapshotResponse()

        return self._call(context, run)

    def DenseRegister(self, request: pb.DenseRequest, context: grpc.ServicerContext) -> pb.DenseResponse:
        def run() -> pb.DenseResponse:
            if not request.learning_rate > 0:
                raise ValueError(f"learning_rate: must be > 0, got {request.learning_rate}")
            values = self.dense.register(request.name, _floats(request.values, "values"), request.learning_rate)
            return pb.DenseResponse(values=values.tobytes())

        return self._call(context, run)

    def DenseStep(self, request: pb.DenseRequest, context: grpc.ServicerContext) -> pb.DenseResponse:
        def run() -> pb.DenseResponse:
            values, version = self.dense.step(request.name, _floats(request.values, "values"))
            return pb.DenseResponse(values=values.tobytes(), version=version)

        return self._call(context, run)


def serve_shard(
    address: str, workers: int = 8, interceptors: Sequence[grpc.ServerInterceptor] = ()
) -> tuple[grpc.Server, int, ShardServicer]:
    """Start a store-shard gRPC server on `address` ("host:port", port 0 for a free one);
    `interceptors` wrap every call (the process's request metrics).

    Returns:
        (server, bound port, servicer); stop it with `server.stop(grace)`.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shard"),
        options=_OPTIONS,
        interceptors=list(interceptors),
    )
    servicer = ShardServicer()
    pb_grpc.add_StoreShardServicer_to_server(servicer, server)
    port = server.add_insecure_port(address)
    if not port:
        raise OSError(f"cannot bind store shard to {address}")
    server.start()
    return server, port, servicer


class RemoteTable:
    """One table of a remote shard; the same interface as `LocalTable`."""

    def __init__(self, store: RemoteStore, config: TableConfig) -> None:
        self._store = store
        self._config = config

    @property
    def config(self) -> TableConfig:
        return self._config

    def __len__(self) -> int:
        return self.stats().ids

    def lookup(self, keys: np.ndarray, now: float | None = None) -> np.ndarray:
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        reply = self._store.call("Lookup", pb.KeysRequest(table=self._config.name, keys=keys.tobytes(), now=now))
        return _rows(reply.rows, len(keys), self._config.dim, "rows").copy()

    def get(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        reply = self._store.call("Get", pb.KeysRequest(table=self._config.name, keys=keys.tobytes()))
        found = np.frombuffer(reply.found, dtype=np.uint8).astype(bool)
        return _rows(reply.rows, len(keys), self._config.dim, "rows").copy(), found

    def apply_gradients(self, keys: np.ndarray, grads: np.ndarray, now: float | None = None) -> None:
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        grads = np.ascontiguousarray(grads, dtype="<f4").reshape(len(keys), self._config.dim)
        request = pb.GradientsRequest(table=self._config.name, keys=keys.tobytes(), grads=grads.tobytes(), now=now)
        self._store.call("ApplyGradients", request)

    def evict_expired(self, now: float) -> int:
        return int(self._store.call("EvictExpired", pb.EvictExpiredRequest(table=self._config.name, now=now)).evicted)

    def delete(self, keys: np.ndarray) -> int:
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        reply = self._store.call("Delete", pb.KeysRequest(table=self._config.name, keys=keys.tobytes()))
        return int(reply.evicted)

    def drain_delta(self) -> TableDelta:
        reply = self._store.call("DrainDelta", pb.TableRequest(table=self._config.name))
        keys = _keys(reply.keys)
        rows = _rows(reply.rows, len(keys), self._config.dim, "rows").copy()
        return TableDelta(self._config.name, keys, rows, _keys(reply.evicted), int(reply.version))

    def stats(self) -> TableStats:
        s = self._store.call("Stats", pb.TableRequest(table=self._config.name))
        return TableStats(
            self._config.name, s.ids, s.bytes, s.admissions, s.filtered_lookups, s.evicted_expired, s.evicted_capacity
        )


class ShardClient:
    """A gRPC connection to one `freshrec store-shard` process.

    Args:
        address: "host:port" of the shard.
        timeout_s: deadline of each call.
    """

    def __init__(self, address: str, timeout_s: float = 30.0) -> None:
        self.address = address
        self._timeout_s = timeout_s
        self._channel = grpc.insecure_channel(address, options=_OPTIONS)
        self._stub = pb_grpc.StoreShardStub(self._channel)

    def call(self, method: str, request: Any, wait: bool = False) -> Any:
        """Call `method` on the shard, turning gRPC errors into this package's exceptions."""
        try:
            return getattr(self._stub, method)(request, timeout=self._timeout_s, wait_for_ready=wait)
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
            message = f"store shard {self.address} {method}: {details}"
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise StoreUnavailable(message) from e
            if code == grpc.StatusCode.DATA_LOSS:
                raise CorruptSnapshot(message) from e
            if code == grpc.StatusCode.NOT_FOUND and "no tables" in details:
                raise ShardRestarted(message) from e
            if code == grpc.StatusCode.NOT_FOUND:
                raise (FileNotFoundError if method == "Restore" else KeyError)(message) from e
            raise ValueError(message) from e

    def close(self) -> None:
        self._channel.close()


class RemoteStore(ShardClient):
    """The tables of one `freshrec store-shard` process.

    Args:
        address: "host:port" of the shard.
        configs: the tables to open there (the shard keeps the first configs it was opened with).
        timeout_s: deadline of each call.

    Raises:
        StoreUnavailable: the shard cannot be reached within `timeout_s`.
        ValueError: the shard holds tables with other configs.
    """

    def __init__(self, address: str, configs: list[TableConfig], timeout_s: float = 30.0) -> None:
        super().__init__(address, timeout_s)
        self._configs = list(configs)
        self._open()
        self._tables = {c.name: RemoteTable(self, c) for c in configs}

    def _open(self) -> None:
        super().call("Open", pb.OpenRequest(configs_json=json.dumps([c.to_dict() for c in self._configs])), wait=True)

    def call(self, method: str, request: Any, wait: bool = False) -> Any:
        """`ShardClient.call`; a shard that restarted (it holds no tables) is opened again and
        the call repeated: its rows are gone (they relearn), training goes on."""
        try:
            return super().call(method, request, wait)
        except ShardRestarted:
            log.warning("store shard %s holds no tables (restarted?): opening them again", self.address)
            self._open()
            return super().call(method, request, wait)

    def table(self, name: str) -> RemoteTable:
        return pick_table(self._tables, name)

    @property
    def configs(self) -> list[TableConfig]:
        return list(self._configs)

    def save(self, directory: str | Path) -> None:
        self.call("Save", pb.SnapshotRequest(directory=str(directory)))

    def restore(self, directory: str | Path) -> None:
        self.call("Restore", pb.SnapshotRequest(directory=str(directory)))


class RemoteDense(ShardClient):
    """`embedding_store.dense.DenseParameters` on a store shard's dense service.

    Args:
        address: "host:port" of the shard holding them (the first of a `grpc://` store URL).
        timeout_s: deadline of each call.
    """

    def __init__(self, address: str, timeout_s: float = 30.0) -> None:
        super().__init__(address, timeout_s)
        self._latest: dict[str, tuple[np.ndarray, float]] = {}  # name -> (values, learning rate)

    def register(self, name: str, initial: np.ndarray, learning_rate: float) -> np.ndarray:
        values = np.ascontiguousarray(initial, dtype="<f4").tobytes()
        request = pb.DenseRequest(name=name, values=values, learning_rate=learning_rate)
        registered = _floats(self.call("DenseRegister", request, wait=True).values, "values")
        self._latest[name] = (registered, learning_rate)
        return registered

    def step(self, name: str, grad: np.ndarray) -> tuple[np.ndarray, int]:
        """One step of `name`; a shard that restarted (and so forgot `name`) gets it registered
        again with the last values this client saw (a fresh Adam state), and the step repeated."""
        request = pb.DenseRequest(name=name, values=np.ascontiguousarray(grad, dtype="<f4").tobytes())
        try:
            response = self.call("DenseStep", request)
        except KeyError:  # not registered: never (raise), or before the shard restarted
            if name not in self._latest:
                raise
            log.warning("dense service %s forgot %r (restarted?): registering it again", self.address, name)
            self.register(name, *self._latest[name])
            response = self.call("DenseStep", request)
        values = _floats(response.values, "values")
        if name in self._latest:
            self._latest[name] = (values, self._latest[name][1])
        return values, int(response.version)

    def state_dict(self) -> dict[str, Any]:
        return {}  # saved and restored with the shard's tables (`Save` / `Restore`)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
