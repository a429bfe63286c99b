"""Fills -> `orders.raw`, each order_key once, with dedupe and XADD in one atomic Lua step; and the
per-wallet watermarks that gap backfill starts from. The one module that knows Redis tricks.

The dedupe-and-XADD script and the watermarks are `shared/orders_raw.py` (the CLI's replays use
them too): a fill is added once per status, and its publication may raise its wallet's watermark
(`<feed>:<wallet>`, feed `dome` for the Dome WebSocket, its backfill and REST polling; `data_api`
for the Data API poller), the newest exchange `timestamp` read and published for that wallet. A
live fill moves it in the same script that publishes it, and only once the wallet's backfill since
the last (re)connect is complete (the caller passes no feed before); a backfill or poll moves it
with `advance_watermark` after reading every page. A restarted ingestor therefore backfills from
where it was.

Sources hand fills to `submit`, which waits when the bounded queue is full: backpressure reaches
the socket reader instead of memory growing or fills being dropped. One task drains the queue,
taking everything already waiting (up to `batch_max`) into one script call, so a lone fill goes
out at once and a burst costs one round trip. Backfill and polling call `publish_now`, which
returns once the fills are in Redis. While Redis is down both retry the same batch with backoff;
dead letters go through the queue so they survive an outage too (a dead letter whose reply was
lost may be written twice: they are for people, not for the pipeline).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.ingestor import metrics
from shared.backoff import Backoff
from shared.logs import scrub
from shared.models import OrderFill
from shared.orders_raw import OrdersRaw, Outgoing
from shared.redis_streams import calling, dead_letter, server_identity
from shared.streams import Streams
from shared.tasks import cancel_and_wait

if TYPE_CHECKING:
    from services.ingestor.pending import PendingTracker

log = logging.getLogger(__name__)

T = TypeVar("T")

REDIS_RETRY_MIN_S = 0.05
REDIS_RETRY_MAX_S = 5.0
# How often the publisher asks which Redis servers answer (run ids): a failover takes seconds.
REDIS_WATCH_S = 2.0
DEAD_LETTER_ORIGIN = "ingestor"


@dataclass(frozen=True, slots=True)
class DeadFrame:
    raw: bytes
    reason: str
    source: str


QueueItem = Outgoing | DeadFrame


class Publisher:
    def __init__(
        self,
        client: aioredis.Redis,
        streams: Streams,
        *,
        stream_maxlen: int,
        dedupe_ttl_s: int,
        queue_size: int = 10_000,
        batch_max: int = 500,
    ) -> None:
        self._client = client
        self._streams = streams
        self.orders = OrdersRaw(
            client, streams, stream_maxlen=stream_maxlen, dedupe_ttl_s=dedupe_ttl_s
        )
        self._batch_max = batch_max
        self._queue: asyncio.Queue[QueueItem] = asyncio.Queue(queue_size)
        self._unfinished = 0
        self._retry = Backoff(REDIS_RETRY_MIN_S, REDIS_RETRY_MAX_S)
        self.redis_ok = True
        # Called when Redis answers again after failing: what it acknowledged last may be gone.
        self._on_recovered: list[Callable[[], None]] = []
        self.published = 0
        self.duplicates = 0
        self.published_by_source: Counter[str] = Counter()
        self.duplicates_by_source: Counter[str] = Counter()
        # The pending fills' deadlines (services/ingestor/pending.py), when the service has one.
        self.pending: PendingTracker | None = None

    def on_recovered(self, callback: Callable[[], None]) -> None:
        """Call `callback` each time Redis answers again after an outage: a restart without its
        data, or a failover whose replica missed the last writes, may have lost fills that were
        acknowledged, so the sources read their gaps again (from the watermarks, which such a
        loss takes back with the fills)."""
        self._on_recovered.append(callback)

    @property
    def unfinished(self) -> int:
        """Items submitted and not yet in Redis (queued or in the batch being written)."""
        return self._unfinished

    async def submit(self, fill: OrderFill, watermark: str | None = None) -> None:
        """Queue a live fill; with `watermark`, its publication also raises that feed's mark."""
        await self._put(Outgoing(fill, watermark))

    async def submit_dead(self, raw: bytes, reason: str, source: str) -> None:
        await self._put(DeadFrame(raw, reason, source))

    async def publish(self, items: Sequence[Outgoing]) -> list[bool]:
        return await self.orders.publish(items)

    async def publish_now(self, fills: Sequence[OrderFill]) -> int:
        """Publish (retrying while Redis is down) and return how many were new."""
        new = 0
        for start in range(0, len(fills), self._batch_max):
            chunk = [Outgoing(fill) for fill in fills[start : start + self._batch_max]]
            new += sum(await self._publish_items(chunk, live=False))
        return new

    async def watermark(self, feed: str, wallet: str) -> int | None:
        """The newest exchange timestamp read and published for this wallet and feed."""
        return await self._retrying(lambda: self.orders.watermark(feed, wallet))

    async def advance_watermark(self, feed: str, wallet: str, timestamp: int) -> None:
        """Raise the wallet's mark to `timestamp` (never lower it)."""
        await self._retrying(lambda: self.orders.raise_watermark(feed, wallet, timestamp))

    async def run(self) -> None:
        """Drain the queue forever, one script call per batch of what is waiting; meanwhile
        watch for a Redis replaced under us (`watch_redis`)."""
        watcher = asyncio.create_task(self.watch_redis(), name="redis-watch")
        try:
            await self._drain_forever()
        finally:
            await cancel_and_wait(watcher)

    async def watch_redis(self, every_s: float = REDIS_WATCH_S) -> None:
        """Tell the sources when the Redis answering is not the one that answered before (a
        restart, a replica promoted by a failover), even while no write of ours failed: either
        may have lost writes acknowledged a moment before, and nothing else would say so."""
        known: frozenset[str] | None = None
        while True:
            await asyncio.sleep(every_s)
            try:
                current = await server_identity(self._client)
            except (RedisError, OSError):
                continue  # an outage: the writes' own retries report it
            if known is not None and current != known:
                log.warning("redis_replaced", extra={"servers": len(current)})
                for callback in self._on_recovered:
                    callback()
            known = current

    async def _drain_forever(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._batch_max:
                try:
                    batch.append(self._queue.get_nowait())
                except asyncio.QueueEmpty:
                    break
            await self._deliver(batch)
            self._unfinished -= len(batch)
            metrics.QUEUE_DEPTH.set(self._unfinished)
            for _ in batch:
                self._queue.task_done()

    async def flush(self, within_s: float) -> int:
        """Wait until everything submitted is in Redis, at most `within_s`; returns what is left."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), within_s)
        return self._unfinished

    async def ping(self, within_s: float = 1.0) -> bool:
        try:
            return bool(await asyncio.wait_for(self._client.ping(), within_s))
        except (RedisError, OSError, TimeoutError):
            return False

    async def _put(self, item: QueueItem) -> None:
        await self._queue.put(item)
        self._unfinished += 1
        metrics.QUEUE_DEPTH.set(self._unfinished)

    async def _deliver(self, batch: list[QueueItem]) -> None:
        items: list[Outgoing] = []
        for item in batch:
            if isinstance(item, Outgoing):
                items.append(item)
                continue
            # Keep the batch's order: fills before a dead letter go first.
            if items:
                await self._publish_items(items, live=True)
            items = []
            await self._retrying(functools.partial(self._dead_letter, item))
            metrics.DEAD_LETTERED.labels(item.source).inc()
        if items:
            await self._publish_items(items, live=True)

    async def _publish_items(self, items: list[Outgoing], *, live: bool) -> list[bool]:
        pending = self.pending
        if pending is not None:
            # Before publishing: no pending fill is ever out without its deadline.
            await self._retrying(lambda: pending.track(items))
        deliveries = await self._retrying(lambda: self.orders.deliver(items))
        if pending is not None:
            pending.observe(items, [delivery.added for delivery in deliveries])
        now = time.time()
        metrics.PUBLISH_BATCH.observe(len(items))
        new: Counter[str] = Counter()
        seen: Counter[str] = Counter()
        for item, delivery in zip(items, deliveries, strict=True):
            source = item.fill.source.value
            if delivery.added:
                new[source] += 1
                metrics.SOURCE_FIRST.labels(source).inc()
                if live:
                    metrics.PUBLISH_LATENCY.observe(max(0.0, now - item.fill.received_at))
            else:
                seen[source] += 1
                if delivery.lag_s is not None:
                    metrics.SOURCE_LAG.labels(source).observe(delivery.lag_s)
                log.debug("duplicate_fill", extra={"order_key": item.fill.order_key})
        for source, count in new.items():
            metrics.PUBLISHED.labels(source).inc(count)
        for source, count in seen.items():
            metrics.DUPLICATES.labels(source).inc(count)
        self.published_by_source.update(new)
        self.duplicates_by_source.update(seen)
        self.published += new.total()
        self.duplicates += seen.total()
        return [delivery.added for delivery in deliveries]

    async def _dead_letter(self, item: DeadFrame) -> None:
        await dead_letter(
            self._client,
            self._streams.orders_dead,
            item.raw,
            item.reason,
            origin=DEAD_LETTER_ORIGIN,
        )

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run a Redis call until it succeeds; a retried script is safe thanks to the dedupe."""
        while True:
            try:
                result = await calling(call)
            except (RedisError, OSError) as exc:
                self._failed(exc)
                await asyncio.sleep(self._retry.next_delay())
                continue
            if not self.redis_ok:
                log.info("redis_recovered", extra={"queued": self._unfinished})
                self.redis_ok = True
                for callback in self._on_recovered:
                    callback()
            self._retry.reset()
            return result

    def _failed(self, exc: BaseException) -> None:
        self.redis_ok = False
        metrics.REDIS_ERRORS.inc()
        log.warning(
            "redis_unavailable",
            extra={
                "error": f"{type(exc).__name__}: {scrub(str(exc))[:300]}",
                "queued": self._unfinished,
                "redis": _redis_address(self._client),
            },
        )


def _redis_address(client: aioredis.Redis) -> str:
    # Host and port only: the URL may carry a password. A cluster client has no single pool.
    pool = getattr(client, "connection_pool", None)
    if pool is None:
        return "cluster"
    kwargs = pool.connection_kwargs
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
