"""The pipeline on a real Redis Cluster (3 masters, 3 replicas, started from the installed
`redis-server` by devtools/cluster.py): the wallet registry's MULTI and seed script in one slot,
three detector replicas emitting exactly the reference signals with 1 and 4 partitions, the whole
pipeline end to end with 1 and 4 partitions, and the partitions spread over the masters.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis

from cli.main import run as cli
from devtools.cluster import Cluster
from services.ingestor.publisher import Publisher
from shared import wallet_registry
from shared.consumer import errors_key
from shared.models import OrderFill, TrackedWallet
from shared.redis_streams import connect
from shared.streams import DETECTOR_GROUP, Streams
from shared.tasks import cancel_and_wait
from tests.test_detector_replicas import replica_scenario
from tests.test_partitions import replicas_emit_the_reference
from tests.test_pipeline_e2e import Pipeline, tape_end_to_end

pytestmark = [pytest.mark.integration]

CLUSTER_ENV = {"REDIS_CLUSTER": "true"}
TAPE = Path(__file__).resolve().parents[1] / "data" / "polymarket_trades_nobel2025.json"


@pytest.fixture(scope="module")
def scenario() -> tuple[list[OrderFill], list[TrackedWallet]]:
    return replica_scenario()


@pytest.fixture
async def cluster_client(redis_cluster: Cluster, namespace: str) -> AsyncIterator[aioredis.Redis]:
    client = connect(redis_cluster.url, cluster=True)
    yield client
    keys = [key async for key in client.scan_iter(match=f"*{namespace}*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def test_the_wallet_registry_runs_on_a_cluster(
    cluster_client: aioredis.Redis, namespace: str
) -> None:
    streams = Streams(namespace)
    first = TrackedWallet(address="0x" + "a1" * 20, label="first")
    wallets, last_id = await wallet_registry.load(cluster_client, streams, [first])
    assert wallets == [first]
    assert await wallet_registry.seed(cluster_client, streams, [first]) == -1  # seeded once
    second = TrackedWallet(address="0x" + "b2" * 20, label="second", score=0.7)
    await wallet_registry.upsert(cluster_client, streams, second)
    assert await wallet_registry.remove(cluster_client, streams, first.address)
    changes = wallet_registry.follow(cluster_client, streams, last_id, block_ms=100)
    seen = [await anext(changes), await anext(changes)]
    assert [(c.op, c.wallet.address) for c in seen] == [
        ("upsert", second.address),
        ("remove", first.address),
    ]
    assert (await wallet_registry.snapshot(cluster_client, streams))[0] == [second]


def test_partitions_spread_over_the_masters(redis_cluster: Cluster) -> None:
    """Four wallet and four token partitions (with the default namespace) land on every master:
    each partition's slot is its name's, so their load spreads as the slots do."""
    lanes = Streams("", 4).lanes()
    masters = {redis_cluster.master_of(lane.stream) for lane in lanes}
    assert masters == set(redis_cluster.masters())
    for lane in lanes:
        # The lane's state, outbox and stream share its slot: one script touches all three.
        slot_keys = [
            lane.stream,
            lane.signals,
            lane.state_prefix + "x",
            errors_key(lane.stream, DETECTOR_GROUP),
            errors_key(lane.signals, DETECTOR_GROUP),
        ]
        assert {redis_cluster.master_of(key) for key in slot_keys} == {
            redis_cluster.master_of(lane.stream)
        }


@pytest.mark.e2e
@pytest.mark.parametrize("partitions", [1, 4])
async def test_three_replicas_on_a_cluster_emit_the_reference(
    redis_cluster: Cluster,
    cluster_client: aioredis.Redis,
    namespace: str,
    tmp_path: Path,
    scenario: tuple[list[OrderFill], list[TrackedWallet]],
    partitions: int,
) -> None:
    await replicas_emit_the_reference(
        redis_cluster.url,
        cluster_client,
        Streams(namespace, partitions),
        scenario,
        tmp_path,
        CLUSTER_ENV,
    )


@pytest.mark.e2e
@pytest.mark.parametrize("partitions", [1, 4])
async def test_the_tape_end_to_end_on_a_cluster(
    redis_cluster: Cluster,
    cluster_client: aioredis.Redis,
    database_url: str,
    namespace: str,
    partitions: int,
) -> None:
    env = {**CLUSTER_ENV, "STREAM_PARTITIONS": str(partitions)}
    pipeline = Pipeline(redis_cluster.url, database_url, namespace, env, detectors=2)
    try:
        await tape_end_to_end(pipeline, cluster_client, database_url, namespace)
    finally:
        pipeline.stop_all()


async def test_the_operators_tool_runs_on_a_cluster(
    redis_cluster: Cluster,
    cluster_client: aioredis.Redis,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Wallets, a tape replayed into 4 partitions, lag and partition status, through `betterbot`
    with REDIS_CLUSTER, each stream read on whichever master holds it."""
    monkeypatch.setenv("REDIS_CLUSTER", "true")
    monkeypatch.setenv("STREAM_PARTITIONS", "4")
    target = ["--redis-url", redis_cluster.url, "--namespace", namespace]
    address = "0x" + "c3" * 20
    assert await cli(["wallets", "add", address, "--label", "desk", "--db", "off", *target]) == 0
    assert await cli(["replay-tape", str(TAPE), "--all-wallets", *target]) == 0
    replayed = capsys.readouterr().out
    assert "1000 trades read: 1000 added" in replayed
    streams = Streams(namespace, 4)
    lengths = [await cluster_client.xlen(s) for s in streams.order_streams()]
    assert sum(lengths) == 1000 and all(lengths)
    assert await cli(["lag", "--json", *target]) == 0
    report = orjson.loads(capsys.readouterr().out)
    assert {row["stream"] for row in report} >= set(streams.order_streams())
    assert await cli(["partitions", "status", *target]) == 0
    assert "drained: nothing waits" in capsys.readouterr().out
    assert await cli(["wallets", "list", "--db", "off", "--json", *target]) == 0
    assert address in capsys.readouterr().out


async def test_the_ingestor_sees_a_failover_even_without_a_failed_write(
    redis_cluster: Cluster, cluster_client: aioredis.Redis, namespace: str
) -> None:
    """A master replaced by its replica while the ingestor wrote nothing (a quiet hour): the
    publisher still tells its sources, which read their gaps again (writes the old master
    acknowledged just before may be gone)."""
    streams = Streams(namespace, 4, cluster=True)
    publisher = Publisher(cluster_client, streams, stream_maxlen=1000, dedupe_ttl_s=60)
    told: list[float] = []
    replaced = asyncio.Event()

    def tell() -> None:
        told.append(time.monotonic())
        replaced.set()

    publisher.on_recovered(tell)
    watching = asyncio.create_task(publisher.watch_redis(every_s=0.2))
    try:
        await asyncio.sleep(0.5)
        assert told == []
        victim = redis_cluster.masters()[0]
        redis_cluster.kill(victim)
        await asyncio.to_thread(redis_cluster.wait_failover, victim)
        await asyncio.wait_for(replaced.wait(), 15)
        await asyncio.sleep(0.6)
        assert len(told) == 1  # once per replacement, not on every look
    finally:
        await cancel_and_wait(watching)
        await asyncio.to_thread(redis_cluster.restart, victim)
