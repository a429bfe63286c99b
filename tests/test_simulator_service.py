"""The simulator served for real on a loopback port, driven with a websockets client and httpx.

Every test runs its own simulator in-process on a free port, the tape at high speed without
looping, so the whole tape plays in well under a second.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from services.simulator.main import Simulator
from services.simulator.settings import SimulatorSettings, resolve_path
from services.simulator.trades import ORDER_FIELDS
from shared.models import DomeOrder
from shared.wallets import load_wallets

SUB_ID = re.compile(r"^sub_[a-z0-9]{11}$")
FAKE_A, FAKE_B, FAKE_C = ("0x" + c * 40 for c in "abc")
SAFETY = 15  # seconds: only guards against a hang, never asserts speed
TRACKED = [w.address for w in load_wallets(resolve_path(Path("config/wallets.example.json")))]


@dataclass
class Running:
    sim: Simulator
    http: httpx.AsyncClient
    ws_base: str

    async def status(self) -> dict[str, Any]:
        return (await self.http.get("/_sim/status")).json()

    async def truth(self, user: str | None = None) -> list[dict[str, Any]]:
        params = {"user": user} if user else {}
        return (await self.http.get("/_sim/trades", params=params)).json()

    async def emit(self, trades: list[dict[str, Any]]) -> list[dict[str, Any]]:
        response = await self.http.post("/_sim/emit", content=orjson.dumps(trades))
        assert response.status_code == 200, response.text
        return response.json()["trades"]

    async def wait_status(self, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        async with asyncio.timeout(SAFETY):
            while True:
                status = await self.status()
                if check(status):
                    return status
                await asyncio.sleep(0.02)

    async def tape_done(self) -> None:
        await self.wait_status(lambda status: bool(status["tape_done"]))

    async def orders(self, **params: Any) -> httpx.Response:
        return await self.http.get("/v1/polymarket/orders", params=params)


@asynccontextmanager
async def simulator(api_key: str = "", **overrides: Any) -> AsyncIterator[Running]:
    values: dict[str, Any] = {
        "sim_host": "127.0.0.1",
        "sim_port": 0,
        "sim_speed": 5000.0,
        "sim_loop": False,
        "sim_api_key": api_key,
        **overrides,
    }
    sim = Simulator(SimulatorSettings(**values))
    stop = asyncio.Event()
    task = asyncio.create_task(sim.run(stop))
    await sim.listening.wait()
    host = f"127.0.0.1:{sim.port}"
    headers = {"Authorization": f"Bearer {api_key or 'any-key'}"}
    try:
        async with httpx.AsyncClient(base_url=f"http://{host}", headers=headers) as http:
            yield Running(sim, http, f"ws://{host}")
    finally:
        stop.set()
        await task


def subscribe_message(**filters: list[str]) -> str:
    return orjson.dumps(
        {
            "action": "subscribe",
            "platform": "polymarket",
            "version": 1,
            "type": "orders",
            "filters": filters,
        }
    ).decode()


async def receive(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(SAFETY):
        return orjson.loads(await ws.recv())


async def subscribe(ws: ClientConnection, **filters: list[str]) -> str:
    await ws.send(subscribe_message(**filters))
    ack = await receive(ws)
    assert ack["type"] == "ack" and SUB_ID.match(ack["subscription_id"]), ack
    return str(ack["subscription_id"])


def busiest_wallets(truth: list[dict[str, Any]], n: int) -> list[str]:
    return [user for user, _ in Counter(t["user"] for t in truth).most_common(n)]


def without_emitted_at(trade: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in trade.items() if k != "emitted_at"}


async def test_subscribers_get_exactly_their_wallets_trades() -> None:
    # A first run learns the tape's busiest wallets; trades are the same in every run.
    async with simulator(sim_wait_for_subscriber=False) as run:
        await run.tape_done()
        wallets = busiest_wallets(await run.truth(), 3)
    async with simulator() as run:
        assert not (await run.status())["started"]
        async with connect(f"{run.ws_base}/key") as ws:
            # Mixed case on purpose: users are compared lower-case.
            sub_id = await subscribe(
                ws, users=[wallets[0].upper().replace("0X", "0x"), *wallets[1:]]
            )
            await run.tape_done()
            expected = [t for t in await run.truth() if t["user"] in wallets]
            by_wallet = [await run.truth(wallet) for wallet in wallets]
            assert len(expected) == sum(map(len, by_wallet)) > 10
            events = [await receive(ws) for _ in expected]
            # A marker proves nothing else was queued before it.
            [marker] = await run.emit([{"user": wallets[0]}])
            assert (await receive(ws))["data"]["tx_hash"] == marker["tx_hash"]
        assert {e["type"] for e in events} == {"event"}
        assert {e["subscription_id"] for e in events} == {sub_id}
        assert [e["data"] for e in events] == [without_emitted_at(t) for t in expected]
        for event in events:
            assert tuple(event["data"]) == ORDER_FIELDS
            DomeOrder.model_validate(event["data"])
        status = await run.status()
        assert status["started"] and status["tape_done"] and status["emitted"] == 1001


async def test_update_replaces_filters_and_unsubscribe_stops_events() -> None:
    async with simulator() as run, connect(f"{run.ws_base}/key") as ws:
        first = await subscribe(ws, users=[FAKE_A])
        fence = await subscribe(ws, users=[FAKE_C])

        async def events_until_fence() -> list[tuple[str, str]]:
            seen = []
            while True:
                frame = await receive(ws)
                seen.append((frame["subscription_id"], frame["data"]["user"]))
                if frame["subscription_id"] == fence:
                    return seen

        await run.emit([{"user": FAKE_A}, {"user": FAKE_B}, {"user": FAKE_C}])
        assert await events_until_fence() == [(first, FAKE_A), (fence, FAKE_C)]

        await ws.send(
            orjson.dumps(
                {
                    "action": "update",
                    "subscription_id": first,
                    "platform": "polymarket",
                    "version": 1,
                    "type": "orders",
                    "filters": {"users": [FAKE_B]},
                }
            ).decode()
        )
        await run.emit([{"user": FAKE_A}, {"user": FAKE_B}, {"user": FAKE_C}])
        assert await events_until_fence() == [(first, FAKE_B), (fence, FAKE_C)]

        await ws.send(
            orjson.dumps({"action": "unsubscribe", "version": 1, "subscription_id": first}).decode()
        )
        await run.emit([{"user": FAKE_A}, {"user": FAKE_B}, {"user": FAKE_C}])
        assert await events_until_fence() == [(fence, FAKE_C)]
        subs = (await run.http.get("/_sim/subscriptions")).json()
        assert subs == [{"subscription_id": fence, "filters": {"users": [FAKE_C]}}]


async def test_market_filters_and_one_event_per_matching_subscription() -> None:
    async with simulator() as run, connect(f"{run.ws_base}/key") as ws:
        by_slug = await subscribe(ws, market_slugs=["slug-one"])
        by_condition = await subscribe(ws, condition_ids=["0xC0FFEE"])
        fence = await subscribe(ws, users=[FAKE_C])
        await run.emit(
            [
                {"user": FAKE_A, "market_slug": "slug-one", "condition_id": "0xc0ffee"},
                {"user": FAKE_A, "market_slug": "slug-two", "condition_id": "0xc0ffee"},
                {"user": FAKE_B, "market_slug": "slug-three"},
                {"user": FAKE_C},
            ]
        )
        frames = [await receive(ws) for _ in range(4)]
        assert [f["subscription_id"] for f in frames[:2]] in (
            [by_slug, by_condition],
            [by_condition, by_slug],
        )
        assert frames[2]["subscription_id"] == by_condition
        assert frames[2]["data"]["market_slug"] == "slug-two"
        assert frames[3]["subscription_id"] == fence


async def test_bad_messages_get_an_error_frame_and_the_connection_stays_up() -> None:
    async with simulator() as run, connect(f"{run.ws_base}/key") as ws:
        for bad in (
            "not json",
            "[]",
            '{"action":"subscribe","platform":"kalshi","type":"orders","filters":{"users":["*"]}}',
            subscribe_message(wallets=[FAKE_A]),
            '{"action":"unsubscribe","version":1,"subscription_id":"sub_nope"}',
        ):
            await ws.send(bad)
            frame = await receive(ws)
            assert frame["type"] == "error" and frame["message"], frame
        await ws.send(b"\xff\xfe")  # a binary frame that is not JSON
        assert (await receive(ws))["type"] == "error"
        await subscribe(ws, users=[FAKE_A])


async def test_wrong_or_missing_key_is_refused_with_401_and_never_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    key = "s3cret-test-key"
    async with simulator(api_key=key) as run:
        for path in ("/wrong-key", "/"):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(f"{run.ws_base}{path}"):
                    pass
            assert refused.value.response.status_code == 401
            assert orjson.loads(refused.value.response.body or b"")["error"] == "unauthorized"
        async with connect(f"{run.ws_base}/{key}") as ws:
            await subscribe(ws, users=[FAKE_A])

        async with httpx.AsyncClient(base_url=str(run.http.base_url)) as anonymous:
            missing = await anonymous.get("/v1/polymarket/orders")
            wrong = await anonymous.get(
                "/v1/polymarket/orders", headers={"Authorization": "Bearer nope"}
            )
        for response in (missing, wrong):
            assert response.status_code == 401
            assert response.json() == {
                "error": "unauthorized",
                "message": "missing or invalid API key",
            }
        assert (await run.orders()).status_code == 200
    assert caplog.records and key not in caplog.text and "wrong-key" not in caplog.text


async def test_rest_filters_validation_and_time_bounds() -> None:
    async with simulator(sim_wait_for_subscriber=False) as run:
        await run.tape_done()
        truth = await run.truth()
        sample = truth[500]
        for param, field in (
            ("user", "user"),
            ("market_slug", "market_slug"),
            ("condition_id", "condition_id"),
            ("token_id", "token_id"),
        ):
            body = (await run.orders(**{param: sample[field], "limit": 1000})).json()
            expected = [without_emitted_at(t) for t in reversed(truth) if t[field] == sample[field]]
            assert body["orders"] == expected, param
            assert body["pagination"]["total"] == len(expected)
        default = (await run.orders()).json()
        assert len(default["orders"]) == 100 and default["pagination"]["limit"] == 100
        for order in default["orders"]:
            assert tuple(order) == ORDER_FIELDS
            DomeOrder.model_validate(order)

        for params in (
            {"market_slug": "x", "condition_id": "0x1"},
            {"limit": 0},
            {"limit": 1001},
            {"limit": "many"},
            {"offset": -1},
            {"pagination_key": "garbage"},
        ):
            response = await run.orders(**params)
            assert response.status_code == 400, params
            assert response.json()["error"] == "bad_request" and response.json()["message"]

        stamps = (1000, 2000, 3000, 4000)
        await run.emit([{"user": FAKE_A, "timestamp": ts} for ts in stamps])
        for params, expected_stamps in (
            ({"start_time": 2000, "end_time": 3000}, [3000, 2000]),
            ({"start_time": 3000}, [4000, 3000]),
            ({"end_time": 1000}, [1000]),
            ({"start_time": 4001}, []),
        ):
            body = (await run.orders(user=FAKE_A, **params)).json()
            assert [o["timestamp"] for o in body["orders"]] == expected_stamps, params


async def test_rest_pagination_has_no_gap_or_repeat() -> None:
    async with simulator(sim_wait_for_subscriber=False) as run:
        await run.tape_done()
        newest_first = [without_emitted_at(t) for t in reversed(await run.truth())]

        by_offset: list[dict[str, Any]] = []
        for offset in range(0, 1000, 150):
            body = (await run.orders(limit=150, offset=offset)).json()
            by_offset += body["orders"]
            assert body["pagination"]["has_more"] == (offset + 150 < 1000)
        assert by_offset == newest_first

        first = (await run.orders(limit=37)).json()
        # Trades emitted between two pages must not shift a key-paged walk.
        await run.emit([{"user": FAKE_A}, {"user": FAKE_B}])
        by_key, body = list(first["orders"]), first
        while body["pagination"]["has_more"]:
            key = body["pagination"]["pagination_key"]
            body = (await run.orders(limit=37, pagination_key=key)).json()
            by_key += body["orders"]
        assert by_key == newest_first
        assert body["pagination"]["pagination_key"] is None
        assert body["pagination"]["total"] == 1002


async def test_inject_sends_raw_frames_and_drop_closes_every_client() -> None:
    async with simulator() as run:
        async with connect(f"{run.ws_base}/k1") as one, connect(f"{run.ws_base}/k2") as two:
            await subscribe(one, users=[FAKE_A])
            assert (await run.status())["clients"] == 2
            sent = (await run.http.post("/_sim/inject", content=b'{"type":"event", broken')).json()
            assert sent == {"sent": 2}
            for ws in (one, two):
                async with asyncio.timeout(SAFETY):
                    assert await ws.recv() == '{"type":"event", broken'
            assert (await run.http.post("/_sim/drop")).json() == {"dropped": 2}
            for ws in (one, two):
                with pytest.raises(ConnectionClosed) as closed:
                    await receive(ws)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
        status = await run.status()
        assert status["clients"] == 0 and status["subscriptions"] == 0


async def test_a_client_that_does_not_read_is_cut_off_with_1013() -> None:
    async with simulator(sim_send_queue_max=5) as run, connect(f"{run.ws_base}/key") as ws:
        await subscribe(ws, users=[FAKE_A])
        # One request emits them all without yielding: the queue of 5 must overflow.
        await run.emit([{"user": FAKE_A}] * 50)
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await receive(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
        assert "too slowly" in closed.value.rcvd.reason
        assert (await run.status())["clients"] == 0


async def test_emit_validates_and_fills_trades() -> None:
    async with simulator() as run:
        [filled] = await run.emit([{}])
        assert set(filled) == {*ORDER_FIELDS, "emitted_at"}
        DomeOrder.model_validate(filled)
        for body in (b"{}", b"not json", b'[{"price": "1"}]'):
            response = await run.http.post("/_sim/emit", content=body)
            assert response.status_code == 400 and response.json()["error"] == "bad_request"
        assert (await run.status())["emitted"] == 1


async def test_looping_tape_replays_with_fresh_hashes() -> None:
    async with simulator(sim_loop=True, sim_speed=50_000.0, sim_wait_for_subscriber=False) as run:
        await run.wait_status(lambda status: bool(status["loops"] >= 2))
        truth = await run.truth()
        status = await run.status()
    assert not status["tape_done"] and len(truth) >= 2000
    assert len({t["tx_hash"] for t in truth}) == len(truth)
    assert len({t["order_hash"] for t in truth}) == len(truth)
    first, second = truth[0], truth[1000]
    assert (first["user"], first["token_id"], first["shares"]) == (
        second["user"],
        second["token_id"],
        second["shares"],
    )


async def test_synthetic_mode_streams_tracked_wallets() -> None:
    async with simulator(sim_mode="synthetic", sim_rate=2000.0, sim_seed=3) as run:
        wallets = sorted({t["user"] for t in await run.truth()})
        assert wallets == []  # nothing before the first subscription
        async with connect(f"{run.ws_base}/key") as ws:
            chosen = TRACKED[:2]
            sub_id = await subscribe(ws, users=chosen)
            events = [await receive(ws) for _ in range(50)]
        assert {e["subscription_id"] for e in events} == {sub_id}
        assert {e["data"]["user"] for e in events} <= set(chosen)
        assert all(0.01 <= e["data"]["price"] <= 0.99 for e in events)
        health = (await run.http.get("/health")).json()
        assert health["ok"] and health["mode"] == "synthetic"
        metrics = (await run.http.get("/metrics")).text
        assert "betterbot_sim_trades_emitted_total" in metrics
