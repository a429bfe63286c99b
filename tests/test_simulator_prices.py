"""The simulator's CLOB price history (`GET /prices-history`) and its Gamma resolutions
(`GET /markets?condition_ids=..&closed=..` with SIM_RESOLUTION), served for real on loopback."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.test_simulator_service import simulator

MACHADO = "0x14a3dfeba8b22a32feb0f10763db68bc4d2abeb5bff90e9ae20de53793b35a1d"
MACHADO_YES = "75406677405586796507165996816755205915219135539748390183994296030461533919844"
RESOLUTION = "data/nobel2025_resolution.json"
TAPE = Path(__file__).resolve().parent.parent / "data" / "polymarket_trades_nobel2025.json"


def trade(ts: int, price: float, token: str = MACHADO_YES, **extra: Any) -> dict[str, Any]:
    return {"token_id": token, "condition_id": MACHADO, "timestamp": ts, "price": price, **extra}


async def test_price_history_is_the_last_trade_at_or_before_each_point() -> None:
    t0 = int(time.time()) - 86_400
    async with simulator() as sim:
        await sim.emit(
            [
                trade(t0, 0.40),
                trade(t0 + 90, 0.45),
                trade(t0 + 90, 0.44),  # same second, emitted later: it is the price
                trade(t0 + 400, 0.60, user="0x" + "7" * 40),  # any wallet's trade counts
                trade(t0 + 100, 0.99, token="42"),  # another token
            ]
        )
        answer = await sim.http.get(
            "/prices-history",
            params={"market": MACHADO_YES, "startTs": t0 - 60, "endTs": t0 + 330, "fidelity": 2},
        )
        assert answer.status_code == 200, answer.text
        # Points every 2 minutes from the start plus the end; none before the first trade.
        assert answer.json() == {
            "history": [
                {"t": t0 + 60, "p": 0.40},
                {"t": t0 + 180, "p": 0.44},
                {"t": t0 + 300, "p": 0.44},
                {"t": t0 + 330, "p": 0.44},
            ]
        }
        whole = (await sim.http.get("/prices-history", params={"market": MACHADO_YES})).json()
        assert whole["history"][0] == {"t": t0, "p": 0.40}
        assert whole["history"][-1]["p"] == 0.60  # up to now
        recent = await sim.http.get("/prices-history", params={"market": "42", "interval": "1h"})
        # Its one trade is a day old: still its price, every minute of the last hour.
        points = recent.json()["history"]
        assert {p["p"] for p in points} == {0.99} and len(points) in (61, 62)
        nothing = await sim.http.get("/prices-history", params={"market": "nope"})
        assert nothing.json() == {"history": []}


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "market"),
        ({"market": "1", "interval": "1h", "startTs": "5"}, "mutually exclusive"),
        ({"market": "1", "interval": "2y"}, "interval must be one of"),
        ({"market": "1", "fidelity": "0"}, "fidelity"),
        ({"market": "1", "startTs": "9", "endTs": "5"}, "startTs must not be after endTs"),
        ({"market": "1", "startTs": "soon"}, "Unix seconds"),
    ],
)
async def test_bad_price_history_queries_are_400s(params: dict[str, str], message: str) -> None:
    async with simulator() as sim:
        answer = await sim.http.get("/prices-history", params=params)
        assert answer.status_code == 400 and message in answer.json()["message"], answer.text


async def test_too_many_points_is_a_400() -> None:
    async with simulator() as sim:
        await sim.emit([trade(1_000_000, 0.5)])
        params = {"market": MACHADO_YES, "startTs": 1_000_000, "endTs": 2_000_000}
        answer = await sim.http.get("/prices-history", params=params)
        assert answer.status_code == 400 and "points" in answer.text


async def gamma(sim: Any, **params: Any) -> list[dict[str, Any]]:
    answer = await sim.http.get("/markets", params=params)
    assert answer.status_code == 200, answer.text
    body: list[dict[str, Any]] = answer.json()
    return body


async def test_gamma_serves_the_resolution_to_those_who_ask_for_closed_markets() -> None:
    async with simulator(sim_resolution=RESOLUTION) as sim:
        [machado] = await gamma(sim, condition_ids=MACHADO, closed="true")
        assert machado["closed"] is True
        labels = orjson.loads(machado["outcomes"])
        prices = orjson.loads(machado["outcomePrices"])
        tokens = orjson.loads(machado["clobTokenIds"])
        assert dict(zip(labels, prices, strict=True)) == {"Yes": "1", "No": "0"}
        assert tokens[labels.index("Yes")] == MACHADO_YES
        # Every market of the tape resolved; none is left open.
        conditions = sorted({t["conditionId"] for t in orjson.loads(TAPE.read_bytes())})
        everything = await gamma(sim, condition_ids=",".join(conditions), closed="true")
        assert sorted(m["conditionId"] for m in everything) == conditions
        for market in everything:
            if market["conditionId"] != MACHADO:
                labels = orjson.loads(market["outcomes"])
                paid = zip(labels, orjson.loads(market["outcomePrices"]), strict=True)
                assert all(price == ("0" if label == "Yes" else "1") for label, price in paid)
        assert await gamma(sim, condition_ids=MACHADO, closed="false") == []
        # By token id, repeated or comma-separated, as before; each market once.
        by_token = await gamma(sim, clob_token_ids=f"{MACHADO_YES},{tokens[1]}")
        assert [m["conditionId"] for m in by_token] == [MACHADO]


async def test_without_a_resolution_every_market_is_open() -> None:
    async with simulator() as sim:
        assert await gamma(sim, condition_ids=MACHADO, closed="true") == []
        [machado] = await gamma(sim, condition_ids=MACHADO.upper().replace("0X", "0x"))
        assert machado["closed"] is False and "outcomePrices" not in machado
