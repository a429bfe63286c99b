"""The publisher against real Redis: the atomic dedupe + XADD script, plain entries, one slot for
the stream, its seen keys and the watermarks, watermarks that only grow and only with what was
published, and nothing lost while Redis is unreachable (through a TCP proxy the test switches off
and on)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from devtools.servers import free_port
from services.ingestor.publisher import Publisher
from shared.models import DomeOrder, FillStatus, OrderFill, Source
from shared.orders_raw import Outgoing, watermark_key
from shared.streams import Streams
from tests.helpers.ingestion import until

TAPE = Path(__file__).resolve().parent.parent / "data" / "polymarket_trades_nobel2025.json"
TTL_S = 3600


def tape_fills(count: int) -> list[OrderFill]:
    trades = json.loads(TAPE.read_bytes())[:count]
    return [
        OrderFill.from_dome(
            DomeOrder(
                token_id=trade["asset"],
                side=trade["side"],
                market_slug=trade["slug"],
                condition_id=trade["conditionId"],
                token_label=trade["outcome"],
                shares_normalized=trade["size"],
                price=trade["price"],
                tx_hash=trade["transactionHash"],
                title=trade["title"],
                timestamp=trade["timestamp"],
                user=trade["proxyWallet"],
            ),
            Source.DOME_WS,
            time.time(),
        )
        for trade in trades
    ]


def make_publisher(client: aioredis.Redis, streams: Streams, **options: int) -> Publisher:
    return Publisher(client, streams, stream_maxlen=10_000, dedupe_ttl_s=TTL_S, **options)


Entry = tuple[bytes, dict[bytes, bytes]]


async def entries(client: aioredis.Redis, stream: str) -> list[Entry]:
    return cast(list[Entry], await client.xrange(stream))


async def stream_keys(client: aioredis.Redis, streams: Streams) -> list[str]:
    found = await entries(client, streams.orders_raw)
    assert all(set(fields) == {b"data"} for _, fields in found)
    return [json.loads(fields[b"data"])["order_key"] for _, fields in found]


async def test_script_adds_each_order_key_once(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    a, b, c = tape_fills(3)
    publisher = make_publisher(redis_client, streams)
    assert await publisher.publish([Outgoing(a), Outgoing(b), Outgoing(a)]) == [True, True, False]
    assert await publisher.publish([Outgoing(a), Outgoing(c)]) == [False, True]
    assert await stream_keys(redis_client, streams) == [a.order_key, b.order_key, c.order_key]
    seen = streams.seen_order_prefix() + a.order_key
    assert 0 < await redis_client.ttl(seen) <= TTL_S


async def test_entries_are_plain_json_readable_without_our_code(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    (fill,) = tape_fills(1)
    await make_publisher(redis_client, streams).publish([Outgoing(fill)])
    ((_, fields),) = await entries(redis_client, streams.orders_raw)
    payload = json.loads(fields[b"data"])
    assert payload == json.loads(fill.model_dump_json())
    assert payload["v"] == 1 and payload["source"] == "dome_ws"
    assert payload["user"] == fill.user and payload["price"] == fill.price


def test_stream_seen_keys_and_watermarks_share_a_cluster_slot() -> None:
    for namespace in ("", "t1:", "prod-eu:"):
        streams = Streams(namespace)
        seen = streams.seen_order_prefix() + "0123456789abcdef"
        slot = key_slot(streams.orders_raw.encode())
        assert slot == key_slot(seen.encode()) == key_slot(watermark_key(streams).encode())


async def test_watermarks_move_only_up_and_only_with_published_fills(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    early, late = sorted(tape_fills(40), key=lambda f: f.timestamp)[::39]
    assert early.timestamp < late.timestamp
    other = next(f for f in tape_fills(40) if f.user != late.user)
    publisher = make_publisher(redis_client, streams)
    # Published without a feed (a backfill page, or a live fill before its wallet's backfill):
    # no watermark moves.
    assert await publisher.publish_now([late]) == 1
    assert await publisher.watermark("dome", late.user) is None
    # A live fill of a caught-up wallet raises its feed's mark in the publishing script, even
    # when it is a duplicate (it was read, and it is in the stream).
    await publisher.publish([Outgoing(late, "dome"), Outgoing(other, "data_api")])
    assert await publisher.watermark("dome", late.user) == late.timestamp
    assert await publisher.watermark("data_api", other.user) == other.timestamp
    assert await publisher.watermark("dome", other.user) is None
    # Never lowered, by a live fill or by a backfill.
    await publisher.publish([Outgoing(early.model_copy(update={"user": late.user}), "dome")])
    await publisher.advance_watermark("dome", late.user, early.timestamp)
    assert await publisher.watermark("dome", late.user) == late.timestamp
    await publisher.advance_watermark("dome", late.user, late.timestamp + 5)
    assert await publisher.watermark("dome", late.user) == late.timestamp + 5
    fields = await redis_client.hgetall(watermark_key(streams))
    assert set(fields) == {f"dome:{late.user}".encode(), f"data_api:{other.user}".encode()}


async def test_queued_fills_go_out_in_batches(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    fills = tape_fills(30)
    publisher = make_publisher(redis_client, streams, batch_max=8)
    for fill in [*fills, *fills[:5]]:
        await publisher.submit(fill)
    runner = asyncio.create_task(publisher.run())
    try:
        assert await publisher.flush(10) == 0
    finally:
        runner.cancel()
    assert await stream_keys(redis_client, streams) == [fill.order_key for fill in fills]
    assert (publisher.published, publisher.duplicates) == (30, 5)


class SwitchableProxy:
    """A TCP proxy to Redis that the test turns off (refusing and cutting connections) and on."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._pipe, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        self._writers |= {writer, upstream_writer}
        await asyncio.gather(
            self._copy(reader, upstream_writer), self._copy(upstream_reader, writer)
        )

    async def _copy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()
        self._writers.discard(writer)


@pytest.fixture
async def proxied_client(redis_url: str) -> AsyncIterator[tuple[aioredis.Redis, SwitchableProxy]]:
    parts = urlsplit(redis_url)
    proxy = SwitchableProxy(parts.hostname or "127.0.0.1", parts.port or 6379)
    client = aioredis.Redis.from_url(
        f"redis://127.0.0.1:{proxy.port}{parts.path or '/0'}", socket_connect_timeout=1
    )
    yield client, proxy
    await proxy.stop()
    await client.aclose()


async def test_nothing_is_lost_while_redis_is_unreachable(
    redis_client: aioredis.Redis,
    streams: Streams,
    proxied_client: tuple[aioredis.Redis, SwitchableProxy],
) -> None:
    client, proxy = proxied_client
    await proxy.start()
    publisher = make_publisher(client, streams, queue_size=2, batch_max=2)
    recoveries: list[bool] = []
    # What a source does on this call: backfill again, since Redis may have lost recent writes.
    publisher.on_recovered(lambda: recoveries.append(publisher.redis_ok))
    runner = asyncio.create_task(publisher.run())
    first, *rest = tape_fills(7)
    try:
        await publisher.submit(first)
        assert await publisher.flush(10) == 0
        assert recoveries == []
        await proxy.stop()

        # The queue holds 2 and the publisher's retried batch 2; the other submits must wait.
        submits = [asyncio.create_task(publisher.submit(fill)) for fill in rest]
        await until(lambda: _false_redis(publisher))
        await asyncio.sleep(0.2)
        assert not all(task.done() for task in submits)
        assert not await publisher.ping()

        await proxy.start()
        await asyncio.gather(*submits)
        assert await publisher.flush(20) == 0
    finally:
        runner.cancel()
    assert publisher.redis_ok
    assert recoveries == [True], "the sources are told once, after Redis answered again"
    keys = await stream_keys(redis_client, streams)
    assert sorted(keys) == sorted(fill.order_key for fill in [first, *rest])


async def _false_redis(publisher: Publisher) -> bool:
    return not publisher.redis_ok


async def test_a_fill_is_published_once_per_status_and_a_reorg_can_come_back(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    """First sight, its retraction, the fill included again by a later block, and a second
    reorg: each once, whatever is repeated in between."""
    publisher = make_publisher(redis_client, streams)
    fill = tape_fills(1)[0].model_copy(update={"source": Source.POLYGON})
    late_copy = fill.model_copy(update={"source": Source.DOME_WS})
    retraction = fill.model_copy(update={"status": FillStatus.RETRACTED, "status_reason": "reorg"})
    # Only the chain re-opens a retracted fill: the same fill from another source (a late copy
    # of the old inclusion) stays held back.
    sequence = [fill, fill, retraction, retraction, late_copy, fill, fill, retraction, late_copy]
    added = [await publisher.publish_now([item]) for item in sequence]
    assert added == [1, 0, 1, 0, 0, 1, 0, 1, 0]
    entries = cast(list[Entry], await redis_client.xrange(streams.orders_raw))
    statuses = [json.loads(fields[b"data"])["status"] for _, fields in entries]
    assert statuses == ["confirmed", "retracted", "confirmed", "retracted"]
    assert {json.loads(fields[b"data"])["order_key"] for _, fields in entries} == {fill.order_key}
