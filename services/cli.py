"""The `freshrec` command line: one subcommand per process role, plus replay and quickstart."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import platformdirs
import redis
from prometheus_client import start_http_server
from redis.exceptions import RedisClusterException

from services import heap, metrics
from services.config import Config, load_config, load_config_with_sources, show
from services.datasets import DATASETS, DatasetUnavailable, load_dataset
from trainer.eventlog import LogUnavailable

if TYPE_CHECKING:
    from services.node import Node

# the long-running commands: they restart on the configured allocator before the heavy
# imports (torch, Faiss, the node), which are made inside the commands for that reason
SERVING_COMMANDS = frozenset({"up", "gateway", "trainer", "retrieval", "ranking", "store-shard", "quickstart"})

log = logging.getLogger("freshrec")


def _common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML config file (env FRESHREC_* and flags override it)")
    parser.add_argument("--host", help="interface to bind (default 0.0.0.0)")
    parser.add_argument("--grpc-port", type=int, help="gRPC port (default 50051)")
    parser.add_argument(
        "--redis",
        metavar="URL",
        help="use this Redis (redis://HOST:PORT, or redis-cluster://HOST:PORT[,...]) as the serving store",
    )


def _server_flags(parser: argparse.ArgumentParser) -> None:
    _common_flags(parser)
    parser.add_argument("--port", type=int, help="REST port (default 8000)")
    parser.add_argument("--kafka", metavar="HOST:PORT", help="use this Kafka broker as the event log")


def _stage_flags(parser: argparse.ArgumentParser) -> None:
    _common_flags(parser)
    parser.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default 9100, 0: none)")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    kafka = getattr(args, "kafka", None)
    overrides: dict[str, Any] = {
        "server.host": args.host,
        "server.http_port": getattr(args, "port", None),
        "server.grpc_port": args.grpc_port,
        "log_url": f"kafka://{kafka}" if kafka else None,
        "serving_store_url": args.redis,
        "metrics_port": getattr(args, "metrics_port", None),
    }
    return overrides


def _serve(node: Node, then: Callable[[], int | None] | None = None) -> int:
    """Start `node`, run `then` (its int result ends the process with that code), serve until stopped."""
    signal.signal(signal.SIGTERM, lambda *_: node.request_stop())
    node.start()
    try:
        code = then() if then is not None else None
        if code is not None:
            return code
        node.wait()
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
    return 0


def _default_checkpoint_dir(config: Config) -> str | None:
    """Where a trainer on a durable log checkpoints when told nowhere: under the user's data
    folder, one folder per log and consumer group. Without checkpoints a restarted trainer
    would start from empty tables while the serving store still serves the old model. None
    when a folder is set, the log dies with the process, or the tables live on store shards."""
    t = config.trainer
    if t.checkpoint_dir or config.log_url.startswith("memory://") or not t.store_url.startswith("local://"):
        return None  # (workers > 1 need grpc:// shards, so they never get here)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{config.log_url}-{t.group_id}").strip("_")
    return str(platformdirs.user_data_path("freshrec") / "checkpoints" / slug)


def cmd_up(args: argparse.Namespace, roles: tuple[str, ...] = ("gateway", "trainer")) -> int:
    overrides = _overrides(args)
    data_dir = getattr(args, "data_dir", None)
    if data_dir:  # durable embedded mode: the log on disk, checkpoints beside it
        overrides["trainer.checkpoint_dir"] = f"{data_dir}/checkpoints"
        if not args.kafka:
            overrides["log_url"] = f"file://{data_dir}/log"
    config = load_config(args.config, overrides=overrides)
    default = _default_checkpoint_dir(config) if "trainer" in roles else None
    if default is not None:
        print(f"checkpoints: {default} (set trainer.checkpoint_dir to choose)", flush=True)
        config = load_config(args.config, overrides={**overrides, "trainer.checkpoint_dir": default})
    from services.node import Node

    node = Node(config, roles)
    if "gateway" in roles:
        print(f"freshrec {'+'.join(roles)}: log {config.log_url}, serving store {config.serving_store_url}", flush=True)
    if node.stage:
        print(f"freshrec {node.stage}: serving store {config.serving_store_url}", flush=True)
    return _serve(node)


def _shard_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"shard.host": args.host, "shard.port": args.port, "shard.metrics_port": args.metrics_port}


def cmd_store_shard(args: argparse.Namespace) -> int:
    from embedding_store.remote import serve_shard

    shard = load_config(args.config, overrides=_shard_overrides(args)).shard
    server, port, servicer = serve_shard(f"{shard.host}:{shard.port}", interceptors=[metrics.GrpcObserver("store")])
    metrics.STORE.watch(servicer.stats)
    if shard.metrics_port:
        start_http_server(shard.metrics_port, addr=shard.host)
    print(f"freshrec store-shard: gRPC on {shard.host}:{port}, metrics on :{shard.metrics_port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    server.stop(grace=2.0).wait()
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    """Print the effective config of `freshrec up` given these flags, each value's source beside it."""
    for line in show(*load_config_with_sources(args.config, overrides=_overrides(args))):
        print(line)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from services.replay import replay

    dataset = load_dataset(args.dataset)
    report = replay(
        dataset,
        url=args.url.rstrip("/"),
        rate=args.rate,
        batch_size=args.batch_size,
        metrics_url=args.metrics_url,
        watch_user=args.watch_user,
        api_key=args.api_key,
    )
    return 0 if report.trained and report.accepted == report.sent else 1


def cmd_quickstart(args: argparse.Namespace) -> int:
    from services.node import Node
    from services.replay import replay

    node = Node(load_config(overrides={"server.http_port": args.port, "server.grpc_port": args.grpc_port}))

    def replay_into_it() -> int | None:
        url = f"http://127.0.0.1:{node.http_port}"
        print(f"freshrec is up: REST {url}, gRPC 127.0.0.1:{node.grpc_port} (embedded mode)", flush=True)
        dataset = load_dataset(args.dataset)
        user = dataset.most_active_user()
        print(f"replaying {len(dataset.events):,} {dataset.name} events; watching user {user}", flush=True)
        if not replay(dataset, url=url, rate=args.rate, watch_user=user).trained:
            return 1
        print(
            f"\nThe API stays up: try\n  curl -s {url}/v1/recommendations -H 'content-type: application/json' "
            f'-d \'{{"user_id": "{user}", "k": 5}}\'\n  curl -s {url}/metrics | grep freshrec_\n'
            "Ctrl-C to stop.",
            flush=True,
        )
        return 0 if args.exit else None

    return _serve(node, replay_into_it)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="freshrec", description="Online-training recommendation serving.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="all-in-one: gateway + trainer (embedded unless --kafka/--redis)")
    _server_flags(up)
    up.add_argument(
        "--data-dir", help="keep the embedded log (fsync'd before acknowledging) and checkpoints here; resume from them"
    )
    up.set_defaults(func=cmd_up)
    gateway = sub.add_parser("gateway", help="cluster role: REST + gRPC gateway with a serving replica")
    _server_flags(gateway)
    gateway.set_defaults(func=lambda a: cmd_up(a, ("gateway",)))
    trainer = sub.add_parser("trainer", help="cluster role: online trainer + parameter sync")
    _server_flags(trainer)
    trainer.set_defaults(func=lambda a: cmd_up(a, ("trainer",)))

    for stage, what in (("retrieval", "candidates from the item index"), ("ranking", "the ranker's order")):
        role = sub.add_parser(stage, help=f"cluster role: {what} for gateways, over gRPC (a serving replica)")
        _stage_flags(role)
        role.set_defaults(func=lambda a, stage=stage: cmd_up(a, (stage,)))

    shard = sub.add_parser("store-shard", help="cluster role: one embedding-store shard served over gRPC")
    shard.add_argument(
        "--config", help="TOML config file (its [shard] table; env FRESHREC_SHARD__* and flags override it)"
    )
    shard.add_argument("--host", help="interface to bind (default 0.0.0.0)")
    shard.add_argument("--port", type=int, help="gRPC port (default 7070, 0: any free port)")
    shard.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default 9101, 0: none)")
    shard.set_defaults(func=cmd_store_shard)

    config = sub.add_parser("config", help="the effective configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    config_show = config_sub.add_parser(
        "show", help="print every setting, its value and its source (default, file, env, flag); secrets masked"
    )
    _server_flags(config_show)
    config_show.add_argument("--metrics-port", type=int, help="as for the roles")
    config_show.set_defaults(func=cmd_config_show)

    rp = sub.add_parser("replay", help="stream a data set through the REST API")
    rp.add_argument("dataset", choices=DATASETS)
    rp.add_argument("--rate", type=float, default=0.0, help="events per second (0 = as fast as accepted)")
    rp.add_argument("--url", default="http://127.0.0.1:8000", help="gateway REST URL")
    rp.add_argument("--metrics-url", help="trainer /metrics URL (default: URL/metrics)")
    rp.add_argument("--batch-size", type=int, default=500)
    rp.add_argument("--watch-user", help="show this user's recommendations as the replay goes")
    rp.add_argument(
        "--api-key", default=os.environ.get("FRESHREC_API_KEY"), help="the gateway's API key (env FRESHREC_API_KEY)"
    )
    rp.set_defaults(func=cmd_replay)

    qs = sub.add_parser("quickstart", help="start embedded, replay MovieLens-100K, keep the API up")
    qs.add_argument("--dataset", choices=DATASETS, default="movielens-100k")
    qs.add_argument("--port", type=int, default=8000)
    qs.add_argument("--grpc-port", type=int, default=50051)
    qs.add_argument("--rate", type=float, default=10000.0, help="events per second (0 = as fast as accepted)")
    qs.add_argument("--exit", action="store_true", help="stop after the replay instead of serving on")
    qs.set_defaults(func=cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("kafka", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.command in SERVING_COMMANDS:
            heap.reexec_with(load_config(getattr(args, "config", None)).allocator)
        return int(args.func(args))
    except (ValueError, DatasetUnavailable, LogUnavailable, redis.ConnectionError, RedisClusterException) as e:
        print(f"freshrec: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
