"""Filters, tokens and limits of `/ws`, against real Redis and an in-process notifier."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect

from services.notifier.filters import parse_filters
from services.notifier.main import Notifier
from shared.models import Signal, SignalKind
from shared.streams import Streams
from tests.helpers.notifier import (
    assert_nothing_more,
    closed_with,
    publish,
    recv_hello,
    recv_json,
    recv_signals,
    recv_until,
    running_notifier,
    variant,
    wait_until,
    wallet,
    ws_url,
)

pytestmark = pytest.mark.integration

TOKEN = "tok-" + "a1b2c3d4" * 4
OTHER_TOKEN = "tok-" + "e5f6a7b8" * 4
KINDS = list(SignalKind)
MARKETS = ["nobel-peace-prize-2025", "fed-rate-cut-december", "world-cup-winner"]


def mixed_signal(n: int) -> Signal:
    """Signals spread over 5 wallets, 3 markets, 4 kinds and 3 confidence levels."""
    market = n % 3
    return variant(
        n,
        wallet=wallet(n % 5),
        market_slug=MARKETS[market],
        condition_id="0x" + f"{market + 1:064x}",
        kind=KINDS[n % 4],
        confidence=(0.5, 0.75, 0.95)[(n // 3) % 3],
    )


def matching(filters: dict[str, Any], signals: list[Signal], ids: list[str]) -> list[str]:
    wanted = parse_filters(filters, max_values=1000)
    pairs = zip(ids, signals, strict=True)
    return [entry_id for entry_id, signal in pairs if wanted.matches(signal)]


async def subscribe(ws: ClientConnection, filters: dict[str, Any], **extra: Any) -> dict[str, Any]:
    await ws.send(orjson.dumps({"type": "subscribe", "filters": filters, **extra}).decode())
    reply = await recv_json(ws)
    assert reply["type"] == "subscribed", reply
    return reply


async def test_clients_with_different_filters_each_get_exactly_theirs(
    redis_url: str, namespace: str, streams: Streams, redis_client: aioredis.Redis
) -> None:
    by_url: dict[str, dict[str, Any]] = {
        "": {},
        "?wallets=" + wallet(1) + "," + wallet(2).upper().replace("0X", "0x"): {
            "wallets": [wallet(1), wallet(2)]
        },
        "?kinds=trader_entry&kinds=whale_order&min_confidence=0.7": {
            "kinds": ["trader_entry", "whale_order"],
            "min_confidence": 0.7,
        },
        "?markets=" + "0x" + f"{2:064x}": {"markets": ["0x" + f"{2:064x}"]},
    }
    by_message: dict[str, Any] = {
        "markets": [MARKETS[0].upper()],
        "wallets": [wallet(0), wallet(3)],
        "min_confidence": 0.95,
    }
    async with running_notifier(redis_url, namespace) as notifier:
        clients = {query: await connect(ws_url(notifier, query)) for query in by_url}
        for ws in clients.values():
            await recv_hello(ws)
        messaged = await connect(ws_url(notifier))
        await recv_hello(messaged)
        reply = await subscribe(messaged, by_message)
        assert reply["filters"] == {
            "wallets": [wallet(0), wallet(3)],
            "markets": [MARKETS[0]],
            "kinds": None,
            "min_confidence": 0.95,
            "min_notional_usd": 0.0,
            "min_price": 0.0,
            "max_price": 1.0,
            "sides": None,
            "tags": None,
            "only_new_positions": False,
        }

        signals = [mixed_signal(n) for n in range(120)]
        ids = await publish(redis_client, streams.signals, signals)

        expectations = [(clients[q], f) for q, f in by_url.items()] + [(messaged, by_message)]
        for ws, filters in expectations:
            expected = matching(filters, signals, ids)
            assert 0 < len(expected) <= len(ids)
            received = await recv_signals(ws, len(expected))
            assert [m["id"] for m in received] == expected, filters
            await assert_nothing_more(ws)
            await ws.close()


async def test_filter_change_applies_from_its_answer_on(
    redis_url: str, namespace: str, streams: Streams, redis_client: aioredis.Redis
) -> None:
    new_filters = {"kinds": ["trader_entry"]}
    async with (
        running_notifier(redis_url, namespace) as notifier,
        publishing(redis_client, streams, count=200) as published,
        connect(ws_url(notifier)) as ws,
    ):
        await recv_hello(ws)
        before = [await recv_json(ws) for _ in range(20)]
        await ws.send(orjson.dumps({"type": "subscribe", "filters": new_filters}).decode())
        before += await recv_until(ws, "subscribed")
        before.pop()
        ids, signals = await published()
        rest = len(matching(new_filters, signals[len(before) :], ids[len(before) :]))
        after = await recv_signals(ws, rest)
        await assert_nothing_more(ws)
    # Everything up to the answer (old filter: all), then only the matching ones.
    assert [m["id"] for m in before] == ids[: len(before)]
    assert [m["id"] for m in after] == matching(
        new_filters, signals[len(before) :], ids[len(before) :]
    )


@pytest.mark.parametrize("token_in", ["url", "header", "first_message"])
async def test_resume_with_filters_gets_every_match_exactly_once(
    redis_url: str, namespace: str, streams: Streams, redis_client: aioredis.Redis, token_in: str
) -> None:
    filters = {"wallets": [wallet(1), wallet(2), wallet(4)], "min_confidence": 0.7}
    query = f"?wallets={wallet(1)},{wallet(2)},{wallet(4)}&min_confidence=0.7"
    received: list[dict[str, Any]] = []
    async with (
        running_notifier(redis_url, namespace, notifier_tokens=(TOKEN,)) as notifier,
        publishing(redis_client, streams, count=300) as published,
    ):
        for round_ in range(3):
            # The first connection resumes from the stream's start: it misses nothing either.
            last_id = received[-1]["id"] if received else "0-0"
            async with open_feed(notifier, token_in, query, filters, last_id) as ws:
                # Drop the connection mid-stream, with messages still in flight to it.
                for _ in range(15 if round_ < 2 else 0):
                    received += await recv_signals(ws, 1)
                if round_ == 2:
                    ids, signals = await published()
                    expected = matching(filters, signals, ids)
                    received += await recv_signals(ws, len(expected) - len(received))
                    await assert_nothing_more(ws)
    assert [m["id"] for m in received] == expected


@contextlib.asynccontextmanager
async def open_feed(
    notifier: Notifier, token_in: str, query: str, filters: dict[str, Any], last_id: str | None
) -> AsyncIterator[ClientConnection]:
    resume = f"&last_id={last_id}" if last_id else ""
    if token_in == "url":
        ws = await connect(ws_url(notifier, f"{query}&token={TOKEN}{resume}"))
    elif token_in == "header":
        ws = await connect(
            ws_url(notifier, query + resume),
            additional_headers={"Authorization": f"Bearer {TOKEN}"},
        )
    else:
        ws = await connect(ws_url(notifier))
        extra = {"last_id": last_id} if last_id else {}
        await recv_hello(ws)
        await ws.send(
            orjson.dumps(
                {"type": "subscribe", "token": TOKEN, "filters": filters, **extra}
            ).decode()
        )
        assert (await recv_json(ws))["type"] == "subscribed"
    if token_in != "first_message":
        await recv_hello(ws)
    try:
        yield ws
    finally:
        await ws.close()


@contextlib.asynccontextmanager
async def publishing(
    client: aioredis.Redis, streams: Streams, count: int
) -> AsyncIterator[Callable[[], Any]]:
    """Publish `count` mixed signals, a few at a time; yields an awaitable of (ids, signals)."""
    signals = [mixed_signal(n) for n in range(count)]

    async def run() -> tuple[list[str], list[Signal]]:
        ids: list[str] = []
        for start in range(0, count, 5):
            ids += await publish(client, streams.signals, signals[start : start + 5])
            await asyncio.sleep(0.005)
        return ids, signals

    task = asyncio.ensure_future(run())
    try:
        yield lambda: task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize(
    ("query", "message", "code", "reason"),
    [
        (
            "?kinds=nope",
            None,
            1008,
            # A close reason holds 123 bytes: the list of kinds is cut there.
            (
                "bad filter: kinds.0: Input should be 'trader_entry', 'trader_exit', "
                "'whale_order', 'consensus', 'accumulation' or 'distribution'"
            )[:123],
        ),
        (
            "?wallets=0x12",
            None,
            1008,
            "bad filter: wallets.0: not a 0x wallet address of 40 hex digits",
        ),
        (
            "?wallets=",
            None,
            1008,
            "bad filter: wallets: empty list matches nothing; leave the field out to match any",
        ),
        (
            "?min_confidence=high",
            None,
            1008,
            "bad filter: min_confidence: Input should be a valid number, unable to parse "
            "string as a number",
        ),
        (
            "",
            '{"type":"subscribe","filters":{"min_confidence":2}}',
            1008,
            "bad filter: min_confidence: Input should be less than or equal to 1",
        ),
        (
            "",
            '{"type":"subscribe","filters":{"wallet":["0x1"]}}',
            1008,
            "bad filter: wallet: unknown field (did you mean wallets?)",
        ),
        (
            "",
            '{"type":"subscribe","filters":{"markets":["a","b","c","d","e","f"]}}',
            1008,
            "bad filter: 6 values, limit 5",
        ),
        (
            "",
            '{"type":"subscribe","filters":{"kinds":["whale_order"]',
            1003,
            'not JSON: send {"type":"ping"} or {"type":"subscribe","filters":{...}}',
        ),
        (
            "",
            '{"type":"subscribe","filters":{},"last_id":"1-0"}',
            1008,
            "last_id is read only on the URL or in the first message",
        ),
        (
            "",
            '{"type":"ping","pad":"' + "x" * 2000 + '"}',
            1009,
            "message too big: 2024 bytes, limit 1024",
        ),
    ],
)
async def test_bad_requests_get_a_clear_close_reason(
    redis_url: str, namespace: str, query: str, message: str | None, code: int, reason: str
) -> None:
    async with (
        running_notifier(
            redis_url, namespace, notifier_max_filter_values=5, notifier_max_message_bytes=1024
        ) as notifier,
        connect(ws_url(notifier, query)) as ws,
    ):
        if message is not None:
            await recv_hello(ws)
            await ws.send(message)
        assert await closed_with(ws) == (code, reason)


async def test_tokens_are_required_and_checked(
    redis_url: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    missing = (
        4401,
        "unauthorized: token required (Authorization header, ?token= or the first message)",
    )
    unknown = (4401, "unauthorized: unknown token")
    async with running_notifier(
        redis_url, namespace, notifier_tokens=(TOKEN, OTHER_TOKEN), notifier_setup_timeout_s=0.5
    ) as notifier:
        async with connect(ws_url(notifier, "?token=" + TOKEN[:-1])) as ws:
            assert await closed_with(ws) == unknown
        async with connect(
            ws_url(notifier), additional_headers={"Authorization": "Bearer nope"}
        ) as ws:
            assert await closed_with(ws) == unknown
        for first in ('{"type":"ping"}', '{"type":"subscribe","filters":{}}'):
            async with connect(ws_url(notifier)) as ws:
                await recv_hello(ws)
                await ws.send(first)
                assert await closed_with(ws) == missing
        async with connect(ws_url(notifier)) as ws:
            await recv_hello(ws)
            await ws.send(orjson.dumps({"type": "subscribe", "token": OTHER_TOKEN + "x"}).decode())
            assert await closed_with(ws) == unknown
        async with connect(ws_url(notifier)) as ws:
            await recv_hello(ws)
            assert await closed_with(ws) == (
                4401,
                'unauthorized: no {"type":"subscribe","token":...} within 0.5 s',
            )
        async with connect(ws_url(notifier, "?token=" + OTHER_TOKEN)) as ws:
            await recv_hello(ws)
            await assert_nothing_more(ws)
    # Our own log lines (with their fields) never carry a token (libraries' DEBUG frame dumps
    # do; configure_logging scrubs registered secrets from those).
    ours = " ".join(str(r.__dict__) for r in caplog.records if r.name.startswith("services."))
    assert "client_closed" in ours
    assert TOKEN[:12] not in ours and OTHER_TOKEN[:12] not in ours


async def test_connections_per_token_are_limited(redis_url: str, namespace: str) -> None:
    async with running_notifier(
        redis_url,
        namespace,
        notifier_tokens=f"{TOKEN},{OTHER_TOKEN}",
        notifier_max_clients_per_token=2,
    ) as notifier:
        held = [await connect(ws_url(notifier, "?token=" + TOKEN)) for _ in range(2)]
        for ws in held:
            await recv_hello(ws)
        async with connect(ws_url(notifier, "?token=" + TOKEN)) as ws:
            assert await closed_with(ws) == (
                1008,
                "too many connections for this token (limit 2 per server)",
            )
        async with connect(ws_url(notifier, "?token=" + OTHER_TOKEN)) as ws:
            await recv_hello(ws)
        await held.pop().close()

        async def released() -> bool:
            return notifier.slots.held("token-1") == 1

        await wait_until(released, "the closed connection's slot to be released")
        async with connect(ws_url(notifier, "?token=" + TOKEN)) as ws:
            await recv_hello(ws)
            await assert_nothing_more(ws)
        await held.pop().close()
