"""Test support for the notifier: valid Signals, an in-process notifier, and a WebSocket reader."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import orjson
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection

from devtools.servers import free_port
from services.notifier.main import Notifier
from services.notifier.settings import NotifierSettings
from shared.models import Side, Signal, SignalKind, Source, signal_id
from shared.redis_streams import encode

RECV_TIMEOUT_S = 10.0


def make_signal(n: int, *, title: str = "Who wins the 2025 Nobel Peace Prize?") -> Signal:
    now = time.time()
    key = f"{n:032x}"
    return Signal(
        signal_id=signal_id(SignalKind.WHALE_ORDER, key),
        kind=SignalKind.WHALE_ORDER,
        wallet="0x" + f"{n:040x}"[-40:],
        wallet_label=f"wallet {n}",
        market_slug="nobel-peace-prize-2025",
        title=title,
        condition_id="0x" + "c" * 64,
        token_id=str(10**20 + n),
        token_label="Yes",
        side=Side.BUY,
        price=0.42,
        shares=1000.0 + n,
        notional_usd=0.42 * (1000.0 + n),
        confidence=0.9,
        reasons=["notional above whale threshold"],
        order_keys=[key],
        source=Source.DOME_WS,
        exchange_ts=int(now) - 1,
        received_at=now,
        detected_at=now,
    )


async def publish(client: aioredis.Redis, stream: str, signals: list[Signal]) -> list[str]:
    """XADD the signals as plain entries, in order; their stream ids."""
    async with client.pipeline(transaction=False) as pipe:
        for signal in signals:
            pipe.xadd(stream, cast(Any, encode(signal)))
        ids = await pipe.execute()
    return [entry_id.decode() for entry_id in ids]


@contextlib.asynccontextmanager
async def running_notifier(
    redis_url: str, namespace: str, **overrides: Any
) -> AsyncIterator[Notifier]:
    """A notifier serving on a free loopback port in this event loop, its reader positioned."""
    settings = NotifierSettings(
        redis_url=redis_url, stream_namespace=namespace, notifier_port=free_port(),
        notifier_block_ms=500, **overrides,
    )
    notifier = Notifier(settings)
    stop = asyncio.Event()
    task = asyncio.ensure_future(notifier.run(stop))
    try:
        await asyncio.wait_for(_until_serving(notifier), 10)
        yield notifier
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def _until_serving(notifier: Notifier) -> None:
    await notifier.fanout.ready.wait()
    # uvicorn offers a flag, not an event, for "listening".
    while not notifier.server.started:  # noqa: ASYNC110
        await asyncio.sleep(0.01)


def ws_url(notifier: Notifier, query: str = "") -> str:
    return f"ws://127.0.0.1:{notifier.settings.notifier_port}/ws{query}"


def http_url(notifier: Notifier, path: str) -> str:
    return f"http://127.0.0.1:{notifier.settings.notifier_port}{path}"


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    message: dict[str, Any] = orjson.loads(await asyncio.wait_for(ws.recv(), RECV_TIMEOUT_S))
    return message


async def recv_hello(ws: ClientConnection) -> None:
    hello = await recv_json(ws)
    assert hello == {"type": "hello", "server": "betterbot-notifier", "v": 1}


async def recv_signals(ws: ClientConnection, count: int) -> list[dict[str, Any]]:
    """The next `count` messages, each of which must be a signal."""
    messages = [await recv_json(ws) for _ in range(count)]
    assert [m["type"] for m in messages] == ["signal"] * count, messages
    return messages


async def assert_nothing_more(ws: ClientConnection) -> None:
    """Nothing is queued before a pong: no extra or repeated signal was sent."""
    await ws.send('{"type":"ping"}')
    assert await recv_json(ws) == {"type": "pong"}
