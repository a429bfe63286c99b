"""Postgres outages: a TCP proxy between the store and Postgres is cut (every connection closed,
new ones refused) while entries keep arriving, then restored. Every row must end up stored exactly
once, nothing acked before its commit, /health red during the cut."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis.asyncio as aioredis

from services.store.main import Store
from shared.streams import STORE_GROUP, Streams
from tests.test_store_rows import make_fill, make_signal
from tests.test_store_service import (
    count,
    fetch,
    has_rows,
    metric,
    running_store,
    settled,
    store_settings,
    wait_until,
    xadd_all,
)

pytestmark = pytest.mark.integration


class CuttableProxy:
    """Forwards 127.0.0.1:<port> to a target; `cut()` closes every connection and stops listening
    (so connects are refused), `restore()` listens on the same port again."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def restore(self) -> None:
        await self.start()

    async def close(self) -> None:
        await self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.transport.abort()
        self._writers.discard(dst)


@contextlib.asynccontextmanager
async def proxied(database_url: str) -> Any:
    parts = urlsplit(database_url)
    proxy = CuttableProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    netloc = (
        f"{parts.username}@127.0.0.1:{proxy.port}" if parts.username else f"127.0.0.1:{proxy.port}"
    )
    try:
        yield proxy, urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
    finally:
        await proxy.close()


async def pending(client: aioredis.Redis, stream: str) -> int:
    return int((await client.xpending(stream, STORE_GROUP))["pending"])


async def unhealthy(store: Store) -> bool:
    ok, details = await store.health()
    return not ok and details["postgres"] == "down" and bool(details.get("postgres_error"))


async def test_a_postgres_outage_loses_and_doubles_nothing(
    redis_url: str,
    database_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
) -> None:
    total, chunk = 600, 20
    fills = [make_fill(i) for i in range(total)]
    signals = [make_signal(i) for i in range(0, total, 10)]
    inserted, duplicates = metric("rows_inserted", "orders"), metric("duplicates_skipped", "orders")
    async with proxied(database_url) as (proxy, via_proxy):
        settings = store_settings(redis_url, via_proxy, namespace, store_batch_max=50)
        async with running_store(settings) as store:
            seen_unhealthy = False

            async def produce() -> None:
                for start in range(0, total, chunk):
                    await xadd_all(redis_client, streams.orders_raw, fills[start : start + chunk])
                    if start % 200 == 0:
                        await xadd_all(
                            redis_client, streams.signals, signals[start // 10 : start // 10 + 20]
                        )
                    await asyncio.sleep(0.02)

            producer = asyncio.create_task(produce())
            await wait_until(has_rows(database_url, "orders", 100), "the first rows")
            await proxy.cut()
            # Entries keep coming; the store holds what it read, unacknowledged.
            await wait_until(lambda: unhealthy(store), "/health to turn red")
            seen_unhealthy = True
            await wait_until(
                lambda: _positive(pending(redis_client, streams.orders_raw)),
                "a batch held during the cut",
            )
            stored_during_cut = await count(database_url, "orders")
            await asyncio.sleep(0.5)
            assert await count(database_url, "orders") == stored_during_cut
            assert await pending(redis_client, streams.orders_raw) > 0
            ok, details = await store.health()
            assert not ok and via_proxy not in str(details)
            await proxy.restore()
            await producer
            await wait_until(has_rows(database_url, "orders", total), "every order")
            await wait_until(has_rows(database_url, "signals", len(signals)), "every signal")
            await wait_until(lambda: settled(redis_client, streams.orders_raw), "orders acked")
            await wait_until(lambda: settled(redis_client, streams.signals), "signals acked")
            await wait_until(lambda: _healthy(store), "/health green again")

    assert seen_unhealthy
    keys = {r["order_key"] for r in await fetch(database_url, "SELECT order_key FROM orders")}
    assert keys == {fill.order_key for fill in fills}
    assert await count(database_url, "signals") == len(signals)
    # Each entry went through one successful attempt. A commit whose reply the cut swallowed is
    # retried, and its rows then count as duplicates: never as a second row.
    new_rows = metric("rows_inserted", "orders") - inserted
    assert new_rows + metric("duplicates_skipped", "orders") - duplicates == total


async def _positive(value: Any) -> bool:
    return int(await value) > 0


async def _healthy(store: Store) -> bool:
    return (await store.health())[0]


async def test_startup_waits_for_postgres(
    redis_url: str,
    database_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
) -> None:
    async with proxied(database_url) as (proxy, via_proxy):
        await proxy.cut()
        store = Store(store_settings(redis_url, via_proxy, namespace))
        starting = asyncio.create_task(store.start())
        try:
            await wait_until(lambda: _down_with_error(store), "a failed first connection")
            assert not starting.done()
            assert not (await store.health())[0]
            await proxy.restore()
            await asyncio.wait_for(starting, 10)
            await xadd_all(redis_client, streams.orders_raw, [make_fill(1)])
            await wait_until(has_rows(database_url, "orders", 1), "the order")
        finally:
            await store.stop()


async def _down_with_error(store: Store) -> bool:
    return store.db.last_error is not None


async def test_stopping_during_an_outage_leaves_the_batch_for_a_reclaimer(
    redis_url: str,
    database_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
) -> None:
    fills = [make_fill(i) for i in range(40)]
    async with proxied(database_url) as (proxy, via_proxy):
        store = Store(store_settings(redis_url, via_proxy, namespace))
        await store.start()
        await proxy.cut()
        await xadd_all(redis_client, streams.orders_raw, fills)
        await wait_until(
            lambda: _positive(pending(redis_client, streams.orders_raw)), "the batch held"
        )
        await asyncio.wait_for(store.stop(), 10)  # does not wait for Postgres
        [group] = await redis_client.xinfo_groups(streams.orders_raw)
        assert group["pending"] > 0 and group["pending"] + group["lag"] == 40  # nothing acked
    assert await count(database_url, "orders") == 0
    settings = store_settings(redis_url, database_url, namespace, store_claim_idle_ms=100)
    async with running_store(settings):
        await wait_until(has_rows(database_url, "orders", 40), "the held orders")
        await wait_until(lambda: settled(redis_client, streams.orders_raw), "all acked")
