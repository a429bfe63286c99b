"""Fills -> `orders.raw`, each order_key once, with dedupe and XADD in one atomic Lua step.

The script sets `<seen prefix><order_key>` with NX and a TTL, and only when that key was new adds
the fill to the stream. Both happen in one script, so a crash or a lost reply can neither lose a
fill nor double it: a retried batch finds its keys set and adds nothing twice. The seen keys carry
the stream's name as their Redis Cluster hash tag (`{<ns>orders.raw}:seen:<order_key>`), so they
hash to the stream's slot and the script runs unchanged on a cluster.

Sources hand fills to `submit`, which waits when the bounded queue is full: backpressure reaches
the socket reader instead of memory growing or fills being dropped. One task drains the queue,
taking everything already waiting (up to `batch_max`) into one script call, so a lone fill goes
out at once and a burst costs one round trip. While Redis is down the task retries the same batch
with backoff; dead letters go through the same queue so they survive an outage too (a dead letter
whose reply was lost may be written twice: they are for people, not for the pipeline).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from redis.typing import EncodableT

from services.ingestor import metrics
from services.ingestor.backoff import Backoff
from shared.logs import scrub
from shared.models import OrderFill
from shared.redis_streams import DATA_FIELD, dead_letter, encode
from shared.streams import Streams

log = logging.getLogger(__name__)

T = TypeVar("T")

# KEYS[1] = the stream, KEYS[2..n+1] = the seen keys; ARGV[1] = TTL (s), ARGV[2] = MAXLEN,
# ARGV[3..n+2] = the fills' JSON. Returns 1 (added) or 0 (duplicate) per fill, in order.
DEDUPE_XADD = """
local added = {}
for i = 2, #KEYS do
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', ARGV[1]) then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'data', ARGV[i + 1])
    added[i - 1] = 1
  else
    added[i - 1] = 0
  end
end
return added
"""

REDIS_RETRY_MIN_S = 0.05
REDIS_RETRY_MAX_S = 5.0
DEAD_LETTER_ORIGIN = "ingestor"


@dataclass(frozen=True, slots=True)
class DeadFrame:
    raw: bytes
    reason: str


QueueItem = OrderFill | DeadFrame


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
        self._maxlen = stream_maxlen
        self._ttl = dedupe_ttl_s
        self._batch_max = batch_max
        self._queue: asyncio.Queue[QueueItem] = asyncio.Queue(queue_size)
        self._unfinished = 0
        self._retry = Backoff(REDIS_RETRY_MIN_S, REDIS_RETRY_MAX_S)
        self.redis_ok = True
        self.published = 0
        self.duplicates = 0

    @property
    def unfinished(self) -> int:
        """Items submitted and not yet in Redis (queued or in the batch being written)."""
        return self._unfinished

    async def submit(self, fill: OrderFill) -> None:
        await self._put(fill)

    async def submit_dead(self, raw: bytes, reason: str) -> None:
        await self._put(DeadFrame(raw, reason))

    async def publish(self, fills: Sequence[OrderFill]) -> list[bool]:
        """One script call: add the fills whose order_key is new; True for each one added."""
        prefix = self._streams.seen_order_prefix()
        keys = [self._streams.orders_raw, *(prefix + fill.order_key for fill in fills)]
        args: list[EncodableT] = [self._ttl, self._maxlen]
        args += [encode(fill)[DATA_FIELD] for fill in fills]
        added = await self._script(keys=keys, args=args)
        return [bool(flag) for flag in added]

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
        fills: list[OrderFill] = []
        for item in batch:
            if isinstance(item, OrderFill):
                fills.append(item)
                continue
            # Keep the batch's order: fills before a dead letter go first.
            await self._publish_fills(fills)
            fills = []
            await self._retrying(functools.partial(self._dead_letter, item))
        await self._publish_fills(fills)

    async def _publish_fills(self, fills: list[OrderFill]) -> None:
        if not fills:
            return
        added = await self._retrying(lambda: self.publish(fills))
        now = time.time()
        new = sum(added)
        self.published += new
        self.duplicates += len(fills) - new
        metrics.PUBLISHED.inc(new)
        metrics.DUPLICATES.inc(len(fills) - new)
        metrics.PUBLISH_BATCH.observe(len(fills))
        for fill, was_new in zip(fills, added, strict=True):
            if was_new:
                metrics.PUBLISH_LATENCY.observe(max(0.0, now - fill.received_at))
            else:
                log.debug("duplicate_fill", extra={"order_key": fill.order_key})

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
