"""The simulator's polynode dialect as polynode documents it (feeds.md "polynode"): its own ack,
unsubscribe reply, error codes, heartbeats, filters, snapshots and `since` replays, zlib
compression, pending events, and the free plan's session limit. A plain websockets client
speaking the documented frames drives a simulator served for real on a loopback port."""

from __future__ import annotations

import asyncio
import zlib
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from services.simulator.protocol import (
    Dialect,
    Filters,
    ProtocolError,
    Subscribe,
    parse_client_message,
)
from tests.test_simulator_service import FAKE_A, FAKE_B, SAFETY, Running, simulator

KEY = "polynode-sim-key-3b9c"


def message(action: str, **fields: Any) -> bytes:
    return orjson.dumps({"action": action, **fields})


async def frame(ws: ClientConnection) -> dict[str, Any]:
    """The next frame that is not a heartbeat, inflated when it came compressed."""
    async with asyncio.timeout(SAFETY):
        while True:
            raw = await ws.recv()
            parsed = orjson.loads(zlib.decompress(raw, -15) if isinstance(raw, bytes) else raw)
            if parsed.get("type") != "heartbeat":
                return dict(parsed)


async def subscribed(ws: ClientConnection, **filters: Any) -> dict[str, Any]:
    await ws.send(message("subscribe", type="dome", filters=filters))
    ack = await frame(ws)
    assert ack["type"] == "subscribed" and ack["subscription_type"] == "dome", ack
    assert isinstance(ack["warnings"], list)
    return ack


def polynode_url(run: Running, extra: str = "") -> str:
    return f"{run.ws_base}/ws?key={KEY}{extra}"


async def test_ack_unsubscribed_reply_and_error_codes() -> None:
    async with simulator(api_key=KEY) as run, connect(polynode_url(run)) as ws:
        ack = await subscribed(ws, wallets=[FAKE_A])
        assert ack["warnings"] == []
        await ws.send(message("unsubscribe", subscription_id=ack["subscription_id"]))
        assert await frame(ws) == {
            "type": "unsubscribed",
            "subscription_id": ack["subscription_id"],
        }
        for filters in ({"wallets": [FAKE_A], "side": "HOLD"}, {"users": [FAKE_A]}):
            await ws.send(message("subscribe", type="dome", filters=filters))
            error = await frame(ws)
            assert error["type"] == "error" and error["code"] == "INVALID_FILTERS", error
        await ws.send(message("unsubscribe", subscription_id="sub_nope"))
        assert (await frame(ws))["code"] == "UNKNOWN_SUBSCRIPTION"


async def test_heartbeats_arrive_on_an_idle_connection() -> None:
    async with simulator(api_key=KEY, sim_polynode_heartbeat_s=0.2) as run:
        async with connect(polynode_url(run)) as ws:
            beats = [orjson.loads(await ws.recv()) for _ in range(2)]
        assert all(b["type"] == "heartbeat" and isinstance(b["ts"], int) for b in beats)
        assert beats[1]["ts"] > beats[0]["ts"]


async def test_token_side_and_size_filters() -> None:
    async with simulator(api_key=KEY) as run, connect(polynode_url(run)) as ws:
        await subscribed(ws, wallets=[FAKE_A], tokens=["111"], side="buy", min_size=5, max_size=50)
        trades = await run.emit(
            [
                {"user": FAKE_A, "token_id": "222", "shares_normalized": 10},
                {"user": FAKE_A, "token_id": "111", "side": "SELL", "shares_normalized": 10},
                {"user": FAKE_A, "token_id": "111", "shares_normalized": 4},
                {"user": FAKE_A, "token_id": "111", "shares_normalized": 51},
                {"user": FAKE_A, "token_id": "111", "shares_normalized": 10},
            ]
        )
        event = await frame(ws)
        assert event["data"]["tx_hash"] == trades[-1]["tx_hash"]


async def test_snapshot_and_since_replay_before_live_events_and_since_is_capped_by_the_plan() -> (
    None
):
    async with simulator(api_key=KEY, sim_polynode_plan="free") as run:
        old = await run.emit([{"user": FAKE_A, "price": p} for p in (0.1, 0.2, 0.3)])
        await run.emit([{"user": FAKE_B}])
        async with connect(polynode_url(run)) as ws:
            ack = await subscribed(ws, wallets=[FAKE_A], snapshot_count=2)
            snapshot = await frame(ws)
            assert snapshot["type"] == "snapshot" and snapshot["snapshot_count"] == 2
            assert snapshot["subscription_id"] == ack["subscription_id"]
            assert [e["tx_hash"] for e in snapshot["events"]] == [t["tx_hash"] for t in old[1:]]
            ack = await subscribed(ws, wallets=[FAKE_A], since=100)
            assert any("capped to 30" in w for w in ack["warnings"])
            replayed = [(await frame(ws))["data"]["tx_hash"] for _ in old]
            assert replayed == [t["tx_hash"] for t in old]
            [live] = await run.emit([{"user": FAKE_A}])
            # Both subscriptions get the live fill, once each.
            live_events = [await frame(ws), await frame(ws)]
            assert {e["data"]["tx_hash"] for e in live_events} == {live["tx_hash"]}


async def test_compressed_connections_get_events_as_raw_deflate_and_control_as_text() -> None:
    async with (
        simulator(api_key=KEY) as run,
        connect(polynode_url(run, "&compress=zlib")) as ws,
    ):
        await ws.send(message("subscribe", type="dome", filters={"wallets": [FAKE_A]}))
        ack = await ws.recv()
        assert isinstance(ack, str) and orjson.loads(ack)["type"] == "subscribed"
        [trade] = await run.emit([{"user": FAKE_A}])
        raw = await ws.recv()
        assert isinstance(raw, bytes)
        with pytest.raises(zlib.error):
            zlib.decompress(raw)  # no zlib header: raw deflate
        event = orjson.loads(zlib.decompress(raw, -15))
        assert event["type"] == "event" and event["data"]["tx_hash"] == trade["tx_hash"]


@pytest.mark.parametrize(("status", "confirmed_too"), [("all", True), ("pending", False)])
async def test_pending_events_have_no_block_and_precede_the_confirmed_one(
    status: str, confirmed_too: bool
) -> None:
    async with (
        simulator(api_key=KEY, sim_pending_events=True, sim_pending_lead_s=0.3) as run,
        connect(polynode_url(run)) as ws,
    ):
        await subscribed(ws, wallets=[FAKE_A], status=status)
        response = await run.http.post(
            "/_sim/emit", params={"pending": "1"}, content=orjson.dumps([{"user": FAKE_A}])
        )
        [announced] = response.json()["trades"]
        pending = (await frame(ws))["data"]
        assert pending["block_number"] is None and pending["log_index"] is None
        assert pending["tx_hash"] == announced["tx_hash"] and "status" not in pending
        if confirmed_too:
            confirmed = (await frame(ws))["data"]
            assert confirmed["tx_hash"] == pending["tx_hash"]
            assert isinstance(confirmed["block_number"], int)
        else:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.8):
                    pytest.fail(f"unexpected {await frame(ws)}")


async def test_the_free_plans_session_ends_and_is_refused_until_reset() -> None:
    async with simulator(api_key=KEY, sim_polynode_plan="free", sim_polynode_session_s=0.6) as run:
        async with connect(polynode_url(run)) as ws:
            await subscribed(ws, wallets=[FAKE_A])
            error = await frame(ws)
            assert error["type"] == "error" and error["code"] == "SESSION_LIMIT"
            with pytest.raises(ConnectionClosed) as closed:
                await frame(ws)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4008
            assert "session limit" in closed.value.rcvd.reason
        async with connect(polynode_url(run)) as refused:
            assert (await frame(refused))["code"] == "SESSION_LIMIT"
            with pytest.raises(ConnectionClosed):
                await frame(refused)
        state = await run.http.post("/_sim/polynode", json={"reset_session": True})
        assert state.json()["polynode"]["session_used_s"] == 0
        async with connect(polynode_url(run)) as again:
            await subscribed(again, wallets=[FAKE_A])


def test_polynode_filters_parse_to_the_criteria_they_name() -> None:
    raw = message(
        "subscribe",
        type="dome",
        filters={
            "wallets": [FAKE_A.upper().replace("0X", "0x")],
            "tokens": ["111"],
            "side": "sell",
            "status": "pending",
            "min_size": 1,
            "max_size": 2.5,
            "snapshot_count": 3,
            "since": 20,
        },
    )
    parsed = parse_client_message(raw, 10, Dialect.POLYNODE)
    assert isinstance(parsed, Subscribe)
    assert parsed.filters == Filters(
        users=frozenset({FAKE_A}),
        tokens=frozenset({"111"}),
        side="SELL",
        pending=True,
        confirmed=False,
        min_size=1.0,
        max_size=2.5,
        snapshot_count=3,
        since_s=20.0,
    )
    assert parsed.filters.admits("111", "SELL", 2.0)
    assert not parsed.filters.admits("111", "SELL", 3.0)


@pytest.mark.parametrize(
    ("filters", "code"),
    [
        ({"wallets": [FAKE_A], "status": "maybe"}, "INVALID_FILTERS"),
        ({"wallets": [FAKE_A], "min_size": -1}, "INVALID_FILTERS"),
        ({"wallets": [FAKE_A], "snapshot_count": 1.5}, "INVALID_FILTERS"),
        ({"wallets": [FAKE_A, FAKE_B], "tokens": ["1"]}, "ITEMS_LIMIT"),
    ],
)
def test_bad_polynode_filters_name_their_code(filters: dict[str, Any], code: str) -> None:
    with pytest.raises(ProtocolError) as raised:
        parse_client_message(
            message("subscribe", type="dome", filters=filters), 2, Dialect.POLYNODE
        )
    assert raised.value.code == code
