"""The notifier against real Redis, served in-process by uvicorn on a free loopback port."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
import websockets
from prometheus_client import REGISTRY
from websockets.asyncio.client import ClientConnection, connect

from services.notifier.main import Notifier
from shared.streams import Streams
from tests.helpers.notifier import (
    assert_nothing_more,
    http_url,
    make_signal,
    publish,
    recv_hello,
    recv_json,
    recv_signals,
    running_notifier,
    wait_until,
    ws_url,
)

pytestmark = pytest.mark.integration


async def closed_with(ws: ClientConnection) -> tuple[int | None, str | None]:
    """Read until the server closes the connection; its close code and reason."""
    with pytest.raises(websockets.ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), 10)
    return ws.close_code, ws.close_reason


def dropped(reason: str) -> float:
    sample = "betterbot_notifier_clients_dropped_total"
    return REGISTRY.get_sample_value(sample, {"reason": reason}) or 0.0


async def test_every_client_gets_every_signal_once_in_order(
    redis_url: str, namespace: str, streams: Streams, redis_client: aioredis.Redis
) -> None:
    async with running_notifier(redis_url, namespace) as notifier:
        clients = [await connect(ws_url(notifier)) for _ in range(3)]
        for ws in clients:
            await recv_hello(ws)
        signals = [make_signal(n) for n in range(60)]
        ids = await publish(redis_client, streams.signals, signals[:30])
        ids += await publish(redis_client, streams.signals, signals[30:])

        for ws in clients:
            received = await recv_signals(ws, len(signals))
            assert [m["id"] for m in received] == ids
            assert [m["signal"]["signal_id"] for m in received] == [s.signal_id for s in signals]
            assert received[7]["signal"] == signals[7].model_dump(mode="json")
            await assert_nothing_more(ws)
            await ws.close()


async def test_resume_gets_exactly_the_missed_entries_then_live(
    redis_url: str, namespace: str, streams: Streams, redis_client: aioredis.Redis
) -> None:
    async with running_notifier(redis_url, namespace) as notifier:
        async with connect(ws_url(notifier)) as ws:
            await recv_hello(ws)
            seen = await publish(redis_client, streams.signals, [make_signal(n) for n in range(5)])
            assert [m["id"] for m in await recv_signals(ws, 5)] == seen
        # Missed while away: more than one backlog page.
        missed = await publish(
            redis_client, streams.signals, [make_signal(n) for n in range(5, 1205)]
        )

        async def keep_publishing() -> list[str]:
            ids = []
            for n in range(1205, 1265):
                ids += await publish(redis_client, streams.signals, [make_signal(n)])
                await asyncio.sleep(0.002)
            return ids

        # Live entries keep coming while the client reconnects and reads its backlog.
        publisher = asyncio.ensure_future(keep_publishing())
        async with connect(ws_url(notifier, f"?last_id={seen[-1]}")) as ws:
            await recv_hello(ws)
            live = await publisher
            expected = missed + live
            received = await recv_signals(ws, len(expected))
            assert [m["id"] for m in received] == expected
            await assert_nothing_more(ws)


async def test_resume_from_the_middle_and_without_last_id(
    redis_url: str, namespace: str, streams: Streams, redis_client: aioredis.Redis
) -> None:
    async with running_notifier(redis_url, namespace) as notifier:
        ids = await publish(redis_client, streams.signals, [make_signal(n) for n in range(6)])
        async with (
            connect(ws_url(notifier, f"?last_id={ids[2]}")) as resumed,
            connect(ws_url(notifier)) as live_only,
        ):
            await recv_hello(resumed)
            await recv_hello(live_only)
            assert [m["id"] for m in await recv_signals(resumed, 3)] == ids[3:]
            later = await publish(redis_client, streams.signals, [make_signal(6)])
            assert [m["id"] for m in await recv_signals(resumed, 1)] == later
            assert [m["id"] for m in await recv_signals(live_only, 1)] == later
            await assert_nothing_more(resumed)
            await assert_nothing_more(live_only)


async def test_resume_past_trimmed_entries_announces_the_gap(
    redis_url: str, namespace: str, streams: Streams, redis_client: aioredis.Redis
) -> None:
    async with running_notifier(redis_url, namespace) as notifier:
        ids = await publish(redis_client, streams.signals, [make_signal(n) for n in range(10)])
        await redis_client.xtrim(streams.signals, maxlen=5, approximate=False)
        async with connect(ws_url(notifier, f"?last_id={ids[1]}")) as ws:
            await recv_hello(ws)
            assert await recv_json(ws) == {"type": "gap", "last_id": ids[1], "first_id": ids[5]}
            assert [m["id"] for m in await recv_signals(ws, 5)] == ids[5:]
        async with connect(ws_url(notifier, f"?last_id={ids[6]}")) as ws:
            await recv_hello(ws)
            assert [m["id"] for m in await recv_signals(ws, 3)] == ids[7:]


async def test_slow_client_is_dropped_and_others_get_everything(
    redis_url: str, namespace: str, streams: Streams, redis_client: aioredis.Redis
) -> None:
    async with running_notifier(redis_url, namespace, notifier_client_queue=4) as notifier:
        # The slow client never reads: a small receive buffer makes its socket back up sooner.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", notifier.settings.notifier_port))
        slow = await connect(ws_url(notifier), sock=sock, max_queue=1)
        fast = await connect(ws_url(notifier))
        await recv_hello(fast)
        before = dropped("slow_consumer")

        ids: list[str] = []
        # Random titles: big messages that do not compress, so the socket's buffers fill up.
        while dropped("slow_consumer") == before:
            assert len(ids) < 5000, "the slow client was never dropped"
            signal = make_signal(len(ids), title=os.urandom(2400).hex())
            ids += await publish(redis_client, streams.signals, [signal])
            # The fast client reads each one before the next is published: it never falls behind.
            assert (await recv_json(fast))["id"] == ids[-1]
        ids += await publish(redis_client, streams.signals, [make_signal(n) for n in range(5)])
        assert [m["id"] for m in await recv_signals(fast, 5)] == ids[-5:]
        await assert_nothing_more(fast)

        # The slow client gets what was already on its socket, in order, then the reason.
        got = [orjson.loads(raw) async for raw in _until_closed(slow)]
        assert got[0]["type"] == "hello"
        assert [m["id"] for m in got[1:]] == ids[: len(got) - 1]
        assert slow.close_code == 1008
        assert slow.close_reason == (
            "slow consumer: queue overflow at 4 messages; reconnect and resume"
        )
        await wait_until(_client_count_is(notifier, 1), "the slow client to be gone")
        await fast.close()


async def _until_closed(ws: ClientConnection) -> AsyncIterator[str | bytes]:
    try:
        while True:
            yield await asyncio.wait_for(ws.recv(), 10)
    except websockets.ConnectionClosed:
        return


def _client_count_is(notifier: Notifier, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return notifier.fanout.client_count == count

    return check


async def test_invalid_entries_are_skipped(
    redis_url: str, namespace: str, streams: Streams, redis_client: aioredis.Redis
) -> None:
    async with running_notifier(redis_url, namespace) as notifier:
        async with connect(ws_url(notifier)) as ws:
            await recv_hello(ws)
            first = await publish(redis_client, streams.signals, [make_signal(1)])
            await redis_client.xadd(streams.signals, {b"data": b"{not json"})
            await redis_client.xadd(streams.signals, {b"data": b'{"v":1,"kind":"whale_order"}'})
            await redis_client.xadd(streams.signals, {b"__data__": b"\x89BIN"})
            bad_price = make_signal(2).model_dump(mode="json") | {"confidence": 7}
            await redis_client.xadd(streams.signals, {b"data": orjson.dumps(bad_price)})
            last = await publish(redis_client, streams.signals, [make_signal(3)])
            assert [m["id"] for m in await recv_signals(ws, 2)] == first + last
            await assert_nothing_more(ws)
        async with httpx.AsyncClient() as http:
            assert (await http.get(http_url(notifier, "/health"))).status_code == 200


async def test_client_messages(redis_url: str, namespace: str) -> None:
    async with running_notifier(redis_url, namespace) as notifier:
        async with connect(ws_url(notifier)) as ws:
            await recv_hello(ws)
            padded = '{"type":"ping","pad":"' + "x" * (64 * 1024 - 24) + '"}'
            assert len(padded) == 64 * 1024
            await ws.send(padded)
            assert await recv_json(ws) == {"type": "pong"}
            await ws.send(padded[:-2] + 'x"}')
            code, reason = await closed_with(ws)
            assert code == 1009
            assert reason == "message too big: 65537 bytes, limit 65536"
        async with connect(ws_url(notifier)) as ws:
            await recv_hello(ws)
            await ws.send('{"type":"unsubscribe"}')
            code, reason = await closed_with(ws)
            assert code == 1003
            assert reason == (
                'unknown message: send {"type":"ping"} or {"type":"subscribe","filters":{...}}'
            )
        async with connect(ws_url(notifier, "?last_id=yesterday")) as ws:
            code, reason = await closed_with(ws)
            assert code == 1008
            assert reason is not None and reason.startswith("bad last_id")


async def test_reader_keeps_its_place_through_redis_errors(
    redis_url: str, namespace: str, streams: Streams, redis_client: aioredis.Redis
) -> None:
    async with (
        running_notifier(redis_url, namespace) as notifier,
        httpx.AsyncClient() as http,
        connect(ws_url(notifier)) as ws,
    ):
        await recv_hello(ws)
        ids = await publish(redis_client, streams.signals, [make_signal(0)])
        await recv_signals(ws, 1)

        # Kill the reader's connection while it blocks in XREAD.
        name = f"betterbot-notifier:{streams.signals}"
        readers = [c["id"] for c in await redis_client.client_list() if c["name"] == name]
        assert len(readers) == 1
        await redis_client.client_kill_filter(_id=readers[0])
        ids += await publish(redis_client, streams.signals, [make_signal(n) for n in (1, 2)])
        assert [m["id"] for m in await recv_signals(ws, 2)] == ids[1:]

        # A stream key of the wrong type: every read fails until it is fixed.
        await redis_client.delete(streams.signals)
        await redis_client.set(streams.signals, "not a stream")

        async def unhealthy() -> bool:
            return (await http.get(http_url(notifier, "/health"))).status_code == 503

        await wait_until(unhealthy, "/health to report the failing reader")
        body = (await http.get(http_url(notifier, "/health"))).json()
        assert body["reader"] == "retrying" and body["redis"] == "ok"
        await redis_client.delete(streams.signals)
        ids = await publish(redis_client, streams.signals, [make_signal(n) for n in (3, 4)])
        assert [m["id"] for m in await recv_signals(ws, 2)] == ids
        await assert_nothing_more(ws)
        assert (await http.get(http_url(notifier, "/health"))).status_code == 200


async def test_health_metrics_and_page(
    redis_url: str, namespace: str, streams: Streams, redis_client: aioredis.Redis
) -> None:
    async with running_notifier(redis_url, namespace) as notifier, httpx.AsyncClient() as http:
        async with connect(ws_url(notifier)) as ws:
            await recv_hello(ws)
            await publish(redis_client, streams.signals, [make_signal(1)])
            await recv_signals(ws, 1)
            health = await http.get(http_url(notifier, "/health"))
            assert health.status_code == 200
            assert health.json() | {"last_id": None} == {
                "ok": True,
                "redis": "ok",
                "reader": "reading",
                "last_id": None,
                "clients": 1,
            }
            metrics = (await http.get(http_url(notifier, "/metrics"))).text
        for name in (
            "betterbot_notifier_clients ",
            'betterbot_notifier_messages_sent_total{phase="live"}',
            "betterbot_notifier_signals_read_total",
            "betterbot_notifier_latency_seconds_count",
            "betterbot_notifier_entries_invalid_total",
        ):
            assert name in metrics, name
        page = await http.get(http_url(notifier, "/"))
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "new WebSocket" in page.text and "/ws" in page.text


async def test_stop_closes_clients_with_going_away(redis_url: str, namespace: str) -> None:
    async with running_notifier(redis_url, namespace) as notifier:
        ws = await connect(ws_url(notifier))
        await recv_hello(ws)
    # Leaving the block stopped the notifier.
    code, reason = await closed_with(ws)
    assert code == 1001
    assert reason == "server shutting down; reconnect and resume"
