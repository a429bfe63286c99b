"""Test support for the notifier: valid Signals, an in-process notifier, a WebSocket reader, and
a local webhook receiver."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import orjson
import redis.asyncio as aioredis
import uvicorn
import websockets
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from websockets.asyncio.client import ClientConnection

from devtools.servers import free_port
from services.notifier.main import Notifier
from services.notifier.settings import NotifierSettings
from shared.models import FillStatus, Side, Signal, SignalKind, Source, signal_id
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
        redis_url=redis_url,
        stream_namespace=namespace,
        notifier_port=free_port(),
        notifier_block_ms=500,
        **overrides,
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
    if notifier.webhooks is not None:
        await notifier.webhooks.ready.wait()
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


def variant(n: int, **changes: Any) -> Signal:
    """`make_signal(n)` with some fields changed (validated again, like a real entry)."""
    return Signal.model_validate(make_signal(n).model_dump() | changes)


def restated(signal: Signal, status: FillStatus, reason: str = "") -> Signal:
    """`signal` repeated with a new status, as the detector publishes a status change: same
    `signal_id` and fields, `detected_at` the time the change was decided."""
    changes = {"status": status, "status_reason": reason, "detected_at": time.time()}
    return Signal.model_validate(signal.model_dump() | changes)


def wallet(n: int) -> str:
    return "0x" + f"{n:040x}"[-40:]


async def recv_until(ws: ClientConnection, kind: str) -> list[dict[str, Any]]:
    """Messages up to and including the first one of type `kind`."""
    messages = [await recv_json(ws)]
    while messages[-1]["type"] != kind:
        messages.append(await recv_json(ws))
    return messages


async def closed_with(ws: ClientConnection) -> tuple[int | None, str | None]:
    """Read until the server closes the connection; its close code and reason."""
    try:
        while True:
            await asyncio.wait_for(ws.recv(), RECV_TIMEOUT_S)
    except websockets.ConnectionClosed:
        return ws.close_code, ws.close_reason


async def wait_until(
    condition: Callable[[], Awaitable[bool]], what: str, limit_s: float = 10
) -> None:
    async def poll() -> None:
        # Conditions seen from outside (HTTP answers, Redis state): nothing to wait on but polling.
        while not await condition():  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(poll(), limit_s)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


class Receiver:
    """A webhook endpoint on 127.0.0.1 that records every request.

    `plan` maps a path to the statuses of the 1st, 2nd, ... request for one idempotency key (the
    last one repeats); paths not in it answer 200. `delay_s` holds every answer that long.
    """

    def __init__(self, plan: dict[str, list[int]] | None = None, delay_s: float = 0.0) -> None:
        self.plan = plan or {}
        self.delay_s = delay_s
        self.requests: list[Received] = []
        self.port = free_port()
        self._server = uvicorn.Server(
            uvicorn.Config(
                Starlette(routes=[Route("/{path:path}", self._endpoint, methods=["POST"])]),
                host="127.0.0.1",
                port=self.port,
                log_config=None,
                access_log=False,
                lifespan="off",
            )
        )
        self._server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
        self._task: asyncio.Task[None] | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def to(self, path: str) -> list[Received]:
        return [r for r in self.requests if r.path == path]

    async def _endpoint(self, request: Request) -> Response:
        path = request.path_params["path"]
        body = await request.body()
        key = request.headers.get("idempotency-key", "")
        tries = sum(
            1 for r in self.requests if r.path == path and r.headers.get("idempotency-key") == key
        )
        self.requests.append(Received(path, dict(request.headers), body, time.time()))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        statuses = self.plan.get(path, [200])
        status = statuses[min(tries, len(statuses) - 1)]
        return PlainTextResponse("ok" if status < 300 else f"no ({status})", status_code=status)

    async def __aenter__(self) -> Receiver:
        self._task = asyncio.ensure_future(self._server.serve())
        while not self._server.started:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *_: object) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await asyncio.wait_for(self._task, 10)
