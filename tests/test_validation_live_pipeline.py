"""Issue 17, live: the simulator, ingestor, detector and store as real processes on loopback (real
Redis and Postgres), the detector seeding positions from the simulator's `/positions`, the store's
validator reading the simulator's `/prices-history` and Gamma resolutions, and its wallet-quality
refresher reading `/positions`, `/closed-positions` and `/trades`. The stored signals, their
markouts and settlements, the `/signals/validation` summary and one wallet's quality are checked
against figures computed here, by hand, from the trades this test injects.

Time: the validator runs on the store's real clock, so a horizon is measured only once it has
ended. The whale fills are therefore stamped three days ago (every horizon ended long since, and
they were detected now, inside the validator's lookback). A `trader_entry` needs a fill *after*
the wallet's `/positions` snapshot (a fill at or before it is in the snapshot and opens nothing),
i.e. after the detector started: those fills are stamped now, so only their settlement is due
(a settlement needs no horizon to pass: the markets resolved already), not their markouts.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from devtools.servers import free_port
from shared.models import TrackedWallet
from shared.streams import DETECTOR_GROUP, Streams
from shared.wallets import dump_wallets
from tests.helpers.processes import ServiceProcess

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

ROOT = Path(__file__).resolve().parent.parent
TAPE = orjson.loads((ROOT / "data" / "polymarket_trades_nobel2025.json").read_bytes())
RESOLUTION = str(ROOT / "data" / "nobel2025_resolution.json")
WITHIN_S = 40.0  # only turns a hang into a failure

# The tracked wallets: A held Navalnaya "Yes" before the window (its /positions says so), B is the
# wallet whose quality is checked, C only sells.
A, B, C = "0x" + "a1" * 20, "0x" + "b2" * 20, "0x" + "c3" * 20
Z = "0x" + "9d" * 20  # untracked: makes the prices, never reaches the ingestor (not subscribed)
MACHADO = "will-mara-corina-machado-win-the-nobel-peace-prize-in-2025"  # Yes paid 1, No 0
NAVALNAYA = "will-yulia-navalnaya-win-the-nobel-peace-prize-in-2025"  # Yes paid 0, No 1
FEE_BPS = 100  # 1 %: fee per share = 0.01 x p x (1 - p) dollars


def tape_item(slug: str, outcome: str) -> dict[str, Any]:
    return next(t for t in TAPE if t["slug"] == slug and t["outcome"] == outcome)


def token(slug: str, outcome: str) -> dict[str, str]:
    """The Dome-shaped market fields of one outcome of a tape market."""
    item = tape_item(slug, outcome)
    return {
        "token_id": item["asset"],
        "condition_id": item["conditionId"],
        "market_slug": slug,
        "token_label": outcome,
        "title": item["title"],
    }


MY, NY = token(MACHADO, "Yes"), token(NAVALNAYA, "Yes")
# A market of no tape: Gamma does not know it (never resolved), so its holdings stay unrealised.
OPEN = {"token_id": "77" * 30, "condition_id": "0x" + "e7" * 32, "market_slug": "open-market"}


def fill(who: str, market: dict[str, str], side: str, shares: float, price: float, ts: int) -> Any:
    return {
        **market,
        "user": who,
        "side": side,
        "shares_normalized": shares,
        "price": price,
        "timestamp": ts,
    }


def fee(price: float) -> float:
    """The follower's taker fee per share in cents: 100 x 0.01 x p x (1 - p)."""
    return 100 * FEE_BPS / 10_000 * price * (1 - price)


def price_at(trades: list[tuple[int, float]], target: int) -> float:
    """The last trade at or before `target` (trades listed in time order)."""
    return [p for t, p in trades if t <= target][-1]


def write_tapes(tmp_path: Path, now: int) -> tuple[Path, Path, Path]:
    """The simulator's tape (one untracked trade of each outcome of the two markets, so Gamma
    knows both markets with both tokens; replayed now, after every horizon of this test), the
    earlier tape `/positions` starts from (A bought 300 Navalnaya "Yes" an hour before), and the
    wallets file."""
    tape = [
        {**tape_item(slug, outcome), "proxyWallet": Z, "timestamp": now}
        for slug in (MACHADO, NAVALNAYA)
        for outcome in ("Yes", "No")
    ]
    earlier = [
        {
            **tape_item(NAVALNAYA, "Yes"),
            "proxyWallet": A,
            "side": "BUY",
            "size": 300,
            "price": 0.12,
            "timestamp": now - 3600,
        }
    ]
    wallets = [TrackedWallet(address=w, label=f"w{w[2]}") for w in (A, B, C)]
    paths = (tmp_path / "tape.json", tmp_path / "earlier.json", tmp_path / "wallets.json")
    paths[0].write_bytes(orjson.dumps(tape))
    paths[1].write_bytes(orjson.dumps(earlier))
    paths[2].write_bytes(dump_wallets(wallets))
    return paths


@pytest.fixture
def processes() -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for proc in reversed(started):
        proc.stop()


async def until(check: Callable[[], Awaitable[Any]], what: str) -> Any:
    deadline = time.monotonic() + WITHIN_S
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WITHIN_S}s waiting for {what}")
        await asyncio.sleep(0.1)


async def test_the_live_pipeline_stores_validation_figures_computed_by_hand(
    redis_url: str,
    database_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
    processes: list[ServiceProcess],
    tmp_path: Path,
) -> None:
    now = int(time.time())
    tape, earlier, wallets = write_tapes(tmp_path, now)
    key = "vl" + secrets.token_hex(8)
    sim_port, store_port, det_port, ing_port = (free_port() for _ in range(4))
    sim_url, store_url = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{store_port}"
    env = {
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "STREAM_NAMESPACE": namespace,
        "WALLETS_FILE": str(wallets),
        "LOG_LEVEL": "INFO",
    }

    def start(name: str, extra: dict[str, str], health: str) -> ServiceProcess:
        proc = ServiceProcess(name, {**env, **extra}, health, tag="validation-live-")
        processes.append(proc)
        return proc

    sim = start(
        "simulator",
        {
            "SIM_PORT": str(sim_port),
            "SIM_SPEED": "1000",
            "SIM_LOOP": "false",
            "SIM_API_KEY": key,
            "SIM_TAPE": str(tape),
            "SIM_RESOLUTION": RESOLUTION,
            "SIM_POSITIONS_TAPE": str(earlier),
            # The Data API's CDN would answer a repeated /positions URL from its cache.
            "SIM_CDN_CACHE_S": "0",
        },
        f"{sim_url}/health",
    )
    await asyncio.to_thread(sim.wait_healthy)
    store = start(
        "store",
        {
            "OPS_PORT": str(store_port),
            "STORE_BLOCK_MS": "20",
            "VALIDATION_PRICES_URL": sim_url,
            "GAMMA_API_URL": sim_url,
            "DATA_API_URL": sim_url,
            "VALIDATION_FEE_BPS": str(FEE_BPS),
            "VALIDATION_EVERY_S": "0.2",
            "VALIDATION_DELAY_S": "1",
            "VALIDATION_RESOLUTION_EVERY_S": "0.3",
            "WALLET_QUALITY_EVERY_S": "0.5",
            "WALLET_QUALITY_TICK_S": "0.3",
            "WALLET_QUALITY_SETS_SCORE": "false",
        },
        f"{store_url}/health",
    )
    detector = start(
        "detector",
        {
            "OPS_PORT": str(det_port),
            "DETECTOR_SEED_POSITIONS": "true",
            "DATA_API_URL": sim_url,
        },
        f"http://127.0.0.1:{det_port}/health",
    )
    await asyncio.gather(
        asyncio.to_thread(store.wait_healthy), asyncio.to_thread(detector.wait_healthy)
    )
    async with httpx.AsyncClient(timeout=5) as http:

        async def seeded() -> bool:
            body = (await http.get(f"http://127.0.0.1:{det_port}/health")).json()
            return bool(body.get("seeded_wallets") == 3)

        await until(seeded, "the detector to seed the three wallets from /positions")
        # Every snapshot was taken at or before this second: a fill stamped later is new.
        snapshots_by = int(time.time())
        ingestor = start(
            "ingestor",
            {
                "OPS_PORT": str(ing_port),
                "DOME_WS_URL": f"ws://127.0.0.1:{sim_port}",
                "DOME_API_URL": f"{sim_url}/v1",
                "DOME_API_KEY": key,
                "DOME_RECONNECT_MIN_S": "0.2",
            },
            f"http://127.0.0.1:{ing_port}/health",
        )
        await asyncio.to_thread(ingestor.wait_healthy)

        async def tape_done() -> bool:
            return bool((await http.get(f"{sim_url}/_sim/status")).json()["tape_done"])

        await until(tape_done, "the ingestor's subscription to start (and the tape to end)")

        async def next_second() -> bool:
            return time.time() >= snapshots_by + 1

        await until(next_second, "a second after the snapshots")
        live = int(time.time())  # after every /positions snapshot: fills that can open positions
        t0 = now - 3 * 86_400  # three days ago: every horizon of these fills has ended

        # Machado "Yes" after the whales' fills, by the untracked Z (tracked fills count too).
        machado_prices = [
            (t0 + 120, 0.45),
            (t0 + 290, 0.47),
            (t0 + 400, 0.60),
            (t0 + 3500, 0.55),
            (t0 + 3700, 0.90),
            (t0 + 80_000, 0.97),
            (t0 + 90_000, 0.99),
        ]
        whale_buy = fill(B, MY, "BUY", 3000, 0.40, t0)  # $1,200: a whale
        whale_sell = fill(C, MY, "SELL", 2500, 0.42, t0 + 10)  # $1,050: a whale
        held_buy = fill(A, NY, "BUY", 100, 0.15, live)  # $15, but A already holds 300
        new_buy = fill(A, MY, "BUY", 50, 0.60, live)  # $30, A holds no Machado "Yes"
        open_buy = fill(B, OPEN, "BUY", 40, 0.50, live)  # $20, a market nobody resolved
        emitted = [
            *(fill(Z, MY, "BUY", 10, p, t) for t, p in machado_prices),
            whale_buy,
            whale_sell,
            held_buy,
            new_buy,
            open_buy,
            fill(Z, OPEN, "BUY", 10, 0.65, live),  # the open market's last price: 0.65
        ]
        answer = await http.post(f"{sim_url}/_sim/emit", content=orjson.dumps(emitted))
        assert answer.status_code == 200, answer.text
        emitted_at = datetime.fromtimestamp(time.time()).astimezone()
        tracked_fills = [whale_buy, whale_sell, held_buy, new_buy, open_buy]

        # What must come of them, by hand (docs/signals.md):
        # - whale_buy, whale_sell: `whale_order` (notional >= $1,000) only: stamped before the
        #   wallets' /positions snapshots, they count as in them (no entry, no exit);
        # - held_buy: nothing: A held 300 before (its /positions), so no new position;
        # - new_buy, open_buy: `trader_entry`, opening a position (opens_position true).
        expected_signals = {
            ("whale_order", B, MY["token_id"], "BUY", 0.40),
            ("whale_order", C, MY["token_id"], "SELL", 0.42),
            ("trader_entry", A, MY["token_id"], "BUY", 0.60),
            ("trader_entry", B, OPEN["token_id"], "BUY", 0.50),
        }

        # Markouts, from the Machado "Yes" trades above plus the whales' own:
        machado = sorted([(t0, 0.40), (t0 + 10, 0.42), *machado_prices])
        # whale_buy at t0: 5 min -> t0+300: 0.47 (t0+290); 1 h -> t0+3600: 0.55 (t0+3500);
        # 24 h -> t0+86400: 0.97 (t0+80000). BUY: (later - 0.40) x 100 - fee(0.40) = 7, 15, 57
        # cents less 0.24. whale_sell at t0+10 (t0+310, t0+3610, t0+86410: the same trades):
        # SELL: (0.42 - later) x 100 - fee(0.42) = -5, -13, -55 cents less 0.2436.
        horizons = {"5m": 300, "1h": 3600, "24h": 86_400}
        assert [price_at(machado, t0 + s) for s in horizons.values()] == [0.47, 0.55, 0.97]
        buy_cents = {
            h: 100 * (price_at(machado, t0 + s) - 0.40) - fee(0.40) for h, s in horizons.items()
        }
        sell_cents = {
            h: 100 * (0.42 - price_at(machado, t0 + 10 + s)) - fee(0.42)
            for h, s in horizons.items()
        }
        # Settlements: Machado "Yes" paid 1. BUY at 0.40: +60 - 0.24; SELL at 0.42: -58 - 0.2436;
        # the entry at 0.60: +40 - 0.24. The open market never resolves: no settlement.
        buy_cents["settlement"] = 100 * (1 - 0.40) - fee(0.40)
        sell_cents["settlement"] = 100 * (0.42 - 1) - fee(0.42)
        entry_settlement = 100 * (1 - 0.60) - fee(0.60)

        db = await asyncpg.connect(database_url)
        try:

            async def orders_stored() -> bool:
                return bool(await db.fetchval("SELECT count(*) FROM orders") >= len(tracked_fills))

            await until(orders_stored, "the five tracked fills in Postgres")

            async def detector_drained() -> bool:
                groups = await redis_client.xinfo_groups(streams.orders_raw)
                group = next((g for g in groups if g["name"] == DETECTOR_GROUP.encode()), None)
                return group is not None and group["lag"] == 0 and group["pending"] == 0

            await until(detector_drained, "the detector to decide every fill")

            async def signals_stored() -> list[asyncpg.Record]:
                rows = await db.fetch(
                    "SELECT signal_id, kind, wallet, token_id, side, price, payload FROM signals"
                )
                return rows if len(rows) >= len(expected_signals) else []

            signals = await until(signals_stored, "the four signals in Postgres")
            # Every entry on the signals stream is in the table (nothing else still on its way).
            assert len(signals) == await redis_client.xlen(streams.signals)
            assert {
                (r["kind"], r["wallet"], r["token_id"], r["side"], r["price"]) for r in signals
            } == expected_signals
            by = {(r["kind"], r["wallet"], r["token_id"]): r for r in signals}
            buy_id = by["whale_order", B, MY["token_id"]]["signal_id"]
            sell_id = by["whale_order", C, MY["token_id"]]["signal_id"]
            entry_id = by["trader_entry", A, MY["token_id"]]["signal_id"]
            open_id = by["trader_entry", B, OPEN["token_id"]]["signal_id"]
            for signal_id in (entry_id, open_id):
                payload = orjson.loads(
                    next(r for r in signals if r["signal_id"] == signal_id)["payload"]
                )
                assert payload["opens_position"] is True

            expected_rows = {
                **{(buy_id, h): cents for h, cents in buy_cents.items()},
                **{(sell_id, h): cents for h, cents in sell_cents.items()},
                (entry_id, "settlement"): entry_settlement,
            }

            async def validated() -> list[asyncpg.Record]:
                rows = await db.fetch("SELECT * FROM signal_validation")
                return rows if len(rows) >= len(expected_rows) else []

            rows = await until(validated, "every markout and settlement due")
            got = {(r["signal_id"], r["horizon"]): r for r in rows}
            assert set(got) == set(expected_rows)
            for key_, cents in expected_rows.items():
                assert got[key_]["markout_cents"] == pytest.approx(cents), key_
            for h, s in horizons.items():
                assert got[buy_id, h]["price"] == price_at(machado, t0 + s)
                assert got[buy_id, h]["target_at"].timestamp() == t0 + s
                assert got[buy_id, h]["fee_cents"] == pytest.approx(fee(0.40))
                assert got[sell_id, h]["target_at"].timestamp() == t0 + 10 + s
            assert got[buy_id, "settlement"]["price"] == 1.0
            assert got[entry_id, "settlement"]["fee_cents"] == pytest.approx(fee(0.60))
        finally:
            await db.close()

        # The history API serves each signal's figures as columns.
        items = (await http.get(f"{store_url}/signals", params={"limit": 50})).json()["items"]
        served = {item["signal_id"]: item for item in items}
        assert served[buy_id]["markout_1h_cents"] == pytest.approx(buy_cents["1h"])
        assert served[sell_id]["settlement_cents"] == pytest.approx(sell_cents["settlement"])
        assert served[entry_id]["settlement_cents"] == pytest.approx(entry_settlement)
        assert served[entry_id]["markout_5m_cents"] is None  # 5 minutes have not passed
        assert served[open_id]["settlement_cents"] is None  # the market never resolved

        summary = (await http.get(f"{store_url}/signals/validation", params={"by": "kind"})).json()
        table = {(r["group"], r["horizon"]): r for r in summary["rows"]}
        for h in ("5m", "1h", "24h", "settlement"):
            whale = table["whale_order", h]
            assert whale["n"] == 2
            assert whale["mean_markout_cents"] == pytest.approx((buy_cents[h] + sell_cents[h]) / 2)
            assert whale["hits"] == (buy_cents[h] > 0) + (sell_cents[h] > 0)
        entries = table["trader_entry", "settlement"]
        assert (entries["n"], entries["hits"]) == (1, 1)
        assert entries["mean_markout_cents"] == pytest.approx(entry_settlement)
        assert table["trader_entry", "5m"]["n"] == 0  # its horizons have not ended yet

        # B's quality, from /closed-positions, /positions and /trades:
        # - Machado "Yes": 3000 bought at 0.40 ($1,200), resolved Yes: redeemed for $3,000,
        #   realised 3000 x (1 - 0.40) = +1,800, a win;
        # - the open market: 40 at 0.50 ($20), last traded 0.65: worth $26, unrealised +6;
        # - two markets, two trades, volume 1,200 + 20 = 1,220.
        hand = {
            "realised_pnl": 3000 * (1 - 0.40),
            "unrealised_pnl": 40 * (0.65 - 0.50),
            "wins": 1,
            "losses": 0,
            "markets_traded": 2,
            "trades": 2,
            "volume_usd": 3000 * 0.40 + 40 * 0.50,
        }

        async def refreshed_after(moment: datetime) -> datetime | None:
            listed = (await http.get(f"{store_url}/wallets")).json()
            quality = next(w for w in listed if w["address"] == B)["quality"]
            at = quality and quality["refreshed_at"]
            stamp = datetime.fromisoformat(at) if at else None
            return stamp if stamp is not None and stamp > moment else None

        # A refresh that started before the trades may save after them: wait for the one after.
        first = await until(lambda: refreshed_after(emitted_at), "a refresh of B's quality")
        await until(lambda: refreshed_after(first), "a refresh that read every trade")
        listed = (await http.get(f"{store_url}/wallets")).json()
        quality = next(w for w in listed if w["address"] == B)["quality"]
        assert {k: quality[k] for k in hand} == pytest.approx(hand)
        assert quality["win_rate"] == 1.0 and quality["error"] == ""

    for proc in processes:
        assert "Traceback" not in proc.log_text(), proc.name
