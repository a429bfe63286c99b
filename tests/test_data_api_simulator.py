"""The simulated Data API as Polymarket serves it (issue 15): a CDN that answers an identical URL
from its cache (`cf-cache-status: HIT`, `age`) for SIM_CDN_CACHE_S, switchable; the v2 cursor
feeds `/v2/trades` and `/v2/activity` (no offset, a keyset cursor, a time window); v1's caps as
400s; and `takerOnly`, whose default hides a wallet's maker fills. All over real HTTP on loopback.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from services.simulator.cdn import Cdn
from services.simulator.trades import Quirks, TradeTemplate
from tests.helpers.ingestion import Sim, simulator

USER = "0x" + "a1" * 20
OTHER = "0x" + "b2" * 20


async def emit(sim: Sim, *trades: dict[str, Any]) -> list[dict[str, Any]]:
    return list((await sim.post("/_sim/emit", list(trades)))["trades"])


async def hashes(sim: Sim, path: str, **params: Any) -> list[str]:
    body = await sim.get(path, **params)
    rows = body["data"] if isinstance(body, dict) else body
    return [row.get("transaction_hash") or row.get("transactionHash") for row in rows]


async def test_an_identical_url_is_answered_from_the_cache_until_it_expires() -> None:
    async with simulator() as sim:
        await emit(sim, {"user": USER})
        params: dict[str, Any] = {"user": USER, "taker_only": "false", "end": int(time.time()) + 60}
        first = await sim.http.get("/v2/trades", params=params)
        [late] = await emit(sim, {"user": USER})
        again = await sim.http.get("/v2/trades", params=params)
        assert first.headers["cf-cache-status"] == "MISS" and "age" not in first.headers
        assert again.headers["cf-cache-status"] == "HIT" and int(again.headers["age"]) >= 0
        assert again.content == first.content, "a HIT is the cached body"
        assert late["tx_hash"] not in again.text
        moved = await sim.http.get("/v2/trades", params={**params, "end": params["end"] + 1})
        assert moved.headers["cf-cache-status"] == "MISS" and late["tx_hash"] in moved.text
        log = (await sim.get("/_sim/requests"))[-3:]
        assert [r["cache"] for r in log] == ["MISS", "HIT", "MISS"]
        # The switch: a short lifetime expires; 0 turns the cache off.
        assert (await sim.post("/_sim/cdn", {"seconds": 0.2}))["cdn_cache_s"] == 0.2
        await sim.http.get("/trades", params={"user": USER})
        assert (await sim.http.get("/trades", params={"user": USER})).headers[
            "cf-cache-status"
        ] == "HIT"
        await asyncio.sleep(0.25)
        expired = await sim.http.get("/trades", params={"user": USER})
        assert expired.headers["cf-cache-status"] == "MISS"
        await sim.post("/_sim/cdn", {"seconds": 0})
        for _ in range(2):
            off = await sim.http.get("/trades", params={"user": USER})
            assert off.headers["cf-cache-status"] == "DYNAMIC"
        assert (await sim.http.post("/_sim/cdn", json={"seconds": -1})).status_code == 400


async def test_errors_and_429s_are_never_cached() -> None:
    async with simulator() as sim:
        bad: dict[str, Any] = {"user": USER, "offset": 5}
        for _ in range(2):
            response = await sim.http.get("/v2/trades", params=bad)
            assert response.status_code == 400 and "cursor" in response.json()["message"]
        await sim.post("/_sim/rate_limit", {"requests": 1, "retry_after": 1})
        assert (await sim.http.get("/trades", params={"user": USER})).status_code == 429
        answer = await sim.http.get("/trades", params={"user": USER})
        assert answer.status_code == 200 and answer.headers["cf-cache-status"] == "MISS"


def test_the_cache_forgets_a_url_after_its_lifetime() -> None:
    now = [100.0]
    cdn = Cdn(300, clock=lambda: now[0])
    cdn.store("/trades?user=a", b"[1]")
    now[0] += 299.5
    cached = cdn.lookup("/trades?user=a")
    assert cached is not None and cached.body == b"[1]" and cached.age_s == 299
    assert cdn.lookup("/trades?user=A") is None, "another byte, another URL"
    now[0] += 0.5
    assert cdn.lookup("/trades?user=a") is None


async def test_v2_trades_pages_by_keyset_cursor_newest_first() -> None:
    base = int(time.time()) - 100
    async with simulator() as sim:
        trades = await emit(sim, *({"user": USER, "timestamp": base + i % 4} for i in range(9)))
        await emit(sim, {"user": OTHER, "timestamp": base})
        expected = [t["tx_hash"] for t in sorted(trades, key=lambda t: -t["timestamp"])]
        page = await sim.get("/v2/trades", user=USER, limit=4, taker_only="false")
        seen = [row["transaction_hash"] for row in page["data"]]
        assert page["pagination"]["has_more"] and set(page["data"][0]) >= {
            "proxy_wallet",
            "condition_id",
            "transaction_hash",
        }
        # Trades arriving between pages neither shift nor repeat a page (a keyset, not offsets).
        await emit(sim, {"user": USER}, {"user": USER, "timestamp": base + 3})
        while page["pagination"]["has_more"]:
            cursor = page["pagination"]["next_cursor"]
            page = await sim.get("/v2/trades", user=USER, cursor=cursor, taker_only="false")
            seen += [row["transaction_hash"] for row in page["data"]]
        assert page["pagination"]["next_cursor"] is None
        assert sorted(seen) == sorted(expected) and len(seen) == len(set(seen))
        stamps = [t["timestamp"] for t in trades]
        assert [stamps[[t["tx_hash"] for t in trades].index(h)] for h in seen] == sorted(
            stamps, reverse=True
        )


async def test_v2_refuses_offsets_foreign_cursors_and_limits_past_the_cap() -> None:
    async with simulator() as sim:
        await emit(sim, {"user": USER}, {"user": USER})
        page = await sim.get("/v2/trades", user=USER, limit=1)
        cursor = page["pagination"]["next_cursor"]
        cases: list[tuple[str, dict[str, Any]]] = [
            ("/v2/trades", {"user": USER, "offset": 0}),
            ("/v2/activity", {"user": USER, "offset": 1}),
            ("/v2/trades", {"user": USER, "limit": 1001}),
            ("/v2/activity", {"user": USER, "cursor": cursor}),  # typed per route
            ("/v2/trades", {"user": USER, "cursor": cursor[:-2] + "AA"}),  # signed
            ("/v2/activity", {}),  # user-anchored
            ("/v2/activity", {"user": USER, "type": "SWAP"}),
            ("/trades", {"user": USER, "offset": 10_001}),  # v1's caps
            ("/trades", {"user": USER, "limit": 10_001}),
        ]
        for path, params in cases:
            response = await sim.http.get(path, params=params)
            assert response.status_code == 400, (path, params, response.text)
        assert (await sim.http.get("/trades", params={"offset": 10_000})).status_code == 200


async def test_v2_start_and_end_bound_a_wallets_window() -> None:
    base = int(time.time()) - 1000
    async with simulator() as sim:
        trades = await emit(sim, *({"user": USER, "timestamp": base + i} for i in range(6)))
        inside = await hashes(sim, "/v2/trades", user=USER, start=base + 1, end=base + 3)
        assert inside == [t["tx_hash"] for t in reversed(trades[1:4])]
        activity = await hashes(
            sim, "/v2/activity", user=USER, start=base + 2, sort_direction="ASC", limit=2
        )
        assert activity == [t["tx_hash"] for t in trades[2:4]]
        assert await hashes(sim, "/v2/activity", user=USER, type="SPLIT,MERGE") == []


async def test_taker_only_hides_maker_fills_unless_false_on_every_route() -> None:
    async with simulator() as sim:
        taker, maker = await emit(sim, {"user": USER}, {"user": USER, "maker": True})
        assert maker["maker"] is True and "maker" not in taker
        both = {taker["tx_hash"], maker["tx_hash"]}
        assert set(await hashes(sim, "/trades", user=USER)) == {taker["tx_hash"]}
        assert set(await hashes(sim, "/trades", user=USER, takerOnly="false")) == both
        assert set(await hashes(sim, "/v2/trades", user=USER)) == {taker["tx_hash"]}
        assert set(await hashes(sim, "/v2/trades", user=USER, taker_only="false")) == both
        assert set(await hashes(sim, "/v2/trades", user=USER, takerOnly="false")) == both
        assert set(await hashes(sim, "/v2/activity", user=USER)) == both
        bad = await sim.http.post("/_sim/emit", json=[{"user": USER, "maker": "yes"}])
        assert bad.status_code == 400


def test_the_maker_quirk_makes_every_nth_scheduled_trade_a_maker_fill() -> None:
    template = TradeTemplate(
        token_id="1",
        token_label="Yes",
        side="BUY",
        market_slug="m",
        condition_id="0x" + "c" * 64,
        shares=1_000_000,
        shares_normalized=1.0,
        price=0.5,
        tx_hash="0x" + "d" * 64,
        title="t",
        order_hash="0x" + "e" * 64,
        user=USER,
    )
    quirks = Quirks(maker_every=3)
    assert [quirks.stamp(template, n).maker for n in range(1, 7)] == [
        False,
        False,
        True,
        False,
        False,
        True,
    ]
