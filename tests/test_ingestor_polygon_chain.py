"""Source `polygon` on a real local EVM node (ganache from the npm registry): the tape's fills
emitted as real transactions by contracts with Polymarket's exact OrderFilled signatures, read
through the node's own `eth_subscribe` and `eth_getLogs`, behind a proxy that injects providers'
faults."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from eth_hash.auto import keccak

from devtools.servers import compile_exchanges, ganache_node
from services.ingestor.chain.events import V1_TOPIC, V2_TOPIC
from services.ingestor.service import Ingestor
from services.simulator.tape import load_tape
from services.simulator.trades import TradeTemplate
from shared.logs import JsonFormatter
from shared.streams import Streams
from tests.helpers.chain import Chain, Emitted, RpcProxy
from tests.helpers.ingestion import (
    ROOT,
    WALLETS,
    Sim,
    ingestor_settings,
    metric,
    raw_payloads,
    running,
    simulator,
    until,
)

TAPE = load_tape(ROOT / "data" / "polymarket_trades_nobel2025.json")
SECRET_PATH = "v2/sk-polygon-a8f3e1c9d7b2460f9e1d"


@pytest.fixture(scope="module")
def node() -> Iterator[str]:
    with ganache_node() as url:
        yield url


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict[str, Any]]:
    return compile_exchanges()


@pytest.fixture
async def chain(node: str) -> AsyncIterator[Chain]:
    driver = Chain(node)
    yield driver
    await driver.aclose()


@pytest.fixture
async def exchanges(chain: Chain, compiled: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """Fresh V2 and V1 exchanges per test, so each test's filter sees only its own logs."""
    v2 = await chain.deploy(str(compiled["ExchangeV2"]["bytecode"]))
    v1 = await chain.deploy(str(compiled["ExchangeV1"]["bytecode"]))
    return v2, v1


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    async with simulator(sim_wait_for_subscriber=True) as running_sim:
        yield running_sim


def event_topic(abi: list[dict[str, Any]]) -> str:
    event = next(item for item in abi if item.get("type") == "event")
    types = ",".join(str(param["type"]) for param in event["inputs"])
    return "0x" + keccak(f"{event['name']}({types})".encode()).hex()


def test_compiled_events_have_the_published_topics(compiled: dict[str, dict[str, Any]]) -> None:
    assert event_topic(compiled["ExchangeV2"]["abi"]) == V2_TOPIC  # type: ignore[arg-type]
    assert event_topic(compiled["ExchangeV1"]["abi"]) == V1_TOPIC  # type: ignore[arg-type]


def settings_for(sim: Sim, redis_url: str, namespace: str, urls: list[str], **extra: Any) -> Any:
    return ingestor_settings(
        sim,
        redis_url,
        namespace,
        ingest_sources="polygon",
        polygon_ws_urls=",".join(urls),
        polygon_confirmations=extra.pop("polygon_confirmations", 0),
        gamma_api_url=sim.base_url,
        polygon_stall_timeout_s=extra.pop("polygon_stall_timeout_s", 30),
        **extra,
    )


async def emit_tape(chain: Chain, v2: str, trades: list[TradeTemplate]) -> list[Emitted]:
    """The trades in transactions of up to 7 fills, as matches of several makers look."""
    emitted: list[Emitted] = []
    for start in range(0, len(trades), 7):
        emitted += await chain.fill_v2(v2, trades[start : start + 7])
    return emitted


def tracked(emitted: list[Emitted]) -> list[Emitted]:
    return [fill for fill in emitted if fill.wallet in set(WALLETS)]


async def published(client: aioredis.Redis, streams: Streams) -> list[dict[str, Any]]:
    return [fill for fill in await raw_payloads(client, streams) if fill["source"] == "polygon"]


def as_compared(fill: dict[str, Any]) -> tuple[Any, ...]:
    return (
        fill["user"],
        fill["side"],
        fill["token_id"],
        fill["shares"],
        round(fill["price"], 6),
        fill["block_number"],
    )


def expected(fills: list[Emitted]) -> list[tuple[Any, ...]]:
    return sorted(
        (f.wallet, f.side, f.token_id, f.shares_raw, round(f.price, 6), f.block_number)
        for f in fills
    )


async def test_every_tracked_fill_of_the_tape_once_v2_and_v1(
    sim: Sim,
    chain: Chain,
    exchanges: tuple[str, str],
    redis_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
) -> None:
    v2, v1 = exchanges
    trades = TAPE[:120]
    settings = settings_for(
        sim, redis_url, namespace, [chain.ws_url], polygon_exchanges=f"{v2},{v1}"
    )
    async with running(settings) as ingestor:
        await until(lambda: ingestor.statuses[0].connected, what="connected")
        emitted = await emit_tape(chain, v2, trades[:60])
        v1_trade = next(t for t in trades if t.user in set(WALLETS) and t.side == "BUY")
        emitted.append(await chain.fill_v1(v1, v1_trade))
        emitted += await emit_tape(chain, v2, trades[60:])
        want = tracked(emitted)
        await all_read(ingestor, chain, redis_client, streams, len(want), "every tracked fill")
    fills = await published(redis_client, streams)
    assert sorted(as_compared(fill) for fill in fills) == expected(want)
    assert len({fill["order_key"] for fill in fills}) == len(fills)
    times = {f.block_number: await chain.block_time(f.block_number) for f in want}
    for fill in fills:
        assert fill["timestamp"] == times[fill["block_number"]]
        trade = next(t for t in trades if t.token_id == fill["token_id"])
        assert (fill["market_slug"], fill["token_label"]) == (trade.market_slug, trade.token_label)
        assert fill["condition_id"] == trade.condition_id
    assert any(fill["block_number"] == emitted[60].block_number for fill in fills)


def ingestor_cursor(ingestor: Ingestor) -> int:
    assert ingestor.polygon is not None
    return ingestor.polygon.cursor or 0


async def all_read(
    ingestor: Ingestor,
    chain: Chain,
    client: aioredis.Redis,
    streams: Streams,
    count: int,
    what: str,
) -> None:
    """Wait until `count` polygon fills are on orders.raw and every block to the head is read."""

    async def there() -> bool:
        return len(await published(client, streams)) >= count

    await until(there, within_s=60, what=what)
    head = await chain.head()
    await until(lambda: ingestor_cursor(ingestor) >= head, what="blocks read")


async def test_a_dropped_connection_is_backfilled_from_the_block_watermark(
    sim: Sim,
    chain: Chain,
    exchanges: tuple[str, str],
    redis_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
) -> None:
    v2, _ = exchanges
    trades = [t for t in TAPE[120:400]]
    async with RpcProxy(chain.ws_url).running() as proxy:
        settings = settings_for(
            sim,
            redis_url,
            namespace,
            [f"{proxy.url}/{SECRET_PATH}"],
            polygon_exchanges=v2,
            polygon_getlogs_max_blocks=50,
        )
        async with running(settings) as ingestor:
            await until(lambda: ingestor.statuses[0].connected, what="connected")
            emitted = await emit_tape(chain, v2, trades[:100])
            proxy.faults.refuse_429 = True
            proxy.drop()
            await until(lambda: not ingestor.statuses[0].connected, what="saw the drop")
            # While it is away: many blocks, more than one eth_getLogs range.
            for trade in trades[100:]:
                emitted += await chain.fill_v2(v2, [trade])
            proxy.faults.refuse_429 = False
            want = tracked(emitted)
            await all_read(
                ingestor, chain, redis_client, streams, len(want), "backfilled after the drop"
            )
    fills = await published(redis_client, streams)
    assert sorted(as_compared(fill) for fill in fills) == expected(want)
    assert proxy.faults.connections >= 2
    assert proxy.faults.requests.count("eth_getLogs") > (len(trades) - 100) / 50


async def test_refused_ranges_are_split_failover_and_back_and_the_key_is_never_logged(
    sim: Sim,
    chain: Chain,
    exchanges: tuple[str, str],
    redis_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    v2, _ = exchanges
    trades = [t for t in TAPE[400:700] if t.user in set(WALLETS)][:40]
    # Blocks before the source starts: its first catch-up reads them in ranges.
    emitted = [fill for trade in trades[:20] for fill in await chain.fill_v2(v2, [trade])]
    start = await chain.head() - 30
    await redis_client.hset(
        "{" + streams.orders_raw + "}:watermark", "polygon:block", str(max(0, start))
    )
    caplog.set_level(logging.DEBUG)
    async with (
        chain.heartbeat(),
        RpcProxy(chain.ws_url).running() as first,
        RpcProxy(chain.ws_url).running() as second,
    ):
        first.faults.max_log_blocks = 4
        settings = settings_for(
            sim,
            redis_url,
            namespace,
            [f"{first.url}/{SECRET_PATH}", f"{second.url}/{SECRET_PATH}"],
            polygon_exchanges=v2,
            polygon_getlogs_max_blocks=25,
            polygon_failback_after_s=1.5,
            polygon_stall_timeout_s=1.0,
        )
        async with running(settings) as ingestor:
            source = ingestor.polygon
            assert source is not None
            await until(lambda: ingestor.statuses[0].connected, what="connected")
            assert first.faults.refused_ranges >= 1 and source.ranges_split >= 1
            # The first endpoint's head stops moving: the source moves to the second.
            first.faults.stall_heads = True
            emitted += await chain.fill_v2(v2, [trades[20]])
            await until(lambda: source.endpoint == 1, what="failed over")
            await until(lambda: second.faults.connections >= 1, what="on the second")
            first.faults.stall_heads = False
            for trade in trades[21:]:
                emitted += await chain.fill_v2(v2, [trade])
            await until(lambda: source.endpoint == 0, within_s=30, what="came back")
            emitted += await chain.fill_v2(v2, [trades[0]])
            want = tracked(emitted)
            await all_read(
                ingestor,
                chain,
                redis_client,
                streams,
                len(want),
                "every fill through the failovers",
            )
    fills = await published(redis_client, streams)
    assert sorted(as_compared(fill) for fill in fills) == expected(want)
    assert metric("betterbot_ingestor_chain_ranges_split_total") >= 1
    secret = SECRET_PATH.split("/")[1]
    assert first.faults.connections >= 2
    formatter = JsonFormatter("ingestor")
    assert caplog.records
    for record in caplog.records:
        assert secret not in formatter.format(record)
    status = await redis_client.hgetall(streams.feed_status_key())
    assert not any(secret.encode() in value for value in status.values())
