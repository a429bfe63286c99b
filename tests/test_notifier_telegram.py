"""Telegram as a webhook preset: the Bot API's `sendMessage`, to a stand-in on 127.0.0.1.

- The endpoints file: `chat_id` and `bot_token` validated, the token in no repr or error, the Bot
  API's URL built only for the request.
- The text: Telegram's HTML with every feed text escaped (MarkdownV2 specials, `<!channel>`, a
  link of the feed's own, a slug with `"` and `>`), checked by an independent parser
  (`tests.helpers.notifier.parse_telegram_html`), within 4096 UTF-16 units whatever the input,
  cut inside a tag it closes.
- Delivery (real Redis, in-process notifier, `BotApi`): a 429's `parameters.retry_after` is waited
  out up to the cap; a dead chat (403) or an unknown one (400) is final and dead-lettered with
  Telegram's description while another chat gets every signal; the bot token is in no log line,
  no dead letter and no metric.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY, generate_latest

from services.notifier.webhooks.config import (
    TELEGRAM_API,
    Preset,
    Webhook,
    WebhookConfigError,
    load_webhooks,
)
from services.notifier.webhooks.delivery import RetryPolicy, deliver
from services.notifier.webhooks.presets import market_url, render, telegram_body
from services.notifier.webhooks.signing import verify
from shared.logs import JsonFormatter, scrub
from shared.models import FillStatus, Signal
from shared.streams import Streams
from tests.helpers.notifier import (
    BOT_BLOCKED,
    BOT_NO_CHAT,
    BOT_OK,
    BotApi,
    BotCall,
    bot_flood,
    make_signal,
    parse_telegram_html,
    publish,
    restated,
    variant,
)
from tests.test_notifier_webhooks import (
    SECRET,
    dead_letters,
    hooks_file,
    notifier_with,
    until_settled,
)

TOKEN = "7312450981:AAHk-" + "tg_T0ken" * 4  # BotFather's shape: id, colon, 35 characters
CHAT = -1001234567890
MARKDOWN_V2 = "_*[]()~`>#+-=|{}.!\\"
PAYLOAD = '<!channel> <a href="https://evil.example">Polymarket</a> <b>bold</b> &amp; &lt;'


def telegram_hook(**changes: Any) -> Webhook:
    fields = {"name": "desk", "preset": "telegram", "bot_token": TOKEN, "chat_id": CHAT}
    return Webhook.model_validate(fields | changes)


def hostile(**changes: Any) -> Signal:
    """A signal whose every feed text is an attack on Telegram's HTML (not validated, like a
    forged entry)."""
    base = {
        "title": f"Will it {MARKDOWN_V2} rain? {PAYLOAD}",
        "wallet_label": f"cow {PAYLOAD}",
        "token_label": f"Yes {MARKDOWN_V2}",
        "market_slug": 'rain"><a href="https://evil.example">',
        "reasons": [f"reason {PAYLOAD}", f"- # {MARKDOWN_V2}"],
    }
    return make_signal(5).model_copy(update=base | changes)


# The endpoints file.


def test_a_telegram_endpoint_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "hooks.yaml"
    path.write_text(f"""
webhooks:
  - name: desk-chat
    preset: telegram
    bot_token: "{TOKEN}"
    chat_id: {CHAT}
    filters: {{min_confidence: 0.9}}
  - name: channel
    preset: telegram
    bot_token: "{TOKEN}"
    chat_id: "@betterbot_alerts"
    url: http://127.0.0.1:8081/
    secret: "{SECRET}"
  - name: quoted
    preset: telegram
    bot_token: "{TOKEN}"
    chat_id: "-42"
""")
    desk, channel, quoted = load_webhooks(path)
    assert desk.preset is Preset.TELEGRAM and desk.chat_id == CHAT
    assert desk.url == TELEGRAM_API and desk.secret is None
    assert desk.target() == f"https://api.telegram.org/bot{TOKEN}/sendMessage"
    assert desk.filters.describe()["min_confidence"] == 0.9
    assert channel.chat_id == "@betterbot_alerts"
    assert channel.target() == f"http://127.0.0.1:8081/bot{TOKEN}/sendMessage"
    assert quoted.chat_id == -42
    for hook in (desk, channel, quoted):
        assert TOKEN not in repr(hook) and TOKEN not in str(hook)
        assert TOKEN not in hook.model_dump_json()
    # Read, the token is scrubbed from any log line that might carry it.
    assert (
        scrub(f'"url": "{desk.target()}"') == '"url": "https://api.telegram.org/bot***/sendMessage"'
    )


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"bot_token": TOKEN}, "a telegram webhook needs chat_id and bot_token"),
        ({"chat_id": CHAT}, "a telegram webhook needs chat_id and bot_token"),
        ({"bot_token": TOKEN, "chat_id": 0}, "chat_id: must be a chat id"),
        ({"bot_token": TOKEN, "chat_id": 2**53}, "chat_id: must be a chat id"),
        ({"bot_token": TOKEN, "chat_id": True}, "chat_id: must be a chat id"),
        ({"bot_token": TOKEN, "chat_id": "@x"}, "chat_id: must be a chat id"),
        ({"bot_token": TOKEN, "chat_id": "@bad-name"}, "chat_id: must be a chat id"),
        ({"bot_token": TOKEN, "chat_id": 1.5}, "chat_id: must be a chat id"),
        ({"bot_token": TOKEN[:-12], "chat_id": CHAT}, "bot_token: must look like <bot id>:"),
        ({"bot_token": TOKEN + "/x", "chat_id": CHAT}, "bot_token: must look like <bot id>:"),
        ({"bot_token": "x" + TOKEN, "chat_id": CHAT}, "bot_token: must look like <bot id>:"),
        (
            {"bot_token": TOKEN, "chat_id": CHAT, "url": "https://h/x?y=1"},
            "url: a telegram webhook's url is a Bot API server",
        ),
        (
            {"preset": "discord", "url": "https://h/x", "bot_token": TOKEN},
            "chat_id and bot_token are for preset telegram only",
        ),
        (
            {"preset": "slack", "url": "https://h/x", "chat_id": CHAT},
            "chat_id and bot_token are for preset telegram only",
        ),
    ],
)
def test_bad_telegram_entries_name_the_problem_and_never_the_token(
    tmp_path: Path, entry: dict[str, Any], problem: str
) -> None:
    path = tmp_path / "hooks.json"
    path.write_text(orjson.dumps([{"preset": "telegram"} | entry]).decode())
    with pytest.raises(WebhookConfigError) as caught:
        load_webhooks(path)
    assert problem in str(caught.value)
    assert TOKEN[11:] not in str(caught.value) and TOKEN[:20] not in str(caught.value)


# The text.


def shown(signal: Signal, chat_id: int | str = CHAT) -> tuple[dict[str, Any], Any]:
    """The body for `signal`, and how Telegram reads its text (no problems allowed)."""
    body = telegram_body(signal, chat_id)
    text = parse_telegram_html(body["text"])
    assert text.problems == [], (text.problems, body["text"])
    return body, text


def test_the_body_is_sendmessage_with_html() -> None:
    signal = make_signal(3)
    body, text = shown(signal)
    assert set(body) == {"chat_id", "text", "parse_mode", "link_preview_options"}
    assert body["chat_id"] == CHAT and body["parse_mode"] == "HTML"
    assert body["link_preview_options"] == {"is_disabled": True}
    assert orjson.loads(render(Preset.TELEGRAM, "1-1", signal, b"{}", chat_id="@c")) == (
        body | {"chat_id": "@c"}
    )
    with pytest.raises(ValueError, match="chat_id"):
        render(Preset.TELEGRAM, "1-1", signal, b"{}")
    lines = text.shown.split("\n")
    assert lines[0] == "Whale order: wallet 3 BUY Yes at 42.0¢ · $421 · " + signal.title
    assert lines[1] == signal.title
    assert text.links == ["https://polymarket.com/market/nobel-peace-prize-2025"]
    assert f"Wallet: wallet 3 ({signal.wallet})" in lines
    assert "Confidence: 90%" in lines and lines[-1] == "notional above whale threshold"
    assert text.tags == ["b", "a", "i"]


def test_feed_text_is_escaped_and_the_only_link_is_ours() -> None:
    signal = hostile()
    body, text = shown(signal)
    # Every feed text comes out as it came in: nothing parsed, nothing lost, no backslash added.
    for feed in (signal.title, signal.wallet_label, signal.token_label, *signal.reasons):
        assert feed in text.shown, feed
    assert "\\_" not in body["text"] and "<!channel>" not in body["text"]
    # Our tags only, and one link: the market's, its slug encoded within polymarket.com.
    assert text.tags == ["b", "a", "i"]
    assert text.links == [market_url(signal.market_slug)]
    (link,) = text.links
    assert link.startswith("https://polymarket.com/market/rain%22%3E%3Ca%20href%3D%22https")
    parts = urlsplit(link)
    assert (parts.scheme, parts.netloc, parts.query, parts.fragment) == (
        "https",
        "polymarket.com",
        "",
        "",
    )
    assert re.fullmatch(r"/market/[A-Za-z0-9%._~-]+", parts.path), link
    assert f'<a href="{link}">' in body["text"]


@pytest.mark.parametrize("slug", ["", "..", "x" * 500])
def test_a_slug_that_names_no_page_gets_no_link(slug: str) -> None:
    _, text = shown(hostile(market_slug=slug))
    assert text.links == [] and text.tags == ["b", "i"]


@pytest.mark.parametrize(
    ("status", "mark", "word"),
    [
        (FillStatus.RETRACTED, "RETRACTED: ", "Retracted"),
        (FillStatus.PENDING, "PENDING: ", "Pending"),
    ],
)
def test_a_status_change_says_so_with_its_reason(status: FillStatus, mark: str, word: str) -> None:
    reason = "fill <removed> & reorged at block 7 " + MARKDOWN_V2
    signal = restated(variant(4, title="A" * 3000), status, reason)
    _, text = shown(signal)
    first, second = text.shown.split("\n")[:2]
    assert first.startswith(mark + "Whale order: ") and first.endswith(f"… — {reason}")
    assert second == f"Status: {word}: {reason}"


def test_overlong_feed_text_is_cut_inside_its_tag() -> None:
    # `&` takes five units escaped and an emoji two: within 4096 units all the same.
    signal = hostile(
        title="&" * 5000,
        wallet_label="🐋" * 3000,
        token_label="<" * 3000,
        reasons=[">" * 3000, '"' * 3000, "🐋&" * 2000],
    )
    body, text = shown(signal)
    html = body["text"]
    assert len(html.encode("utf-16-le")) // 2 <= 4096
    # Cut where the limit falls (an entity whole, a tag closed), the rest left out.
    assert re.search(r"(&(amp|lt|gt|quot);|[^&;])…(</[a-z]+>)?$", html), html[-20:]
    assert text.shown.endswith("…") and "Signal " not in text.shown
    # Many reasons: everything before them whole, the reasons cut inside their <i>.
    many = hostile(reasons=[f"reason {n} " + "&" * 40 for n in range(200)])
    body, text = shown(many)
    assert body["text"].endswith("&amp;…</i>"), body["text"][-20:]
    assert f"Signal {many.signal_id}\nreason 0 " in text.shown
    assert shown(hostile(reasons=[]))[1].tags == ["b", "a"]


# Any character but a lone surrogate, which no JSON signal can carry.
feed_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=300)


@settings(max_examples=200, deadline=None)
@given(
    title=feed_text,
    label=feed_text,
    outcome=feed_text,
    slug=feed_text,
    reasons=st.lists(feed_text, max_size=4),
    status=st.sampled_from(list(FillStatus)),
    reason=feed_text,
)
def test_any_feed_text_makes_a_text_telegram_takes(
    title: str,
    label: str,
    outcome: str,
    slug: str,
    reasons: list[str],
    status: FillStatus,
    reason: str,
) -> None:
    signal = hostile(
        title=title,
        wallet_label=label,
        token_label=outcome,
        market_slug=slug,
        reasons=reasons,
        status=status,
        status_reason=reason,
    )
    _, text = shown(signal)
    url = market_url(slug)
    assert text.links == ([] if url is None else [url])
    assert set(text.tags) <= {"b", "a", "i"}
    for feed in (label, outcome, *reasons):
        assert feed in text.shown


# Delivery without Redis: the Bot API's answers.


async def post(answers: list[httpx.Response], hook: Webhook) -> tuple[Any, list[Any], list[float]]:
    """`deliver` against scripted answers: the outcome, the requests, the waits."""
    requests: list[httpx.Request] = []
    sleeps: list[float] = []
    replies = iter(answers)

    def answer(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return next(replies)

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    body = render(Preset.TELEGRAM, "1-1", make_signal(1), b"{}", chat_id=CHAT)
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        outcome = await deliver(http, hook, body, "sig-1", RetryPolicy(4, 0.01, 8.0), sleep=sleep)
    return outcome, requests, sleeps


def bot_answer(status: int, description: str = "", **parameters: Any) -> httpx.Response:
    if status == 200:
        return httpx.Response(200, json={"ok": True, "result": {"message_id": 1}})
    body: dict[str, Any] = {"ok": False, "error_code": status, "description": description}
    if parameters:
        body["parameters"] = parameters
    return httpx.Response(status, json=body)


async def test_retry_after_in_the_body_is_honoured_up_to_the_cap() -> None:
    outcome, requests, sleeps = await post(
        [
            bot_answer(429, "Too Many Requests: retry after 5", retry_after=5),
            bot_answer(429, "Too Many Requests: retry after 60", retry_after=60),
            bot_answer(200),
        ],
        telegram_hook(secret=SECRET),
    )
    assert (outcome.delivered, outcome.attempts) == (True, 3)
    assert sleeps == [5.0, 8.0]
    for request in requests:
        assert str(request.url) == f"https://api.telegram.org/bot{TOKEN}/sendMessage"
        # Signed as any endpoint with a secret is (Telegram ignores it).
        headers = request.headers
        assert verify(
            SECRET,
            request.content,
            headers["x-betterbot-timestamp"],
            headers["x-betterbot-signature"],
            now=time.time(),
        )


async def test_the_reason_is_telegrams_description_without_the_token() -> None:
    outcome, _, _ = await post(
        [bot_answer(403, "Forbidden: bot was kicked from the channel chat")], telegram_hook()
    )
    assert outcome.reason == (
        "HTTP 403: Forbidden: bot was kicked from the channel chat (final, not retried)"
    )
    outcome, _, _ = await post(
        [
            bot_answer(
                400,
                "Bad Request: group chat was upgraded to a supergroup chat",
                migrate_to_chat_id=-1009876543210,
            )
        ],
        telegram_hook(),
    )
    assert outcome.reason == (
        "HTTP 400: Bad Request: group chat was upgraded to a supergroup chat "
        "(migrate_to_chat_id -1009876543210) (final, not retried)"
    )
    # A server that echoes the request's path (a proxy's 404 page) does not put it in the reason.
    echo = httpx.Response(404, text=f"no route POST /bot{TOKEN}/sendMessage")
    outcome, _, _ = await post([echo], telegram_hook())
    assert outcome.reason == "HTTP 404: no route POST /bot***/sendMessage (final, not retried)"
    outcome, _, _ = await post([httpx.Response(502, text="<html>bad gateway")] * 4, telegram_hook())
    assert outcome.reason == "4 attempts, last: HTTP 502: <html>bad gateway"


# End to end: real Redis, an in-process notifier, the stand-in Bot API.


def telegram_entry(api: BotApi, name: str, chat_id: int | str, **more: Any) -> dict[str, Any]:
    return {
        "name": name,
        "preset": "telegram",
        "url": api.url,
        "bot_token": TOKEN,
        "chat_id": chat_id,
        **more,
    }


def tries(calls: list[BotCall], signal: Signal) -> list[BotCall]:
    return [c for c in calls if c.headers["idempotency-key"] == signal.signal_id]


@pytest.mark.integration
async def test_hostile_signals_reach_the_chat_escaped(
    redis_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    signals = [hostile(), make_signal(2), restated(hostile(), FillStatus.RETRACTED, "reorg <b>")]
    async with BotApi(TOKEN) as api:
        path = hooks_file(tmp_path, [telegram_entry(api, "chat", CHAT, secret=SECRET)])
        async with notifier_with(redis_url, namespace, path):
            ids = await publish(redis_client, streams.signals, signals)
            await until_settled(redis_client, streams, ids[-1])
    assert api.problems == []
    assert await dead_letters(redis_client, streams) == []
    keys = sorted(c.headers["idempotency-key"] for c in api.calls)
    assert keys == sorted(
        [s.signal_id for s in signals[:2]] + [f"{signals[0].signal_id}:retracted"]
    )
    for call in api.calls:
        assert call.payload["chat_id"] == CHAT
        assert verify(
            SECRET,
            call.body,
            call.headers["x-betterbot-timestamp"],
            call.headers["x-betterbot-signature"],
            now=time.time(),
        )
    # What the chat shows: the hostile texts as they are, the retraction marked.
    hostile_calls = [c for c in api.calls if signals[0].title in c.shown]
    assert len(hostile_calls) == 2, [c.shown[:80] for c in api.calls]
    retracted = next(c for c in hostile_calls if c.headers["x-betterbot-status"] == "retracted")
    assert retracted.shown.startswith("RETRACTED: ")
    assert "\nStatus: Retracted: reorg <b>\n" in retracted.shown


@pytest.mark.integration
async def test_a_429s_retry_after_is_waited_out_up_to_the_cap(
    redis_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    # Telegram's answer carries no Retry-After header here: the wait comes from the JSON body.
    cap = 1.5
    plan = {
        CHAT: [bot_flood(1), BOT_OK],
        -42: [bot_flood(60), BOT_OK],
        -7: [bot_flood(1), bot_flood(1), BOT_OK],
    }
    async with BotApi(TOKEN, plan) as api:
        path = hooks_file(
            tmp_path,
            [telegram_entry(api, f"chat{n}", chat) for n, chat in enumerate((CHAT, -42, -7))],
        )
        async with notifier_with(redis_url, namespace, path, webhook_backoff_max_s=cap):
            signal = make_signal(1)
            ids = await publish(redis_client, streams.signals, [signal])
            await until_settled(redis_client, streams, ids[-1])
    assert api.problems == [] and await dead_letters(redis_client, streams) == []
    gaps = {}
    for chat in (CHAT, -42, -7):
        calls = tries(api.to(chat), signal)
        assert [c.headers["x-betterbot-attempt"] for c in calls] == [
            str(n) for n in range(1, len(calls) + 1)
        ]
        gaps[chat] = [b.at - a.at for a, b in itertools.pairwise(calls)]
    # retry_after 1: at least a second; retry_after 60: the cap, not a minute. (The backoff
    # alone is 0.01 s; the upper bounds leave room for a loaded machine.)
    slack = 3.0
    assert len(gaps[CHAT]) == 1 and 1.0 <= gaps[CHAT][0] < cap + slack, gaps
    assert len(gaps[-42]) == 1 and cap <= gaps[-42][0] < cap + slack, gaps
    assert len(gaps[-7]) == 2 and all(1.0 <= gap < cap + slack for gap in gaps[-7]), gaps


@pytest.mark.integration
async def test_a_dead_chat_is_final_and_dead_lettered_and_the_token_is_nowhere(
    redis_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    gone = "@no_such_channel"
    plan = {-666: [BOT_BLOCKED], gone: [BOT_NO_CHAT]}
    signals = [make_signal(n) for n in range(8)]
    with captured_logs() as records:
        async with BotApi(TOKEN, plan) as api:
            path = hooks_file(
                tmp_path,
                [
                    telegram_entry(api, "blocked", -666),
                    telegram_entry(api, "good", CHAT),
                    telegram_entry(api, "gone", gone),
                ],
            )
            async with notifier_with(redis_url, namespace, path, webhook_max_attempts=5):
                ids = await publish(redis_client, streams.signals, signals)
                await until_settled(redis_client, streams, ids[-1])
    assert api.problems == []
    everyone = sorted(s.signal_id for s in signals)
    assert sorted(c.headers["idempotency-key"] for c in api.to(CHAT)) == everyone
    # Refused once each, never retried.
    assert sorted(c.headers["idempotency-key"] for c in api.to(-666)) == everyone
    assert sorted(c.headers["idempotency-key"] for c in api.to(gone)) == everyone

    letters = await dead_letters(redis_client, streams)
    reasons = {(d["webhook"], d["reason"], d["deliveries"]) for d in letters}
    assert reasons == {
        ("blocked", "HTTP 403: Forbidden: bot was blocked by the user (final, not retried)", "1"),
        ("gone", "HTTP 400: Bad Request: chat not found (final, not retried)", "1"),
    }
    assert sorted(d["entry_id"] for d in letters if d["webhook"] == "blocked") == sorted(ids)
    assert sorted(d["signal_id"] for d in letters if d["webhook"] == "gone") == everyone

    # The token: in no dead letter, no metric, no log line.
    assert not [d for d in letters if any(TOKEN in value for value in d.values())]
    assert TOKEN not in generate_latest(REGISTRY).decode()
    assert any(r.getMessage() == "webhook_dead_lettered" for r in records)
    formatter = JsonFormatter("notifier")
    leaks = [
        formatter.format(r) for r in records if TOKEN in formatter.format(r) or TOKEN in raw(r)
    ]
    assert leaks == []


class _Records(logging.Handler):
    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def raw(record: logging.LogRecord) -> str:
    """A log record's message and every field, before any scrubbing."""
    return record.getMessage() + repr(record.__dict__)


@contextlib.contextmanager
def captured_logs() -> Iterator[list[logging.LogRecord]]:
    """Every log record at any level, with the library levels the services set
    (`shared.logs.configure_logging`: httpx, which names each request's URL, at WARNING)."""
    handler = _Records(logging.DEBUG)
    records = handler.records
    root, httpx_log = logging.getLogger(), logging.getLogger("httpx")
    levels = (root.level, httpx_log.level)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    httpx_log.setLevel(logging.WARNING)
    try:
        yield records
    finally:
        root.removeHandler(handler)
        root.setLevel(levels[0])
        httpx_log.setLevel(levels[1])
