"""The simulator's RTDS (`WS /rtds`) as a client sees it, over a real socket on loopback: the frame
shape, every quirk, and every failure switch (feeds.md, "Polymarket RTDS activity")."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from eth_utils import is_checksum_address
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from services.ingestor.sources.rtds import subscribe_message
from tests.helpers.ingestion import WALLETS, Sim, simulator, until

QUIET_S = 1.5  # the simulated latency is 0.65 s: a frame not here by then is not coming


@contextlib.asynccontextmanager
async def rtds_socket(sim: Sim) -> AsyncIterator[ClientConnection]:
    async with connect(f"{sim.ws_url}/rtds", close_timeout=0.5) as ws:
        yield ws


async def frames_within(ws: ClientConnection, seconds: float) -> list[str]:
    """Every text frame that arrives within `seconds`."""
    received: list[str] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while True:
                frame = await ws.recv()
                assert isinstance(frame, str)
                received.append(frame)
    return received


def payload_frames(frames: list[str]) -> list[dict[str, Any]]:
    return [m for m in (orjson.loads(f) for f in frames if f.startswith("{")) if "payload" in m]


async def started(sim: Sim) -> None:
    """Start the clock (a subscribe opens the gate), let the bundled tape play out and its
    frames go (they leave 0.65 s after their trades, to whoever is connected then)."""
    async with rtds_socket(sim) as ws:
        await ws.send(subscribe_message())
        await until(lambda: _tape_done(sim), what="tape played")
    await asyncio.sleep(QUIET_S)


async def _tape_done(sim: Sim) -> bool:
    return bool((await sim.status())["tape_done"])


async def test_each_trade_comes_on_both_types_after_the_latency_with_every_quirk() -> None:
    quirks = {
        "sim_rtds_empty_first_frame": True,
        "sim_rtds_checksum_wallets": True,
        "sim_rtds_outcome_index_999_every": 2,
        "sim_rtds_fee_every": 3,
    }
    async with simulator(**quirks) as sim:
        await started(sim)
        async with rtds_socket(sim) as ws:
            assert await ws.recv() == ""  # the empty first frame
            await ws.send(subscribe_message())
            emitted = await sim.emit(WALLETS[:3], 6)
            frames = payload_frames(await frames_within(ws, QUIET_S + 1))
    assert len(frames) == 2 * len(emitted)
    assert {f["type"] for f in frames} == {"trades", "orders_matched"}
    for frame in frames:
        assert frame["topic"] == "activity"
        # Milliseconds in the envelope, seconds in the payload.
        assert frame["timestamp"] > 10**12 and frame["payload"]["timestamp"] < 10**11
        assert frame["timestamp"] / 1000 >= frame["payload"]["timestamp"]
        assert is_checksum_address(frame["payload"]["proxyWallet"])
        assert frame["payload"]["proxyWallet"] != frame["payload"]["proxyWallet"].lower()
    emitted_at = {t["tx_hash"]: t["emitted_at"] for t in emitted}
    assert {f["payload"]["transactionHash"] for f in frames} == set(emitted_at)
    assert any(f["payload"]["outcomeIndex"] == 999 for f in frames)
    assert any(f["payload"]["outcomeIndex"] != 999 for f in frames)
    assert any("fee" in f["payload"] for f in frames)
    assert any("fee" not in f["payload"] for f in frames)
    # The latency: no frame leaves before 0.65 s after its trade was emitted.
    lags = [f["timestamp"] / 1000 - emitted_at[f["payload"]["transactionHash"]] for f in frames]
    assert min(lags) >= 0.65 - 0.01


async def test_a_subscribe_without_action_gets_nothing_and_no_error() -> None:
    async with simulator() as sim:
        await started(sim)
        async with rtds_socket(sim) as ws:
            no_action = orjson.loads(subscribe_message())
            del no_action["action"]
            await ws.send(orjson.dumps(no_action).decode())
            await sim.emit(WALLETS[:2], 4)
            assert await frames_within(ws, QUIET_S) == []
            # The same socket with `action` works: the silence was the missing field.
            await ws.send(subscribe_message())
            await sim.emit(WALLETS[:2], 4)
            assert len(payload_frames(await frames_within(ws, QUIET_S))) == 8


async def test_a_frozen_socket_answers_pings_and_sends_nothing_until_a_new_socket() -> None:
    async with simulator() as sim:
        await started(sim)
        async with rtds_socket(sim) as frozen:
            await frozen.send(subscribe_message())
            state = await sim.post("/_sim/rtds", {"freeze": True})
            assert state["froze"] == 1
            await sim.emit(WALLETS[:2], 4)
            await frozen.send("ping")
            # Protocol pings are answered too: the link looks alive.
            pong = await frozen.ping()
            async with asyncio.timeout(2):
                await pong
            await frozen.send(subscribe_message())  # re-subscribing does not recover it
            assert await frames_within(frozen, QUIET_S) == ["pong"]
            async with rtds_socket(sim) as fresh:
                await fresh.send(subscribe_message())
                await sim.emit(WALLETS[:2], 4)
                assert len(payload_frames(await frames_within(fresh, QUIET_S))) == 8
            assert await frames_within(frozen, 0.2) == []


async def test_trades_silent_while_orders_matched_works() -> None:
    async with simulator(sim_rtds_trades_silent=True) as sim:
        await started(sim)
        async with rtds_socket(sim) as ws:
            await ws.send(subscribe_message())
            await sim.emit(WALLETS[:2], 5)
            frames = payload_frames(await frames_within(ws, QUIET_S))
    assert [f["type"] for f in frames] == ["orders_matched"] * 5


async def test_a_429_at_connect_then_healthy_and_switches_validated() -> None:
    async with simulator() as sim:
        state = await sim.post("/_sim/rtds", {"reject_connects": 1, "retry_after": 2})
        assert state["reject_connects"] == 1
        with pytest.raises(InvalidStatus) as refused:
            async with rtds_socket(sim):
                pass
        assert refused.value.response.status_code == 429
        assert refused.value.response.headers["Retry-After"] == "2"
        async with rtds_socket(sim) as ws:
            await ws.send("ping")
            assert await ws.recv() == "pong"
        state = await sim.get("/_sim/rtds")
        assert (state["handshakes"], state["refused"]) == (2, 1)
        for bad in ({"freeze": "yes"}, {"fee_every": -1}, {"nonsense": 1}, {"trades_silent": 1}):
            response = await sim.http.post("/_sim/rtds", content=orjson.dumps(bad))
            assert response.status_code == 400, bad
