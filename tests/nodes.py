"""Helpers to run a whole freshrec process in-process on free ports."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from services.node import Node
from tests import local_servers
from tests.local_servers import wait_until


@contextmanager
def running_node(log_url: str = "memory://", store_url: str = "memory://", **overrides: object) -> Iterator[Node]:
    """`local_servers.running_node` with a faster sync and poll, so tests wait less."""
    fast = {"trainer.sparse_sync_interval_s": 0.5, "trainer.poll_timeout_s": 0.05}
    with local_servers.running_node(log_url, store_url, **{**fast, **overrides}) as node:
        yield node


def rest(node: Node) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{node.http_port}", timeout=10)


def wait_trained_and_served(node: Node, events: int, timeout_s: float = 60) -> None:
    """Wait until the trainer has trained on `events` events in all and serving caught up with it."""
    assert node.trainer is not None and node.publisher is not None and node.replica is not None
    trainer, replica = node.trainer, node.replica
    wait_until(lambda: trainer.events_trained >= events, timeout_s, f"trainer to train on {events} events")
    node.publisher.publish_now()
    target = node.store.latest_version()
    wait_until(lambda: replica.version >= target, timeout_s, f"serving to apply version {target}")
