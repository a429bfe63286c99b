"""Ties at a page boundary (issue 16): nothing promises that an API lists the fills of one second
in the same order on every request. A reader that pages by offset or by cursor then sees some of
that second's fills twice and others never. The Data API reader (against the simulator with its
`unstable_ties` quirk) and the Dome REST reader (against a fake orders endpoint that shuffles ties
on every request) read every fill exactly once all the same. Also: an item without a usable
timestamp is dead-lettered once, not on every poll."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import redis.asyncio as aioredis

from services.ingestor.backfill import CatchUp
from services.ingestor.http_api import JsonApi
from services.ingestor.publisher import Publisher
from services.ingestor.ratelimit import RateLimiter
from services.ingestor.sources.data_api import DataApiHistory
from services.ingestor.sources.dome_rest import DomeRestHistory
from shared.streams import Streams
from tests.helpers.ingestion import (
    WALLETS,
    converge,
    ingestor_settings,
    running,
    simulator,
    until,
)
from tests.test_ingestor_exchange_times import TOKEN

USER = WALLETS[0]


async def test_the_data_api_reader_reads_every_fill_of_a_shuffled_second_once(
    redis_url: str, namespace: str, redis_client: aioredis.Redis, streams: Streams
) -> None:
    second = int(time.time()) - 5
    async with simulator(sim_unstable_ties=True) as sim:
        await sim.post("/_sim/emit", [{"user": USER, "timestamp": second} for _ in range(13)])
        await sim.post("/_sim/emit", [{"user": USER, "timestamp": second - 1} for _ in range(3)])
        # Plain offset pages of 5 cut through the second in a different order each time.
        pages = [
            await sim.get("/trades", user=USER, limit=5, offset=offset, takerOnly="false")
            for offset in (0, 5, 10, 15)
        ]
        seen = [item["transactionHash"] for page in pages for item in page]
        assert len(seen) == 16 and len(set(seen)) < 16, "the quirk shuffled nothing"
        settings = ingestor_settings(
            sim, redis_url, namespace, ingest_sources="data_api", data_api_page_limit=5
        )
        async with running(settings) as ingestor:
            await converge(sim, redis_client, streams, [USER])
            await until(lambda: ingestor.pollers[0].polls >= 3, what="a few polls")
            await converge(sim, redis_client, streams, [USER])


class ShufflingDome:
    """Dome's orders endpoint over fixed rows, newest first, that lists the rows of one second
    in a new order on every request; its cursor continues by position in the order of the moment
    (as a cursor over an unstable sort does)."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows
        self.asked: list[dict[str, str]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        params = dict(request.url.params)
        self.asked.append(params)
        start, end = int(params.get("start_time", 0)), params.get("end_time")
        matching = [
            row
            for row in self.rows
            if row["user"] == params["user"]
            and start <= row["timestamp"]
            and (end is None or row["timestamp"] <= int(end))
        ]
        shuffle = random.Random(len(self.asked))
        ordered = sorted(matching, key=lambda row: (-row["timestamp"], shuffle.random()))
        offset, limit = int(params.get("pagination_key", 0)), int(params["limit"])
        more = offset + limit < len(ordered)
        pagination = {
            "limit": limit,
            "offset": offset,
            "total": len(ordered),
            "has_more": more,
            "pagination_key": str(offset + limit) if more else None,
        }
        return httpx.Response(
            200, json={"orders": ordered[offset : offset + limit], "pagination": pagination}
        )


def dome_rows(seconds: list[int], per_second: int) -> list[dict[str, Any]]:
    return [
        {
            "token_id": TOKEN,
            "side": "BUY",
            "shares_normalized": 1.0 + n,
            "price": 0.5,
            "tx_hash": "0x" + f"{second:08x}{n:056x}",
            "timestamp": second,
            "log_index": n,
            "user": USER,
        }
        for second in seconds
        for n in range(per_second)
    ]


@contextlib.asynccontextmanager
async def dome_history(
    rows: list[dict[str, Any]], limit: int
) -> AsyncIterator[tuple[DomeRestHistory, ShufflingDome]]:
    server = ShufflingDome(rows)
    api = JsonApi(
        "dome_rest",
        "http://dome.test/v1",
        RateLimiter(1000, 10_000),
        timeout_s=5,
        transport=httpx.MockTransport(server),
    )
    try:
        yield DomeRestHistory(api, limit), server
    finally:
        await api.aclose()


async def read_all(history: DomeRestHistory | DataApiHistory, since: int) -> list[str]:
    found = []
    async for page in history.read_since(USER, since):
        found += [history.to_order(item).tx_hash for item in page]
    return found


async def test_the_dome_rest_reader_reads_every_fill_of_shuffled_seconds_once() -> None:
    now = int(time.time())
    rows = dome_rows([now - 50 + 10 * i for i in range(5)], per_second=3)
    async with dome_history(rows, limit=4) as (history, server):
        found = await read_all(history, now - 100)
    assert sorted(found) == sorted(row["tx_hash"] for row in rows)
    # Paged by time: each request after the first ends at the second the last page ended in.
    assert [a.get("end_time") for a in server.asked[:2]] == [None, str(now - 20)]
    assert not any("pagination_key" in a for a in server.asked)


async def test_a_second_larger_than_a_page_is_read_with_a_larger_page() -> None:
    now = int(time.time())
    rows = dome_rows([now - 20], per_second=11) + dome_rows([now - 30], per_second=2)
    async with dome_history(rows, limit=4) as (history, server):
        found = await read_all(history, now - 100)
    assert sorted(found) == sorted(row["tx_hash"] for row in rows)
    assert [a["limit"] for a in server.asked] == ["4", "8", "16"]


async def test_an_item_without_a_usable_timestamp_is_dead_lettered_once(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    now = int(time.time())
    good = {
        "proxyWallet": USER,
        "side": "BUY",
        "asset": TOKEN,
        "conditionId": "0x" + "5a" * 32,
        "size": 3.0,
        "price": 0.5,
        "timestamp": now - 10,
        "transactionHash": "0x" + "77" * 32,
    }
    undated = {**good, "transactionHash": "0x" + "78" * 32, "timestamp": None}
    stamped_ms = {**good, "transactionHash": "0x" + "79" * 32, "timestamp": (now - 9) * 1000}
    answer = {
        "data": [stamped_ms, undated, good],
        "pagination": {"next_cursor": None, "has_more": False},
    }
    api = JsonApi(
        "data_api",
        "http://data.test",
        RateLimiter(1000, 10_000),
        timeout_s=5,
        transport=httpx.MockTransport(lambda request: httpx.Response(200, json=answer)),
    )
    publisher = Publisher(redis_client, streams, stream_maxlen=1000, dedupe_ttl_s=600)
    delivering = asyncio.create_task(publisher.run())
    poll = CatchUp(
        DataApiHistory(api, 100),
        publisher,
        feed="data_api",
        overlap_s=120,
        initial_lookback_s=3600,
        backfill=False,
    )
    try:
        for _ in range(6):
            await poll.wallet(USER)
        await until(lambda: publisher.unfinished == 0, what="dead letters delivered")
    finally:
        delivering.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await delivering
        await api.aclose()
    dead = await redis_client.xrange(streams.orders_dead)
    reasons = sorted(fields[b"reason"].decode() for _, fields in dead)
    assert len(reasons) == 2, reasons
    assert any("looks like milliseconds" in reason for reason in reasons)
    assert any("invalid order: timestamp" in reason for reason in reasons)
    assert await redis_client.xlen(streams.orders_raw) == 1


async def test_an_undatable_row_before_a_full_second_neither_stalls_nor_skips_the_walk() -> None:
    now = int(time.time())
    rows = dome_rows([now - 20], per_second=5) + dome_rows([now - 30], per_second=2)
    odd = {**rows[0], "tx_hash": "0x" + "ee" * 32, "timestamp": (now - 20) * 1000}
    async with dome_history([odd, *rows], limit=4) as (history, _):
        handed: list[Any] = []
        async for page in history.read_since(USER, now - 100):
            handed += page
    dated = [history.to_order(item).tx_hash for item in handed if item["timestamp"] < now]
    assert sorted(dated) == sorted(row["tx_hash"] for row in rows)
    assert [item["tx_hash"] for item in handed if item["timestamp"] > now] == [odd["tx_hash"]]


def test_a_page_is_cut_by_second() -> None:
    from services.ingestor.sources.listing import Row, cut_page

    def rows(*stamps: int | None) -> list[Row]:
        return [Row(n, stamp, stamp is None) for n, stamp in enumerate(stamps)]

    # The page's last second may go on in the next page: held back, read from its first row.
    cut = cut_page(rows(9, 8, 8, 7, 7), since=0, above=None, hold=True)
    assert ([r.item for r in cut.out], cut.edge, cut.edge_at, cut.stuck) == ([0, 1, 2], 7, 3, False)
    # Rows above the second held back last time went on already; a row older than `since` ends.
    cut = cut_page(rows(8, 7, 7, 6, 5), since=6, above=7, hold=True)
    assert ([r.item for r in cut.out], cut.edge, cut.reached) == ([1, 2, 3], None, True)
    # Undatable rows always go on (to the dead letters); one second alone is stuck.
    cut = cut_page(rows(None, 7, 7), since=0, above=None, hold=True)
    assert ([r.item for r in cut.out], cut.stuck) == ([0], True)
