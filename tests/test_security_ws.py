"""The security of `/ws`: who may read the feed, and what one connection may cost the server.

1. Any web page open in the operator's browser could read the feed (WebSockets are not bound by
   the same-origin policy): the handshake's `Origin` must be the notifier's own or listed, and its
   `Host` must be listed (DNS rebinding). Checked from a plain client and from headless Chromium:
   a page of another origin, and a "rebound" name pointing at the notifier, read nothing, while
   the notifier's own dashboard works.
2. A replay (`last_id`) scans at most NOTIFIER_MAX_REPLAY_ENTRIES entries, then says where it
   stopped and closes; the client resumes from there, with no gap and no repeat. Live clients keep
   getting their signals meanwhile. Connections are capped in all and per address.
3. A `last_id` in the future (a browser clock ahead) used to drop every live signal.
4. An empty or short token in NOTIFIER_TOKENS used to let `?token=` (empty) in.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import httpx
import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr, ValidationError
from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from devtools.servers import free_port
from services.notifier.auth import Tokens
from services.notifier.main import Notifier
from services.notifier.settings import NotifierSettings
from shared.ops import http_server
from shared.redis_streams import encode
from shared.streams import Streams
from tests.helpers.notifier import (
    assert_nothing_more,
    closed_with,
    http_url,
    make_signal,
    publish,
    recv_hello,
    recv_json,
    recv_signals,
    running_notifier,
    variant,
    wait_until,
    wallet,
    ws_url,
)
from tests.test_notifier_dashboard import CHROMIUM_ARGS, chromium, stamped, tape_signals, wait_js

__all__ = ["chromium"]  # the fixture, shared with the dashboard test

LONG_TOKEN = "sec-" + "0123456789abcdef" * 2


def port_of(notifier: Notifier) -> int:
    return notifier.settings.notifier_port


async def refused_status(url: str, **options: Any) -> tuple[int, str]:
    """The HTTP status and body of a handshake the server must refuse."""
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url, open_timeout=5, **options):
            pass
    response = refused.value.response
    return response.status_code, response.body.decode(errors="replace") if response.body else ""


# ---- 1. Origin and Host ----


@pytest.mark.integration
async def test_foreign_origins_and_hosts_are_refused_before_the_handshake(
    redis_url: str, namespace: str
) -> None:
    async with running_notifier(redis_url, namespace) as notifier:
        port = port_of(notifier)
        for foreign in (
            "http://evil.example",
            f"http://127.0.0.1:{port + 1}",
            f"http://127.0.0.1:{port}.evil.example",
            "null",
        ):
            status, body = await refused_status(ws_url(notifier), origin=Origin(foreign))
            assert status == 403, foreign
            assert "NOTIFIER_ALLOWED_ORIGINS" in body
        # DNS rebinding: a name of the attacker's, resolving to us, with a "same-origin" Origin.
        rebound = f"ws://rebind.example:{port}/ws"
        for origin in (None, Origin(f"http://rebind.example:{port}")):
            status, body = await refused_status(rebound, host="127.0.0.1", origin=origin)
            assert status == 403 and "NOTIFIER_ALLOWED_HOSTS" in body

        # Programs send no Origin; the dashboard sends its own.
        for own in (None, Origin(f"http://127.0.0.1:{port}")):
            async with connect(ws_url(notifier), origin=own) as ws:
                await recv_hello(ws)
        async with connect(
            f"ws://localhost:{port}/ws", host="127.0.0.1", origin=Origin(f"http://localhost:{port}")
        ) as ws:
            await recv_hello(ws)


@pytest.mark.integration
async def test_pages_and_apis_check_the_host_but_probes_do_not(
    redis_url: str, namespace: str
) -> None:
    async with running_notifier(redis_url, namespace) as notifier, httpx.AsyncClient() as http:
        for path in ("/", "/api/status"):
            assert (await http.get(http_url(notifier, path))).status_code == 200
            foreign = await http.get(http_url(notifier, path), headers={"Host": "rebind.example"})
            assert foreign.status_code == 400, path
            assert "NOTIFIER_ALLOWED_HOSTS" in foreign.text
        # Health checks and scrapers address a replica by its IP: no signal is on these.
        for path in ("/health", "/metrics"):
            answer = await http.get(http_url(notifier, path), headers={"Host": "10.1.2.3:8080"})
            assert answer.status_code == 200, path


@pytest.mark.integration
async def test_listed_origins_and_hosts_are_let_in(redis_url: str, namespace: str) -> None:
    desk = "https://desk.example.com"
    async with running_notifier(
        redis_url,
        namespace,
        notifier_allowed_origins=f"{desk}/",
        notifier_allowed_hosts="feed.example.com",
    ) as notifier:
        port = port_of(notifier)
        async with connect(
            f"ws://feed.example.com:{port}/ws", host="127.0.0.1", origin=Origin(desk)
        ) as ws:
            await recv_hello(ws)
        # Only what is listed (and NOTIFIER_HOST): the defaults are replaced, not extended.
        status, _ = await refused_status(f"ws://localhost:{port}/ws", host="127.0.0.1")
        assert status == 403
    async with running_notifier(
        redis_url, namespace, notifier_allowed_origins="*", notifier_allowed_hosts="*"
    ) as notifier:
        port = port_of(notifier)
        async with connect(
            f"ws://anything.example:{port}/ws",
            host="127.0.0.1",
            origin=Origin("http://evil.example"),
        ) as ws:
            await recv_hello(ws)


def test_origin_and_host_settings_are_checked_at_load() -> None:
    settings = NotifierSettings()
    assert settings.allowed_hosts() == ("localhost", "127.0.0.1", "[::1]", "notifier")
    assert settings.allowed_origins() == ()
    # A concrete listening address is a name clients use; 0.0.0.0 and :: are not.
    assert NotifierSettings(notifier_host="10.0.0.5").allowed_hosts()[-1] == "10.0.0.5"
    assert NotifierSettings(notifier_host="::1").allowed_hosts() == settings.allowed_hosts()
    assert NotifierSettings(notifier_host="0.0.0.0").allowed_hosts() == settings.allowed_hosts()
    listed = NotifierSettings(
        notifier_allowed_hosts=" Feed.Example.com , [2001:DB8::1] ",
        notifier_allowed_origins="HTTPS://Desk.Example.com:8443/, http://[::1]:8080",
    )
    assert listed.allowed_hosts() == ("feed.example.com", "[2001:db8::1]", "127.0.0.1")
    assert listed.allowed_origins() == ("https://desk.example.com:8443", "http://[::1]:8080")
    for field, value, hint in (
        ("notifier_allowed_hosts", "feed.example.com:8080", "is not a host name"),
        ("notifier_allowed_hosts", "http://feed.example.com", "is not a host name"),
        ("notifier_allowed_hosts", " , ", "is empty"),
        ("notifier_allowed_origins", "desk.example.com", "is not an origin"),
        ("notifier_allowed_origins", "https://desk.example.com/path", "is not an origin"),
    ):
        options: dict[str, Any] = {field: value}
        with pytest.raises(ValidationError, match=hint):
            NotifierSettings(**options)


# What a hostile page runs: open the feed and note what comes of it.
EVIL_SCRIPT = """(() => {
  window.report = {opened: false, types: [], closed: null};
  const ws = new WebSocket("%s");
  ws.onopen = () => { report.opened = true; };
  ws.onmessage = (event) => { report.types.push(JSON.parse(event.data).type); };
  ws.onclose = (event) => { report.closed = event.code; };
})();"""
# The dashboard's connection pill says it is connected.
LIVE = "document.getElementById('ws').innerText.trim() === 'live'"


@contextlib.asynccontextmanager
async def page_server(host: str, html: str) -> AsyncIterator[str]:
    """A web server of another origin (another loopback address) serving one page."""

    async def page(_: object) -> HTMLResponse:
        return HTMLResponse(html)

    port = free_port()
    server = http_server(Starlette(routes=[Route("/", page)]), host, port)
    task = asyncio.ensure_future(server.serve())
    try:
        while not server.started:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        yield f"http://{host}:{port}/"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def what_the_page_read(
    page: Any, redis_client: aioredis.Redis, streams: Streams
) -> dict[str, Any]:
    """Wait for the page's socket to open or fail, publish a signal, and return its report."""
    await wait_js(page, "window.report.opened || window.report.closed !== null")
    await publish(redis_client, streams.signals, [make_signal(1)])
    await wait_js(page, "window.report.closed !== null || window.report.types.includes('signal')")
    return cast(dict[str, Any], await page.evaluate("window.report"))


@pytest.mark.integration
async def test_pages_of_other_origins_cannot_read_the_feed_but_the_dashboard_can(
    redis_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
    chromium: str,
) -> None:
    from playwright.async_api import async_playwright

    refused = {"opened": False, "types": [], "closed": 1006}
    async with running_notifier(redis_url, namespace) as notifier, async_playwright() as pw:
        port = port_of(notifier)
        rules = "--host-resolver-rules=MAP rebind.test 127.0.0.1"
        browser = await pw.chromium.launch(executable_path=chromium, args=[*CHROMIUM_ARGS, rules])
        try:
            # A site in another tab: its own server, on another loopback address.
            evil = EVIL_SCRIPT % f"ws://127.0.0.1:{port}/ws"
            async with page_server("127.0.0.2", f"<!doctype html><script>{evil}</script>") as url:
                page = await browser.new_page()
                await page.goto(url)
                assert await what_the_page_read(page, redis_client, streams) == refused

            # DNS rebinding: the attacker's name now resolves to the notifier, so its script and
            # the socket are "same-origin". (The page is loaded from the notifier itself, a local
            # address: Chromium's own local-network checks would block a page of a public one.)
            page = await browser.new_page()
            await page.goto(f"http://rebind.test:{port}/")
            await page.evaluate(EVIL_SCRIPT % f"ws://rebind.test:{port}/ws")
            assert await what_the_page_read(page, redis_client, streams) == refused

            page = await browser.new_page()
            await page.goto(http_url(notifier, "/"))
            await wait_js(page, LIVE)
            await publish(redis_client, streams.signals, [make_signal(2)])
            await wait_js(page, "document.querySelectorAll('#rows tr').length >= 1")
        finally:
            await browser.close()


# ---- 2. Bounded replay and connection caps ----


async def add_entries(
    client: aioredis.Redis, stream: str, count: int, wanted_every: int
) -> tuple[list[str], list[str]]:
    """`count` entries, one in `wanted_every` of wallet 7: all ids, and the wallet-7 ones."""
    other, wanted = encode(make_signal(1)), encode(variant(2, wallet=wallet(7)))
    ids: list[str] = []
    for start in range(0, count, 5000):
        async with client.pipeline(transaction=False) as pipe:
            for n in range(start, min(count, start + 5000)):
                pipe.xadd(stream, cast(Any, wanted if n % wanted_every == 0 else other))
            ids += [entry_id.decode() for entry_id in await pipe.execute()]
    return ids, ids[::wanted_every]


async def replay_page(ws: ClientConnection) -> tuple[list[str], dict[str, Any]]:
    """The signals of one replay and the message that ended it (`replay_cut`)."""
    await recv_hello(ws)
    ids, message = [], await recv_json(ws)
    while message["type"] == "signal":
        ids.append(message["id"])
        message = await recv_json(ws)
    return ids, message


@pytest.mark.integration
async def test_a_replay_is_bounded_and_resumes_while_live_clients_keep_up(
    redis_url: str, namespace: str, streams: Streams, redis_client: aioredis.Redis
) -> None:
    bound = 20_000
    ids, wanted = await add_entries(redis_client, streams.signals, 50_000, 5_000)
    async with running_notifier(
        redis_url, namespace, notifier_max_replay_entries=bound
    ) as notifier:
        live = await connect(ws_url(notifier))
        await recv_hello(live)
        live_signals = [make_signal(100 + n) for n in range(30)]

        async def publish_live() -> list[str]:
            published = []
            for signal in live_signals:
                published += await publish(redis_client, streams.signals, [signal])
                await asyncio.sleep(0.01)
            return published

        publishing = asyncio.ensure_future(publish_live())
        got, cut_at = [], "0-0"
        for page in range(2):
            query = f"?last_id={cut_at}&wallets={wallet(7)}"
            async with connect(ws_url(notifier, query)) as ws:
                page_ids, cut = await replay_page(ws)
                assert cut == {"type": "replay_cut", "last_id": ids[bound * (page + 1) - 1]}
                reason = f"replay limit ({bound} entries) reached; reconnect with last_id="
                assert await closed_with(ws) == (1013, reason + cut["last_id"])
            got += page_ids
            cut_at = cut["last_id"]
        live_ids = await publishing
        # The rest fits the bound: the replay ends and the connection stays, live.
        async with connect(ws_url(notifier, f"?last_id={cut_at}&wallets={wallet(7)}")) as ws:
            await recv_hello(ws)
            got += [m["id"] for m in await recv_signals(ws, len(wanted) - len(got))]
            await assert_nothing_more(ws)
            late = await publish(redis_client, streams.signals, [variant(3, wallet=wallet(7))])
            assert [m["id"] for m in await recv_signals(ws, 1)] == late
        assert got == wanted

        # The live client got every live signal, once and in order, during those replays.
        received = await recv_signals(live, len(live_ids) + 1)
        assert [m["id"] for m in received] == [*live_ids, *late]
        await assert_nothing_more(live)
        await live.close()


@pytest.mark.integration
async def test_connections_are_capped_in_all_and_per_address(
    redis_url: str, namespace: str
) -> None:
    async with running_notifier(
        redis_url, namespace, notifier_max_clients=3, notifier_max_clients_per_ip=2
    ) as notifier:

        async def client_from(address: str) -> ClientConnection:
            return await connect(ws_url(notifier), local_addr=(address, 0))

        held = [await client_from("127.0.0.1") for _ in range(2)]
        for ws in held:
            await recv_hello(ws)
        async with await client_from("127.0.0.1") as ws:
            assert await closed_with(ws) == (
                1008,
                "too many connections from your address (limit 2 per server)",
            )
        held.append(await client_from("127.0.0.2"))
        await recv_hello(held[-1])
        async with await client_from("127.0.0.3") as ws:
            assert await closed_with(ws) == (1013, "server full (3 connections); try again later")

        await held.pop(0).close()

        async def released() -> bool:
            return notifier.limits.held == 2

        await wait_until(released, "the closed connection's place to be released")
        async with await client_from("127.0.0.3") as ws:
            await recv_hello(ws)
            await assert_nothing_more(ws)
        for ws in held:
            await ws.close()


# ---- 3. A last_id in the future ----


@pytest.mark.integration
@pytest.mark.parametrize("where", ["url", "first message"])
async def test_a_last_id_in_the_future_still_gets_every_new_signal(
    redis_url: str, namespace: str, streams: Streams, redis_client: aioredis.Redis, where: str
) -> None:
    await publish(redis_client, streams.signals, [make_signal(1), make_signal(2)])
    future = f"{int(time.time() * 1000) + 86_400_000}-0"
    async with running_notifier(redis_url, namespace, notifier_tokens=(LONG_TOKEN,)) as notifier:
        if where == "url":
            ws = await connect(ws_url(notifier, f"?last_id={future}&token={LONG_TOKEN}"))
            await recv_hello(ws)
        else:
            ws = await connect(ws_url(notifier))
            await recv_hello(ws)
            await ws.send(f'{{"type":"subscribe","token":"{LONG_TOKEN}","last_id":"{future}"}}')
            assert (await recv_json(ws))["type"] == "subscribed"
        ids = await publish(redis_client, streams.signals, [make_signal(3), make_signal(4)])
        assert [m["id"] for m in await recv_signals(ws, 2)] == ids
        await assert_nothing_more(ws)
        await ws.close()


SKEWED_CLOCK = """(() => {
  const real = Date.now;
  Date.now = () => real() + 86400000;
})();"""


@pytest.mark.integration
async def test_dashboard_replays_and_follows_with_its_clock_a_day_ahead(
    redis_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
    chromium: str,
) -> None:
    from playwright.async_api import async_playwright

    signals = tape_signals(8)
    await publish(redis_client, streams.signals, [stamped(s, 60) for s in signals[:4]])
    async with running_notifier(redis_url, namespace) as notifier, async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            await page.add_init_script(SKEWED_CLOCK)
            await page.goto(http_url(notifier, "/"))
            await wait_js(page, "document.querySelectorAll('#rows tr').length === 4")
            await wait_js(page, LIVE)
            await publish(redis_client, streams.signals, [stamped(s, 0) for s in signals[4:]])
            await wait_js(page, "document.querySelectorAll('#rows tr').length === 8")
        finally:
            await browser.close()


# ---- 4. Empty and short tokens ----


@pytest.mark.parametrize(
    "value",
    ['["", "{good}"]', '["{good}", "short-token"]', '["   "]', '[" {good} "]', "{good},tiny"],
)
def test_empty_or_short_tokens_are_refused_at_load(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("NOTIFIER_TOKENS", value.replace("{good}", LONG_TOKEN))
    with pytest.raises(ValidationError, match="at least 16 characters") as refused:
        NotifierSettings()
    assert LONG_TOKEN not in str(refused.value)
    assert "short-token" not in str(refused.value) and "tiny" not in str(refused.value)


def test_an_empty_presented_token_never_matches() -> None:
    with pytest.raises(ValueError, match="at least 16 characters"):
        Tokens([SecretStr(""), SecretStr(LONG_TOKEN)])
    tokens = Tokens([SecretStr(LONG_TOKEN)])
    assert tokens.identify("") is None and tokens.identify(LONG_TOKEN) == "token-1"
