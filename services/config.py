"""The process configuration: one frozen dataclass tree, loaded by `load_config()`.

Order of precedence: defaults, then a TOML file, then `FRESHREC_*` environment variables,
then explicit overrides (command-line flags). Every setting has an environment variable
derived from its path (`env_name`: `trainer.join_window_s` is `FRESHREC_TRAINER__JOIN_WINDOW_S`);
the most used also keep a short alias (`ALIASES`). Unknown keys in the file and unknown
`FRESHREC_*` variables are rejected with their name; every value is validated in `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrieval.index import IndexConfig
from services import heap
from services.experiments import Experiments
from services.gateway.auth import parse_api_keys
from trainer.config import TrainerConfig


@dataclass(frozen=True)
class ServerConfig:
    """Where the gateway listens and how much it accepts.

    Args:
        host: interface to bind.
        http_port: REST port (0 = any free port).
        grpc_port: gRPC port (0 = any free port).
        max_batch_events: most events in one ingest call.
        max_k: largest `k` a recommendation call may ask for.
        default_k: `k` when the request leaves it out.
        torch_threads: threads of each ranking forward pass and index search on the model
            thread (0 keeps torch's and Faiss' defaults, one per core): its small batches gain
            less from more threads than the REST and gRPC event loops lose to them (an idle
            OpenMP worker spins). Set in the model thread, so a trainer in the same process
            keeps its own; a gateway-only process also sets torch's process-wide default.
        candidates: items each candidate source (index, co-visitation, trending) hands to
            ranking; the ranker scores up to twice as many per call, and its cost grows with them.
        recommend_batch: most recommendation calls answered by one ranker forward pass (calls
            that queue up while the model thread is busy are batched, up to this many).
        recommend_queue: most recommendation calls waiting for the model thread; more are
            refused as unavailable (HTTP 503, gRPC UNAVAILABLE) instead of queueing without end.
        request_timeout_s: longest a recommendation call may wait and run (a gRPC deadline can
            make it shorter); past it the caller gets a deadline error (504, DEADLINE_EXCEEDED).
        api_keys: API keys and their scopes, `scopes:secret;...` (`services.gateway.auth`);
            empty turns authentication off.
        rate_limit_per_s: calls per second per API key (0: no limit).
        experiments: A/B experiments as JSON (`services.experiments`; "" for none).
        max_body_bytes: largest REST request body; larger ones get 413 (read and dropped,
            so that a client still sending sees the answer).
        max_clock_skew_s: how far ahead of the gateway's clock an event's `timestamp_ms`
            may be; later ones are rejected (per event, naming the field).
        retrieval_url, ranking_url: `grpc://HOST:PORT` of a `freshrec retrieval` and a
            `freshrec ranking` service; a gateway given both sends the serving stages there
            instead of running them on a replica of its own (both or neither).
        docs: serve the OpenAPI spec at `/openapi.json` and its Swagger UI at `/docs` (from
            assets installed with freshrec, so it works offline).
    """

    host: str = "0.0.0.0"
    http_port: int = 8000
    grpc_port: int = 50051
    max_batch_events: int = 1000
    max_k: int = 500
    default_k: int = 10
    torch_threads: int = 1
    candidates: int = 100
    recommend_batch: int = 8
    recommend_queue: int = 512
    request_timeout_s: float = 2.0
    retrieval_url: str = ""
    ranking_url: str = ""
    api_keys: str = field(default="", repr=False)
    rate_limit_per_s: float = 0.0
    experiments: str = ""
    max_body_bytes: int = 4 * 1024 * 1024
    max_clock_skew_s: float = 300.0
    docs: bool = True

    def __post_init__(self) -> None:
        for name in ("recommend_batch", "recommend_queue", "candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"server.{name}: must be >= 1, got {getattr(self, name)}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"server.request_timeout_s: must be > 0, got {self.request_timeout_s}")
        if self.torch_threads < 0:
            raise ValueError(f"server.torch_threads: must be >= 0, got {self.torch_threads}")
        for name in ("http_port", "grpc_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"server.{name}: must be a port number, got {getattr(self, name)}")
        if self.max_batch_events < 1:
            raise ValueError(f"server.max_batch_events: must be >= 1, got {self.max_batch_events}")
        if not 1 <= self.default_k <= self.max_k:
            raise ValueError(f"server.default_k: must be in [1, max_k={self.max_k}], got {self.default_k}")
        for name in ("retrieval_url", "ranking_url"):
            url = getattr(self, name)
            if url and (not url.startswith("grpc://") or ":" not in url[len("grpc://") :]):
                raise ValueError(f"server.{name}: expected grpc://HOST:PORT, got {url!r}")
        parse_api_keys(self.api_keys)  # raises naming the entry, never the secret
        Experiments(self.experiments)  # raises naming the experiment, arm and field
        if self.rate_limit_per_s < 0:
            raise ValueError(f"server.rate_limit_per_s: must be >= 0, got {self.rate_limit_per_s}")
        if not self.max_clock_skew_s >= 0:
            raise ValueError(f"server.max_clock_skew_s: must be >= 0, got {self.max_clock_skew_s}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"server.max_body_bytes: must be >= 1024, got {self.max_body_bytes}")
        if bool(self.retrieval_url) != bool(self.ranking_url):
            raise ValueError("server.retrieval_url/ranking_url: set both (remote stages) or neither")

    @property
    def remote_stages(self) -> bool:
        return bool(self.retrieval_url)


@dataclass(frozen=True)
class ShardConfig:
    """A `freshrec store-shard` process: one embedding-store shard served over gRPC.

    Args:
        host: interface to bind.
        port: gRPC port (0 = any free port).
        metrics_port: port of its /metrics endpoint (0 disables it).
    """

    host: str = "0.0.0.0"
    port: int = 7070
    metrics_port: int = 9101

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"shard.{name}: must be a port number, got {getattr(self, name)}")


@dataclass(frozen=True)
class Config:
    """Everything one freshrec process needs.

    Args:
        log_url: event log, `memory://`, `file://DIR` (embedded, durable) or `kafka://HOST:PORT[/TOPIC]`.
        serving_store_url: serving store, `memory://`, `redis://HOST:PORT[/DB]` or
            `redis-cluster://HOST:PORT[,HOST:PORT...]` (`services.serving_store`).
        log_partitions: partitions of the events topic when freshrec creates it.
        metrics_port: port of the standalone /metrics endpoint of processes without REST
            (the trainer); 0 disables it.
        allocator: the C allocator of the long-running roles: `jemalloc` (where libjemalloc2
            is installed; the process restarts itself on it) or `system` (glibc's malloc, its
            free pages handed back every 10 s). Under steady load glibc kept ever more freed
            memory resident (`bench.soak`).
        server: gateway settings.
        trainer: trainer settings.
        index: the serving replicas' item index (`retrieval.index.IndexConfig`).
        shard: a store-shard process (`freshrec store-shard`).
    """

    log_url: str = "memory://"
    serving_store_url: str = "memory://"
    log_partitions: int = 4
    metrics_port: int = 9100
    allocator: str = "jemalloc"
    server: ServerConfig = field(default_factory=ServerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)

    def __post_init__(self) -> None:
        if not self.log_url.startswith(("memory://", "file://", "kafka://")):
            raise ValueError(f"log_url: expected memory://, file://DIR or kafka://HOST:PORT, got {self.log_url!r}")
        if not self.serving_store_url.startswith(("memory://", "redis://", "rediss://", "redis-cluster://")):
            raise ValueError(
                f"serving_store_url: expected memory://, redis://... or redis-cluster://..., "
                f"got {self.serving_store_url!r}"
            )
        if self.allocator not in heap.ALLOCATORS:
            raise ValueError(f"allocator: expected one of {', '.join(heap.ALLOCATORS)}, got {self.allocator!r}")
        if self.log_partitions < 1:
            raise ValueError(f"log_partitions: must be >= 1, got {self.log_partitions}")

    @property
    def embedded(self) -> bool:
        """One process holds the log and the serving store (memory://, or file:// for the log)."""
        return self.log_url.startswith(("memory://", "file://"))


PREFIX = "FRESHREC_"

ALIASES: dict[str, str] = {
    "FRESHREC_TORCH_THREADS": "server.torch_threads",
    "FRESHREC_RECOMMEND_BATCH": "server.recommend_batch",
    "FRESHREC_RECOMMEND_QUEUE": "server.recommend_queue",
    "FRESHREC_REQUEST_TIMEOUT_S": "server.request_timeout_s",
    "FRESHREC_RETRIEVAL_URL": "server.retrieval_url",
    "FRESHREC_RANKING_URL": "server.ranking_url",
    "FRESHREC_API_KEYS": "server.api_keys",
    "FRESHREC_RATE_LIMIT_PER_S": "server.rate_limit_per_s",
    "FRESHREC_EXPERIMENTS": "server.experiments",
    "FRESHREC_CANDIDATES": "server.candidates",
    "FRESHREC_MAX_BODY_BYTES": "server.max_body_bytes",
    "FRESHREC_MAX_CLOCK_SKEW_S": "server.max_clock_skew_s",
    "FRESHREC_HOST": "server.host",
    "FRESHREC_HTTP_PORT": "server.http_port",
    "FRESHREC_GRPC_PORT": "server.grpc_port",
    "FRESHREC_MAX_BATCH_EVENTS": "server.max_batch_events",
    "FRESHREC_TRAINER_MAX_CLOCK_SKEW_S": "trainer.max_clock_skew_s",
    "FRESHREC_MAX_CLOCK_JUMP_S": "trainer.max_clock_jump_s",
    "FRESHREC_EMBEDDING_DIM": "trainer.dim",
    "FRESHREC_LEARNING_RATE": "trainer.learning_rate",
    "FRESHREC_NEGATIVES": "trainer.negatives",
    "FRESHREC_BATCH_SIZE": "trainer.batch_size",
    "FRESHREC_SPARSE_SYNC_INTERVAL_S": "trainer.sparse_sync_interval_s",
    "FRESHREC_SPARSE_SYNC_MIN_INTERVAL_S": "trainer.sparse_sync_min_interval_s",
    "FRESHREC_DENSE_SYNC_INTERVAL_S": "trainer.dense_sync_interval_s",
    "FRESHREC_GROUP_ID": "trainer.group_id",
    "FRESHREC_STORE_URL": "trainer.store_url",
    "FRESHREC_OPTIMIZER": "trainer.optimizer",
    "FRESHREC_MIN_COUNT": "trainer.min_count",
    "FRESHREC_TTL_S": "trainer.ttl_s",
    "FRESHREC_MAX_ROWS": "trainer.max_rows",
    "FRESHREC_CHECKPOINT_DIR": "trainer.checkpoint_dir",
    "FRESHREC_CHECKPOINT_INTERVAL_S": "trainer.checkpoint_interval_s",
    "FRESHREC_TRAINER_WORKERS": "trainer.workers",
    "FRESHREC_INDEX": "index.kind",
    "FRESHREC_INDEX_NPROBE": "index.nprobe",
    "FRESHREC_INDEX_EF_SEARCH": "index.ef_search",
    "FRESHREC_INDEX_NORM_RANGES": "index.hnsw_norm_ranges",
    "FRESHREC_INDEX_DEVICE": "index.device",
}
"""Short names kept for the most used settings (the compose file and older deployments use
them); each setting's derived name (`env_name`) works too."""

NOT_CONFIG: dict[str, str] = {
    "FRESHREC_API_KEY": "the API key `freshrec replay` sends",
    "FRESHREC_DOCKERFILE": "docker-compose.yml: the Dockerfile its image is built from",
    "FRESHREC_VERSION": "docker-compose.yml: the image tag",
    "FRESHREC_REPLAY_RATE": "docker-compose.yml: events/s of its replay service",
    "FRESHREC_REPLAY_API_KEY": "docker-compose.yml: the API key of its replay service",
    "FRESHREC_TRAINER_METRICS_PORT": "docker-compose.yml: the host port of the trainer's /metrics",
}
"""`FRESHREC_*` variables that are not settings of the process config (so not rejected)."""

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def env_name(path: str) -> str:
    """The environment variable of the setting at dotted `path`.

    Example:
        >>> env_name("trainer.join_window_s"), env_name("log_url")
        ('FRESHREC_TRAINER__JOIN_WINDOW_S', 'FRESHREC_LOG_URL')
    """
    return PREFIX + path.upper().replace(".", "__")


def settings(cls: type = Config, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field[Any], Any]]:
    """Every leaf setting of the dataclass tree `cls`: (dotted path, field, its type)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from settings(typing.cast(type, kind), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, kind


def value_at(config: Any, path: str) -> Any:
    """The value of the setting at dotted `path` in `config`.

    Example:
        >>> value_at(Config(), "server.http_port")
        8000
    """
    for part in path.split("."):
        config = getattr(config, part)
    return config


def is_secret(f: dataclasses.Field[Any]) -> bool:
    """A setting kept out of reprs (`field(repr=False)`) is a secret: `config show` masks it."""
    return not f.repr


def _parse(kind: Any, raw: Any, where: str) -> Any:
    """`raw` (from TOML, an override, or an environment string) as a value of type `kind`."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(kind) if a is not type(None)]
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "none", "null")):
            return None
        return _parse(members[0], raw, where)
    if origin in (tuple, list):
        (item, *_rest) = typing.get_args(kind) or (str,)
        if isinstance(raw, str):
            text = raw.strip()
            if text.startswith("["):
                try:
                    raw = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: expected a JSON list or comma-separated values, got {raw!r}") from e
            else:
                raw = [part.strip() for part in text.split(",") if part.strip()]
        if not isinstance(raw, list | tuple):
            raise ValueError(f"{where}: expected a list, got {raw!r}")
        return origin(_parse(item, v, f"{where}[{i}]") for i, v in enumerate(raw))
    if kind is bool:
        if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        if isinstance(raw, bool):
            return raw
        raise ValueError(f"{where}: expected a boolean (true/false, 1/0, yes/no, on/off), got {raw!r}")
    try:
        if isinstance(raw, str) and kind in (int, float):
            raw = kind(raw.strip())
        elif isinstance(raw, int) and not isinstance(raw, bool) and kind is float:
            raw = float(raw)
    except ValueError as e:
        raise ValueError(f"{where}: expected {kind.__name__}, got {raw!r}") from e
    if not isinstance(raw, kind) or isinstance(raw, bool):
        raise ValueError(f"{where}: expected {kind.__name__}, got {raw!r}")
    return raw


def _build(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from nested `values` (strings from env vars are parsed)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{prefix}{unknown[0]}: unknown configuration key")
    kwargs: dict[str, Any] = {}
    for name, raw in values.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            if not isinstance(raw, Mapping):
                raise ValueError(f"{prefix}{name}: expected a table")
            kwargs[name] = _build(typing.cast(type, kind), raw, f"{prefix}{name}.")
        else:
            kwargs[name] = _parse(kind, raw, f"{prefix}{name}")
    return cls(**kwargs)


def _set(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def env_settings(env: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """The settings `env` sets: dotted path -> (variable, raw value).

    Raises:
        ValueError: a `FRESHREC_*` variable that names no setting (with the closest names), or
            a setting given by both its alias and its derived name with different values.
    """
    by_name = {env_name(path): path for path, _f, _k in settings()} | ALIASES
    found: dict[str, tuple[str, str]] = {}
    for var in sorted(env):
        if not var.startswith(PREFIX) or var in NOT_CONFIG:
            continue
        path = by_name.get(var)
        if path is None:
            close = difflib.get_close_matches(var, list(by_name), n=2)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise ValueError(f"{var}: unknown environment variable, no setting has this name{hint}")
        if path in found and found[path][1] != env[var]:
            raise ValueError(f"{found[path][0]} and {var} both set {path}, to different values")
        found.setdefault(path, (var, env[var]))
    return found


def load_config_with_sources(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[Config, dict[str, str]]:
    """`load_config`, and where each setting that is not a default came from (dotted path ->
    `file PATH`, `env VARIABLE` or `flag`)."""
    tree: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        with open(path, "rb") as f:
            tree = tomllib.load(f)
        sources |= {key: f"file {path}" for key in _flatten(tree)}
    for key, (var, value) in env_settings(os.environ if env is None else env).items():
        _set(tree, key, value)
        sources[key] = f"env {var}"
    for key, value in (overrides or {}).items():
        if value is not None:
            _set(tree, key, value)
            sources[key] = "flag"
    config: Config = _build(Config, tree)
    return config, sources


def load_config(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the config from defaults, `path` (TOML), `env` (default: the process environment)
    and `overrides` (dotted paths, e.g. command-line flags).

    Raises:
        ValueError: an unknown key or `FRESHREC_*` variable, a value of the wrong type or out
            of range; the message starts with the key's path or the variable's name.

    Example:
        >>> load_config(env={"FRESHREC_SERVER__HTTP_PORT": "9000"}).server.http_port
        9000
        >>> load_config(env={"FRESHREC_SERVER__DOCS": "false"}).server.docs
        False
    """
    return load_config_with_sources(path, env, overrides)[0]


def mask(value: str) -> str:
    """A secret as `config show` prints it: API-key specs keep their scopes, never a secret.

    Example:
        >>> mask("ingest,recommend:s3cret;admin:t0p")
        'ingest,recommend:***;admin:***'
    """
    if not value:
        return ""
    return ";".join(f"{e.rsplit(':', 1)[0]}:***" if ":" in e else "***" for e in value.split(";") if e.strip())


def show(config: Config, sources: Mapping[str, str]) -> list[str]:
    """`freshrec config show`'s lines: every setting, its effective value and its source."""
    lines = []
    for key, f, _kind in settings():
        value = value_at(config, key)
        text = json.dumps(mask(str(value)) if is_secret(f) else value)
        lines.append(f"{key} = {text}  # {sources.get(key, 'default')}")
    return lines
