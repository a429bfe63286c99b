"""Fills -> `orders.raw`, each order_key once, with dedupe and XADD in one atomic Lua step; and the
per-wallet watermarks that gap backfill starts from. The one module that knows Redis tricks.

The script sets `<seen prefix><order_key>` (one key per status, `seen_keys`) with NX and a TTL,
and only when that key was new adds the fill to the stream. Both happen in one script, so a crash
or a lost reply can neither lose a fill nor double it: a retried batch finds its keys set and adds
nothing twice. The seen keys carry the stream's name as their Redis Cluster hash tag
(`{<ns>orders.raw}:seen:<order_key>`), so they hash to the stream's slot and the script runs
unchanged on a cluster.

Watermarks: the hash `{<ns>orders.raw}:watermark` (same slot) maps `<feed>:<wallet>` (feed `dome`
for the Dome WebSocket, its backfill and REST polling; `data_api` for the Data API poller) to the
newest exchange `timestamp` read and published for that wallet. It only ever grows, and only to
what was actually read: a live fill moves it in the same script that publishes it, and only once
the wallet's backfill since the last (re)connect is complete (the caller passes no feed before);
a backfill or poll moves it with `advance_watermark` after reading every page. A restarted
ingestor therefore backfills from where it was.

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
from typing import TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from redis.typing import EncodableT

from services.ingestor import metrics
from shared.backoff import Backoff
from shared.logs import scrub
from shared.models import FillStatus, OrderFill
from shared.redis_streams import DATA_FIELD, dead_letter, encode
from shared.streams import Streams

log = logging.getLogger(__name__)

T = TypeVar("T")

# KEYS[1] = the stream, KEYS[2] = the watermark hash, then per fill its seen key and the seen keys
# its status clears; ARGV[1] = TTL (s), ARGV[2] = MAXLEN, then four per fill: its JSON, the
# watermark field to raise ('' = none), its exchange timestamp and how many keys it clears.
# Returns 1 (added) or 0 (duplicate) per fill, in order.
DEDUPE_XADD = """
local added = {}
local k, a = 3, 3
while a <= #ARGV do
  local cleared = tonumber(ARGV[a + 3])
  if redis.call('SET', KEYS[k], '1', 'NX', 'EX', ARGV[1]) then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'data', ARGV[a])
    for i = k + 1, k + cleared do redis.call('DEL', KEYS[i]) end
    added[#added + 1] = 1
  else
    added[#added + 1] = 0
  end
  local field = ARGV[a + 1]
  if field ~= '' then
    local current = tonumber(redis.call('HGET', KEYS[2], field) or '0')
    if tonumber(ARGV[a + 2]) > current then
      redis.call('HSET', KEYS[2], field, ARGV[a + 2])
    end
  end
  k = k + 1 + cleared
  a = a + 4
end
return added
"""

# KEYS[1] = the watermark hash; ARGV[1] = field, ARGV[2] = timestamp. Raises it, never lowers it.
RAISE_WATERMARK = """
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > current then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
"""


def seen_keys(fill: OrderFill) -> tuple[str, tuple[str, ...]]:
    """The dedupe key of the fill in its status, and the keys a new entry in that status clears.

    A fill is published once per status: first sight (`pending` or `confirmed`), then each change.
    A retraction clears the fill's first sight, so a block that includes the fill again publishes
    it again; that re-inclusion clears the retraction, so a later reorg can retract it again."""
    key = fill.order_key
    if fill.status is FillStatus.RETRACTED:
        return f"{key}:retracted", (key, f"{key}:pending")
    if fill.status is FillStatus.PENDING:
        return f"{key}:pending", ()
    return key, (f"{key}:retracted",)


REDIS_RETRY_MIN_S = 0.05
REDIS_RETRY_MAX_S = 5.0
DEAD_LETTER_ORIGIN = "ingestor"


@dataclass(frozen=True, slots=True)
class Outgoing:
    fill: OrderFill
    # The watermark feed this fill may raise (None: publish only).
    watermark: str | None = None


@dataclass(frozen=True, slots=True)
class DeadFrame:
    raw: bytes
    reason: str
    source: str


QueueItem = Outgoing | DeadFrame


def watermark_key(streams: Streams) -> str:
    """The watermark hash, in the slot of `orders.raw` (its hash tag) so one script touches both."""
    return "{" + streams.orders_raw + "}:watermark"


def watermark_field(feed: str, wallet: str) -> str:
    return f"{feed}:{wallet}"


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
        self._script = client.register_script(DEDUPE_XADD)
        self._raise = client.register_script(RAISE_WATERMARK)
        self._watermarks = watermark_key(streams)
        self._maxlen = stream_maxlen
        self._ttl = dedupe_ttl_s
        self._batch_max = batch_max
        self._queue: asyncio.Queue[QueueItem] = asyncio.Queue(queue_size)
        self._unfinished = 0
        self._retry = Backoff(REDIS_RETRY_MIN_S, REDIS_RETRY_MAX_S)
        self.redis_ok = True
        self.published = 0
        self.duplicates = 0
        self.published_by_source: Counter[str] = Counter()
        self.duplicates_by_source: Counter[str] = Counter()

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
        """One script call: add the fills whose order_key is new; True for each one added."""
        prefix = self._streams.seen_order_prefix()
        keys = [self._streams.orders_raw, self._watermarks]
        args: list[EncodableT] = [self._ttl, self._maxlen]
        for item in items:
            own, cleared = seen_keys(item.fill)
            keys += [prefix + key for key in (own, *cleared)]
            field = watermark_field(item.watermark, item.fill.user) if item.watermark else ""
            args += [encode(item.fill)[DATA_FIELD], field, item.fill.timestamp, len(cleared)]
        added = await self._script(keys=keys, args=args)
        return [bool(flag) for flag in added]

    async def publish_now(self, fills: Sequence[OrderFill]) -> int:
        """Publish (retrying while Redis is down) and return how many were new."""
        new = 0
        for start in range(0, len(fills), self._batch_max):
            chunk = [Outgoing(fill) for fill in fills[start : start + self._batch_max]]
            new += sum(await self._publish_items(chunk, live=False))
        return new

    async def watermark(self, feed: str, wallet: str) -> int | None:
        """The newest exchange timestamp read and published for this wallet and feed."""
        field = watermark_field(feed, wallet)
        raw = await self._retrying(lambda: self._client.hget(self._watermarks, field))
        return int(raw) if raw is not None else None

    async def advance_watermark(self, feed: str, wallet: str, timestamp: int) -> None:
        """Raise the wallet's mark to `timestamp` (never lower it)."""
        field = watermark_field(feed, wallet)
        await self._retrying(lambda: self._raise(keys=[self._watermarks], args=[field, timestamp]))

    async def run(self) -> None:
        """Drain the queue forever, one script call per batch of what is waiting."""
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
        added = await self._retrying(lambda: self.publish(items))
        now = time.time()
        metrics.PUBLISH_BATCH.observe(len(items))
        new: Counter[str] = Counter()
        seen: Counter[str] = Counter()
        for item, was_new in zip(items, added, strict=True):
            if was_new:
                new[item.fill.source.value] += 1
                if live:
                    metrics.PUBLISH_LATENCY.observe(max(0.0, now - item.fill.received_at))
            else:
                seen[item.fill.source.value] += 1
                log.debug("duplicate_fill", extra={"order_key": item.fill.order_key})
        for source, count in new.items():
            metrics.PUBLISHED.labels(source).inc(count)
        for source, count in seen.items():
            metrics.DUPLICATES.labels(source).inc(count)
        self.published_by_source.update(new)
        self.duplicates_by_source.update(seen)
        self.published += new.total()
        self.duplicates += seen.total()
        return added

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
                result = await call()
            except (RedisError, OSError) as exc:
                self._failed(exc)
                await asyncio.sleep(self._retry.next_delay())
                continue
            if not self.redis_ok:
                log.info("redis_recovered", extra={"queued": self._unfinished})
            self.redis_ok = True
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
    # Host and port only: the URL may carry a password.
    kwargs = client.connection_pool.connection_kwargs
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
