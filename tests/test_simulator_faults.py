"""The simulator's fault injection, polynode dialect and Data API endpoint, served for real on a
loopback port and driven with a websockets client and httpx (see test_simulator_service.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from services.simulator.protocol import (
    Dialect,
    Filters,
    ProtocolError,
    Subscribe,
    Unsubscribe,
    Update,
    parse_client_message,
)
from services.simulator.trades import ORDER_FIELDS
from tests.test_simulator_service import (
    FAKE_A,
    FAKE_B,
    SAFETY,
    receive,
    simulator,
    subscribe,
    without_emitted_at,
)

KEY = "sim-fault-key-4f2a9c"
DATA_API_FIELDS = {
    "proxyWallet", "side", "asset", "conditionId", "size", "price", "timestamp", "title", "slug",
    "icon", "eventSlug", "outcome", "outcomeIndex", "name", "pseudonym", "bio", "profileImage",
    "profileImageOptimized", "transactionHash",
}  # fmt: skip


def polynode(action: str, **fields: Any) -> bytes:
    return orjson.dumps({"action": action, **fields})


def test_the_polynode_dialect_parses_its_own_shape_only() -> None:
    subscribe_msg = polynode(
        "subscribe", type="dome", filters={"wallets": [FAKE_A.upper()[:2] + FAKE_A[2:]]}
    )
    assert parse_client_message(subscribe_msg, 10, Dialect.POLYNODE) == Subscribe(
        Filters(users=frozenset({FAKE_A}))
    )
    update = polynode("update", type="dome", subscription_id="sub_x", filters={"slugs": ["s"]})
    assert parse_client_message(update, 10, Dialect.POLYNODE) == Update(
        "sub_x", Filters(market_slugs=frozenset({"s"}))
    )
    unsubscribe = polynode("unsubscribe", subscription_id="sub_x")
    assert parse_client_message(unsubscribe, 10, Dialect.POLYNODE) == Unsubscribe("sub_x")
    for raw, dialect, reason in (
        (
            polynode("subscribe", type="orders", filters={"wallets": [FAKE_A]}),
            Dialect.POLYNODE,
            'type must be "dome"',
        ),
        (
            polynode("subscribe", type="dome", filters={"users": [FAKE_A]}),
            Dialect.POLYNODE,
            "unknown filter",
        ),
        (subscribe_msg, Dialect.DOME, "platform"),
    ):
        with pytest.raises(ProtocolError, match=reason):
            parse_client_message(raw, 10, dialect)


async def test_the_polynode_path_takes_the_key_in_the_query_and_streams_events() -> None:
    async with simulator(api_key=KEY) as run:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"{run.ws_base}/ws?key=wrong"):
                pass
        assert refused.value.response.status_code == 401
        async with connect(f"{run.ws_base}/ws?key={KEY}") as ws:
            await ws.send(polynode("subscribe", type="dome", filters={"wallets": [FAKE_A]}))
            ack = await receive(ws)
            # polynode's own ack (its SDK's `subscribed`), not Dome's.
            assert ack["type"] == "subscribed" and ack["subscription_type"] == "dome"
            [trade] = await run.emit([{"user": FAKE_A}])
            event = await receive(ws)
            assert event["subscription_id"] == ack["subscription_id"]
            assert event["data"] == without_emitted_at(trade)
            # The Dome shape is not this path's dialect.
            await ws.send(
                orjson.dumps(
                    {
                        "action": "subscribe",
                        "platform": "polymarket",
                        "version": 1,
                        "type": "orders",
                        "filters": {"users": [FAKE_A]},
                    }
                )
            )
            assert (await receive(ws))["type"] == "error"


async def test_a_stalled_socket_sends_nothing_and_answers_no_ping_but_stays_open() -> None:
    async with (
        simulator() as run,
        connect(f"{run.ws_base}/key", ping_interval=None, close_timeout=0.1) as ws,
    ):
        await subscribe(ws, users=[FAKE_A])
        assert (await run.http.post("/_sim/stall")).json() == {"stalled": 1}
        status = await run.status()
        assert (status["clients"], status["subscriptions"]) == (0, 0)
        await run.emit([{"user": FAKE_A}])
        pong = await ws.ping()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(pong), 0.5)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.2)
        assert ws.state.name == "OPEN"
        # A new connection is healthy.
        async with connect(f"{run.ws_base}/key") as fresh:
            await subscribe(fresh, users=[FAKE_A])
            [trade] = await run.emit([{"user": FAKE_A}])
            assert (await receive(fresh))["data"]["tx_hash"] == trade["tx_hash"]


async def test_rejected_auth_refuses_handshakes_and_rest_and_can_close_with_4001() -> None:
    async with simulator(api_key=KEY) as run:
        headers = {"Authorization": f"Bearer {KEY}"}
        async with connect(f"{run.ws_base}/{KEY}") as ws:
            await subscribe(ws, users=[FAKE_A])
            body = (await run.http.post("/_sim/auth", json={"reject": True, "drop": True})).json()
            assert body == {"reject": True, "dropped": 1}
            with pytest.raises(ConnectionClosed) as closed:
                await receive(ws)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
            assert "unauthorized" in closed.value.rcvd.reason
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"{run.ws_base}/{KEY}"):
                pass
        assert refused.value.response.status_code == 401
        rest = await run.http.get("/v1/polymarket/orders", headers=headers)
        assert rest.status_code == 401 and rest.json()["error"] == "unauthorized"
        await run.http.post("/_sim/auth", json={"reject": False})
        assert (await run.http.get("/v1/polymarket/orders", headers=headers)).status_code == 200
        async with connect(f"{run.ws_base}/{KEY}") as ws:
            await subscribe(ws, users=[FAKE_A])
        bad = await run.http.post("/_sim/auth", json={"reject": "yes"})
        assert bad.status_code == 400


async def test_the_next_requests_get_429_with_retry_after_on_both_rest_endpoints() -> None:
    async with simulator() as run:
        state = await run.http.post("/_sim/rate_limit", json={"requests": 2, "retry_after": 3})
        assert state.json()["throttle_left"] == 2
        first = await run.http.get("/v1/polymarket/orders")
        second = await run.http.get("/trades", params={"user": FAKE_A})
        third = await run.http.get("/trades", params={"user": FAKE_A})
        for response in (first, second):
            assert response.status_code == 429 and response.headers["retry-after"] == "3"
            assert response.json()["error"] == "rate_limited"
        assert third.status_code == 200
        log = (await run.http.get("/_sim/requests")).json()
        assert [(r["path"], r["status"]) for r in log] == [
            ("/v1/polymarket/orders", 429),
            ("/trades", 429),
            ("/trades", 200),
        ]
        assert log[2]["params"] == {"user": FAKE_A} and "authorization" not in str(log).lower()
        await run.http.post("/_sim/rate_limit", json={"requests": 1, "retry_after": 0.5})
        assert (await run.http.get("/trades")).headers["retry-after"] == "0.5"
        assert (await run.http.post("/_sim/rate_limit", json={"requests": -1})).status_code == 400


async def test_the_data_api_lists_a_wallets_trades_newest_first_with_offsets() -> None:
    async with simulator() as run:
        emitted = await run.emit([{"user": FAKE_A, "timestamp": 1000 + i} for i in range(5)])
        await run.emit([{"user": FAKE_B}])
        page = (
            await run.http.get(
                "/trades",
                params={
                    "user": FAKE_A.upper().replace("0X", "0x"),
                    "limit": 2,
                    "offset": 1,
                    "takerOnly": "false",
                },
            )
        ).json()
        assert [t["timestamp"] for t in page] == [1003, 1002]
        assert set(page[0]) == DATA_API_FIELDS
        newest = emitted[-1]
        [item] = (await run.http.get("/trades", params={"user": FAKE_A, "limit": 1})).json()
        assert (item["proxyWallet"], item["asset"], item["size"], item["transactionHash"]) == (
            newest["user"],
            newest["token_id"],
            newest["shares_normalized"],
            newest["tx_hash"],
        )
        assert (item["conditionId"], item["slug"], item["outcome"]) == (
            newest["condition_id"],
            newest["market_slug"],
            newest["token_label"],
        )
        # takerOnly=true (the default) returns the same rows: the tape holds one side of a trade.
        taker = (await run.http.get("/trades", params={"user": FAKE_A})).json()
        assert (
            taker
            == (await run.http.get("/trades", params={"user": FAKE_A, "takerOnly": "false"})).json()
        )
        assert len(taker) == 5
        assert (await run.http.get("/trades", params={"limit": 0})).json() == []
        for params in ({"takerOnly": "maybe"}, {"limit": 10_001}, {"offset": -1}, {"side": "HOLD"}):
            response = await run.http.get("/trades", params=params)
            assert response.status_code == 400 and response.json()["error"] == "bad_request"
        assert tuple(newest) == (*ORDER_FIELDS, "emitted_at")


async def test_stalled_sockets_do_not_hold_up_shutdown() -> None:
    async with simulator() as run:
        ws = await connect(f"{run.ws_base}/key", ping_interval=None, close_timeout=0.1)
        await subscribe(ws, users=[FAKE_A])
        await run.http.post("/_sim/stall")
    # The simulator has stopped (the context exited) and aborted the stalled socket.
    async with asyncio.timeout(SAFETY):
        with pytest.raises(ConnectionClosed):
            await ws.recv()
