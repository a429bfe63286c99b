"""Pending fills end to end, as real processes on real Redis: the simulator's mempool sends a
pending event ahead of its block, the ingestor (Predexon's or polynode's dialect, asking for
pending events) publishes it pending and then confirmed under one order_key, and the detector
emits ONE signal whose status goes pending -> confirmed under one signal_id. A pending fill
dropped from the mempool is retracted by the ingestor after PENDING_CONFIRM_TIMEOUT_S, and its
signal with it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from devtools.servers import free_port
from shared.models import FillStatus
from shared.streams import Streams
from tests.helpers.processes import ServiceProcess

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

WALLET = "0x" + "7" * 40
TIMEOUT_S = 4
LEAD_S = 1.0
OTHER_MARKET = {
    "price": 0.4,
    "token_id": "12345",
    "market_slug": "another-market",
    "condition_id": "0x" + "ab" * 32,
}


# How the ingestor reads each successor (its client, services/ingestor/dialects.py), asking
# for pending events; `{port}` is the simulator's.
DIALECTS = {
    "predexon": {
        "DOME_DIALECT": "predexon",
        "PREDEXON_STATUS_ALL": "true",
        "DOME_WS_URL": "ws://127.0.0.1:{port}/v1",
    },
    "polynode": {
        "DOME_DIALECT": "polynode",
        "POLYNODE_STATUS_ALL": "true",
        "DOME_WS_URL": "ws://127.0.0.1:{port}/ws",
    },
}


@contextlib.asynccontextmanager
async def pipeline(
    redis_url: str, namespace: str, wallets: Path, dialect: str
) -> AsyncIterator[int]:
    sim_port = free_port()
    base = {"REDIS_URL": redis_url, "STREAM_NAMESPACE": namespace, "WALLETS_FILE": str(wallets)}
    procs: list[ServiceProcess] = []

    def start(name: str, env: dict[str, str], health: str) -> None:
        procs.append(ServiceProcess(name, {**base, **env}, health, tag="pending-"))

    try:
        start(
            "simulator",
            {"SIM_HOST": "127.0.0.1", "SIM_PORT": str(sim_port), "SIM_LOOP": "false"},
            f"http://127.0.0.1:{sim_port}/health",
        )
        ingestor_port, detector_port = free_port(), free_port()
        start(
            "ingestor",
            {
                "OPS_PORT": str(ingestor_port),
                "INGEST_SOURCES": "dome_ws",
                **{k: v.format(port=sim_port) for k, v in DIALECTS[dialect].items()},
                "DOME_API_URL": f"http://127.0.0.1:{sim_port}/v1",
                "PENDING_CONFIRM_TIMEOUT_S": str(TIMEOUT_S),
                "PENDING_SWEEP_INTERVAL_S": "0.2",
            },
            f"http://127.0.0.1:{ingestor_port}/health",
        )
        start(
            "detector", {"OPS_PORT": str(detector_port)}, f"http://127.0.0.1:{detector_port}/health"
        )
        await asyncio.gather(*(asyncio.to_thread(p.wait_healthy) for p in procs))
        yield sim_port
    finally:
        for proc in reversed(procs):
            proc.stop()


async def until(check: Callable[[], Awaitable[bool]], within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


async def read(client: aioredis.Redis, stream: str) -> list[dict[str, Any]]:
    entries: Any = await client.xrange(stream)
    return [orjson.loads(fields[b"data"]) for _, fields in entries]


@pytest.mark.parametrize("dialect", list(DIALECTS))
async def test_one_signal_per_pending_fill_confirmed_or_retracted(
    redis_url: str, namespace: str, redis_client: aioredis.Redis, tmp_path: Path, dialect: str
) -> None:
    wallets = tmp_path / "wallets.json"
    wallets.write_text(json.dumps([{"address": WALLET, "label": "mempool", "score": 0.9}]))
    streams = Streams(namespace=namespace)
    async with (
        pipeline(redis_url, namespace, wallets, dialect) as sim_port,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{sim_port}") as sim,
    ):

        async def subscribed() -> bool:
            return bool((await sim.get("/_sim/subscriptions")).json())

        await until(subscribed, 30, "the ingestor's subscription")
        await sim.post("/_sim/pending", json={"lead_s": LEAD_S})
        fill = {"user": WALLET, "side": "BUY", "shares_normalized": 3000, "price": 0.5}
        confirms = await sim.post(
            "/_sim/emit", params={"pending": "1"}, content=orjson.dumps([fill])
        )
        dropped = await sim.post(
            "/_sim/emit",
            params={"pending": "1", "drop": "1"},
            # Another market: the first fill's cooldowns must not hold its signals back.
            content=orjson.dumps([{**fill, **OTHER_MARKET}]),
        )
        kept_tx = confirms.json()["trades"][0]["tx_hash"]
        lost_tx = dropped.json()["trades"][0]["tx_hash"]

        def statuses(entries: list[dict[str, Any]], tx: str) -> list[str]:
            return [e["status"] for e in entries if e["tx_hash"] == tx]

        async def settled() -> bool:
            orders = await read(redis_client, streams.orders_raw)
            return statuses(orders, kept_tx) == ["pending", "confirmed"] and statuses(
                orders, lost_tx
            ) == ["pending", "retracted"]

        await until(settled, TIMEOUT_S + 20, "pending, confirmed and retracted fills")
        orders = await read(redis_client, streams.orders_raw)
        assert len({o["order_key"] for o in orders if o["tx_hash"] == kept_tx}) == 1
        assert len({o["order_key"] for o in orders if o["tx_hash"] == lost_tx}) == 1
        [retraction] = [o for o in orders if o["status"] == FillStatus.RETRACTED]
        assert "not confirmed within" in retraction["status_reason"]

        kept_keys = {o["order_key"] for o in orders if o["tx_hash"] == kept_tx}
        lost_keys = {o["order_key"] for o in orders if o["tx_hash"] == lost_tx}

        def by_fill(signals: list[dict[str, Any]], keys: set[str]) -> list[tuple[str, str]]:
            return [(s["signal_id"], s["status"]) for s in signals if set(s["order_keys"]) & keys]

        async def signalled() -> bool:
            signals = await read(redis_client, streams.signals)
            kept, lost = by_fill(signals, kept_keys), by_fill(signals, lost_keys)
            return [s for _, s in kept][-1:] == ["confirmed"] and [s for _, s in lost][-1:] == [
                "retracted"
            ]

        await until(signalled, 20, "the signals' confirmation and retraction")
        await asyncio.sleep(1.0)  # anything more would be a second signal
        signals = await read(redis_client, streams.signals)
        kept, lost = by_fill(signals, kept_keys), by_fill(signals, lost_keys)
        # One signal per rule that fired, each first pending, then once confirmed / retracted.
        for entries, last in ((kept, "confirmed"), (lost, "retracted")):
            ids = sorted({signal_id for signal_id, _ in entries})
            assert ids, entries
            for signal_id in ids:
                assert [s for i, s in entries if i == signal_id] == ["pending", last], entries
