"""The live page at `/` in headless Chromium while signals flow, and the `/api/status` it polls.

The browser test needs Debian's `chromium` (`make test` installs it) and Playwright from PyPI,
which drives that binary (no browser download). Without Chromium it fails, never skips. It saves
tests/output/dashboard.png for people to look at.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from shared.models import Side, Signal, SignalKind, Source, signal_id
from shared.streams import Streams
from tests.helpers.notifier import http_url, publish, running_notifier, wait_until
from tests.helpers.processes import OUTPUT, ROOT

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = OUTPUT / "dashboard.png"


def tape_signals(count: int) -> list[Signal]:
    """Signals built from the real trades of the tape and the example wallets' labels."""
    trades = json.loads((ROOT / "data" / "polymarket_trades_nobel2025.json").read_text())
    wallets = {
        w["address"]: w for w in json.loads((ROOT / "config" / "wallets.example.json").read_text())
    }
    kinds = [
        SignalKind.WHALE_ORDER,
        SignalKind.TRADER_ENTRY,
        SignalKind.CONSENSUS,
        SignalKind.TRADER_EXIT,
    ]
    signals = []
    for n, trade in enumerate(trades[:count]):
        known = wallets.get(trade["proxyWallet"].lower(), {})
        kind = kinds[n % len(kinds)]
        key = f"{n:032x}"
        signals.append(
            Signal(
                signal_id=signal_id(kind, key),
                kind=kind,
                wallet=trade["proxyWallet"],
                wallet_label=known.get("label") or trade.get("pseudonym") or "",
                market_slug=trade["slug"],
                title=trade["title"],
                condition_id=trade["conditionId"],
                token_id=trade["asset"],
                token_label=trade["outcome"],
                side=Side(trade["side"]),
                price=trade["price"],
                shares=trade["size"] * 40,
                notional_usd=trade["size"] * 40 * trade["price"],
                confidence=known.get("score") or 0.55 + (n % 9) / 20,
                reasons=[f"{kind.value.replace('_', ' ')} by a tracked wallet"],
                order_keys=[key],
                source=Source.DOME_WS,
                exchange_ts=0,
                received_at=0.0,
                detected_at=0.0,
            )
        )
    return signals


def stamped(signal: Signal, age_s: float) -> Signal:
    """The signal as if its trade happened `age_s` ago and the pipeline took ~0.3 s."""
    now = time.time()
    return signal.model_copy(
        update={
            "exchange_ts": int(now - age_s - 0.3),
            "received_at": now - age_s - 0.15,
            "detected_at": now - age_s - 0.1,
        }
    )


async def write_feed_status(client: aioredis.Redis, streams: Streams) -> None:
    now = time.time()
    await client.hset(
        streams.feed_status_key(),
        mapping={
            "source": "dome_ws",
            "state": "connected",
            "connected": "1",
            "wallets": "20",
            "subscriptions": "20",
            "last_event_at": f"{now - 0.4:.6f}",
            "reconnects": "0",
            "last_error": "",
            "updated_at": f"{now:.6f}",
        },
    )


@contextlib.asynccontextmanager
async def signals_flowing(
    client: aioredis.Redis, streams: Streams, signals: list[Signal]
) -> AsyncIterator[None]:
    async def run() -> None:
        for signal in signals:
            await publish(client, streams.signals, [stamped(signal, 0)])
            await write_feed_status(client, streams)
            await asyncio.sleep(0.15)

    task = asyncio.ensure_future(run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def wait_js(page: Any, predicate: str, timeout_s: float = 30.0) -> None:
    """Poll `predicate` (a JS expression) until it is true. Playwright's `wait_for_function`
    evaluates its predicate with `eval` inside the page, which the page's Content-Security-Policy
    refuses (as it should); `evaluate` goes through the DevTools protocol, which CSP does not
    govern."""
    deadline = time.monotonic() + timeout_s
    while not await page.evaluate(predicate):
        if time.monotonic() > deadline:
            state = await page.evaluate(
                "[...document.querySelectorAll('.pill, .state')].map((e) => e.textContent.trim())"
            )
            raise AssertionError(f"timed out after {timeout_s} s waiting for {predicate}: {state}")
        await asyncio.sleep(0.1)


@pytest.fixture
def chromium() -> str:
    assert shutil.which(CHROMIUM), (
        f"{CHROMIUM} missing: `make test` installs it (devtools/prereqs.sh), "
        "or apt-get install chromium"
    )
    return CHROMIUM


async def test_dashboard_shows_signals_as_they_arrive_and_filters_them(
    redis_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
    chromium: str,
) -> None:
    from playwright.async_api import async_playwright

    signals = tape_signals(120)
    # Published a minute before the page opens: replayed on load, shown greyed.
    await publish(redis_client, streams.signals, [stamped(s, 60) for s in signals[:4]])
    async with running_notifier(redis_url, namespace) as notifier, async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1480, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            async with signals_flowing(redis_client, streams, signals[4:]):
                await page.goto(http_url(notifier, "/"))
                await wait_js(page, "document.querySelectorAll('#rows tr.replayed').length === 4")
                await wait_js(
                    page,
                    "document.querySelectorAll('#rows tr:not(.replayed)').length >= 12",
                    timeout_s=20,
                )
                await wait_js(
                    page, "document.getElementById('feed').textContent.includes('feed connected')"
                )
                assert "last event" in await page.inner_text("#feed")
                assert await page.inner_text("#ws") == "live"
                SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                await page.screenshot(path=str(SCREENSHOT))

                first_row = await row_texts(page, 0)
                assert first_row[2] in {s.wallet_label for s in signals if s.wallet_label}
                # HTML collapses runs of spaces, and some real tape titles have double spaces.
                assert first_row[3] in {" ".join(s.title.split()) for s in signals}

                await page.check("input[name=kinds][value=whale_order]")
                await page.fill("input[name=min_confidence]", "50")
                await page.click("form#filters button[type=submit]")
                await wait_js(
                    page,
                    "document.getElementById('filter-note').textContent"
                    " === 'Showing whale order, confidence ≥ 50%.'",
                )
                # Live rows above the "From here on" note: whale orders only.
                await wait_js(page, WHALES_SINCE_NOTE, timeout_s=20)
                await page.screenshot(path=str(OUTPUT / "dashboard-filtered.png"))
            assert errors == []
        finally:
            await browser.close()


WHALES_SINCE_NOTE = """() => {
  const all = [...document.querySelectorAll('#rows tr')];
  const note = all.findIndex((tr) => tr.classList.contains('note'));
  if (note < 3) return false;
  return all.slice(0, note).every((tr) => tr.children[1].textContent === 'whale order');
}"""


async def row_texts(page: Any, index: int) -> list[str]:
    cells = await page.query_selector_all(f"#rows tr:nth-child({index + 1}) td")
    return [await cell.inner_text() for cell in cells]


async def test_status_reports_the_feed_and_the_notifier(
    redis_url: str, namespace: str, streams: Streams, redis_client: aioredis.Redis
) -> None:
    async with running_notifier(redis_url, namespace) as notifier, httpx.AsyncClient() as http:
        body = (await http.get(http_url(notifier, "/api/status"))).json()
        assert body["feed"] is None and body["redis"] == "ok" and body["webhooks"] is None
        assert body["notifier"] == {
            "reader": "reading",
            "last_id": notifier.fanout.last_id,
            "clients": 0,
            "auth": False,
        }

        await write_feed_status(redis_client, streams)
        body = (await http.get(http_url(notifier, "/api/status"))).json()
        feed = body["feed"]
        assert (feed["connected"], feed["state"], feed["source"], feed["wallets"]) == (
            True,
            "connected",
            "dome_ws",
            20,
        )
        assert 0.4 <= feed["last_event_age_s"] < 30

        async def gone() -> bool:
            response = await http.get(http_url(notifier, "/api/status"))
            return bool(response.json()["feed"] is None)

        # The ingestor's hash expires when it stops: the page then says the feed is gone.
        await redis_client.pexpire(streams.feed_status_key(), 50)
        await wait_until(gone, "the expired feed status to disappear")
