"""The simulator's Predexon dialect (`/v1/<key>`, feeds.md "Predexon") and the mempool's pending
events, served for real on a loopback port and driven with a plain websockets client speaking the
documented frames."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from services.simulator.trades import ORDER_FIELDS
from tests.test_simulator_service import FAKE_A, FAKE_B, SAFETY, Running, receive, simulator

KEY = "predexon-sim-key-7d1e"
PREDEXON_FIELDS = {
    "event_type", "status", "role", "fee", "version", "builder", "metadata", "outcome_index",
    "is_neg_risk",
}  # fmt: skip


def dome_subscribe(**filters: Any) -> bytes:
    return orjson.dumps(
        {
            "action": "subscribe",
            "platform": "polymarket",
            "version": 1,
            "type": "orders",
            "filters": filters,
        }
    )


async def open_predexon(run: Running) -> ClientConnection:
    ws = await connect(f"{run.ws_base}/v1/{KEY}")
    greeting = await receive(ws)
    assert greeting["type"] == "connected" and isinstance(greeting["message"], str)
    return ws


async def subscribed(ws: ClientConnection, **filters: Any) -> str:
    await ws.send(dome_subscribe(**filters))
    ack = await receive(ws)
    assert ack["type"] == "ack" and ack["channel"] == "trades", ack
    return str(ack["subscription_id"])


async def nothing_within(ws: ClientConnection, seconds: float) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(seconds):
            frame = await ws.recv()
            pytest.fail(f"unexpected frame {frame!r}")


async def test_greeting_ack_and_events_carry_predexons_fields() -> None:
    async with simulator(api_key=KEY) as run:
        ws = await open_predexon(run)
        async with ws:
            sub_id = await subscribed(ws, users=[FAKE_A])
            [trade] = await run.emit([{"user": FAKE_A, "token_label": "No"}])
            event = await receive(ws)
        assert event["type"] == "event" and event["subscription_id"] == sub_id
        data = event["data"]
        assert set(ORDER_FIELDS) | PREDEXON_FIELDS <= set(data)
        assert data["tx_hash"] == trade["tx_hash"] and data["user"] == FAKE_A
        assert data["log_index"] == hex(trade["log_index"])  # a hex string, unlike Dome's
        assert data["block_number"] == trade["block_number"]
        assert (data["event_type"], data["status"], data["version"]) == (
            "order_filled",
            "confirmed",
            2,
        )
        # The default taker is the exchange contract: the wallet's own order was the taker.
        assert data["role"] == "taker" and data["outcome_index"] == 1
        assert data["is_neg_risk"] is False


async def test_pending_comes_first_only_with_status_all_and_a_dropped_one_never_confirms() -> None:
    async with simulator(api_key=KEY) as run:
        answer = await run.http.post("/_sim/pending", json={"enabled": True, "lead_s": 0.4})
        assert answer.json()["pending"] == {"enabled": True, "lead_s": 0.4, "drop_every": 0}
        everything, confirmed_only = await open_predexon(run), await open_predexon(run)
        async with everything, confirmed_only:
            await subscribed(everything, users=[FAKE_A], status="all")
            await subscribed(confirmed_only, users=[FAKE_A])
            response = await run.http.post(
                "/_sim/emit", params={"pending": "1"}, content=orjson.dumps([{"user": FAKE_A}])
            )
            [announced] = response.json()["trades"]
            pending = (await receive(everything))["data"]
            assert (pending["status"], pending["block_number"], pending["log_index"]) == (
                "pending",
                None,
                None,
            )
            assert pending["tx_hash"] == announced["tx_hash"]
            confirmed = (await receive(everything))["data"]
            assert confirmed["status"] == "confirmed" and confirmed["tx_hash"] == pending["tx_hash"]
            assert isinstance(confirmed["block_number"], int)
            # Confirmed only: the same fill once, in its block.
            only = (await receive(confirmed_only))["data"]
            assert only["status"] == "confirmed" and only["tx_hash"] == pending["tx_hash"]

            dropped = await run.http.post(
                "/_sim/emit",
                params={"pending": "1", "drop": "1"},
                content=orjson.dumps([{"user": FAKE_A, "price": 0.31}]),
            )
            [lost] = dropped.json()["trades"]
            assert lost["dropped"] is True
            assert (await receive(everything))["data"]["status"] == "pending"
            await nothing_within(everything, 1.2)
            await nothing_within(confirmed_only, 0.1)
        truth = {t["tx_hash"] for t in await run.truth(FAKE_A)}
        assert announced["tx_hash"] in truth and lost["tx_hash"] not in truth
        rest = (await run.orders(user=FAKE_A)).json()["orders"]
        assert lost["tx_hash"] not in {o["tx_hash"] for o in rest}
        mempool = (await run.http.get("/_sim/mempool")).json()
        assert [t["tx_hash"] for t in mempool["dropped"]] == [lost["tx_hash"]]


async def test_drop_every_makes_every_nth_scheduled_pending_fill_vanish() -> None:
    async with simulator(
        api_key=KEY, sim_pending_events=True, sim_pending_lead_s=0.2, sim_pending_drop_every=3
    ) as run:
        ws = await open_predexon(run)
        async with ws:
            await subscribed(ws, users=["0x" + "0" * 40])  # starts the clock
            await run.tape_done()
            await asyncio.sleep(0.5)  # the last confirmations
        mempool = (await run.http.get("/_sim/mempool")).json()
        truth = {t["tx_hash"] for t in await run.truth()}
        assert mempool["announced"] and len(mempool["dropped"]) == len(mempool["announced"]) // 3
        dropped = {t["tx_hash"] for t in mempool["dropped"]}
        assert not dropped & truth
        assert {t["tx_hash"] for t in mempool["announced"]} - dropped <= truth


@pytest.mark.parametrize(
    ("filters", "code"),
    [
        ({"users": [FAKE_A], "status": "maybe"}, "INVALID_FILTERS"),
        ({"wallets": [FAKE_A]}, "INVALID_FILTERS"),
        ({"users": [f"0x{i:040x}" for i in range(11)]}, "ITEMS_LIMIT"),
    ],
)
async def test_errors_carry_predexons_codes(filters: dict[str, Any], code: str) -> None:
    async with simulator(api_key=KEY, sim_predexon_plan="dev") as run:
        ws = await open_predexon(run)
        async with ws:
            await ws.send(dome_subscribe(**filters))
            error = await receive(ws)
            assert error["type"] == "error" and error["code"] == code, error
            assert error["message"]
            await subscribed(ws, users=[FAKE_A])  # the connection stays up


async def test_the_dev_plan_allows_ten_subscriptions_a_connection_and_the_switch_lifts_it() -> None:
    async with simulator(api_key=KEY, sim_predexon_plan="dev") as run:
        ws = await open_predexon(run)
        async with ws:
            for _ in range(10):
                await subscribed(ws, users=[FAKE_A])
            await ws.send(dome_subscribe(users=[FAKE_B]))
            assert (await receive(ws))["code"] == "CONNECTION_LIMIT"
            await run.http.post("/_sim/predexon", json={"plan": "pro"})
            await subscribed(ws, users=[FAKE_B])


async def test_event_types_alternate_and_fee_refunds_are_not_fills() -> None:
    async with simulator(api_key=KEY, sim_predexon_event_type="alternate") as run:
        answer = await run.http.post("/_sim/predexon", json={"fee_refund_every": 1})
        assert answer.json()["predexon"]["fee_refund_every"] == 1
        ws = await open_predexon(run)
        async with ws:
            await subscribed(ws, users=[FAKE_A])
            [trade] = await run.emit([{"user": FAKE_A, "shares_normalized": 100, "price": 0.5}])
            fill, refund = await receive(ws), await receive(ws)
        assert {fill["type"], refund["type"]} == {"event", "trade"}
        assert fill["data"]["event_type"] == "order_filled"
        assert refund["data"]["event_type"] == "fee_refund"
        assert refund["data"]["tx_hash"] == trade["tx_hash"]
        assert refund["data"]["shares"] != trade["shares"]  # taken for a fill, it would be wrong
        assert int(refund["data"]["log_index"], 16) == trade["log_index"] + 1


async def test_server_pings_and_closes_a_connection_that_never_subscribes() -> None:
    async with simulator(
        api_key=KEY, sim_predexon_ping_s=0.2, sim_predexon_idle_close_s=1.0
    ) as run:
        idle, busy = await open_predexon(run), await open_predexon(run)
        pings: list[bytes] = []
        receive_frame = busy.protocol.recv_frame

        def counting(frame: Any) -> None:
            if frame.opcode.name == "PING":
                pings.append(bytes(frame.data))
            receive_frame(frame)

        busy.protocol.recv_frame = counting  # type: ignore[method-assign]
        left = await open_predexon(run)
        async with busy:
            await subscribed(busy, users=[FAKE_A])
            await left.send(
                orjson.dumps(
                    {
                        "action": "unsubscribe",
                        "version": 1,
                        "subscription_id": await subscribed(left, users=[FAKE_A]),
                    }
                )
            )
            for quiet in (idle, left):  # never subscribed; no subscription any more
                async with asyncio.timeout(SAFETY):
                    with pytest.raises(ConnectionClosed) as closed:
                        await quiet.recv()
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
                assert "no subscription" in closed.value.rcvd.reason
            await asyncio.sleep(0.3)
            await busy.ping()  # still open after the idle bound
        assert len(pings) >= 3
