"""A signal's status changes through the notifier: a repeat of a `signal_id` with a new status.

The detector publishes a retraction (or a pending signal's confirmation) as a new entry on
`signals` that repeats the signal with `status` and `status_reason` set (docs/streams.md). Here:
WebSocket clients get it like any signal (filters and resume included); webhooks get it under an
`Idempotency-Key` of its own, so receivers that deduplicate on the key do not drop it, and Discord
and Slack show it for what it is, the hostile reason escaped; the dashboard updates the signal's
row instead of adding one, in real Chromium, at desktop and phone width.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect

from services.notifier.webhooks.config import Preset
from services.notifier.webhooks.delivery import RetryPolicy, deliver
from services.notifier.webhooks.presets import discord_body, render, slack_body
from shared.models import FillStatus, Signal
from shared.streams import Streams
from tests.helpers.notifier import (
    Receiver,
    assert_nothing_more,
    http_url,
    make_signal,
    publish,
    recv_hello,
    recv_signals,
    restated,
    running_notifier,
    variant,
    wallet,
    ws_url,
)
from tests.helpers.processes import OUTPUT
from tests.test_notifier_dashboard import (  # noqa: F401 (fixture)
    CHROMIUM_ARGS,
    chromium,
    wait_js,
)
from tests.test_notifier_webhooks import SECRET, hooks_file, notifier_with, until_settled
from tests.test_notifier_webhooks_units import HOOK, Script
from tests.test_security_webhooks import PHISH, PING, discord_texts, slack_texts, unescaped

REASON = "chain reorg removed block 123"
# Feed text is hostile, and a status reason is feed text too.
HOSTILE_REASON = f"reorg {PING} {PHISH} & done"
# For the page: markup that would run if it were ever parsed as HTML.
MARKUP_REASON = '<img src=x onerror="window.pwned=1"><b>reorg</b> removed block 123'


def pair(n: int, reason: str = REASON, **changes: Any) -> tuple[Signal, Signal]:
    """A confirmed signal and its retraction."""
    original = variant(n, **changes)
    return original, restated(original, FillStatus.RETRACTED, reason)


# WebSocket.


@pytest.mark.integration
async def test_ws_subscribers_get_the_original_then_its_retraction(
    redis_url: str, namespace: str, streams: Streams, redis_client: aioredis.Redis
) -> None:
    original, retraction = pair(1, wallet=wallet(1), confidence=0.9)
    other = variant(2, wallet=wallet(2), confidence=0.9)
    pending = variant(3, wallet=wallet(1), confidence=0.9, status=FillStatus.PENDING)
    confirmed = restated(pending, FillStatus.CONFIRMED)
    mine = f"?wallets={wallet(1)}&kinds=whale_order&min_confidence=0.8"
    async with (
        running_notifier(redis_url, namespace) as notifier,
        connect(ws_url(notifier, mine)) as ws,
        connect(ws_url(notifier, f"?wallets={wallet(2)}")) as others,
        connect(ws_url(notifier, "?min_confidence=0.95")) as picky,
    ):
        for client in (ws, others, picky):
            await recv_hello(client)
        ids = await publish(
            redis_client, streams.signals, [original, other, retraction, pending, confirmed]
        )

        got = await recv_signals(ws, 4)
        assert [m["id"] for m in got] == [ids[0], ids[2], ids[3], ids[4]]
        first, second = got[0]["signal"], got[1]["signal"]
        assert first["signal_id"] == second["signal_id"] == original.signal_id
        assert (first["status"], second["status"]) == ("confirmed", "retracted")
        assert second == retraction.model_dump(mode="json")
        assert second["status_reason"] == REASON
        assert [m["signal"]["status"] for m in got[2:]] == ["pending", "confirmed"]
        assert got[2]["signal"]["signal_id"] == got[3]["signal"]["signal_id"]
        await assert_nothing_more(ws)
        # Filters apply to a retraction as to its original: neither reaches these two.
        assert [m["id"] for m in await recv_signals(others, 1)] == [ids[1]]
        await assert_nothing_more(others)
        await assert_nothing_more(picky)

        # Resume: the retraction is replayed like any entry after `last_id`.
        async with connect(ws_url(notifier, f"{mine}&last_id={ids[0]}")) as resumed:
            await recv_hello(resumed)
            replayed = await recv_signals(resumed, 3)
            assert [m["id"] for m in replayed] == [ids[2], ids[3], ids[4]]
            assert replayed[0]["signal"] == retraction.model_dump(mode="json")
            await assert_nothing_more(resumed)


# Webhooks.


@pytest.mark.integration
async def test_webhooks_get_a_retraction_under_its_own_key(
    redis_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    original, retraction = pair(1, reason=HOSTILE_REASON)
    pending = variant(2, status=FillStatus.PENDING)
    confirmed = restated(pending, FillStatus.CONFIRMED)
    async with Receiver() as receiver:
        path = hooks_file(
            tmp_path,
            [
                {"name": "desk", "url": receiver.url("desk"), "secret": SECRET},
                {"name": "discord", "url": receiver.url("discord"), "preset": "discord"},
                {"name": "slack", "url": receiver.url("slack"), "preset": "slack"},
            ],
        )
        # One delivery at a time per endpoint: requests arrive in stream order.
        async with notifier_with(redis_url, namespace, path, webhook_concurrency=1):
            signals = [original, retraction, pending, confirmed]
            ids = await publish(redis_client, streams.signals, signals)
            await until_settled(redis_client, streams, ids[-1])

    expected = [
        (original.signal_id, "confirmed"),
        (f"{original.signal_id}:retracted", "retracted"),
        (f"{pending.signal_id}:pending", "pending"),
        (pending.signal_id, "confirmed"),
    ]
    for name in ("desk", "discord", "slack"):
        requests = receiver.to(name)
        got = [(r.headers["idempotency-key"], r.headers["x-betterbot-status"]) for r in requests]
        assert got == expected, name
    desk = [orjson.loads(r.body) for r in receiver.to("desk")]
    assert desk[1]["id"] == ids[1]
    assert desk[1]["signal"] == retraction.model_dump(mode="json")
    discord = orjson.loads(receiver.to("discord")[1].body)
    assert discord["content"].startswith("RETRACTED: ")
    assert discord["allowed_mentions"] == {"parse": []}
    slack = orjson.loads(receiver.to("slack")[1].body)
    assert slack["text"].startswith("RETRACTED: ") and "&lt;!channel&gt;" in slack["text"]


async def test_delivery_keys_and_status_header() -> None:
    for status, key in [
        (FillStatus.CONFIRMED, "sig-1"),
        (FillStatus.RETRACTED, "sig-1:retracted"),
        (FillStatus.PENDING, "sig-1:pending"),
    ]:
        script = Script([500, 204])
        async with httpx.AsyncClient(transport=httpx.MockTransport(script)) as http:
            outcome = await deliver(http, HOOK, b"{}", "sig-1", RetryPolicy(2, 0, 0), status=status)
        assert outcome.delivered
        # The same key on the retry: a repeat of this status is still a repeat.
        assert [r.headers["idempotency-key"] for r in script.requests] == [key, key]
        assert {r.headers["x-betterbot-status"] for r in script.requests} == {status.value}


def test_generic_body_carries_the_status_as_is() -> None:
    _, retraction = pair(4)
    data = retraction.to_json()
    message = orjson.loads(render(Preset.GENERIC, "9-0", retraction, data))
    assert message["signal"]["status"] == "retracted"
    assert message["signal"]["status_reason"] == REASON
    assert message["signal"] == orjson.loads(data)


def test_discord_shows_a_retraction_and_escapes_its_reason() -> None:
    _, retraction = pair(5, reason=HOSTILE_REASON, wallet_label="cowcat")
    body = discord_body(retraction)
    (embed,) = body["embeds"]
    assert body["content"].startswith("RETRACTED: Whale order: cowcat BUY Yes at 42.0¢")
    assert embed["title"].startswith("RETRACTED: ")
    assert body["allowed_mentions"] == {"parse": []}
    fields = {f["name"]: f["value"] for f in embed["fields"]}
    assert fields["Status"].startswith("Retracted: reorg \\<!channel\\>")
    # The reason is in the message itself, not only in the embed.
    assert "\\<!channel\\> \\<!here\\|here\\>" in body["content"]
    assert "\\[Polymarket\\](https://evil.example/login)" in body["content"]
    for text in discord_texts(body):
        assert unescaped(text) == "", text


def test_slack_shows_a_retraction_and_escapes_its_reason() -> None:
    _, retraction = pair(6, reason=HOSTILE_REASON)
    body = slack_body(retraction)
    header = body["blocks"][0]
    assert header["type"] == "header" and header["text"]["type"] == "plain_text"
    assert header["text"]["text"].startswith("RETRACTED: Whale order: BUY Yes")
    assert body["text"].startswith("RETRACTED: Whale order: ")
    status = body["blocks"][1]["text"]
    assert status["text"].startswith("*Retracted:* reorg &lt;!channel&gt; &lt;!here|here&gt;")
    for obj, text in slack_texts(body):
        assert "<!" not in text and "<@" not in text and "<#" not in text, text
        if obj is not None:
            assert obj["verbatim"] is True
    assert "&lt;!channel&gt;" in body["text"]


def test_pending_is_marked_and_confirmed_is_not() -> None:
    pending = variant(7, status=FillStatus.PENDING)
    assert discord_body(pending)["content"].startswith("PENDING: Whale order: ")
    assert discord_body(pending)["embeds"][0]["title"].startswith("PENDING: ")
    assert slack_body(pending)["text"].startswith("PENDING: Whale order: ")
    assert slack_body(pending)["blocks"][0]["text"]["text"].startswith("PENDING: ")
    confirmed = make_signal(7)
    assert discord_body(confirmed)["content"].startswith("Whale order: ")
    assert "Status" not in {f["name"] for f in discord_body(confirmed)["embeds"][0]["fields"]}
    assert slack_body(confirmed)["text"].startswith("Whale order: ")
    assert len(slack_body(confirmed)["blocks"]) == 4


def test_the_reason_survives_the_length_cuts() -> None:
    # A title long enough to fill every text: the reason is never the part cut away.
    _, retraction = pair(8, reason="reorg at block 123", title="*" * 5000)
    discord = discord_body(retraction)
    assert "reorg at block 123" in discord["content"] and len(discord["content"]) <= 2000
    slack = slack_body(retraction)
    assert "reorg at block 123" in slack["text"] and len(slack["text"]) <= 3000


# Dashboard.

ROWS = "document.querySelectorAll('#rows tr:not(.note)').length"
SHOW = """(id) => {
  const tr = [...document.querySelectorAll('#rows tr')].find((r) => r.dataset.signalId === id);
  if (!tr) return null;
  const price = tr.children[6];
  return {
    classes: [...tr.classList],
    status: tr.querySelector('.status') ? tr.querySelector('.status').textContent : null,
    why: tr.querySelector('.why') ? tr.querySelector('.why').textContent : null,
    struck: getComputedStyle(price).textDecorationLine,
  };
}"""


@pytest.mark.integration
async def test_dashboard_updates_the_row_of_a_retracted_signal(
    redis_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
    chromium: str,  # noqa: F811 (the fixture)
) -> None:
    from playwright.async_api import async_playwright

    original, retraction = pair(1, reason=MARKUP_REASON)
    orphan = restated(variant(2), FillStatus.RETRACTED, REASON)
    pending = variant(3, status=FillStatus.PENDING)
    later = variant(4)
    async with running_notifier(redis_url, namespace) as notifier, async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1480, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            await page.goto(http_url(notifier, "/"))
            await wait_js(page, "document.getElementById('ws').innerText.trim() === 'live'")

            await publish(redis_client, streams.signals, [original, later])
            await wait_js(page, f"{ROWS} === 2")
            await publish(redis_client, streams.signals, [retraction])
            await wait_js(
                page,
                f"document.querySelectorAll('#rows tr.retracted').length === 1 && {ROWS} === 2",
            )
            row = await page.evaluate(SHOW, original.signal_id)
            assert "retracted" in row["classes"] and row["status"] == "retracted"
            # The reason as text: markup in it is shown, never run.
            assert row["why"] == MARKUP_REASON
            assert "line-through" in row["struck"]
            assert await page.evaluate("window.pwned === undefined")
            assert not await page.evaluate("document.querySelectorAll('#rows img').length")
            assert (await page.evaluate(SHOW, later.signal_id))["status"] is None

            # No row of its own on the page: the retraction shows as one, marked.
            await publish(redis_client, streams.signals, [orphan])
            await wait_js(page, f"{ROWS} === 3")
            row = await page.evaluate(SHOW, orphan.signal_id)
            assert (row["status"], row["why"]) == ("retracted", REASON)

            # Pending, then confirmed: one row, its mark gone.
            await publish(redis_client, streams.signals, [pending])
            await wait_js(page, f"{ROWS} === 4")
            row = await page.evaluate(SHOW, pending.signal_id)
            assert "pending" in row["classes"] and row["status"] == "pending"
            assert "line-through" not in row["struck"]
            await publish(redis_client, streams.signals, [restated(pending, FillStatus.CONFIRMED)])
            await wait_js(page, "!document.querySelector('#rows tr.pending')", timeout_s=10)
            row = await page.evaluate(SHOW, pending.signal_id)
            assert row["status"] is None and await page.evaluate(ROWS) == 4
            assert await page.inner_text("#count") == "4 signals"
            OUTPUT.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(OUTPUT / "dashboard-retractions.png"))

            # A phone opening the page later: the replay folds each status change into its row,
            # and the page does not scroll sideways (the table does, in its box).
            phone = await browser.new_page(viewport={"width": 390, "height": 844})
            phone.on("pageerror", lambda error: errors.append(str(error)))
            await phone.goto(http_url(notifier, "/"))
            await wait_js(phone, f"{ROWS} === 4")
            assert await phone.evaluate(
                "document.documentElement.scrollWidth <= window.innerWidth"
            ), "the page scrolls sideways at phone width"
            row = await phone.evaluate(SHOW, original.signal_id)
            assert (row["status"], row["why"]) == ("retracted", MARKUP_REASON)
            badge = await phone.query_selector(f"tr[data-signal-id='{original.signal_id}'] .status")
            assert badge is not None
            box = await badge.bounding_box()
            assert box is not None and box["x"] + box["width"] <= 390
            await phone.screenshot(path=str(OUTPUT / "dashboard-retractions-phone.png"))
            assert errors == []
        finally:
            await browser.close()
