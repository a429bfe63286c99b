"""Wallet quality from real history (issue 17): the figures, the survivorship correction, the
flags and the score, then the simulator's `/closed-positions` and `/v1/leaderboard`, and the store
refreshing a tracked wallet's quality from the simulator as a real server into real Postgres and
Redis, checked against a hand computation."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from services.store.database import Database
from services.store.markouts import Payouts
from services.store.wallet_quality import (
    ScoreRule,
    WalletHistory,
    is_bot,
    is_market_maker,
    quality_of,
)
from services.store.wallet_quality_refresh import QualityConfig, QualityRefresher
from shared import wallet_registry
from shared.models import TrackedWallet
from shared.streams import Streams
from tests.helpers.ingestion import Sim, simulator
from tests.test_store_api import TOKEN, serving, wallets_file
from tests.test_store_service import running_store, store_settings, wait_until

ROOT = Path(__file__).resolve().parents[1]
TAPE = orjson.loads((ROOT / "data" / "polymarket_trades_nobel2025.json").read_bytes())
RESOLUTION = str(ROOT / "data" / "nobel2025_resolution.json")
W = "0x" + "7e" * 20
MACHADO = "will-mara-corina-machado-win-the-nobel-peace-prize-in-2025"  # resolved Yes: 1
TRUMP = "will-donald-trump-win-the-nobel-peace-prize-in-2025"  # resolved Yes: 0
NAVALNAYA = "will-yulia-navalnaya-win-the-nobel-peace-prize-in-2025"  # resolved Yes: 0


def yes_of(slug: str) -> dict[str, str]:
    trade = next(t for t in TAPE if t["slug"] == slug and t["outcome"] == "Yes")
    return {
        "token_id": trade["asset"],
        "condition_id": trade["conditionId"],
        "market_slug": slug,
        "token_label": "Yes",
    }


def fill(market: dict[str, str], side: str, shares: float, price: float) -> dict[str, Any]:
    return {**market, "user": W, "side": side, "shares_normalized": shares, "price": price}


# By hand: Machado Yes bought 100 @ 0.40 and redeemed at 1: +60 (closed). Trump Yes 50 @ 0.20
# sold @ 0.30: +5 (closed). Navalnaya Yes 200 @ 0.10, resolved 0, never redeemed: -20 (decided,
# a loss the closed list leaves out). An open market: 10 @ 0.50 and 10 @ 0.70, last 0.70: worth
# 14 for 12 paid, +2 unrealised. Realised 60 + 5 - 20 = 45; 2 wins, 1 loss (not 2 of 2); four
# markets; six trades; volume 40 + 10 + 15 + 20 + 5 + 7 = 97.
def history_trades() -> list[dict[str, Any]]:
    machado, trump, navalnaya = yes_of(MACHADO), yes_of(TRUMP), yes_of(NAVALNAYA)
    return [
        fill(machado, "BUY", 100, 0.40),
        fill(trump, "BUY", 50, 0.20),
        fill(trump, "SELL", 50, 0.30),
        fill(navalnaya, "BUY", 200, 0.10),
        {"user": W, "side": "BUY", "shares_normalized": 10, "price": 0.50},
        {"user": W, "side": "BUY", "shares_normalized": 10, "price": 0.70},
    ]


HAND = {
    "realised_pnl": 45.0,
    "unrealised_pnl": 2.0,
    "wins": 2,
    "losses": 1,
    "markets_traded": 4,
    "trades": 6,
    "volume_usd": 97.0,
    "market_maker": False,
    "bot": False,
}
# 0.5 x the lower 95 % Wilson bound of 2 wins in 3 (0.20766) + 0.5 x (0.5 + 0.5 tanh(47 / 10,000)).
HAND_SCORE = 0.355


# The figures, from a history given by hand.


def position(asset: str, cid: str, size: float, initial: float, current: float) -> dict[str, Any]:
    return {
        "asset": asset,
        "conditionId": cid,
        "size": size,
        "initialValue": initial,
        "currentValue": current,
        "outcome": "Yes",
    }


def test_losers_never_redeemed_count_as_losses() -> None:
    closed = [
        {"asset": "a", "conditionId": "0xa", "realizedPnl": 30.0},
        {"asset": "b", "conditionId": "0xb", "realizedPnl": 12.5},
    ]
    open_positions = [
        position("c", "0xc", 400, 80, 1.2),  # resolved against: worth 0, never redeemed
        position("d", "0xd", 10, 4, 6),  # not resolved
        position("a", "0xa", 5, 1, 5),  # listed closed too: counted once, as closed
    ]
    payouts = {"0xc": Payouts({"c": 0.0}, {"Yes": 0.0})}
    history = WalletHistory(closed, open_positions, [], payouts)
    quality = quality_of(history, ScoreRule(min_decided=1))
    assert (quality.wins, quality.losses) == (2, 1)  # the naive count would say 2 of 2
    assert quality.win_rate == pytest.approx(2 / 3)
    assert quality.realised_pnl == pytest.approx(30 + 12.5 - 80)
    assert quality.unrealised_pnl == pytest.approx(2)
    assert quality.markets_traded == 4


def test_the_score_is_none_below_the_minimum_and_halved_when_flagged() -> None:
    closed = [{"asset": str(i), "conditionId": f"0x{i}", "realizedPnl": 10.0} for i in range(4)]
    history = WalletHistory(closed, [], [], {})
    assert quality_of(history, ScoreRule(min_decided=5)).score is None
    plain = quality_of(history, ScoreRule(min_decided=4)).score
    # 4 wins of 4: Wilson low 0.5101; PnL 40 of a 10,000 scale: profit 0.5020.
    assert plain == pytest.approx(0.5 * 0.5101 + 0.5 * (0.5 + 0.5 * math.tanh(0.004)), abs=1e-4)
    maker_trades = [
        {"asset": "x", "side": side, "size": 100, "price": 0.5, "timestamp": 1000 + 60 * i}
        for i, side in enumerate(["BUY", "SELL"] * 10)
    ]
    flagged = quality_of(WalletHistory(closed, [], maker_trades, {}), ScoreRule(min_decided=4))
    assert flagged.market_maker and not flagged.bot
    assert flagged.score == pytest.approx((plain or 0) / 2, abs=1e-4)


def test_market_maker_and_bot_rules() -> None:
    one_way = [{"asset": "x", "side": "BUY", "size": 10, "timestamp": i * 600} for i in range(40)]
    assert not is_market_maker(one_way) and not is_bot(one_way)
    fast = [{"asset": "x", "side": "BUY", "size": 1, "timestamp": 1000 + 3 * i} for i in range(30)]
    assert is_bot(fast) and not is_bot(fast[:29])  # 30 trades needed
    # 60 % of the shares round-trip: 2 x min(100, 60) / 160 = 0.75 -> a maker.
    both = [{"asset": "x", "side": "BUY", "size": 5, "timestamp": i} for i in range(20)]
    both += [{"asset": "x", "side": "SELL", "size": 3, "timestamp": i} for i in range(20)]
    assert is_market_maker(both)
    assert not is_market_maker(both[:15] + [{"asset": "y", "side": "SELL", "size": 900}] * 5)


def test_hostile_numbers_count_as_zero() -> None:
    closed: list[dict[str, Any]] = [
        {"asset": "a", "realizedPnl": "1e9"},
        {"asset": "b", "realizedPnl": float("nan")},
        {"asset": "c", "realizedPnl": True},
    ]
    quality = quality_of(WalletHistory(closed, [], [], {}), ScoreRule())
    assert quality.realised_pnl == 0 and (quality.wins, quality.losses) == (0, 0)


# The simulator's Data API, as a real server.


async def emitted(sim: Sim) -> None:
    await sim.post("/_sim/emit", history_trades())


async def test_the_simulator_serves_closed_positions_without_unredeemed_losers() -> None:
    async with simulator(sim_resolution=RESOLUTION) as sim:
        await emitted(sim)
        closed = await sim.get("/closed-positions", user=W)
        pnl = {item["slug"]: item["realizedPnl"] for item in closed}
        assert pnl == pytest.approx({MACHADO: 60.0, TRUMP: 5.0})
        assert [item["slug"] for item in closed] == [MACHADO, TRUMP]  # by realised PnL, desc
        oldest = await sim.get("/closed-positions", user=W, sortBy="TIMESTAMP", limit=1)
        assert len(oldest) == 1
        bad = await sim.http.get("/closed-positions", params={"user": "nobody"})
        assert bad.status_code == 400


async def test_the_simulator_serves_a_leaderboard() -> None:
    async with simulator(sim_resolution=RESOLUTION) as sim:
        await emitted(sim)
        other = {**yes_of(MACHADO), "user": "0x" + "9f" * 20, "shares_normalized": 10}
        await sim.post("/_sim/emit", [{**other, "side": "BUY", "price": 0.5}])
        board = await sim.get("/v1/leaderboard", timePeriod="ALL")
        assert [row["proxyWallet"] for row in board] == [W, "0x" + "9f" * 20]
        assert board[0]["rank"] == "1"
        # 60 + 5 - 20 + 2 (the open market marked at its last price) = 47; and 10 x (1 - 0.5).
        assert board[0]["pnl"] == pytest.approx(47.0) and board[1]["pnl"] == pytest.approx(5.0)
        by_volume = await sim.get("/v1/leaderboard", timePeriod="ALL", orderBy="VOL", limit=1)
        assert by_volume[0]["vol"] == pytest.approx(97.0)
        trump = await sim.get("/v1/leaderboard", timePeriod="ALL", category="TRUMP")
        assert [(row["proxyWallet"], row["pnl"]) for row in trump] == [(W, pytest.approx(5.0))]
        assert await sim.get("/v1/leaderboard", timePeriod="ALL", category="SPORTS") == []
        bad = await sim.http.get("/v1/leaderboard", params={"timePeriod": "YEAR"})
        assert bad.status_code == 400


# The store's refresher, against the simulator, Postgres and Redis.


@pytest.mark.integration
async def test_the_store_refreshes_quality_serves_it_and_feeds_the_score(
    redis_url: str,
    database_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    async with simulator(sim_resolution=RESOLUTION) as sim:
        await emitted(sim)
        settings = store_settings(
            redis_url,
            database_url,
            namespace,
            store_api_token=TOKEN,
            wallets_file=wallets_file(tmp_path, TrackedWallet(address=W, label="w")),
            data_api_url=sim.base_url,
            gamma_api_url=sim.base_url,
            validation_enabled=False,
            wallet_quality_min_decided=3,
        )
        async with serving(settings) as api:

            async def refreshed() -> bool:
                listed = (await api.client.get("/wallets")).json()
                return bool(listed and listed[0]["quality"] and listed[0]["score"] is not None)

            await wait_until(refreshed, "the wallet's quality and score")
            (wallet,) = (await api.client.get("/wallets")).json()
    quality = wallet["quality"]
    assert {k: quality[k] for k in HAND} == pytest.approx(HAND)
    assert quality["win_rate"] == pytest.approx(2 / 3)
    assert quality["score"] == pytest.approx(HAND_SCORE, abs=1e-3)
    assert quality["error"] == "" and quality["refreshed_at"] is not None
    # The score is the wallet's score now: what the detector's confidence formulas read.
    assert wallet["score"] == quality["score"]
    live, _ = await wallet_registry.snapshot(redis_client, streams)
    assert {w.address: w.score for w in live}[W] == quality["score"]


@pytest.mark.integration
async def test_an_unreachable_data_api_is_recorded_and_keeps_the_wallet(
    redis_url: str, database_url: str, namespace: str, tmp_path: Path
) -> None:
    settings = store_settings(
        redis_url,
        database_url,
        namespace,
        store_api_token=TOKEN,
        wallets_file=wallets_file(tmp_path, TrackedWallet(address=W, label="w", score=0.4)),
        data_api_url="http://127.0.0.1:9",
        validation_enabled=False,
    )
    async with serving(settings) as api:

        async def attempted() -> bool:
            listed = (await api.client.get("/wallets")).json()
            return bool(listed and listed[0]["quality"])

        await wait_until(attempted, "the failed attempt")
        (wallet,) = (await api.client.get("/wallets")).json()
    assert wallet["quality"]["error"].startswith("/closed-positions: ")
    assert "127.0.0.1" not in wallet["quality"]["error"]
    assert wallet["quality"]["refreshed_at"] is None and wallet["score"] == 0.4


class SlowHistory:
    """A Data API whose first answer waits until the test lets it go (`go`); `asked` is set once
    the refresher waits on it."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()
        self.go = asyncio.Event()

    async def history(self, address: str) -> WalletHistory:
        self.asked.set()
        await self.go.wait()
        closed = [{"asset": str(i), "conditionId": f"0x{i}", "realizedPnl": 10.0} for i in range(4)]
        return WalletHistory(closed, [], [], {})

    async def aclose(self) -> None:
        pass


@pytest.mark.integration
async def test_a_refresh_does_not_revive_or_relabel_a_wallet_changed_during_its_reads(
    redis_url: str,
    database_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    gone, renamed, kept = "0x" + "a1" * 20, "0x" + "b2" * 20, "0x" + "c3" * 20
    settings = store_settings(
        redis_url,
        database_url,
        namespace,
        wallets_file=wallets_file(
            tmp_path,
            TrackedWallet(address=gone, label="gone"),
            TrackedWallet(address=renamed, label="old"),
            TrackedWallet(address=kept, label="kept"),
        ),
        validation_enabled=False,
        wallet_quality_enabled=False,
    )
    async with running_store(settings) as store:
        source = SlowHistory()
        db = Database(database_url, pool_size=1, timeout=3, retry_min=0.05, retry_max=0.4)
        rule = ScoreRule(min_decided=4)
        config = QualityConfig("http://unused", "http://unused", rule=rule)
        refresher = QualityRefresher(db, store.wallets, config, source)  # type: ignore[arg-type]
        tick = asyncio.create_task(refresher.tick())
        await asyncio.wait_for(source.asked.wait(), 10)  # the due wallets are read: mid-tick
        assert await store.wallets.delete(gone)
        await store.wallets.put(TrackedWallet(address=renamed, label="new", score=0.9))
        source.go.set()
        assert await asyncio.wait_for(tick, 20) == 3
        score = quality_of(await source.history(kept), rule).score
        assert score is not None
        durable = {w.address: w.tracked for w in await store.wallets.tracked()}
        assert not await store.wallets.set_score(gone, 0.3)  # untracked: nothing to score
        await refresher.close()
    live, _ = await wallet_registry.snapshot(redis_client, streams)
    expected = {
        renamed: TrackedWallet(address=renamed, label="new", score=score),
        kept: TrackedWallet(address=kept, label="kept", score=score),
    }
    # The removed wallet stays removed, the new label stays; both places agree.
    assert durable == expected
    assert {w.address: w for w in live} == expected
    entries: Any = await redis_client.xrange(streams.wallets_control)
    changes = [orjson.loads(fields[b"data"]) for _, fields in entries]
    about_gone = [c["op"] for c in changes if c["wallet"]["address"] == gone]
    assert about_gone[-1] == "remove"  # no upsert of it after its removal
