"""The ingestor against the real simulator (in-process, on a free port) and real Redis: starting
both, driving the simulator's faults, and comparing `orders.raw` with the simulator's ground truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from services.ingestor.service import Ingestor
from services.ingestor.settings import IngestorSettings
from services.simulator.main import Simulator
from services.simulator.settings import SimulatorSettings
from shared.models import order_key
from shared.streams import Streams
from shared.wallets import load_wallets

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-dome-test-7d41c0a9e3b2f6d8"
WALLETS = [w.address for w in load_wallets(ROOT / "config" / "wallets.example.json")]
SAFETY_S = 20.0  # only turns a hang into a failure; never asserts speed


async def until(check: Callable[[], Any], within_s: float = SAFETY_S, what: str = "") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"not met within {within_s}s: {what or check}")
        await asyncio.sleep(0.02)


@dataclass
class Sim:
    sim: Simulator
    http: httpx.AsyncClient
    port: int

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def post(self, path: str, body: Any = None) -> Any:
        response = await self.http.post(path, content=orjson.dumps(body) if body else b"")
        assert response.status_code == 200, response.text
        return response.json()

    async def post_raw(self, path: str, body: str | bytes) -> Any:
        response = await self.http.post(path, content=body)
        assert response.status_code == 200, response.text
        return response.json()

    async def get(self, path: str, **params: Any) -> Any:
        response = await self.http.get(path, params=params)
        assert response.status_code == 200, response.text
        return response.json()

    async def emit(self, wallets: Iterable[str], count: int) -> list[dict[str, Any]]:
        """`count` fresh trades, round-robin over `wallets`, emitted now."""
        chosen = list(itertools.islice(itertools.cycle(wallets), count))
        body = await self.post("/_sim/emit", [{"user": wallet} for wallet in chosen])
        return list(body["trades"])

    async def truth(self, wallets: Iterable[str]) -> list[str]:
        """order_keys of every emitted trade of these wallets (the ground truth): identical
        fills of one transaction told apart by their occurrence, trades a quirk stamped wrongly
        (`quirk`: they must be dead-lettered) left out."""
        tracked = set(wallets)
        seen: Counter[str] = Counter()
        keys = []
        for trade in await self.get("/_sim/trades"):
            base = truth_key(trade)
            occurrence = seen[base]
            seen[base] += 1
            if trade["user"] in tracked and not trade.get("quirk"):
                keys.append(truth_key(trade, occurrence))
        return keys

    async def status(self) -> dict[str, Any]:
        return dict(await self.get("/_sim/status"))

    async def subscriptions(self) -> list[dict[str, Any]]:
        return list(await self.get("/_sim/subscriptions"))


def truth_key(trade: dict[str, Any], occurrence: int = 0) -> str:
    return order_key(
        trade["tx_hash"],
        trade["user"],
        trade["token_id"],
        trade["side"],
        trade["shares_normalized"],
        trade["price"],
        occurrence=occurrence,
    )


@contextlib.asynccontextmanager
async def simulator(**overrides: Any) -> AsyncIterator[Sim]:
    values: dict[str, Any] = {
        "_env_file": None,
        "sim_host": "127.0.0.1",
        "sim_port": 0,
        "sim_speed": 5000.0,
        "sim_loop": False,
        "sim_api_key": KEY,
        **overrides,
    }
    sim = Simulator(SimulatorSettings(**values))
    stop = asyncio.Event()
    task = asyncio.create_task(sim.run(stop))
    await sim.listening.wait()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{sim.port}", timeout=10) as http:
            yield Sim(sim, http, sim.port)
    finally:
        stop.set()
        await task


def ingestor_settings(
    sim: Sim, redis_url: str, namespace: str, **overrides: Any
) -> IngestorSettings:
    values: dict[str, Any] = {
        "_env_file": None,
        "redis_url": redis_url,
        "stream_namespace": namespace,
        "dome_ws_url": sim.ws_url,
        "dome_api_url": f"{sim.base_url}/v1",
        "data_api_url": sim.base_url,
        "dome_api_key": KEY,
        "dome_reconnect_min_s": 0.05,
        "dome_reconnect_max_s": 0.3,
        "dome_close_timeout_s": 0.3,
        "dome_rest_rate_per_s": 1000,
        "dome_rest_rate_per_10s": 100_000,
        "data_api_rate_per_s": 1000,
        "data_api_rate_per_10s": 100_000,
        "dome_poll_interval_s": 0.05,
        "data_api_poll_interval_s": 0.05,
        "status_interval_s": 0.05,
        "ops_port": 0,
        "shutdown_flush_timeout_s": 5,
        **overrides,
    }
    return IngestorSettings(**values)


@contextlib.asynccontextmanager
async def running(settings: IngestorSettings) -> AsyncIterator[Ingestor]:
    ingestor = Ingestor(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(ingestor.run(stop))
    try:
        await until(lambda: ingestor.sources or task.done(), what="ingestor started")
        if task.done():
            task.result()
        yield ingestor
    finally:
        stop.set()
        left = await asyncio.wait_for(task, 30)
    assert left == 0


async def raw_keys(client: aioredis.Redis, streams: Streams) -> list[str]:
    entries = await client.xrange(streams.orders_raw)
    return [orjson.loads(fields[b"data"])["order_key"] for _, fields in entries]


async def raw_payloads(client: aioredis.Redis, streams: Streams) -> list[dict[str, Any]]:
    entries = await client.xrange(streams.orders_raw)
    return [orjson.loads(fields[b"data"]) for _, fields in entries]


async def converge(
    sim: Sim, client: aioredis.Redis, streams: Streams, wallets: Iterable[str]
) -> list[str]:
    """Wait until orders.raw holds exactly the ground truth's keys; assert no key twice."""
    tracked = list(wallets)
    state: dict[str, Any] = {}

    async def same() -> bool:
        state["truth"] = await sim.truth(tracked)
        state["raw"] = await raw_keys(client, streams)
        return sorted(state["raw"]) == sorted(state["truth"])

    try:
        await until(same, what="orders.raw == ground truth")
    except AssertionError:
        missing = set(state["truth"]) - set(state["raw"])
        extra = set(state["raw"]) - set(state["truth"])
        raise AssertionError(f"missing {len(missing)}, extra {len(extra)}") from None
    keys: list[str] = state["raw"]
    assert len(keys) == len(set(keys)), "an order_key was published twice"
    assert keys, "the ground truth is empty: the test proves nothing"
    return keys


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def subscribed(ingestor: Ingestor, subscriptions: int | None = None) -> None:
    """Every WebSocket connection open with all its subscribes acknowledged."""

    def ready() -> bool:
        source = ingestor.websocket
        if source is None or not source.connections:
            return False
        status = source.status
        done = status.connected and status.pending_subscribes == 0 and status.subscriptions > 0
        return done and (subscriptions is None or status.subscriptions == subscriptions)

    await until(ready, what="subscribed")


async def caught_up(ingestor: Ingestor) -> None:
    """Every WebSocket connection's confirmed wallets backfilled since it opened."""

    def ready() -> bool:
        source = ingestor.websocket
        assert source is not None
        return all(
            conn.registry.confirmed() <= conn.caught_up and conn.status.connected
            for conn in source.connections
        )

    await until(ready, what="backfill complete")
