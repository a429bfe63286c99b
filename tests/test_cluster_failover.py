"""A Redis Cluster failover that loses acknowledged fills, recovered by the ingestor.

Replication is asynchronous, so a master can acknowledge a fill and die before its replica has
it: the promoted replica lacks the fill, its dedupe key and the watermark move, all in the
partition's slot. The ingestor notices Redis failing and answering again and backfills every
wallet from its watermark, which reaches back before the lost fills.

The loss is made certain (chaos/failover.py): the replica of the master serving the busiest
wallet partition is frozen and its replication link closed, fills land on the master alone, the
master is SIGKILLed and the replica promoted. The test proves entries were lost at the failover,
then that every tracked fill of the tape is back on the order streams once and in Postgres once.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from chaos.failover import Failover, lose_acknowledged_writes
from chaos.truth import expected_order_keys, read_stream
from devtools.cluster import Cluster
from devtools.servers import free_port
from shared.redis_streams import connect
from shared.streams import Streams
from shared.wallets import load_wallets
from tests.helpers.processes import ServiceProcess
from tests.test_pipeline_e2e import WALLETS, Pipeline

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

PARTITIONS = 4
# 27 s of tape: long enough for the failover (about 4 s) to happen in the middle of it.
SIM_SPEED = "80"
FAULT_AT_EMITTED = 250
SETTLE_S = 60.0
# Fills the master acknowledges alone before it is killed (about a second of the busiest partition).
UNREPLICATED = 10


class FailoverPipeline(Pipeline):
    """The e2e pipeline, its logs under a tag of its own: tests/output/failover-<name>.log, and
    failover-<n>-<name>.log for the n-th other replica (each replica keeps its own log)."""

    async def start(self, name: str, env: dict[str, str], health_url: str) -> ServiceProcess:
        others = sum(proc.name == name for proc in self.procs)
        tag = f"failover-{others}-" if others else "failover-"
        proc = ServiceProcess(name, {**self.env, **env}, health_url, tag=tag)
        self.procs.append(proc)
        await asyncio.to_thread(proc.wait_healthy)
        return proc


@pytest.fixture
async def cluster_client(redis_cluster: Cluster, namespace: str) -> AsyncIterator[aioredis.Redis]:
    client = connect(redis_cluster.url, cluster=True)
    yield client
    keys = [key async for key in client.scan_iter(match=f"*{namespace}*", count=1000)]
    for key in keys:  # one by one: the keys span every slot
        await client.delete(key)
    await client.aclose()


async def start_pipeline(pipeline: Pipeline) -> None:
    """Simulator, store, two detectors, then the ingestor, whose subscription starts the tape."""
    await pipeline.start(
        "simulator",
        {
            "SIM_HOST": "127.0.0.1",
            "SIM_PORT": str(pipeline.sim_port),
            "SIM_SPEED": SIM_SPEED,
            "SIM_LOOP": "false",
            "SIM_API_KEY": pipeline.key,
        },
        f"{pipeline.sim_url}/health",
    )
    await pipeline.start_ops_service("store")
    for _ in range(pipeline.detectors):
        await pipeline.start_ops_service("detector")
    ingestor_port = free_port()
    await pipeline.start(
        "ingestor",
        {
            "OPS_PORT": str(ingestor_port),
            "DOME_WS_URL": f"ws://127.0.0.1:{pipeline.sim_port}",
            "DOME_API_URL": f"{pipeline.sim_url}/v1",
            "DOME_API_KEY": pipeline.key,
            "DOME_RECONNECT_MIN_S": "0.2",
        },
        f"http://127.0.0.1:{ingestor_port}/health",
    )


def layout(pipeline: Pipeline) -> Streams:
    """The services' streams: four partitions on a cluster."""
    return Streams(pipeline.namespace, PARTITIONS, cluster=True)


async def sim_status(sim: httpx.AsyncClient) -> dict[str, int]:
    body: dict[str, int] = (await sim.get("/_sim/status")).json()
    return body


async def until(what: str, within_s: float, ready: Callable[[], Awaitable[bool]]) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if await ready():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {within_s}s waiting for {what}")


async def busiest(client: aioredis.Redis, streams: Streams) -> str:
    """The wallet partition with the most fills so far: fills will go on landing there."""
    lengths = {stream: await client.xlen(stream) for stream in streams.order_streams()}
    return max(lengths, key=lambda stream: lengths[stream])


def order_key_of(data: bytes) -> str:
    return str(orjson.loads(data)["order_key"])


async def order_keys_on(client: aioredis.Redis, streams: Streams) -> Counter[str]:
    keys: Counter[str] = Counter()
    for stream in streams.order_streams():
        keys.update(
            order_key_of(fields[b"data"]) for _, fields in await read_stream(client, stream)
        )
    return keys


def ingestor_log(pipeline: Pipeline) -> str:
    return next(p for p in pipeline.procs if p.name == "ingestor").log_text()


def prove_the_loss(failover: Failover) -> None:
    """Entries the master acknowledged are missing on the promoted replica: every one written
    after the replica's link closed, none it had before."""
    assert failover.unreplicated, f"no fill landed on {failover.stream} while frozen: {failover}"
    lost = {entry_id for entry_id, _ in failover.lost}
    assert {entry_id for entry_id, _ in failover.unreplicated} <= lost
    assert not lost & {entry_id for entry_id, _ in failover.replicated}


async def test_a_failover_losing_acknowledged_fills_is_recovered_by_the_ingestor(
    redis_cluster: Cluster, cluster_client: aioredis.Redis, database_url: str, namespace: str
) -> None:
    env = {"REDIS_CLUSTER": "true", "STREAM_PARTITIONS": str(PARTITIONS)}
    pipeline = FailoverPipeline(redis_cluster.url, database_url, namespace, env, detectors=2)
    started = time.monotonic()
    try:
        await start_pipeline(pipeline)
        failover, trades = await fail_over_mid_tape(pipeline, redis_cluster, cluster_client)
        prove_the_loss(failover)
        expected = expected_order_keys(trades, load_wallets(WALLETS))
        lost_keys = {order_key_of(data) for _, data in failover.lost}
        assert lost_keys <= expected
        await all_back_once(pipeline, cluster_client, expected, lost_keys)
        await stored_once(database_url, expected)
        stopped_cleanly(pipeline)
        print(f"recovered {len(lost_keys)} lost fills; {time.monotonic() - started:.0f}s in all")
    finally:
        pipeline.stop_all()
        await heal(redis_cluster)


async def fail_over_mid_tape(
    pipeline: Pipeline, cluster: Cluster, client: aioredis.Redis
) -> tuple[Failover, list[dict[str, object]]]:
    """Once the tape is well under way, fail over the busiest partition's master losing what it
    acknowledged alone; restart it (it rejoins as a replica); the tape's trades at its end."""
    async with httpx.AsyncClient(base_url=pipeline.sim_url, timeout=5) as sim:

        async def far_enough() -> bool:
            return (await sim_status(sim))["emitted"] >= FAULT_AT_EMITTED

        async def tape_done() -> bool:
            return bool((await sim_status(sim))["tape_done"])

        await until("the tape to reach the fault", 60, far_enough)
        target = await busiest(client, layout(pipeline))
        failover = await lose_acknowledged_writes(cluster, target, min_unreplicated=UNREPLICATED)
        await asyncio.to_thread(cluster.restart, failover.master)
        await until("the end of the tape", 90, tape_done)
        trades: list[dict[str, object]] = (await sim.get("/_sim/trades")).json()
    print(
        f"failover of {failover.master} (serving {target}) to {failover.replica}: "
        f"{failover.failover_s:.1f}s, replica frozen {failover.frozen_s:.1f}s, "
        f"{len(failover.lost)} acknowledged entries lost"
    )
    return failover, trades


async def all_back_once(
    pipeline: Pipeline, client: aioredis.Redis, expected: set[str], lost: set[str]
) -> None:
    """Every tracked fill on the order streams (the lost ones published again), each once; if
    not, what the ingestor saw."""
    streams = layout(pipeline)

    async def all_back() -> bool:
        return set(await order_keys_on(client, streams)) >= expected

    try:
        await until("every tracked fill on the order streams", SETTLE_S, all_back)
    except AssertionError:
        missing = expected - set(await order_keys_on(client, streams))
        log = ingestor_log(pipeline)
        raise AssertionError(
            f"{len(lost & missing)} of {len(lost)} lost fills and {len(missing)} tracked fills "
            f"in all not on the order streams; ingestor saw Redis fail: "
            f"{'redis_unavailable' in log}, recover: {'redis_recovered' in log}, backfilled "
            f"again: {'backfill_after_redis_outage' in log} (tests/output/failover-ingestor.log)"
        ) from None
    published = await order_keys_on(client, streams)
    assert [key for key, n in published.items() if n > 1] == [], "a fill published twice"


def stopped_cleanly(pipeline: Pipeline) -> None:
    """Every process exits 0 on SIGTERM; the log's end of any that did not."""
    codes = pipeline.stop_all()
    failed = {name: code for name, code in codes.items() if code != 0}
    tails = [proc.log_tail(15) for proc in pipeline.procs if proc.returncode not in (0, None)]
    assert not failed, f"{failed}\n" + "\n".join(tails)


async def stored_once(database_url: str, expected: set[str]) -> None:
    """Every tracked fill in `orders` once (and nothing else); each signal row once."""
    db = await asyncpg.connect(database_url)
    try:

        async def stored() -> bool:
            return bool(await db.fetchval("SELECT count(*) FROM orders") >= len(expected))

        await until("every tracked fill in Postgres", SETTLE_S, stored)
        keys = [r["order_key"] for r in await db.fetch("SELECT order_key FROM orders")]
        assert sorted(keys) == sorted(expected)
        ids = [r["signal_id"] for r in await db.fetch("SELECT signal_id FROM signals")]
        assert ids and len(ids) == len(set(ids))
    finally:
        await db.close()


async def heal(cluster: Cluster) -> None:
    """Leave every node up for the next test of the session, whatever failed here."""
    for port in cluster.ports:
        try:
            cluster.pid_of(port)
        except RuntimeError:
            await asyncio.to_thread(cluster.restart, port)
