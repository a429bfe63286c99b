"""The dashboard's pictures in real headless Chromium, against a running pipeline: the real store
and detector as processes on real Redis and Postgres, the notifier serving the page, the
simulator's price history for the store's validator.

Fills of the tracked wallets (the Nobel 2025 tape, moved to the last 40 minutes) go in through the
ingestor's own publishing script (`OrdersRaw`): first from one source, then again from a slower
one, which records the per-source lag in Redis. The detector turns them into signals, the store
keeps fills and signals and measures the signals' markouts. Then the page opens, more fills are
published, and the live signals must reach it. Each picture's figures (its table and the data
attributes of what it draws) must match the store's history API, or the source-lag reader; a
hostile market title must show as text; at 390 px the page must not scroll sideways.
Screenshots go to the test's tmp_path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr

from devtools.servers import free_port
from services.notifier.main import Notifier
from shared.models import DomeOrder, OrderFill, Source
from shared.orders_raw import OrdersRaw, Outgoing
from shared.source_lag import read_source_lag
from shared.streams import Streams
from tests.helpers.notifier import http_url, make_signal, running_notifier
from tests.helpers.notifier import publish as publish_signals
from tests.helpers.processes import ROOT, ServiceProcess
from tests.test_notifier_dashboard import CHROMIUM_ARGS, chromium, wait_js  # noqa: F401 (a fixture)
from tests.test_notifier_dashboard_api import FakeStore, serving
from tests.test_simulator_service import simulator

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

TAPE = ROOT / "data" / "polymarket_trades_nobel2025.json"
WALLETS = ROOT / "config" / "wallets.example.json"
HOSTILE = '<img src=x onerror="window.__pwned=1">Nobel & "peace" <b>prize</b>'
HISTORY_FILLS = 260
LIVE_FILLS = 60
WAIT_S = 45.0
# The page's bucket (BUCKET_S) and window (WINDOW_S), as the test reads the store.
BUCKET_S, WINDOW_S = 60, 3600


def tape_fills(now: float) -> list[DomeOrder]:
    """The tracked wallets' trades of the tape, in time order, moved so the last one happened two
    minutes ago; the tape's busiest token carries a hostile title."""
    trades = json.loads(TAPE.read_text())
    tracked = {w["address"].lower() for w in json.loads(WALLETS.read_text())}
    shift = int(now) - 120 - max(t["timestamp"] for t in trades)
    mine = sorted(
        (t for t in trades if t["proxyWallet"].lower() in tracked), key=lambda t: t["timestamp"]
    )
    busiest = Counter(t["asset"] for t in mine).most_common(1)[0][0]
    return [
        DomeOrder(
            token_id=t["asset"],
            token_label=t["outcome"],
            side=t["side"],
            market_slug=t["slug"],
            condition_id=t["conditionId"],
            shares_normalized=t["size"],
            price=t["price"],
            tx_hash=t["transactionHash"],
            title=HOSTILE if t["asset"] == busiest else t["title"],
            timestamp=t["timestamp"] + shift,
            user=t["proxyWallet"],
        )
        for t in mine
    ]


def price_history(now: float) -> list[dict[str, Any]]:
    """Every trade of the tape (tracked or not), moved like the fills: the simulator's prices."""
    trades = json.loads(TAPE.read_text())
    shift = int(now) - 120 - max(t["timestamp"] for t in trades)
    return [
        {
            "token_id": t["asset"],
            "condition_id": t["conditionId"],
            "timestamp": t["timestamp"] + shift,
            "price": t["price"],
        }
        for t in trades
    ]


async def publish(orders: OrdersRaw, batch: list[DomeOrder], *, lagging: bool) -> None:
    """Each fill from Dome's WebSocket first; with `lagging`, two in three again from the Data
    API, 0.3 to 4.5 s later."""
    received = time.time()
    first = [OrderFill.from_dome(order, Source.DOME_WS, received) for order in batch]
    await orders.deliver([Outgoing(fill) for fill in first])
    if lagging:
        again = [
            OrderFill.from_dome(order, Source.DATA_API, received + 0.3 + (n % 10) * 0.45)
            for n, order in enumerate(batch)
            if n % 3
        ]
        await orders.deliver([Outgoing(fill) for fill in again])


@contextlib.contextmanager
def services(env: dict[str, str]) -> Iterator[tuple[str, list[ServiceProcess]]]:
    """The store and the detector as processes; the store API's URL."""
    store_port, detector_port = free_port(), free_port()
    store_url = f"http://127.0.0.1:{store_port}"
    procs = [
        ServiceProcess(
            "store",
            # The wallets' quality figures from the simulator's Data API (the detector keeps
            # none: it would seed the tape's positions, and the tape's entries would not be new).
            {
                **env,
                "OPS_PORT": str(store_port),
                "STORE_BLOCK_MS": "20",
                "DATA_API_URL": env["VALIDATION_PRICES_URL"],
            },
            f"{store_url}/health",
            tag="pictures-",
        ),
        ServiceProcess(
            "detector",
            {**env, "OPS_PORT": str(detector_port), "DETECTOR_BLOCK_MS": "20"},
            f"http://127.0.0.1:{detector_port}/health",
            tag="pictures-",
        ),
    ]
    try:
        yield store_url, procs
    finally:
        for proc in procs:
            proc.stop()


async def until_equal(read_page: Any, read_truth: Any, what: str) -> Any:
    """Poll both sides until they agree (live signals keep both moving for a while)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        page, truth = await read_page(), await read_truth()
        if page == truth:
            return truth
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: the page shows {page!r}, the API says {truth!r}")
        await asyncio.sleep(0.5)


def seconds(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


async def items(store: httpx.AsyncClient, path: str, **params: Any) -> list[dict[str, Any]]:
    response = await store.get(path, params=params)
    assert response.status_code == 200, response.text
    listed: list[dict[str, Any]] = response.json()["items"]
    return listed


@contextlib.asynccontextmanager
async def pipeline(
    redis_url: str, database_url: str, namespace: str
) -> AsyncIterator[tuple[str, Any]]:
    async with simulator() as sim:
        now = time.time()
        await sim.emit(price_history(now))
        sim_url = f"http://127.0.0.1:{sim.sim.port}"
        env = {
            "REDIS_URL": redis_url,
            "DATABASE_URL": database_url,
            "STREAM_NAMESPACE": namespace,
            "WALLETS_FILE": str(WALLETS),
            "LOG_LEVEL": "INFO",
            "VALIDATION_PRICES_URL": sim_url,
            "GAMMA_API_URL": sim_url,
            "VALIDATION_EVERY_S": "0.5",
            "VALIDATION_DELAY_S": "0",
        }
        with services(env) as (store_url, procs):
            await asyncio.gather(*(asyncio.to_thread(p.wait_healthy) for p in procs))
            yield store_url, now
            for proc in procs:
                assert "Traceback" not in proc.log_text(), proc.name


PAGE_TIMELINE = """() => {
  const out = {};
  for (const tr of document.querySelectorAll('#timeline-table tbody tr')) {
    const row = {};
    for (const td of tr.querySelectorAll('td[data-kind]')) {
      if (td.textContent !== '0') row[td.dataset.kind] = Number(td.textContent);
    }
    out[tr.dataset.bucket] = row;
  }
  const drawn = {};
  for (const bar of document.querySelectorAll('#timeline rect[data-bucket]')) {
    const row = drawn[bar.dataset.bucket] = drawn[bar.dataset.bucket] || {};
    row[bar.dataset.kind] = Number(bar.dataset.count);
  }
  return {table: out, drawn};
}"""

PAGE_MARKET = """() => ({
  token: document.getElementById('market-select').value,
  trades: [...document.querySelectorAll('#market circle.trade')]
    .map((c) => [Number(c.dataset.ts), Number(c.dataset.price)]),
  signals: [...document.querySelectorAll('#market circle.signal')]
    .map((c) => c.dataset.signalId).sort(),
  tableSignals: [...document.querySelectorAll('#market-signals tbody tr')]
    .map((tr) => tr.dataset.signalId).sort(),
})"""

PAGE_VALIDATION = """() => [...document.querySelectorAll('#validation g[data-group]')].map((g) => [
  g.dataset.group, Number(g.dataset.n),
  g.dataset.hitRate === '' ? null : Number(g.dataset.hitRate),
  g.dataset.ciLow === '' ? null : Number(g.dataset.ciLow),
  g.dataset.ciHigh === '' ? null : Number(g.dataset.ciHigh),
  document.querySelector(`#validation-table tr[data-group="${CSS.escape(g.dataset.group)}"]`)
    .lastElementChild.textContent,
])"""

PAGE_SOURCES = """() => [...document.querySelectorAll('#sources-table tbody tr')].map((tr) => [
  tr.dataset.source, Number(tr.dataset.first), Number(tr.dataset.behind),
  ((p50) => (p50 === '' ? null : Number(p50)))(
    document.querySelector(`#sources g[data-source="${CSS.escape(tr.dataset.source)}"]`)
      .dataset.p50),
])"""

PAGE_WALLET = """() => ({
  fills: [...document.querySelectorAll('#wallet-fills tbody tr')].map((tr) => tr.dataset.orderKey),
  signals: [...document.querySelectorAll('#wallet-signals tbody tr')]
    .map((tr) => tr.dataset.signalId),
  facts: Object.fromEntries([...document.querySelectorAll('#wallet-facts dd')]
    .map((dd) => [dd.dataset.field, dd.textContent])),
})"""

NEW_ROW = """[...document.querySelectorAll('#rows tr')]
  .some((tr) => tr.dataset.signalId && !%s.includes(tr.dataset.signalId))"""

NO_SIDEWAYS_SCROLL = "document.documentElement.scrollWidth <= window.innerWidth"


async def test_each_picture_shows_the_history_api_and_the_live_signals(
    redis_url: str,
    database_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
    chromium: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    from playwright.async_api import async_playwright

    async with (
        pipeline(redis_url, database_url, namespace) as (store_url, now),
        httpx.AsyncClient(base_url=store_url, timeout=10) as store,
    ):
        orders = OrdersRaw(redis_client, streams, stream_maxlen=100_000, dedupe_ttl_s=3600)
        fills = tape_fills(now)
        await publish(orders, fills[:HISTORY_FILLS], lagging=True)

        async def validated() -> bool:
            summary = (await store.get("/signals/validation")).json()
            return any(r["horizon"] == "5m" and r["n"] > 0 for r in summary["rows"])

        await wait_for(validated, "the store's first 5-minute markouts")
        async with (
            running_notifier(redis_url, namespace, store_api_url=store_url) as notifier,
            async_playwright() as pw,
        ):
            browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1280, "height": 1700})
                problems: list[str] = []
                page.on("pageerror", lambda error: problems.append(str(error)))
                page.on(
                    "console",
                    lambda m: problems.append(m.text) if m.type == "error" else None,
                )
                await page.goto(http_url(notifier, "/"))
                await wait_js(page, "document.querySelectorAll('#rows tr').length > 0")
                known = [s["signal_id"] for s in await items(store, "/signals", limit=1000)]
                await publish(
                    orders, fills[HISTORY_FILLS : HISTORY_FILLS + LIVE_FILLS], lagging=False
                )
                # A signal of the fills published while the page was open reaches it.
                await wait_js(page, NEW_ROW % json.dumps(known), timeout_s=WAIT_S)
                await check_timeline(page, store)
                await check_market(page, store)
                await check_validation(page, store)
                await check_sources(page, redis_client, streams, notifier)
                await check_wallet(page, store)
                await check_hostile_title(page)
                assert await page.inner_text("#history") == "history: store ok"
                await page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
                # The pictures alone, as the README shows them (docs/img/dashboard.png).
                await page.locator("#charts").screenshot(path=str(tmp_path / "charts.png"))
                await check_phone(browser, notifier, tmp_path)
                assert problems == []
            except AssertionError as exc:
                raise AssertionError(f"{exc}; page errors: {problems}") from None
            finally:
                await browser.close()


async def wait_for(check: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.3)


async def check_timeline(page: Any, store: httpx.AsyncClient) -> None:
    async def shown() -> dict[str, Any]:
        seen: dict[str, Any] = await page.evaluate(PAGE_TIMELINE)
        # The table and the bars say the same; the comparison with the store is on the table.
        assert seen["table"] == seen["drawn"]
        return dict(seen["table"])

    async def stored() -> dict[str, Any]:
        now = time.time()
        first = math.floor((now - WINDOW_S) / BUCKET_S) * BUCKET_S
        listed = await items(store, "/signals", since=f"{now - WINDOW_S:.0f}", limit=1000)
        buckets: dict[str, dict[str, int]] = {}
        for signal in listed:
            # Drawn at its trade's minute, if that is within the window.
            traded = seconds(signal["exchange_ts"])
            if traded < first:
                continue
            bucket = str(math.floor(traded / BUCKET_S) * BUCKET_S)
            row = buckets.setdefault(bucket, {})
            row[signal["kind"]] = row.get(signal["kind"], 0) + 1
        return buckets

    buckets = await until_equal(shown, stored, "signals per minute and kind")
    assert sum(sum(row.values()) for row in buckets.values()) > 10


async def check_market(page: Any, store: httpx.AsyncClient) -> None:
    token = await page.eval_on_selector("#market-select", "select => select.value")
    assert token

    async def shown() -> dict[str, Any]:
        seen: dict[str, Any] = await page.evaluate(PAGE_MARKET)
        assert seen["signals"] == seen["tableSignals"]
        return {"token": seen["token"], "trades": seen["trades"], "signals": seen["signals"]}

    async def stored() -> dict[str, Any]:
        fills = await items(
            store, "/orders", token=token, status=["confirmed", "pending"], limit=500
        )
        signals = await items(store, "/signals", token=token, limit=200)
        trades = sorted((seconds(f["exchange_ts"]), f["order_key"], f["price"]) for f in fills)
        return {
            "token": token,
            "trades": [[ts, price] for ts, _, price in trades],
            "signals": sorted(s["signal_id"] for s in signals),
        }

    market = await until_equal(shown, stored, "the chosen market's fills and signals")
    assert len(market["trades"]) > 5 and market["signals"]


async def check_validation(page: Any, store: httpx.AsyncClient) -> None:
    for by in ("kind", "wallet"):
        await page.select_option("#validation-by", by)
        await page.select_option("#validation-horizon", "5m")

        async def shown() -> list[Any]:
            rows: list[Any] = await page.evaluate(PAGE_VALIDATION)
            return rows

        async def stored(by: str = by) -> list[Any]:
            summary = (await store.get("/signals/validation", params={"by": by})).json()
            return [
                [r["group"], r["n"], r["hit_rate"], r["ci95_low"], r["ci95_high"], r["verdict"]]
                for r in summary["rows"]
                if r["horizon"] == "5m"
            ]

        rows = await until_equal(shown, stored, f"the 5-minute validation by {by}")
        assert any(row[1] > 0 for row in rows)


async def check_sources(
    page: Any, redis_client: aioredis.Redis, streams: Streams, notifier: Notifier
) -> None:
    async def shown() -> list[Any]:
        rows: list[Any] = await page.evaluate(PAGE_SOURCES)
        return rows

    async def read() -> list[Any]:
        lags = await read_source_lag(redis_client, streams)
        return [[s.source, s.first, s.behind, s.lag_p50_s] for s in lags]

    rows = await until_equal(shown, read, "the per-source lag")
    assert {row[0] for row in rows} == {"dome_ws", "data_api"}
    behind = next(row for row in rows if row[0] == "data_api")
    assert behind[2] > 0 and behind[3] > 0
    async with httpx.AsyncClient() as http:
        served = (await http.get(http_url(notifier, "/api/sources"))).json()
    assert served == {
        "sources": [lag.to_json() for lag in await read_source_lag(redis_client, streams)]
    }


async def check_wallet(page: Any, store: httpx.AsyncClient) -> None:
    # A click on the wallet of the newest row opens its panel.
    address = str(
        await page.evaluate(
            "(() => { const td = document.querySelector('#rows tr:first-child td.wallet');"
            " td.click(); return td.title; })()"
        )
    ).lower()
    assert address.startswith("0x")

    async def shown() -> dict[str, Any]:
        seen: dict[str, Any] = await page.evaluate(PAGE_WALLET)
        return seen

    async def stored() -> dict[str, Any]:
        fills = await items(store, "/orders", wallet=address, limit=50)
        signals = await items(store, "/signals", wallet=address, limit=50)
        tracked = (await store.get("/wallets")).json()
        entry = next(w for w in tracked if w["address"].lower() == address)
        facts = {"address": address, "label": entry["label"] or "\N{EN DASH}"}
        return {
            "fills": [f["order_key"] for f in fills],
            "signals": [s["signal_id"] for s in signals],
            "facts": facts,
        }

    async def shown_basics() -> dict[str, Any]:
        seen = await shown()
        seen["facts"] = {k: v for k, v in seen["facts"].items() if k in ("address", "label")}
        return seen

    wallet = await until_equal(shown_basics, stored, "the wallet's fills and signals")
    assert wallet["fills"] and wallet["signals"]
    # Whatever else the store says of the wallet (quality, PnL) is shown, nested one level.
    tracked = (await store.get("/wallets")).json()
    entry = next(w for w in tracked if w["address"].lower() == address)
    extra = {
        f"{key}: {name}" if isinstance(value, dict) else key
        for key, value in entry.items()
        if key not in ("address", "label", "score", "added_at", "updated_at")
        for name in (value if isinstance(value, dict) else [key])
    }
    facts = (await shown())["facts"]
    assert {name.replace("_", " ") for name in extra} <= set(facts), facts


async def check_hostile_title(page: Any) -> None:
    options = await page.eval_on_selector_all(
        "#market-select option", "options => options.map((o) => o.textContent)"
    )
    assert any(text.startswith(HOSTILE) for text in options), options
    cells = await page.eval_on_selector_all(
        "#rows td.market a", "links => links.map((a) => a.textContent)"
    )
    # HTML collapses no spaces here: the title has single spaces only.
    assert HOSTILE in cells
    assert await page.evaluate("document.querySelectorAll('img').length") == 0
    assert await page.evaluate("window.__pwned === undefined")


async def check_phone(browser: Any, notifier: Notifier, tmp_path: Path) -> None:
    phone = await browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2)
    try:
        await phone.goto(http_url(notifier, "/"))
        await wait_js(
            phone,
            "document.querySelectorAll('#timeline rect[data-bucket]').length > 0"
            " && document.querySelectorAll('#market circle.signal').length > 0"
            " && document.querySelectorAll('#validation g[data-group]').length > 0",
        )
        assert await phone.evaluate(NO_SIDEWAYS_SCROLL), await phone.evaluate(
            "[document.documentElement.scrollWidth, window.innerWidth]"
        )
        await phone.screenshot(path=str(tmp_path / "dashboard-phone.png"), full_page=True)
    finally:
        await phone.close()


async def test_a_store_outage_shows_as_a_state_while_live_signals_go_on(
    redis_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
    chromium: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    from playwright.async_api import async_playwright

    nobody = f"http://127.0.0.1:{free_port()}"
    async with (
        running_notifier(redis_url, namespace, store_api_url=nobody) as notifier,
        async_playwright() as pw,
    ):
        browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 390, "height": 844})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            await page.goto(http_url(notifier, "/"))
            await wait_js(page, "document.getElementById('history').classList.contains('bad')")
            assert await page.inner_text("#history") == "history unavailable: store unreachable"
            for panel in ("#timeline-state", "#validation-state", "#wallet-state"):
                assert "history unavailable" in await page.inner_text(panel)
            await publish_signals(redis_client, streams.signals, [make_signal(1, title=HOSTILE)])
            # Live signals still arrive, and still make their pictures.
            await wait_js(page, "document.querySelectorAll('#rows tr').length === 1")
            await wait_js(page, "document.querySelectorAll('#timeline rect').length === 1")
            assert await page.evaluate(NO_SIDEWAYS_SCROLL)
            await page.screenshot(path=str(tmp_path / "store-down.png"), full_page=True)
            assert errors == []
        finally:
            await browser.close()


async def test_with_tokens_the_page_reads_the_history_once_given_its_token(
    redis_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
    chromium: str,  # noqa: F811
) -> None:
    from playwright.async_api import async_playwright

    token = "page-token-" + "q" * 24
    async with (
        serving(FakeStore()) as store,
        running_notifier(
            redis_url, namespace, store_api_url=store.url, notifier_tokens=[SecretStr(token)]
        ) as notifier,
        async_playwright() as pw,
    ):
        browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            await page.goto(http_url(notifier, "/"))
            await wait_js(page, "document.getElementById('auth').classList.contains('shown')")
            await wait_js(page, "document.getElementById('history').textContent.includes('token')")
            assert await page.inner_text("#history") == "history: token needed"
            assert store.asked == []
            await page.fill("#token", token)
            await page.click("#auth button[type=submit]")
            await wait_js(page, "document.getElementById('history').classList.contains('ok')")
            # The stand-in store's one signal, read with the token, lists its market.
            await wait_js(page, "document.querySelectorAll('#market-select option').length === 1")
            option = await page.inner_text("#market-select option")
            assert option == "<b>hostile</b> · Yes (1)"
            assert store.asked
        finally:
            await browser.close()
