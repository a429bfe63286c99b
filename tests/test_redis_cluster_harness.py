"""The Redis Cluster harness (devtools/cluster.py) gives a real cluster, and what redis-py's
asyncio cluster client does on one: keys spread over the masters, scripts confined to one slot,
and a killed master survived once a replica takes over, by the same client, retried."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest
import redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ClusterCrossSlotError, ClusterDownError, RedisClusterException

from devtools.cluster import Cluster

pytestmark = pytest.mark.integration

T = TypeVar("T")

# Both keys written and read back: a script touching keys of two slots is refused.
SET_BOTH = """
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[1])
return redis.call('MGET', KEYS[1], KEYS[2])
"""


@pytest.fixture
async def client(redis_cluster: Cluster) -> AsyncIterator[RedisCluster]:
    client = RedisCluster.from_url(redis_cluster.url, decode_responses=True)
    yield client
    await client.aclose()


def one_key_per_master(cluster: Cluster, namespace: str) -> dict[int, str]:
    keys: dict[int, str] = {}
    for index in range(1000):
        key = f"{namespace}k{index}"
        keys.setdefault(cluster.master_of(key), key)
        if len(keys) == len(cluster.masters()):
            return keys
    raise AssertionError(f"1000 keys did not reach every master: {keys}")


async def retrying(call: Callable[[], Awaitable[T]], within_s: float) -> T:
    """What a service needs around a cluster call: redis-py's own retries (10, without a pause)
    are spent in a fraction of a second, while a failover takes seconds."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await call()
        except (redis.ConnectionError, redis.TimeoutError, ClusterDownError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def test_three_masters_each_with_a_replica(redis_cluster: Cluster) -> None:
    masters, replicas = redis_cluster.masters(), redis_cluster.replicas()
    assert len(masters) == 3 and len(replicas) == 3
    assert sorted(masters + replicas) == sorted(redis_cluster.ports)


async def test_keys_on_every_master_are_written_and_read(
    redis_cluster: Cluster, client: RedisCluster, namespace: str
) -> None:
    keys = one_key_per_master(redis_cluster, namespace)
    assert set(keys) == set(redis_cluster.masters())
    for key in keys.values():
        await client.set(key, f"value of {key}")
    assert [await client.get(key) for key in keys.values()] == [
        f"value of {key}" for key in keys.values()
    ]


async def test_a_script_runs_on_the_keys_of_one_hash_tag_only(
    redis_cluster: Cluster, client: RedisCluster, namespace: str
) -> None:
    script = client.register_script(SET_BOTH)
    tagged = ["{" + namespace + "x}:a", "{" + namespace + "x}:b"]
    assert await script(keys=tagged, args=["1"]) == ["1", "1"]

    apart = [f"{namespace}a", f"{namespace}b"]
    assert key_slot(apart[0].encode()) != key_slot(apart[1].encode())
    # redis-py refuses before sending, with an error that is not a RedisError...
    with pytest.raises(RedisClusterException, match="same key slot"):
        await script(keys=apart, args=["1"])
    # ...and a node itself answers CROSSSLOT.
    with (
        redis.Redis(port=redis_cluster.master_of(apart[0])) as node,
        pytest.raises(ClusterCrossSlotError),
    ):
        node.eval(SET_BOTH, 2, *apart, "1")


async def test_flushall_empties_every_master(
    redis_cluster: Cluster, client: RedisCluster, namespace: str
) -> None:
    keys = one_key_per_master(redis_cluster, namespace)
    for key in keys.values():
        await client.set(key, "1")
    redis_cluster.flushall()
    assert [await client.exists(key) for key in keys.values()] == [0, 0, 0]


async def test_a_replica_takes_over_a_killed_master_and_the_same_client_follows(
    redis_cluster: Cluster, client: RedisCluster, namespace: str
) -> None:
    key = f"{namespace}survivor"
    old = redis_cluster.master_of(key)
    # Replication is asynchronous: a write answered just before the kill may be lost. WAIT, on
    # the connection that wrote, answers once a replica has it.
    with redis.Redis(port=old) as node, node.pipeline(transaction=False) as pipe:
        _, replicas_acked = pipe.set(key, "v").wait(1, 5000).execute()
    assert replicas_acked == 1
    assert await client.get(key) == "v"

    redis_cluster.kill(old)
    # The slot map still names the dead node: every retry re-reads it and fails alike.
    with pytest.raises(redis.ConnectionError):
        await client.get(key)
    assert await retrying(lambda: client.get(key), within_s=30) == "v"
    await asyncio.to_thread(redis_cluster.wait_failover, old)
    new = redis_cluster.master_of(key)
    assert new != old and new in redis_cluster.masters()

    await asyncio.to_thread(redis_cluster.restart, old)
    assert old in redis_cluster.replicas()
    assert len(redis_cluster.masters()) == 3
    assert await client.get(key) == "v"
