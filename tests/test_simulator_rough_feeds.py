"""The simulator's rough-feed switches (issue 16), served for real on a loopback port: per-wallet
REST failures (`/_sim/rest_fail`), REST indexing lag (`/_sim/rest_lag`, SIM_REST_INDEX_LAG_S) and
updates applied late (`/_sim/update_delay`, SIM_UPDATE_DELAY_S)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.test_simulator_service import FAKE_A, FAKE_B, FAKE_C, receive, simulator, subscribe


def _users(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [order["user"] for order in response.json()["orders"]]


async def test_rest_fail_breaks_one_wallets_orders_until_cleared() -> None:
    async with simulator() as run:
        await run.emit([{"user": FAKE_A}, {"user": FAKE_A}, {"user": FAKE_B}])
        state = await run.http.post("/_sim/rest_fail", json={"user": FAKE_A, "status": 500})
        assert state.json()["rest_failures"][FAKE_A]["status"] == 500
        failed = await run.orders(user=FAKE_A.upper().replace("0X", "0x"))
        assert failed.status_code == 500 and failed.json()["error"] == "simulated_failure"
        assert _users(await run.orders(user=FAKE_B)) == [FAKE_B]

        body = {"user": FAKE_A, "no_pagination_key": True}
        assert (await run.http.post("/_sim/rest_fail", json=body)).status_code == 200
        broken = (await run.orders(user=FAKE_A, limit=1)).json()
        assert len(broken["orders"]) == 1
        assert broken["pagination"]["has_more"] is True
        assert broken["pagination"]["pagination_key"] is None

        await run.http.post("/_sim/rest_fail", json={"user": "*", "status": 503})
        assert (await run.orders(user=FAKE_B)).status_code == 503
        await run.http.post("/_sim/rest_fail", json={"user": "*", "clear": True})
        await run.http.post("/_sim/rest_fail", json={"user": FAKE_A, "clear": True})
        assert _users(await run.orders(user=FAKE_A)) == [FAKE_A, FAKE_A]
        assert (await run.http.get("/_sim/faults")).json()["rest_failures"] == {}


async def test_rest_fail_can_hold_an_answer_past_a_clients_timeout() -> None:
    async with simulator() as run:
        await run.emit([{"user": FAKE_A}, {"user": FAKE_B}])
        await run.http.post("/_sim/rest_fail", json={"user": FAKE_A, "hang_s": 0.5})
        with pytest.raises(httpx.ReadTimeout):
            await run.http.get("/v1/polymarket/orders", params={"user": FAKE_A}, timeout=0.1)
        assert _users(await run.orders(user=FAKE_B)) == [FAKE_B]
        # A patient client still gets the orders.
        assert _users(await run.orders(user=FAKE_A)) == [FAKE_A]


@pytest.mark.parametrize(
    "body",
    [
        {"status": 500},
        {"user": FAKE_A},
        {"user": FAKE_A, "status": 200},
        {"user": FAKE_A, "hang_s": -1},
        {"user": FAKE_A, "no_pagination_key": "yes"},
    ],
)
async def test_rest_fail_refuses_bad_bodies(body: dict[str, Any]) -> None:
    async with simulator() as run:
        response = await run.http.post("/_sim/rest_fail", json=body)
        assert response.status_code == 400 and response.json()["error"] == "bad_request"


async def test_rest_lists_a_trade_only_once_the_index_lag_has_passed() -> None:
    async with simulator() as run:
        [old] = await run.emit([{"user": FAKE_A}])
        state = (await run.http.post("/_sim/rest_lag", json={"seconds": 0.6})).json()
        assert state["rest_lag_s"] == 0.6
        await asyncio.sleep(0.6)
        [new] = await run.emit([{"user": FAKE_A}])
        page = (await run.orders(user=FAKE_A)).json()
        assert [o["tx_hash"] for o in page["orders"]] == [old["tx_hash"]]
        assert page["pagination"]["total"] == 1
        # The live side and the ground truth have it at once.
        assert new["tx_hash"] in {t["tx_hash"] for t in await run.truth(FAKE_A)}
        await asyncio.sleep(0.7)
        assert [o["tx_hash"] for o in (await run.orders(user=FAKE_A)).json()["orders"]] == [
            new["tx_hash"],
            old["tx_hash"],
        ]
        bad = await run.http.post("/_sim/rest_lag", json={"seconds": -1})
        assert bad.status_code == 400


async def test_the_index_lag_can_be_on_from_the_start() -> None:
    async with simulator(sim_rest_index_lag_s=30) as run:
        await run.emit([{"user": FAKE_A}])
        assert _users(await run.orders(user=FAKE_A)) == []
        assert (await run.http.get("/_sim/faults")).json()["rest_lag_s"] == 30


def _update(subscription_id: str, users: list[str]) -> str:
    message = {
        "action": "update",
        "subscription_id": subscription_id,
        "platform": "polymarket",
        "version": 1,
        "type": "orders",
        "filters": {"users": users},
    }
    return orjson.dumps(message).decode()


async def _users_until_fence(ws: ClientConnection, fence: str) -> list[str]:
    seen = []
    while True:
        frame = await receive(ws)
        if frame["subscription_id"] == fence:
            return seen
        seen.append(frame["data"]["user"])


async def test_an_update_is_applied_only_after_the_delay() -> None:
    async with simulator() as run, connect(f"{run.ws_base}/key") as ws:
        state = (await run.http.post("/_sim/update_delay", json={"seconds": 0.5})).json()
        assert state["update_delay_s"] == 0.5
        sub = await subscribe(ws, users=[FAKE_A])
        fence = await subscribe(ws, users=[FAKE_C])
        await ws.send(_update(sub, [FAKE_A, FAKE_B]))
        await asyncio.sleep(0.05)  # the update has arrived, and is held
        await run.emit([{"user": FAKE_A}, {"user": FAKE_B}, {"user": FAKE_C}])
        assert await _users_until_fence(ws, fence) == [FAKE_A]
        subs = {s["subscription_id"]: s for s in (await run.http.get("/_sim/subscriptions")).json()}
        assert subs[sub]["filters"]["users"] == [FAKE_A]
        await asyncio.sleep(0.6)
        await run.emit([{"user": FAKE_A}, {"user": FAKE_B}, {"user": FAKE_C}])
        assert await _users_until_fence(ws, fence) == [FAKE_A, FAKE_B]
        # An unknown id is still refused at once.
        await ws.send(_update("sub_unknown0000", [FAKE_B]))
        assert (await receive(ws))["type"] == "error"


async def test_a_late_update_of_a_subscription_gone_meanwhile_is_dropped() -> None:
    async with simulator(sim_update_delay_s=0.3) as run, connect(f"{run.ws_base}/key") as ws:
        sub = await subscribe(ws, users=[FAKE_A])
        fence = await subscribe(ws, users=[FAKE_C])
        await ws.send(_update(sub, [FAKE_B]))
        unsubscribe = {"action": "unsubscribe", "version": 1, "subscription_id": sub}
        await ws.send(orjson.dumps(unsubscribe).decode())
        await asyncio.sleep(0.5)
        await run.emit([{"user": FAKE_A}, {"user": FAKE_B}, {"user": FAKE_C}])
        assert await _users_until_fence(ws, fence) == []
        assert [
            s["subscription_id"] for s in (await run.http.get("/_sim/subscriptions")).json()
        ] == [fence]
