"""Source `polygon` against the simulator's chain (`/rpc`): the whole tape as ABI-encoded logs in
blocks, compared with the simulator's ground truth; reorgs with and without confirmations; a head
that stalls turns /health red; the Gamma lookup fills in the market."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from shared.streams import Streams
from tests.helpers.ingestion import (
    WALLETS,
    Sim,
    converge,
    ingestor_settings,
    metric,
    raw_payloads,
    running,
    simulator,
    until,
)


def chain_settings(sim: Sim, redis_url: str, namespace: str, **extra: Any) -> Any:
    values: dict[str, Any] = {
        "ingest_sources": "polygon",
        "polygon_ws_urls": f"ws://127.0.0.1:{sim.port}/rpc/sk-rpc-0d9e8f7a6b5c4d3e2f1a",
        "polygon_exchanges": "0xE111180000d2663C0091e4f400237545B87B996B",
        "polygon_confirmations": 0,
        "gamma_api_url": sim.base_url,
        **extra,
    }
    return ingestor_settings(sim, redis_url, namespace, **values)


async def chain_state(sim: Sim) -> dict[str, Any]:
    return dict(await sim.get("/_sim/chain"))


async def test_the_whole_tape_from_the_chain_equals_the_ground_truth(
    redis_url: str, namespace: str, streams: Streams, redis_client: aioredis.Redis
) -> None:
    async with simulator(sim_block_time_s=0.1, sim_speed=2000) as sim:
        settings = chain_settings(sim, redis_url, namespace, polygon_confirmations=2)
        async with running(settings) as ingestor:
            await until(lambda: sim.sim.emitter.done, within_s=60, what="tape played")
            keys = await converge(sim, redis_client, streams, WALLETS)
            ok, details = await ingestor.health()
            assert ok, details["problems"]
            assert details["chain"]["read_block"] >= details["chain"]["head_block"] - 2 - 1
    fills = await raw_payloads(redis_client, streams)
    assert len(keys) == len(fills) > 300
    assert all(fill["source"] == "polygon" and fill["block_number"] for fill in fills)
    assert all(fill["market_slug"] and fill["token_label"] for fill in fills)


async def test_with_confirmations_a_reorg_never_publishes_an_orphaned_fill(
    redis_url: str, namespace: str, streams: Streams, redis_client: aioredis.Redis
) -> None:
    async with simulator(sim_block_time_s=0.2, sim_speed=300) as sim:
        settings = chain_settings(sim, redis_url, namespace, polygon_confirmations=4)
        async with running(settings):
            await until(lambda: sim.sim.emitter.emitted > 100, within_s=30, what="trades")
            reorgs = []
            for _ in range(3):
                reorgs.append(await sim.post("/_sim/chain", {"reorg": {"depth": 2, "keep": 2}}))
                mark = sim.sim.emitter.emitted
                await until(lambda m=mark: sim.sim.emitter.emitted >= m + 20, what="more trades")
            await until(lambda: sim.sim.emitter.done, within_s=90, what="tape played")
            await sim.post("/_sim/chain", {})
            orphaned = set((await chain_state(sim))["orphaned"])
            canonical = {t.tx_hash for t in sim.sim.chain.canonical_trades() if t.user in WALLETS}

            async def settled() -> bool:
                published = {f["tx_hash"] for f in await raw_payloads(redis_client, streams)}
                return published == canonical

            await until(settled, within_s=30, what="every canonical tracked fill, nothing else")
    assert sum(r["reorg"]["orphaned"] for r in reorgs) > 0
    fills = await raw_payloads(redis_client, streams)
    assert not {f["tx_hash"] for f in fills} & orphaned
    assert len({f["order_key"] for f in fills}) == len(fills)


async def test_without_confirmations_a_reorg_retracts_what_it_took_back(
    redis_url: str, namespace: str, streams: Streams, redis_client: aioredis.Redis
) -> None:
    """A fill published on first sight and then orphaned by a reorg goes out again on
    `orders.raw` as a retraction: same order_key, status `retracted`, the reason."""
    async with simulator(sim_block_time_s=1.0, sim_speed=100) as sim:
        settings = chain_settings(sim, redis_url, namespace)
        chain = sim.sim.chain
        async with running(settings):
            before = metric("betterbot_ingestor_chain_removed_logs_total")
            # A block about a second old with a tracked fill: the reorg (2 deep) takes it back.
            await until(
                lambda: any(t.user in WALLETS for t in chain.head.trades), what="a tracked fill"
            )
            await sim.post("/_sim/chain", {"reorg": {"depth": 2, "keep": 0}})
            orphaned = {t.tx_hash for t in chain.orphaned if t.user in WALLETS}
            assert orphaned

            async def retracted() -> bool:
                fills = await raw_payloads(redis_client, streams)
                return any(f["status"] == "retracted" for f in fills)

            await until(retracted, what="a retraction on orders.raw")
        fills = await raw_payloads(redis_client, streams)
        retractions = [f for f in fills if f["status"] == "retracted"]
        first_sight = {f["order_key"]: i for i, f in enumerate(fills) if f["status"] == "confirmed"}
        for retraction in retractions:
            assert retraction["tx_hash"] in orphaned
            assert "chain reorg" in retraction["status_reason"]
            assert first_sight[retraction["order_key"]] < fills.index(retraction)
        assert await redis_client.xlen(streams.orders_dead) == 0
        assert metric("betterbot_ingestor_chain_removed_logs_total") > before


async def test_a_reorg_deeper_than_the_confirmations_retracts_what_went_out(
    redis_url: str, namespace: str, streams: Streams, redis_client: aioredis.Redis
) -> None:
    """With 2 confirmations, a 5-block reorg replaces blocks already read: the source finds the
    last block read changed, steps back to the fork, and retracts the fills of the replaced blocks
    before it reads the new chain."""
    async with simulator(sim_block_time_s=0.5, sim_speed=100) as sim:
        settings = chain_settings(sim, redis_url, namespace, polygon_confirmations=2)
        chain = sim.sim.chain
        async with running(settings):

            async def published() -> bool:
                return len(await raw_payloads(redis_client, streams)) >= 3

            await until(published, what="fills read with 2 confirmations")
            await sim.post("/_sim/chain", {"reorg": {"depth": 5, "keep": 0}})
            orphaned = {t.tx_hash for t in chain.orphaned if t.user in WALLETS}

            async def retracted() -> bool:
                fills = await raw_payloads(redis_client, streams)
                return any(f["status"] == "retracted" for f in fills)

            await until(retracted, what="a retraction of a fill read before the reorg")
        fills = await raw_payloads(redis_client, streams)
        first_sight = {f["order_key"]: i for i, f in enumerate(fills) if f["status"] == "confirmed"}
        for i, fill in enumerate(fills):
            if fill["status"] == "retracted":
                assert fill["tx_hash"] in orphaned
                assert "replaced" in fill["status_reason"]
                assert first_sight[fill["order_key"]] < i


async def test_a_stalled_head_turns_health_red_and_back(
    redis_url: str, namespace: str, streams: Streams
) -> None:
    async with simulator(sim_block_time_s=0.1) as sim:
        settings = chain_settings(
            sim, redis_url, namespace, polygon_stall_timeout_s=0.5, dome_reconnect_max_s=0.2
        )
        async with running(settings) as ingestor:
            await until(lambda: ingestor.statuses[0].connected, what="connected")

            async def healthy() -> bool:
                return (await ingestor.health())[0]

            await until(healthy, what="healthy")
            await sim.post("/_sim/chain", {"stall": True})

            async def red() -> bool:
                ok, details = await ingestor.health()
                return not ok and any("no new head" in p for p in details["problems"])

            await until(red, what="red while the head stalls")
            await sim.post("/_sim/chain", {"stall": False})
            await until(healthy, what="healthy again")
