"""A chain reorg end to end, as real processes on real Redis and Postgres: the simulator's chain
takes back blocks whose tracked fills the ingestor published on first sight (POLYGON_CONFIRMATIONS
0), and the retraction reaches a WebSocket subscriber, a webhook and Postgres; the wallet's position
is what it would be had the fill never happened."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import redis.asyncio as aioredis
import websockets
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from devtools.servers import free_port
from services.detector import rules
from services.detector.rules import WalletMarketState
from services.detector.serial import SerialDetector
from shared.models import FillStatus, OrderFill
from shared.ops import http_server
from shared.streams import Streams
from shared.wallets import load_wallets
from tests.helpers.processes import ServiceProcess

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

ROOT = Path(__file__).resolve().parent.parent
WALLETS = ROOT / "config" / "wallets.example.json"
SECRET = "s" * 32


class Hook:
    """A webhook receiver that keeps every request's headers and body."""

    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        app = Starlette(routes=[Route("/hook", self._hook, methods=["POST"])])
        self._server = http_server(app, "127.0.0.1", self.port)
        self._task: asyncio.Task[None] | None = None

    async def _hook(self, request: Request) -> Response:
        self.requests.append((dict(request.headers), orjson.loads(await request.body())))
        return Response(status_code=204)

    async def __aenter__(self) -> Hook:
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *_: object) -> None:
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 5)


@contextlib.asynccontextmanager
async def services(
    redis_url: str, database_url: str, namespace: str, hooks: Path
) -> AsyncIterator[tuple[int, int]]:
    sim_port, notifier_port = free_port(), free_port()
    base = {
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "STREAM_NAMESPACE": namespace,
        "WALLETS_FILE": str(WALLETS),
    }
    procs: list[ServiceProcess] = []

    def start(name: str, env: dict[str, str], health: str) -> None:
        procs.append(ServiceProcess(name, {**base, **env}, health, tag="reorg-"))

    try:
        start(
            "simulator",
            {
                "SIM_HOST": "127.0.0.1",
                "SIM_PORT": str(sim_port),
                "SIM_SPEED": "60",
                "SIM_BLOCK_TIME_S": "1",
                "SIM_LOOP": "false",
            },
            f"http://127.0.0.1:{sim_port}/health",
        )
        for name in ("store", "detector"):
            port = free_port()
            start(name, {"OPS_PORT": str(port)}, f"http://127.0.0.1:{port}/health")
        start(
            "notifier",
            {"NOTIFIER_PORT": str(notifier_port), "WEBHOOKS_FILE": str(hooks)},
            f"http://127.0.0.1:{notifier_port}/health",
        )
        await asyncio.gather(*(asyncio.to_thread(p.wait_healthy) for p in procs))
        yield sim_port, notifier_port
    finally:
        for proc in reversed(procs):
            proc.stop()


async def until(check: Callable[[], Awaitable[bool]], within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


async def test_a_reorg_retracts_through_the_whole_pipeline(
    redis_url: str,
    database_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    hooks = tmp_path / "hooks.json"
    async with Hook() as hook:
        url = f"http://127.0.0.1:{hook.port}/hook"
        hooks.write_bytes(orjson.dumps([{"name": "reorg", "url": url, "secret": SECRET}]))
        async with services(redis_url, database_url, namespace, hooks) as (sim_port, ws_port):
            received: list[dict[str, Any]] = []
            listening = asyncio.Event()

            async def subscribe() -> None:
                async with websockets.connect(f"ws://127.0.0.1:{ws_port}/ws") as socket:
                    listening.set()
                    async for raw in socket:
                        message = orjson.loads(raw)
                        if message.get("type") == "signal":
                            received.append(message["signal"])

            subscriber = asyncio.ensure_future(subscribe())
            await asyncio.wait_for(listening.wait(), 10)
            ingestor_port = free_port()
            ingestor = ServiceProcess(
                "ingestor",
                {
                    "REDIS_URL": redis_url,
                    "STREAM_NAMESPACE": namespace,
                    "WALLETS_FILE": str(WALLETS),
                    "OPS_PORT": str(ingestor_port),
                    "INGEST_SOURCES": "polygon",
                    "POLYGON_WS_URLS": f"ws://127.0.0.1:{sim_port}/rpc",
                    "POLYGON_CONFIRMATIONS": "0",
                    "GAMMA_API_URL": f"http://127.0.0.1:{sim_port}",
                },
                f"http://127.0.0.1:{ingestor_port}/health",
                tag="reorg-",
            )
            try:
                await asyncio.to_thread(ingestor.wait_healthy)
                await retract_some_signal(sim_port, redis_client, streams)
                retracted = await settled_retractions(redis_client, streams, received, hook)
                await check_postgres(database_url, retracted)
            finally:
                ingestor.stop()
                subscriber.cancel()
    await check_positions(redis_client, streams)


async def retract_some_signal(sim_port: int, client: aioredis.Redis, streams: Streams) -> None:
    """Reorgs of the newest blocks until one takes back a fill that gave a signal."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{sim_port}", timeout=5) as sim:
        for _ in range(30):
            await asyncio.sleep(1.5)
            await sim.post("/_sim/chain", json={"reorg": {"depth": 2, "keep": 0}})
            await asyncio.sleep(1.0)
            if await _retracted_signals(client, streams):
                return
    raise AssertionError("no reorg took back a fill that had given a signal")


async def _retracted_signals(client: aioredis.Redis, streams: Streams) -> list[dict[str, Any]]:
    entries: Any = await client.xrange(streams.signals)
    signals = [orjson.loads(fields[b"data"]) for _, fields in entries]
    return [s for s in signals if s.get("status") == "retracted"]


async def settled_retractions(
    client: aioredis.Redis, streams: Streams, received: list[dict[str, Any]], hook: Hook
) -> list[dict[str, Any]]:
    retracted = await _retracted_signals(client, streams)
    ids = {s["signal_id"] for s in retracted}

    async def delivered() -> bool:
        to_ws = {s["signal_id"] for s in received if s.get("status") == "retracted"}
        keys = {h.get("idempotency-key") for h, _ in hook.requests}
        return ids <= to_ws and {f"{i}:retracted" for i in ids} <= keys

    await until(delivered, 30, "the retractions at the subscriber and the webhook")
    for signal in retracted:
        original = [s for s in received if s["signal_id"] == signal["signal_id"]]
        assert [s["status"] for s in original][:1] == ["confirmed"], original
        assert "chain reorg" in signal["status_reason"]
    for headers, body in hook.requests:
        if headers.get("idempotency-key", "").endswith(":retracted"):
            assert headers.get("x-betterbot-status") == "retracted"
            assert body["signal"]["status"] == "retracted"
    return retracted


async def check_postgres(database_url: str, retracted: list[dict[str, Any]]) -> None:
    db = await asyncpg.connect(database_url)
    try:

        async def marked() -> bool:
            rows = await db.fetch(
                "SELECT signal_id FROM signals WHERE status = 'retracted' AND signal_id = ANY($1)",
                [s["signal_id"] for s in retracted],
            )
            return len(rows) == len({s["signal_id"] for s in retracted})

        await until(marked, 30, "the signals marked retracted in Postgres")
        keys = {k for s in retracted for k in s["order_keys"]}
        orders = await db.fetch(
            "SELECT order_key, status FROM orders WHERE order_key = ANY($1)", list(keys)
        )
        assert any(row["status"] == "retracted" for row in orders), orders
    finally:
        await db.close()


async def check_positions(client: aioredis.Redis, streams: Streams) -> None:
    """Every wallet's positions: the reference over the stream without the fills retracted for
    good (and their retractions) gives what the detector holds."""
    entries: Any = await client.xrange(streams.orders_raw)
    fills = [OrderFill.model_validate_json(fields[b"data"]) for _, fields in entries]
    final: dict[str, FillStatus] = {}
    for fill in fills:
        final[fill.order_key] = fill.status
    never = [f for f in fills if final[f.order_key] is not FillStatus.RETRACTED]
    reference = SerialDetector(load_wallets(WALLETS), rules.RuleSettings())
    for fill in never:
        reference.process(fill)
    prefix = streams.detector_prefix()
    expected = {
        unit: dict(state.positions)
        for unit, state in reference.states.items()
        if isinstance(state, WalletMarketState) and state.positions
    }
    held = {}
    async for key in client.scan_iter(match=prefix + rules.WALLET_UNIT + "*"):
        state = WalletMarketState.load(await client.get(key))
        if state.positions:
            held[key.decode().removeprefix(prefix)] = dict(state.positions)
    assert held == expected
