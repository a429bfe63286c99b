"""Webhooks against a hostile feed and hostile endpoints.

- Slack: feed text (titles, labels, slugs, reasons) cannot ping a channel or carry a link of its
  own: `& < >` are escaped in every mrkdwn text and in the fallback `text`, auto-parsing is off
  (`verbatim`), and the one link, to the market, is built from the percent-encoded slug.
- Discord: the market link is a valid URL whatever the slug; mentions never ping
  (`allowed_mentions`) and markdown / mention syntax in feed text is escaped; every text stays
  within Discord's limits, the embed's 6000 characters in all included.
- A dead endpoint (hanging, or failing every try) delays no other endpoint: each one has its own
  durable queue in Redis, its own retries and dead letters, and survives a notifier restart.
- The docs promise what is true: at least once, with the signal id to deduplicate on.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from services.notifier.webhooks.presets import MARKET_URL, discord_body, slack_body
from shared.models import Signal
from shared.streams import Streams
from tests.helpers.notifier import Receiver, make_signal, publish, wait_until
from tests.helpers.processes import ROOT
from tests.test_notifier_webhooks import (
    SECRET,
    dead_letters,
    hooks_file,
    notifier_with,
)

MARKET = MARKET_URL.format(slug="")
PING = "<!channel> <!here|here> <@U024BE7LH> <#C024BE7LR> @everyone @here <@&123> <@!42>"
PHISH = "[Polymarket](https://evil.example/login) <https://evil.example|Polymarket> | > *x*"


def hostile(**changes: Any) -> Signal:
    """A signal whose feed-supplied texts are attacks; not validated, like a forged entry."""
    base = {
        "title": f"Will it rain? {PING} {PHISH}",
        "wallet_label": f"cow{PING}",
        "token_label": f"Yes {PHISH}",
        "market_slug": "rain|<https://evil.example>",
        "reasons": [f"reason {PING}", f"- # {PHISH}"],
    }
    return make_signal(5).model_copy(update=base | changes)


# Slack.


def slack_texts(body: dict[str, Any]) -> Iterator[tuple[dict[str, Any] | None, str]]:
    """Every mrkdwn text object of the message (with its object), and the fallback text."""
    yield None, body["text"]
    for block in body["blocks"]:
        objects = [block.get("text"), *block.get("fields", ()), *block.get("elements", ())]
        for obj in objects:
            if obj is not None and obj["type"] == "mrkdwn":
                yield obj, obj["text"]


def slack_links(text: str) -> list[str]:
    return re.findall(r"<([^<>]*)>", text)


def test_slack_feed_text_cannot_ping_or_link() -> None:
    body = slack_body(hostile())
    for obj, text in slack_texts(body):
        assert "<!" not in text and "<@" not in text and "<#" not in text, text
        # The only `<...>` left is ours: the market link.
        for link in slack_links(text):
            url, _, label = link.partition("|")
            assert url.startswith(MARKET), link
            assert not set(url[len(MARKET) :]) & set("|<> /?#&"), url
            assert "<" not in label and ">" not in label
        assert re.sub(r"&(amp|lt|gt);", "", text).count("&") == 0, text
        if obj is not None:
            # No automatic parsing of bare URLs, #channels or @mentions either.
            assert obj.get("verbatim") is True, obj
    assert "&lt;!channel&gt;" in body["text"]
    (header,) = [b for b in body["blocks"] if b["type"] == "header"]
    assert header["text"]["type"] == "plain_text"


def test_slack_link_is_built_from_the_encoded_slug() -> None:
    title = slack_body(hostile())["blocks"][1]["text"]["text"]
    assert title.startswith(f"*<{MARKET}rain%7C%3Chttps%3A%2F%2Fevil.example%3E|Will it rain? ")
    for slug, url in [
        ("nobel-peace-prize-2025", f"{MARKET}nobel-peace-prize-2025"),
        ("a b?c#d/e", f"{MARKET}a%20b%3Fc%23d%2Fe"),
        ("..", None),
        ("", None),
        ("x" * 500, None),
    ]:
        text = slack_body(hostile(market_slug=slug))["blocks"][1]["text"]["text"]
        urls = [link.partition("|")[0] for link in slack_links(text)]
        assert urls == ([] if url is None else [url]), (slug, text)


def test_slack_texts_fit_after_escaping() -> None:
    # Each `&` becomes five characters: cut after escaping, never inside an entity.
    body = slack_body(hostile(title="&" * 5000, wallet_label="<" * 3000, reasons=[">" * 5000]))
    header, title, facts, why = body["blocks"]
    assert len(header["text"]["text"]) <= 150
    assert len(title["text"]["text"]) <= 3000
    assert all(len(field["text"]) <= 2000 for field in facts["fields"])
    assert len(why["elements"][0]["text"]) <= 3000
    assert len(body["text"]) <= 3000
    for _, text in slack_texts(body):
        assert not re.search(r"&[a-z]{0,3}…", text), text[-20:]


# Discord.


DISCORD_SPECIALS = set("\\*_~`|<>[]#-@")


def unescaped(text: str) -> str:
    """The markdown / mention characters of `text` that no backslash escapes."""
    found, chars = [], iter(text)
    for char in chars:
        if char == "\\":
            next(chars, None)
        elif char in DISCORD_SPECIALS:
            found.append(char)
    return "".join(found)


def discord_texts(body: dict[str, Any]) -> list[str]:
    """Every text Discord renders as markdown: content, title, description, field values."""
    (embed,) = body["embeds"]
    values = [field["value"] for field in embed["fields"]]
    return [body["content"], embed["title"], embed["description"], *values]


def test_discord_link_is_a_valid_url_whatever_the_slug() -> None:
    (embed,) = discord_body(hostile(market_slug="will it rain?"))["embeds"]
    assert embed["url"] == f"{MARKET}will%20it%20rain%3F"
    for slug in ("rain|<https://evil.example>", "a b/../c?d#e", "ünïcode slug", "100%"):
        (embed,) = discord_body(hostile(market_slug=slug))["embeds"]
        parts = urlsplit(embed["url"])
        assert (parts.scheme, parts.netloc) == ("https", "polymarket.com"), embed["url"]
        assert re.fullmatch(r"/market/[A-Za-z0-9%._~-]+", parts.path), embed["url"]
        assert not parts.query and not parts.fragment
    for slug in ("", "..", "x" * 500):
        (embed,) = discord_body(hostile(market_slug=slug))["embeds"]
        assert "url" not in embed, slug


def test_discord_feed_text_cannot_ping_or_format() -> None:
    body = discord_body(hostile())
    assert body["allowed_mentions"] == {"parse": []}
    for text in discord_texts(body):
        assert unescaped(text) == "", text
    content = body["content"]
    assert "\\@everyone" in content and "\\<\\@U024BE7LH\\>" in content
    assert "\\[Polymarket\\](https://evil.example/login)" in content


def test_discord_texts_fit_the_limits_after_escaping() -> None:
    body = discord_body(
        hostile(
            title="*" * 5000,
            wallet_label="_" * 5000,
            token_label="~" * 5000,
            reasons=["@" * 3000, "<" * 3000, "[" * 3000],
        )
    )
    (embed,) = body["embeds"]
    assert len(body["content"]) <= 2000
    assert len(embed["title"]) <= 256 and len(embed["description"]) <= 4096
    assert all(len(f["name"]) <= 256 and len(f["value"]) <= 1024 for f in embed["fields"])
    assert len(embed["footer"]["text"]) <= 2048
    total = sum(
        len(text)
        for text in (
            embed["title"],
            embed["description"],
            embed["footer"]["text"],
            *(f["name"] for f in embed["fields"]),
            *(f["value"] for f in embed["fields"]),
        )
    )
    assert total <= 6000
    for text in discord_texts(body):
        # Never cut between a backslash and the character it escapes.
        assert unescaped(text) == "", text[-20:]
        assert not re.search(r"(?<!\\)(\\\\)*\\…$", text), text[-20:]


# A dead endpoint delays nobody else.


class BlackHole:
    """An endpoint that accepts connections and never answers: every POST times out.

    Records the `X-BetterBot-Attempt` of each request it gets (one connection per try: a timed-out
    connection is not reused).
    """

    def __init__(self) -> None:
        self.attempts: list[tuple[str, str]] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    def url(self, path: str) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/{path}"

    def to(self, path: str) -> list[str]:
        return [attempt for where, attempt in self.attempts if where == path]

    async def _swallow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            path = head.split(" ", 2)[1].lstrip("/")
            attempt = re.search(r"(?im)^x-betterbot-attempt: *(\d+)", head)
            self.attempts.append((path, attempt[1] if attempt else "?"))
            await reader.read()  # until the notifier gives up and closes

    async def __aenter__(self) -> BlackHole:
        self._server = await asyncio.start_server(self._swallow, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()


def keys_of(receiver: Receiver, path: str) -> Counter[str]:
    return Counter(r.headers["idempotency-key"] for r in receiver.to(path))


def metric(name: str, webhook: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"webhook": webhook})


@pytest.mark.integration
async def test_hanging_endpoints_do_not_delay_a_healthy_one(
    redis_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    # Two endpoints that never answer, each with as many tries in flight as a replica allows.
    async with Receiver() as receiver, BlackHole() as hole:
        path = hooks_file(
            tmp_path,
            [
                {"name": "stuck-1", "url": hole.url("stuck-1"), "secret": SECRET},
                {"name": "ok", "url": receiver.url("ok"), "secret": SECRET},
                {"name": "stuck-2", "url": hole.url("stuck-2"), "secret": SECRET},
            ],
        )
        async with notifier_with(
            redis_url,
            namespace,
            path,
            webhook_concurrency=2,
            webhook_timeout_s=20,
            webhook_max_attempts=3,
            webhook_claim_idle_ms=600,
        ):
            signals = [make_signal(n) for n in range(12)]
            await publish(redis_client, streams.signals, signals)

            async def all_delivered() -> bool:
                return set(keys_of(receiver, "ok")) == {s.signal_id for s in signals}

            await wait_until(all_delivered, "every signal at the healthy endpoint")
            # The stuck endpoints are still on their first tries: nobody waited for them.
            for stuck in ("stuck-1", "stuck-2"):
                assert set(hole.to(stuck)) <= {"1"} and len(hole.to(stuck)) <= 2, hole.attempts

            async def backlog_counted() -> bool:
                return metric("betterbot_notifier_webhook_backlog", "stuck-1") == 12

            await wait_until(backlog_counted, "the stuck endpoint's backlog gauge")
            assert metric("betterbot_notifier_webhook_backlog", "ok") == 0
    assert keys_of(receiver, "ok") == {s.signal_id: 1 for s in signals}


@pytest.mark.integration
async def test_each_endpoint_dead_letters_its_own_failures(
    redis_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    async with Receiver({"dead": [503]}) as receiver:
        path = hooks_file(
            tmp_path,
            [
                {"name": "dead", "url": receiver.url("dead"), "secret": SECRET},
                {"name": "ok", "url": receiver.url("ok"), "secret": SECRET},
            ],
        )
        async with notifier_with(
            redis_url, namespace, path, webhook_concurrency=2, webhook_max_attempts=3
        ):
            signals = [make_signal(n) for n in range(10)]
            ids = await publish(redis_client, streams.signals, signals)

            async def all_dead() -> bool:
                return len(await dead_letters(redis_client, streams)) == len(signals)

            await wait_until(all_dead, "a dead letter per signal for the dead endpoint")
            assert keys_of(receiver, "ok") == {s.signal_id: 1 for s in signals}

    letters = await dead_letters(redis_client, streams)
    assert sorted(d["entry_id"] for d in letters) == sorted(ids)
    for letter in letters:
        assert letter["webhook"] == "dead" and letter["deliveries"] == "3"
        assert letter["reason"] == "3 attempts, last: HTTP 503: no (503)"
    assert keys_of(receiver, "dead") == {s.signal_id: 3 for s in signals}


@pytest.mark.integration
async def test_an_endpoints_queue_survives_a_restart(
    redis_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    # `later` is down (nothing listens on its port) through a whole notifier lifetime.
    later = Receiver()
    async with Receiver() as receiver:
        path = hooks_file(
            tmp_path,
            [
                {"name": "ok", "url": receiver.url("ok"), "secret": SECRET},
                {"name": "later", "url": later.url("later"), "secret": SECRET},
            ],
        )
        settings = {"webhook_max_attempts": 1000, "webhook_claim_idle_ms": 400}
        first = [make_signal(n) for n in range(6)]
        async with notifier_with(redis_url, namespace, path, **settings):
            await publish(redis_client, streams.signals, first)

            async def first_delivered() -> bool:
                return set(keys_of(receiver, "ok")) == {s.signal_id for s in first}

            await wait_until(first_delivered, "the healthy endpoint to get the first signals")
        # Published while no notifier runs: the group keeps its place.
        second = [make_signal(n) for n in range(6, 9)]
        await publish(redis_client, streams.signals, second)
        async with later, notifier_with(redis_url, namespace, path, **settings):
            everything = {s.signal_id for s in first + second}

            async def all_delivered() -> bool:
                return set(keys_of(later, "later")) == set(keys_of(receiver, "ok")) == everything

            await wait_until(all_delivered, "every signal at both endpoints")
    assert await dead_letters(redis_client, streams) == []


@pytest.mark.integration
async def test_a_full_backlog_dead_letters_at_once(
    redis_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    async with BlackHole() as hole:
        path = hooks_file(
            tmp_path,
            [{"name": "stuck", "url": hole.url("stuck"), "secret": SECRET, "max_backlog": 3}],
        )
        async with notifier_with(
            redis_url, namespace, path, webhook_concurrency=1, webhook_timeout_s=20
        ):
            ids = await publish(redis_client, streams.signals, [make_signal(n) for n in range(7)])

            async def overflowed() -> bool:
                return len(await dead_letters(redis_client, streams)) == 4

            await wait_until(overflowed, "the signals past the backlog to be dead-lettered")
            letters = await dead_letters(redis_client, streams)
    assert [d["entry_id"] for d in letters] == ids[3:]
    assert {d["reason"] for d in letters} == {
        "backlog full: 3 signals waiting for this endpoint (max_backlog 3)"
    }
    assert {d["deliveries"] for d in letters} == {"0"}


# The docs.


def test_docs_promise_at_least_once_and_how_to_deduplicate() -> None:
    text = (ROOT / "docs" / "notifier.md").read_text()
    webhooks = text.split("## Webhooks")[1].split("\n## ")[0]
    scaling = text.split("Scaling:")[1].split("\n\n")[0]
    for part in (webhooks, scaling):
        assert not re.search(r"exactly (one|once)|(?<!at )\bonce per endpoint", part, re.I), part
    assert "at least once" in webhooks.lower()
    assert "Idempotency-Key" in webhooks and "signal_id" in webhooks
    dedupe = webhooks.split("### Deduplicating")[1].split("\n### ")[0]
    assert "Idempotency-Key" in dedupe and "signal_id" in dedupe
    docstrings = "".join(
        (ROOT / "services" / "notifier" / "webhooks" / name).read_text().split('"""')[1]
        for name in ("__init__.py", "consumer.py", "delivery.py")
    )
    assert "exactly one" not in docstrings and "at least once" in docstrings
