"""The store's validator against real Postgres and the simulator served for real on loopback: the
markouts recorded at 5 min, 1 h and 24 h from the simulator's price history as an injected clock
passes each horizon, the settlement from its Gamma resolution, retracted signals left out, the
figures served by the history API (JSON, CSV, the summary), outages ridden out, and the store
process running it on its own clock."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from devtools.servers import free_port
from services.store import rows
from services.store.database import Database
from services.store.validator import ValidationConfig, Validator
from shared.models import FillStatus, Signal, SignalKind
from shared.redis_streams import encode
from shared.streams import Streams
from tests.helpers.processes import ServiceProcess
from tests.test_simulator_service import Running, simulator
from tests.test_store_api import Api, insert, parse_csv, seed_file, serving
from tests.test_store_outage import CuttableProxy, proxied
from tests.test_store_rows import make_signal
from tests.test_store_service import fetch, store_settings, wait_until, xadd_all

pytestmark = pytest.mark.integration

MACHADO = "0x14a3dfeba8b22a32feb0f10763db68bc4d2abeb5bff90e9ae20de53793b35a1d"
MACHADO_YES = "75406677405586796507165996816755205915219135539748390183994296030461533919844"
NAVALNAYA = "0xb1de8e4de72cc5674815e0ac09adce40ba94f3dec50e64ea15918f109fa58339"
NAVALNAYA_YES = "1537581576825635563815694463555335805660509337858114774037691442227224293436"
RESOLUTION = "data/nobel2025_resolution.json"
W1, W2 = "0x" + "1a" * 20, "0x" + "2b" * 20
FEE_BPS = 100  # 1%: fee per share = 0.01 x p x (1 - p)
T0 = int(time.time()) - 3 * 86_400  # the signals' fill: every horizon has passed in real time

# Machado's "Yes" after the fill: 0.47 at 5 min, 0.55 at 1 h, 0.97 at 24 h (the last trade at or
# before each), with trades just after each horizon that must not count.
MACHADO_TRADES = [
    (0, 0.40),
    (120, 0.45),
    (290, 0.47),
    (400, 0.60),
    (3500, 0.55),
    (3700, 0.90),
    (80_000, 0.97),
    (90_000, 0.99),
]


@dataclass
class World:
    sim: Running
    api: Api
    database_url: str
    signals: dict[str, Signal]

    def config(self, **overrides: Any) -> ValidationConfig:
        base = f"http://127.0.0.1:{self.sim.sim.port}"
        values: dict[str, Any] = {
            "prices_url": base,
            "gamma_url": base,
            "fee_bps": FEE_BPS,
            "delay_s": 60,
            "resolution_every_s": 0,
            # A horizon the history does not reach is given up at once: the tests that wait for
            # one (a trailing price history) say how long.
            "give_up_s": 0,
        }
        return ValidationConfig(**(values | overrides))

    async def rows(self) -> dict[tuple[str, str], Any]:
        records = await fetch(self.database_url, "SELECT * FROM signal_validation")
        return {(r["signal_id"], r["horizon"]): r for r in records}


def the_signals() -> dict[str, Signal]:
    def one(i: int, **fields: Any) -> Signal:
        return make_signal(
            i,
            exchange_ts=T0,
            received_at=T0 + 1.0,
            detected_at=T0 + 1.0,
            token_label="Yes",
            **fields,
        )

    machado = {"token_id": MACHADO_YES, "condition_id": MACHADO, "price": 0.40}
    return {
        "buy": one(1, kind=SignalKind.WHALE_ORDER, wallet=W1, side="BUY", **machado),
        "sell": one(2, kind=SignalKind.TRADER_EXIT, wallet=W2, side="SELL", **machado),
        # A long shot nobody traded again: flat at every horizon, and it lost.
        "long": one(
            3,
            kind=SignalKind.CONSENSUS,
            wallet=W1,
            side="BUY",
            token_id=NAVALNAYA_YES,
            condition_id=NAVALNAYA,
            price=0.07,
        ),
        # A token without any trade: no price anywhere, no market in Gamma.
        "unpriced": one(4, kind=SignalKind.WHALE_ORDER, wallet=W2, side="BUY", price=0.5),
        "retracted": one(
            5,
            kind=SignalKind.TRADER_ENTRY,
            wallet=W1,
            side="BUY",
            status=FillStatus.RETRACTED,
            status_reason="reorg",
            **machado,
        ),
    }


@contextlib.asynccontextmanager
async def world(
    redis_url: str, database_url: str, namespace: str, tmp_path: Path
) -> AsyncIterator[World]:
    settings = store_settings(
        redis_url,
        database_url,
        namespace,
        wallets_file=seed_file(tmp_path),
        # The store's own validator would run on the real clock; these tests drive one by hand.
        validation_enabled=False,
    )
    async with simulator(sim_resolution=RESOLUTION) as sim, serving(settings) as api:
        trades = [
            {"token_id": MACHADO_YES, "condition_id": MACHADO, "timestamp": T0 + dt, "price": p}
            for dt, p in MACHADO_TRADES
        ]
        trades.append(
            {"token_id": NAVALNAYA_YES, "condition_id": NAVALNAYA, "timestamp": T0, "price": 0.07}
        )
        await sim.emit(trades)
        signals = the_signals()
        await insert(api.store, rows.SIGNALS, list(signals.values()))
        yield World(sim, api, database_url, signals)


def validator(w: World, **overrides: Any) -> Validator:
    db = Database(w.database_url, pool_size=2, timeout=5, retry_min=0.05, retry_max=0.2)
    return Validator(db, w.config(**overrides))


def fee(price: float) -> float:
    return 100 * FEE_BPS / 10_000 * price * (1 - price)


def recorded(horizon: str, result: str = "measured") -> float:
    sample = REGISTRY.get_sample_value(
        "betterbot_store_validation_recorded_total", {"horizon": horizon, "result": result}
    )
    return sample or 0.0


async def test_each_horizon_is_recorded_once_it_has_passed_and_the_settlement_once_resolved(
    redis_url: str, database_url: str, namespace: str, tmp_path: Path
) -> None:
    async with world(redis_url, database_url, namespace, tmp_path) as w:
        ids = {name: s.signal_id for name, s in w.signals.items()}
        v = validator(w, give_up_s=21_600)
        measured_before = recorded("5m")
        try:
            # Before 5 min (and the delay) have passed: only the settlements, already resolved.
            report = await v.cycle(now=T0 + 300)
            assert (report.markouts, report.no_price, report.settlements) == (0, 0, 3)
            got = await w.rows()
            assert set(got) == {(ids[n], "settlement") for n in ("buy", "sell", "long")}
            assert got[ids["buy"], "settlement"]["price"] == 1.0
            assert got[ids["buy"], "settlement"]["markout_cents"] == pytest.approx(60 - fee(0.4))
            assert got[ids["sell"], "settlement"]["markout_cents"] == pytest.approx(-60 - fee(0.4))
            assert got[ids["long"], "settlement"]["markout_cents"] == pytest.approx(-7 - fee(0.07))

            # The token without a trade has no price yet: it may still come (a trailing price
            # history), so its horizons wait until their targets are 6 h old.
            report = await v.cycle(now=T0 + 360)  # 5 min + the delay
            assert (report.markouts, report.no_price, report.waiting) == (3, 0, 1)
            report = await v.cycle(now=T0 + 3_660)
            assert (report.markouts, report.no_price, report.waiting) == (3, 0, 2)
            report = await v.cycle(now=T0 + 86_460)
            assert (report.markouts, report.no_price, report.waiting) == (3, 2, 1)
            report = await v.cycle(now=T0 + 200_000)
            # Nothing else is due: the last horizon given up, nothing measured twice.
            assert (report.markouts, report.no_price, report.waiting) == (0, 1, 0)
        finally:
            await v.close()
        assert recorded("5m") - measured_before == 3

        got = await w.rows()
        expected = {"5m": (0.47, 7.0), "1h": (0.55, 15.0), "24h": (0.97, 57.0)}
        for horizon, (price, move) in expected.items():
            buy, sell = got[ids["buy"], horizon], got[ids["sell"], horizon]
            assert buy["price"] == price and sell["price"] == price
            assert buy["markout_cents"] == pytest.approx(move - fee(0.4))
            assert sell["markout_cents"] == pytest.approx(-move - fee(0.4))
            assert buy["fee_cents"] == pytest.approx(fee(0.4))
            target = T0 + {"5m": 300, "1h": 3600, "24h": 86_400}[horizon]
            assert buy["target_at"].timestamp() == target == buy["price_at"].timestamp()
            # The long shot never traded again: its own fill is its price, flat before the fee.
            assert got[ids["long"], horizon]["markout_cents"] == pytest.approx(-fee(0.07))
            # No price at all: the horizon is recorded as tried, without figures.
            unpriced = got[ids["unpriced"], horizon]
            assert unpriced["price"] is None and unpriced["markout_cents"] is None
        assert not [key for key in got if key[0] == ids["retracted"]]
        assert len(got) == 3 * 4 + 3


async def test_the_history_api_serves_each_signals_validation_and_the_summary(
    redis_url: str, database_url: str, namespace: str, tmp_path: Path
) -> None:
    async with world(redis_url, database_url, namespace, tmp_path) as w:
        v = validator(w)
        try:
            await v.cycle(now=T0 + 90_000)
        finally:
            await v.close()
        client = w.api.client
        items = {i["signal_id"]: i for i in (await client.get("/signals")).json()["items"]}
        buy = items[w.signals["buy"].signal_id]
        assert buy["markout_5m_cents"] == pytest.approx(7 - fee(0.4))
        assert buy["markout_1h_cents"] == pytest.approx(15 - fee(0.4))
        assert buy["markout_24h_cents"] == pytest.approx(57 - fee(0.4))
        assert buy["settlement_payout"] == 1.0
        assert buy["settlement_cents"] == pytest.approx(60 - fee(0.4))
        assert buy["validation_fee_cents"] == pytest.approx(fee(0.4))
        for name in ("unpriced", "retracted"):
            item = items[w.signals[name].signal_id]
            assert item["markout_5m_cents"] is None and item["settlement_cents"] is None
        # Filters and paging still read the signal's own columns.
        whales = await client.get("/signals", params={"kind": "whale_order", "limit": 1})
        assert whales.status_code == 200 and whales.json()["next_cursor"]

        table = parse_csv((await client.get("/signals", params={"format": "csv"})).text)
        by_id = {row["signal_id"]: row for row in table}
        assert float(by_id[w.signals["sell"].signal_id]["markout_1h_cents"]) == pytest.approx(
            -15 - fee(0.4)
        )
        assert by_id[w.signals["unpriced"].signal_id]["markout_1h_cents"] == ""

        summary = (await client.get("/signals/validation", params={"by": "kind"})).json()
        rows_ = {(r["group"], r["horizon"]): r for r in summary["rows"]}
        assert summary["horizons"] == ["5m", "1h", "24h", "settlement"]
        assert len(rows_) == len(SignalKind) * 4  # every kind, every horizon
        whale_5m = rows_["whale_order", "5m"]  # the unpriced whale is not counted
        assert (whale_5m["n"], whale_5m["hits"]) == (1, 1)
        assert whale_5m["verdict"] == "not significant (n < 10)"
        entry = rows_["trader_entry", "settlement"]  # only the retracted one: nothing
        assert entry["n"] == 0 and entry["verdict"] == "not measured"
        consensus = rows_["consensus", "24h"]
        assert (consensus["n"], consensus["hits"], consensus["flat"]) == (1, 0, 0)
        by_wallet = (await client.get("/signals/validation", params={"by": "wallet"})).json()
        w1 = [r for r in by_wallet["rows"] if r["group"] == W1 and r["horizon"] == "settlement"]
        assert w1[0]["n"] == 2 and w1[0]["mean_markout_cents"] == pytest.approx(
            (60 - fee(0.4) - 7 - fee(0.07)) / 2
        )
        bad = await client.get("/signals/validation", params={"by": "colour"})
        assert bad.status_code == 422

        # A signal retracted after its markouts were recorded leaves the statistics.
        sell = w.signals["sell"]
        gone = sell.model_copy(update={"status": FillStatus.RETRACTED, "status_reason": "reorg"})
        prepared = rows.prepare(rows.SIGNALS, [("99-0", encode(gone))])
        await w.api.store.db.write(rows.SIGNALS, prepared.rows)
        summary = (await client.get("/signals/validation")).json()
        exits = [r for r in summary["rows"] if r["group"] == "trader_exit"]
        assert exits and all(r["n"] == 0 for r in exits)


async def test_outages_of_postgres_and_of_the_price_history_are_ridden_out(
    redis_url: str, database_url: str, namespace: str, tmp_path: Path
) -> None:
    async with world(redis_url, database_url, namespace, tmp_path) as w:
        sim_proxy = CuttableProxy("127.0.0.1", w.sim.sim.port)
        await sim_proxy.start()
        async with proxied(database_url) as (pg_proxy, proxied_url):
            await pg_proxy.cut()
            await sim_proxy.cut()
            db = Database(proxied_url, pool_size=2, timeout=2, retry_min=0.05, retry_max=0.2)
            config = replace(
                w.config(every_s=0.05), prices_url=f"http://127.0.0.1:{sim_proxy.port}"
            )
            v = Validator(db, config, clock=lambda: T0 + 90_000)
            stop = asyncio.Event()
            task = asyncio.create_task(v.run(stop))
            try:
                errors = "betterbot_store_validation_errors_total"
                before = REGISTRY.get_sample_value(errors, {"what": "postgres"}) or 0.0
                await asyncio.sleep(0.5)
                assert not task.done()
                assert (REGISTRY.get_sample_value(errors, {"what": "postgres"}) or 0) > before
                assert await w.rows() == {}

                # Postgres back, the price host still away: settlements only, then markouts.
                await pg_proxy.restore()
                await wait_until(lambda: _count(w, "settlement", 3), "the settlements")
                assert not [k for k in await w.rows() if k[1] != "settlement"]
                await sim_proxy.restore()
                await wait_until(lambda: _count(w, None, 3 * 4 + 3), "every markout")
                assert not task.done()
            finally:
                stop.set()
                await task
                await v.close()
                await sim_proxy.close()


async def _count(w: World, horizon: str | None, expected: int) -> bool:
    got = await w.rows()
    return len([k for k in got if horizon is None or k[1] == horizon]) >= expected


def start_store(env: dict[str, str]) -> ServiceProcess:
    port = free_port()
    return ServiceProcess(
        "store",
        {**env, "OPS_PORT": str(port), "STORE_BLOCK_MS": "20", "LOG_LEVEL": "INFO"},
        f"http://127.0.0.1:{port}/health",
        tag="store-validation-",
    )


async def test_the_store_process_validates_on_its_own_clock(
    redis_url: str,
    database_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
) -> None:
    async with simulator(sim_resolution=RESOLUTION) as sim:
        await sim.emit(
            [
                {"token_id": MACHADO_YES, "condition_id": MACHADO, "timestamp": T0 + dt, "price": p}
                for dt, p in MACHADO_TRADES
            ]
        )
        base = f"http://127.0.0.1:{sim.sim.port}"
        proc = start_store(
            {
                "REDIS_URL": redis_url,
                "DATABASE_URL": database_url,
                "STREAM_NAMESPACE": namespace,
                "VALIDATION_PRICES_URL": base,
                "GAMMA_API_URL": base,
                "VALIDATION_EVERY_S": "0.2",
                "VALIDATION_RESOLUTION_EVERY_S": "0.5",
                "VALIDATION_FEE_BPS": str(FEE_BPS),
            }
        )
        try:
            await asyncio.to_thread(proc.wait_healthy)
            signals = the_signals()
            await xadd_all(redis_client, streams.signals, [signals["buy"], signals["sell"]])
            api = proc.health_url.rsplit("/", 1)[0]
            async with httpx.AsyncClient(base_url=api) as client:

                async def all_recorded() -> bool:
                    body = (await client.get("/signals/validation")).json()
                    return sum(r["n"] for r in body["rows"]) == 2 * 4

                await wait_until(all_recorded, "every horizon of both signals", within_s=30)
                summary = (await client.get("/signals/validation")).json()
                metrics = (await client.get("/metrics")).text
            rows_ = {(r["group"], r["horizon"]): r for r in summary["rows"]}
            assert rows_["whale_order", "24h"]["mean_markout_cents"] == pytest.approx(57 - fee(0.4))
            assert rows_["trader_exit", "settlement"]["hits"] == 0
            assert (
                'betterbot_store_validation_recorded_total{horizon="5m",result="measured"} 2.0'
                in (metrics)
            )
        finally:
            proc.stop()
        assert "Traceback" not in proc.log_text()
        assert '"event":"validation_recorded"' in proc.log_text()


async def test_a_refused_price_answer_records_nothing_for_that_item(
    redis_url: str, database_url: str, namespace: str, tmp_path: Path
) -> None:
    async with world(redis_url, database_url, namespace, tmp_path) as w:
        base = f"http://127.0.0.1:{w.sim.sim.port}"
        refusing = validator(w, prices_url=f"{base}/nowhere")  # every answer a 404
        errors = "betterbot_store_validation_errors_total"
        before = REGISTRY.get_sample_value(errors, {"what": "prices"}) or 0.0
        try:
            report = await refusing.cycle(now=T0 + 90_000)
        finally:
            await refusing.close()
        assert (report.markouts, report.no_price, report.settlements) == (0, 0, 3)
        assert (REGISTRY.get_sample_value(errors, {"what": "prices"}) or 0) - before == 4 * 3
        assert {k[1] for k in await w.rows()} == {"settlement"}
        working = validator(w)
        try:
            report = await working.cycle(now=T0 + 90_000)
        finally:
            await working.close()
        assert (report.markouts, report.no_price, report.settlements) == (9, 3, 0)


async def prices_requests(w: World) -> int:
    requests = (await w.sim.http.get("/_sim/requests")).json()
    return sum(1 for r in requests if r["path"] == "/prices-history")


async def test_a_trailing_price_history_is_waited_for_and_a_429_honoured(
    redis_url: str, database_url: str, namespace: str, tmp_path: Path
) -> None:
    """The simulator's price history trails its trades (`/_sim/prices_lag`): it answers a span
    that ends early, whose last point is a stale price. The validator waits for it instead of
    recording that price, and measures the horizon once the history reaches it. A 429 ends the
    cycle's markouts, and nothing is asked of the host before its Retry-After."""
    async with world(redis_url, database_url, namespace, tmp_path) as w:
        # A fill "in the future" of the simulator's clock, so a lag of a second cuts its span.
        t1 = int(time.time()) + 5_000
        await w.sim.emit(
            [
                {"token_id": MACHADO_YES, "condition_id": MACHADO, "timestamp": t1 + dt, "price": p}
                for dt, p in [(0, 0.30), (200, 0.35)]
            ]
        )
        fresh = make_signal(
            9,
            kind=SignalKind.WHALE_ORDER,
            wallet=W1,
            side="BUY",
            token_id=MACHADO_YES,
            condition_id=MACHADO,
            price=0.30,
            exchange_ts=t1,
            received_at=t1 + 1.0,
            detected_at=float(int(time.time())),
        )
        await insert(w.api.store, rows.SIGNALS, [fresh])
        await asyncio.sleep(1.2)  # the trades just emitted are older than the lag
        lagging = await w.sim.http.post("/_sim/prices_lag", json={"seconds": 1})
        assert lagging.status_code == 200 and lagging.json()["prices_lag_s"] == 1
        v = validator(w, give_up_s=21_600, delay_s=0)
        try:
            # (The world's older signals are measured in this first cycle.)
            report = await v.cycle(now=t1 + 300)
            assert report.waiting == 1
            assert (fresh.signal_id, "5m") not in await w.rows()

            await w.sim.http.post("/_sim/prices_lag", json={"seconds": 0})
            throttled = await w.sim.http.post(
                "/_sim/rate_limit", json={"requests": 1, "retry_after": 2}
            )
            assert throttled.status_code == 200
            asked = await prices_requests(w)
            report = await v.cycle(now=t1 + 300)
            assert (report.markouts, report.waiting) == (0, 0)
            # Quiet until the Retry-After has passed: the next cycle asks nothing.
            await v.cycle(now=t1 + 300)
            assert await prices_requests(w) == asked + 1
            await asyncio.sleep(2.1)
            report = await v.cycle(now=t1 + 300)
            assert (report.markouts, report.waiting) == (1, 0)
        finally:
            await v.close()
        row = (await w.rows())[fresh.signal_id, "5m"]
        assert row["price"] == 0.35 and row["price_at"].timestamp() == t1 + 300
        assert row["markout_cents"] == pytest.approx(5 - fee(0.30))
