"""`betterbot signals tail` against a real Redis: filters, start positions, and bad entries."""

from __future__ import annotations

import asyncio

import orjson
import pytest
import redis.asyncio as aioredis

from cli.signals import SignalFilter, tail
from shared.models import Side, Signal, SignalKind, Source
from shared.redis_streams import encode
from shared.streams import Streams
from tests.helpers.cli import Cli

pytestmark = pytest.mark.integration

ALICE, BOB = "0x" + "a1" * 20, "0x" + "b2" * 20


def _signal(n: int, kind: SignalKind, wallet: str, confidence: float) -> Signal:
    return Signal(
        signal_id=f"s{n}",
        kind=kind,
        wallet=wallet,
        wallet_label="alice" if wallet == ALICE else "",
        market_slug="nobel",
        token_id="9",
        token_label="Yes",
        side=Side.BUY,
        price=0.5,
        shares=3000,
        notional_usd=1500,
        confidence=confidence,
        source=Source.DOME_WS,
        exchange_ts=1760086772,
        received_at=1760086773.0,
        detected_at=1760086773.25,
    )


SIGNALS = [
    _signal(1, SignalKind.WHALE_ORDER, ALICE, 0.9),
    _signal(2, SignalKind.TRADER_ENTRY, ALICE, 0.9),
    _signal(3, SignalKind.WHALE_ORDER, BOB, 0.4),
    _signal(4, SignalKind.WHALE_ORDER, BOB, 0.8),
]


@pytest.fixture
def cli(redis_url: str, namespace: str, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(redis_url, namespace, capsys)


async def _publish(client: aioredis.Redis, stream: str, signals: list[Signal]) -> None:
    for signal in signals:
        await client.xadd(stream, encode(signal))


async def test_filters_from_the_start(
    cli: Cli, redis_client: aioredis.Redis, streams: Streams
) -> None:
    await _publish(redis_client, streams.signals, SIGNALS[:2])
    await redis_client.xadd(streams.signals, {b"data": b"not a signal"})
    await _publish(redis_client, streams.signals, SIGNALS[2:])
    code, out, err = await cli(
        "signals",
        "tail",
        "--from",
        "0",
        "--count",
        "2",
        "--kind",
        "whale_order",
        "--min-confidence",
        "0.5",
        "--json",
        as_json=False,
    )
    assert code == 0 and "not a valid Signal" in err
    lines = [orjson.loads(line) for line in out.splitlines()]
    assert [s["signal_id"] for s in lines] == ["s1", "s4"]
    assert all(s["stream_id"] for s in lines)


async def test_text_format_and_wallet_filter(
    cli: Cli, redis_client: aioredis.Redis, streams: Streams
) -> None:
    await _publish(redis_client, streams.signals, SIGNALS)
    code, out, _ = await cli(
        "signals",
        "tail",
        "--from",
        "0",
        "--count",
        "2",
        "--wallet",
        ALICE.upper().replace("0X", "0x"),
        as_json=False,
    )
    assert code == 0
    first, second = out.splitlines()
    assert "whale_order" in first and "(alice)" in first and "conf 0.90" in first
    assert "trader_entry" in second and "3,000.00 Yes @ 0.500 = $1,500.00" in second


async def test_from_now_skips_what_is_already_there(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    await _publish(redis_client, streams.signals, SIGNALS[:1])
    seen: list[str] = []
    task = asyncio.create_task(
        tail(
            redis_client,
            streams.signals,
            SignalFilter(),
            limit=1,
            as_json=True,
            write=seen.append,
            block_ms=50,
        )
    )
    await asyncio.sleep(0.2)
    await _publish(redis_client, streams.signals, SIGNALS[1:2])
    assert await asyncio.wait_for(task, 5) == 1
    assert orjson.loads(seen[0])["signal_id"] == "s2"


async def test_unknown_kind_is_a_usage_error(cli: Cli) -> None:
    code, _, err = await cli("signals", "tail", "--kind", "moonshot", as_json=False)
    assert code == 2 and "trader_entry" in err
