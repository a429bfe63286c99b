"""The whole pipeline as real processes on real Redis and Postgres, fed the real tape.

The simulator replays the Nobel 2025 tape (all 1,000 trades, 20 of its wallets tracked); a WebSocket
client on the notifier collects signals. At the end: every tracked-wallet trade is in `orders`
exactly once, the signals the client got are exactly those in `signals` (table and stream),
malformed frames were rejected with a reason while streaming went on, and the Dome key is in no
log line.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import redis.asyncio as aioredis
import websockets

from devtools.servers import free_port
from shared.models import order_key
from shared.wallets import load_wallets
from tests.helpers.processes import ServiceProcess

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

ROOT = Path(__file__).resolve().parent.parent
WALLETS = ROOT / "config" / "wallets.example.json"
BAD_FRAMES = [
    b"{not json",
    orjson.dumps({"type": "event", "subscription_id": "sub_x", "data": {"side": "BUY"}}),
    orjson.dumps(
        {
            "type": "event",
            "subscription_id": "sub_x",
            "data": {
                "token_id": "1",
                "side": "BUY",
                "shares_normalized": 5,
                "price": "0.5",
                "tx_hash": "0xab",
                "timestamp": 1760086772,
                "user": "0xe8dd7741ccb12350957ec71e9ee332e0d1e6ec86",
            },
        }
    ),
]


class Pipeline:
    def __init__(
        self,
        redis_url: str,
        database_url: str,
        namespace: str,
        env: dict[str, str] | None = None,
        detectors: int = 1,
    ) -> None:
        self.key = "e2e" + secrets.token_hex(12)
        self.sim_port, self.notifier_port = free_port(), free_port()
        self.namespace = namespace
        self.env = {
            "REDIS_URL": redis_url,
            "DATABASE_URL": database_url,
            "STREAM_NAMESPACE": namespace,
            "LOG_LEVEL": "DEBUG",
            "WALLETS_FILE": str(WALLETS),
            **(env or {}),
        }
        self.detectors = detectors
        self.procs: list[ServiceProcess] = []

    @property
    def sim_url(self) -> str:
        return f"http://127.0.0.1:{self.sim_port}"

    async def start(self, name: str, env: dict[str, str], health_url: str) -> ServiceProcess:
        proc = ServiceProcess(name, {**self.env, **env}, health_url, tag="e2e-")
        self.procs.append(proc)
        await asyncio.to_thread(proc.wait_healthy)
        return proc

    async def start_ops_service(self, name: str) -> ServiceProcess:
        port = free_port()
        return await self.start(name, {"OPS_PORT": str(port)}, f"http://127.0.0.1:{port}/health")

    def stop_all(self) -> dict[str, int]:
        return {
            f"{p.name}#{i}": p.stop(signal.SIGTERM)
            for i, p in reversed(list(enumerate(self.procs)))
        }


@pytest.fixture
async def pipeline(
    redis_url: str, database_url: str, namespace: str, redis_client: aioredis.Redis
) -> AsyncIterator[Pipeline]:
    pipe = Pipeline(redis_url, database_url, namespace)
    try:
        yield pipe
    finally:
        pipe.stop_all()


async def _collect(url: str, into: list[dict[str, Any]], ready: asyncio.Event) -> None:
    async with websockets.connect(url) as socket:
        ready.set()
        async for raw in socket:
            message = orjson.loads(raw)
            if message.get("type") == "signal":
                into.append(message)


async def _until(predicate: Any, within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {within_s}s waiting for {what}")


async def test_tape_flows_end_to_end_exactly_once(
    pipeline: Pipeline, redis_client: aioredis.Redis, database_url: str, namespace: str
) -> None:
    await tape_end_to_end(pipeline, redis_client, database_url, namespace)


async def tape_end_to_end(
    pipeline: Pipeline, redis_client: aioredis.Redis, database_url: str, namespace: str
) -> None:
    """The tape through every service: each tracked fill stored once, each signal delivered,
    stored and streamed once, malformed frames dead-lettered, no key in any log."""
    await pipeline.start(
        "simulator",
        {
            "SIM_HOST": "127.0.0.1",
            "SIM_PORT": str(pipeline.sim_port),
            "SIM_SPEED": "400",
            "SIM_LOOP": "false",
            "SIM_API_KEY": pipeline.key,
        },
        f"{pipeline.sim_url}/health",
    )
    await pipeline.start_ops_service("store")
    for _ in range(pipeline.detectors):
        await pipeline.start_ops_service("detector")
    await pipeline.start(
        "notifier",
        {"NOTIFIER_PORT": str(pipeline.notifier_port)},
        f"http://127.0.0.1:{pipeline.notifier_port}/health",
    )
    received: list[dict[str, Any]] = []
    ready = asyncio.Event()
    client = asyncio.ensure_future(
        _collect(f"ws://127.0.0.1:{pipeline.notifier_port}/ws", received, ready)
    )
    await asyncio.wait_for(ready.wait(), 10)
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

    async with httpx.AsyncClient(base_url=pipeline.sim_url, timeout=5) as sim:

        async def started() -> bool:
            return bool((await sim.get("/_sim/status")).json()["started"])

        await _until(started, 20, "the ingestor's subscription to start the tape")
        for frame in BAD_FRAMES:
            assert (await sim.post("/_sim/inject", content=frame)).status_code < 300

        async def tape_done() -> bool:
            return bool((await sim.get("/_sim/status")).json()["tape_done"])

        await _until(tape_done, 60, "the simulator to finish the tape")
        trades = (await sim.get("/_sim/trades")).json()

    tracked = {w.address for w in load_wallets(WALLETS)}
    expected_keys = {
        order_key(
            t["tx_hash"], t["user"], t["token_id"], t["side"], t["shares_normalized"], t["price"]
        )
        for t in trades
        if t["user"].lower() in tracked
    }
    assert len(trades) == 1000 and len(expected_keys) > 300

    db = await asyncpg.connect(database_url)
    try:

        async def orders_stored() -> bool:
            count = await db.fetchval("SELECT count(*) FROM orders")
            return bool(count >= len(expected_keys))

        await _until(orders_stored, 60, "every tracked order in Postgres")
        stored_keys = [r["order_key"] for r in await db.fetch("SELECT order_key FROM orders")]
        assert sorted(stored_keys) == sorted(expected_keys)

        stream_ids = {orderless_id(e) for e in await redis_client.xrange(f"{namespace}signals")}

        async def signals_settled() -> bool:
            stored = await db.fetchval("SELECT count(*) FROM signals")
            return bool(stored == len(stream_ids) and len(received) == len(stream_ids))

        await _until(signals_settled, 30, "signals stored and delivered")
        stored_signals = {r["signal_id"] for r in await db.fetch("SELECT signal_id FROM signals")}
    finally:
        await db.close()

    delivered = [m["signal"]["signal_id"] for m in received]
    assert len(delivered) == len(set(delivered)), "a signal reached the client twice"
    assert set(delivered) == stored_signals == stream_ids
    kinds = {m["signal"]["kind"] for m in received}
    assert {"trader_entry", "whale_order"} <= kinds
    assert all(set(m["signal"]["order_keys"]) <= expected_keys for m in received)

    dead = await redis_client.xrange(f"{namespace}orders.dead")
    assert len(dead) == len(BAD_FRAMES)
    assert all(entry[b"reason"] for _, entry in dead)

    client.cancel()
    exit_codes = pipeline.stop_all()
    assert exit_codes == dict.fromkeys(exit_codes, 0), exit_codes
    ingestor_log = next(p for p in pipeline.procs if p.name == "ingestor").log_text()
    assert ingestor_log.count("frame_rejected") >= len(BAD_FRAMES)
    for proc in pipeline.procs:
        assert pipeline.key not in proc.log_text(), f"the Dome key leaked into {proc.name}'s log"


def orderless_id(entry: tuple[bytes, dict[bytes, bytes]]) -> str:
    """The signal_id of a `signals` stream entry, read as any plain client would."""
    return str(orjson.loads(entry[1][b"data"])["signal_id"])
