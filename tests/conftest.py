"""Fixtures layered server -> URL -> isolated namespace/database: one override swaps the server."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis
from hypothesis import settings

from devtools.cluster import Cluster
from devtools.cluster import redis_cluster as start_redis_cluster
from devtools.servers import postgres_server, redis_server, throwaway_database
from shared.streams import Streams

# CI (`.ci/run`) replays the same examples on every run, so a red CI means the code changed; local
# runs draw new examples each time and keep exploring (`make chaos` too). Either way a failure
# prints the blob that reproduces it.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture
def namespace() -> str:
    """A stream/key prefix of this test's own, so tests never see each other's entries."""
    return f"t{uuid.uuid4().hex[:10]}:"


@pytest.fixture
def streams(namespace: str) -> Streams:
    return Streams(namespace)


@pytest.fixture
async def redis_client(redis_url: str, namespace: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    keys = [key async for key in client.scan_iter(match=f"*{namespace}*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
async def database_url(postgres_admin_url: str) -> AsyncIterator[str]:
    """A fresh, empty database of this test's own, dropped afterwards."""
    async with throwaway_database(postgres_admin_url, "bb_test") as url:
        yield url


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[Cluster]:
    """A real Redis Cluster, 3 masters and 3 replicas, started by the first test that asks for it
    and shared by the rest of the session. Shared, so each test keeps to a namespace of its own
    (the `namespace` fixture, `Streams(namespace=...)`), and a test that kills a node restarts it
    (`wait_failover`, then `restart`) so the next one finds every node up."""
    with start_redis_cluster() as cluster:
        yield cluster
