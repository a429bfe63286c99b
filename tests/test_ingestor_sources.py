"""The ingestor's other sources against the real simulator and real Redis: REST polling (the
seed's fallback), Polymarket's Data API alone and alongside Dome (one order_key per fill across
sources), and the polynode dialect of the Dome WebSocket."""

from __future__ import annotations

import itertools

import redis.asyncio as aioredis

from services.simulator.data_api import data_api_trade
from services.simulator.trades import Trade, injected_trade
from shared.data_api import order_from_data_api
from shared.models import OrderFill, Source
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
    subscribed,
    until,
)


async def test_rest_polling_reaches_the_same_orders_and_honours_429(
    redis_url: str, namespace: str, redis_client: aioredis.Redis, streams: Streams
) -> None:
    async with simulator() as sim:
        await sim.emit(WALLETS, 30)
        await sim.post("/_sim/rate_limit", {"requests": 2, "retry_after": 0.3})
        settings = ingestor_settings(sim, redis_url, namespace, dome_use_websocket=False)
        assert settings.sources() == ("dome_rest",)
        async with running(settings) as ingestor:
            assert ingestor.websocket is None
            await converge(sim, redis_client, streams, WALLETS)
            await sim.emit(WALLETS, 15)
            await converge(sim, redis_client, streams, WALLETS)
            assert ingestor.pollers[0].status.connected
        requests = [r.to_json() for r in sim.sim.app.state.faults.requests]
    assert {r["path"] for r in requests} == {"/v1/polymarket/orders"}
    assert sum(r["status"] == 429 for r in requests) == 2
    for before, after in itertools.pairwise(requests):
        if before["status"] == 429:
            assert after["at"] - before["at"] >= 0.3 - 0.01
    assert {p["source"] for p in await raw_payloads(redis_client, streams)} == {"dome_rest"}


async def test_rest_polling_paces_requests_at_the_tier_rate(
    redis_url: str, namespace: str, redis_client: aioredis.Redis, streams: Streams
) -> None:
    async with simulator() as sim:
        await sim.emit(WALLETS, 20)
        settings = ingestor_settings(
            sim,
            redis_url,
            namespace,
            dome_use_websocket=False,
            dome_rest_rate_per_s=10,
            dome_rest_rate_per_10s=100,
        )
        async with running(settings):
            await converge(sim, redis_client, streams, WALLETS)
        stamps = [r.at for r in sim.sim.app.state.faults.requests]
    assert len(stamps) >= 20
    # Never more than 10 requests in any one second (with a little slack for clock reads).
    for first, eleventh in zip(stamps, stamps[10:], strict=False):
        assert eleventh - first >= 1.0 - 0.02


async def test_the_data_api_alone_reaches_every_tracked_fill_with_taker_only_false(
    redis_url: str, namespace: str, redis_client: aioredis.Redis, streams: Streams
) -> None:
    async with simulator() as sim:
        await sim.emit([*WALLETS, "0x" + "7" * 40], 42)
        settings = ingestor_settings(
            sim, redis_url, namespace, ingest_sources="data_api", data_api_page_limit=2
        )
        async with running(settings) as ingestor:
            await converge(sim, redis_client, streams, WALLETS)
            await sim.emit(WALLETS, 10)
            await converge(sim, redis_client, streams, WALLETS)
            assert ingestor.pollers[0].status.connected
        requests = [r.to_json() for r in sim.sim.app.state.faults.requests]
    assert {r["path"] for r in requests} == {"/v2/trades"}
    assert all(r["params"]["taker_only"] == "false" for r in requests)
    # Pages of 2 with more than 2 trades per wallet: a page bounded by an earlier second (a walk's
    # first page ends in the future), or a second read again in a larger page, was asked.
    assert any(int(r["params"]["end"]) <= r["at"] or r["params"]["limit"] != "2" for r in requests)
    payloads = await raw_payloads(redis_client, streams)
    assert {p["source"] for p in payloads} == {"data_api"}
    assert all(p["order_hash"] is None for p in payloads)


async def test_dome_and_the_data_api_together_publish_each_fill_once(
    redis_url: str, namespace: str, redis_client: aioredis.Redis, streams: Streams
) -> None:
    duplicates = metric("betterbot_ingestor_duplicates_total", source="data_api")
    async with simulator() as sim:
        settings = ingestor_settings(sim, redis_url, namespace, ingest_sources="dome_ws,data_api")
        async with running(settings) as ingestor:
            await subscribed(ingestor)
            await until(lambda: _tape_done(sim))
            await sim.emit(WALLETS, 40)
            keys = await converge(sim, redis_client, streams, WALLETS)
            # Both sources read every fill; the second reader of each is deduplicated.
            await until(
                lambda: (
                    metric("betterbot_ingestor_duplicates_total", source="data_api")
                    - duplicates
                    + ingestor.publisher.published_by_source["data_api"]
                    >= len(keys)
                )
            )
            assert await converge(sim, redis_client, streams, WALLETS) == keys
        assert ingestor.publisher.published_by_source["dome_ws"] > 0


async def _tape_done(sim: Sim) -> bool:
    return bool((await sim.status())["tape_done"])


def test_the_same_fill_gets_the_same_order_key_from_dome_and_the_data_api() -> None:
    injected = injected_trade({"user": WALLETS[0], "shares_normalized": 68.794036}, "k")
    trade = Trade.stamp(
        injected.template,
        seq=0,
        timestamp=1760086772,
        block_number=1,
        log_index=0,
        emitted_at=1760086772.5,
    )
    from shared.models import DomeOrder

    dome = OrderFill.from_dome(DomeOrder.model_validate(trade.order()), Source.DOME_WS, 1.0)
    data_api = OrderFill.from_dome(order_from_data_api(data_api_trade(trade)), Source.DATA_API, 2.0)
    assert dome.order_key == data_api.order_key
    assert (data_api.user, data_api.token_id, data_api.tx_hash) == (
        dome.user,
        dome.token_id,
        dome.tx_hash,
    )
    assert data_api.shares == dome.shares and data_api.market_slug == dome.market_slug


async def test_the_polynode_dialect_streams_and_backfills_the_same_orders(
    redis_url: str, namespace: str, redis_client: aioredis.Redis, streams: Streams
) -> None:
    # With no key of its own the simulator takes any key: the polynode key for the WebSocket, the
    # Dome key for the REST backfill.
    async with simulator(sim_api_key="") as sim:
        settings = ingestor_settings(
            sim,
            redis_url,
            namespace,
            dome_dialect="polynode",
            dome_ws_url=f"{sim.ws_url}/ws",
            polynode_api_key="pn-test-key-0b7e3c1d",
        )
        assert settings.dome_ws_endpoint().endswith("/ws?key=pn-test-key-0b7e3c1d")
        async with running(settings) as ingestor:
            await subscribed(ingestor)
            subscriptions = await sim.subscriptions()
            assert [sorted(s["filters"]["users"]) for s in subscriptions] == [sorted(WALLETS)]
            await sim.emit(WALLETS, 10)
            await converge(sim, redis_client, streams, WALLETS)
            await sim.post("/_sim/drop")
            await sim.emit(WALLETS, 10)
            await converge(sim, redis_client, streams, WALLETS)
