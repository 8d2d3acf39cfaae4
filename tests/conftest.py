"""Fixtures that start real services on free loopback ports (`tests.local_servers`):
redis-server (alone and as a Redis Cluster) and a Kafka-protocol broker. `scripts/test.sh`
installs both; a missing one fails the tests that need it rather than skipping them."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests import local_servers
from trainer.eventlog import EventLog, open_log


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """URL of a fresh redis-server (no persistence) for the whole session."""
    with local_servers.redis_server() as url:
        yield url


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """The session's Redis with a key prefix of this test's own."""
    return f"{redis_server}?prefix=t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[str]:
    """`redis-cluster://` URL of a 3-node Redis Cluster (redis-server in cluster mode) for the session."""
    with local_servers.redis_cluster(3) as url:
        yield url


@pytest.fixture
def redis_cluster_url(redis_cluster: str) -> str:
    """The session's Redis Cluster with a key prefix of this test's own."""
    return f"{redis_cluster}?prefix=t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[str]:
    """host:port of a Kafka-protocol broker (tansu, in-memory storage) for the whole session."""
    with local_servers.kafka_broker() as address:
        yield address


@pytest.fixture
def kafka_url(kafka_broker: str) -> str:
    """A topic of this test's own on the session broker."""
    return f"kafka://{kafka_broker}/events-{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=["memory", "file", "kafka"])
def event_log(request: pytest.FixtureRequest) -> Iterator[EventLog]:
    """Each EventLog backend in turn: in-process, in-process on disk, and a topic of its own on
    the real broker."""
    url = {
        "memory": lambda: "memory://",
        "file": lambda: f"file://{request.getfixturevalue('tmp_path')}/log",
        "kafka": lambda: request.getfixturevalue("kafka_url"),
    }[request.param]()
    log = open_log(url, partitions=3)
    yield log
    log.close()
