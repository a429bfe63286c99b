"""Pending (mempool) fills that must confirm within a bound, or be retracted.

A source with pending events (polynode, Predexon) publishes a fill as `pending` before its block;
any source (the same feed's confirmed event, the chain, REST, the Data API) later publishes it
`confirmed` under the same order_key. A pending fill that no source confirms within
PENDING_CONFIRM_TIMEOUT_S was dropped from the mempool: it is retracted, by publishing the same
fill with status `retracted` and the reason through the publisher's `publish_now`, the path the
chain source takes for a reorg (docs/streams.md, "Status").

The deadlines live in Redis, so a restarted ingestor keeps them: per wallet partition, a sorted
set `{<stream>}:pending:due` (order_key -> deadline, Unix seconds) and a hash
`{<stream>}:pending:fills` (order_key -> the pending fill's JSON, to retract it as it was). Both
carry the partition's name as their hash tag, the slot of its dedupe keys, so the same commands
run on a Redis Cluster. A deadline is written before its fill is published (first sight wins: a
resent pending event does not move it), so no published pending fill is without one.

At a deadline the fill's dedupe keys decide (`shared/orders_raw.seen_keys`): its confirmed key
set means some source confirmed it (nothing to do); its pending key missing means it was never
published (the process died in between; nothing to retract); otherwise it is retracted. A
confirmation that lands between that look and the retraction still wins: the publishing script
holds back a non-chain retraction when the confirmed key exists.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.ingestor import metrics
from shared.backoff import Backoff
from shared.models import FillStatus, OrderFill
from shared.orders_raw import Outgoing
from shared.streams import Streams

if TYPE_CHECKING:
    from services.ingestor.publisher import Publisher

log = logging.getLogger(__name__)

SWEEP_BATCH = 500
# Pending fills this process published, remembered to time their confirmation (a bound on memory).
REMEMBERED_MAX = 100_000


@dataclass(frozen=True, slots=True)
class Due:
    """A deadline that has passed, and what the dedupe keys say about its fill."""

    order_key: str
    fill: OrderFill | None
    confirmed: bool
    published: bool


class PendingTracker:
    """The pending fills' deadlines in Redis, and the sweep that retracts the overdue ones."""

    def __init__(
        self,
        client: aioredis.Redis,
        streams: Streams,
        *,
        timeout_s: float,
        sweep_interval_s: float = 1.0,
    ) -> None:
        self._client = client
        self._streams = streams
        self.timeout_s = timeout_s
        self._interval_s = sweep_interval_s
        # order_key -> when its pending fill was received (this process's, for the delay metric).
        self._pending_since: OrderedDict[str, float] = OrderedDict()
        # Confirmed by a fill this process published: their deadlines go at the next sweep.
        self._settled: dict[str, str] = {}
        self.retracted = 0
        self.confirmed = 0

    def due_key(self, stream: str) -> str:
        return "{" + stream + "}:pending:due"

    def fills_key(self, stream: str) -> str:
        return "{" + stream + "}:pending:fills"

    # --- from the publisher --------------------------------------------------------------------

    async def track(self, items: Sequence[Outgoing]) -> None:
        """Write the deadline of every pending fill among `items` (before they are published)."""
        by_stream: dict[str, list[OrderFill]] = defaultdict(list)
        for item in items:
            if item.fill.status is FillStatus.PENDING:
                by_stream[self._streams.wallet_stream(item.fill.user)].append(item.fill)
        for stream, fills in by_stream.items():
            deadline = time.time() + self.timeout_s
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.zadd(self.due_key(stream), {f.order_key: deadline for f in fills}, nx=True)
                for fill in fills:
                    pipe.hsetnx(self.fills_key(stream), fill.order_key, fill.model_dump_json())
                await pipe.execute()

    def observe(self, items: Sequence[Outgoing], added: Sequence[bool]) -> None:
        """Count what was published: new pending fills, and confirmations of pending ones."""
        for item, new in zip(items, added, strict=True):
            fill = item.fill
            if not new:
                continue
            if fill.status is FillStatus.PENDING:
                metrics.PENDING_PUBLISHED.labels(fill.source.value).inc()
                self._pending_since[fill.order_key] = fill.received_at
                if len(self._pending_since) > REMEMBERED_MAX:
                    self._pending_since.popitem(last=False)
            elif fill.status is FillStatus.CONFIRMED:
                since = self._pending_since.pop(fill.order_key, None)
                if since is not None:
                    self._confirmed(fill.received_at - since)
                    self._settled[fill.order_key] = self._streams.wallet_stream(fill.user)

    def _confirmed(self, delay_s: float | None) -> None:
        self.confirmed += 1
        metrics.PENDING_CONFIRMED.inc()
        if delay_s is not None:
            metrics.PENDING_CONFIRM_DELAY.observe(max(0.0, delay_s))

    # --- the sweep -----------------------------------------------------------------------------

    async def run(self, publisher: Publisher) -> None:
        """Sweep every interval, forever; a Redis failure waits and tries again."""
        retry = Backoff(0.1, 5.0)
        while True:
            try:
                await self.sweep(publisher)
                retry.reset()
                await asyncio.sleep(self._interval_s)
            except (RedisError, OSError) as exc:
                log.warning("pending_sweep_failed", extra={"error": type(exc).__name__})
                await asyncio.sleep(retry.next_delay())

    async def sweep(self, publisher: Publisher, now: float | None = None) -> int:
        """Retract the overdue pending fills of every partition; returns how many went out."""
        await self._forget_settled()
        at = time.time() if now is None else now
        retracted = 0
        for stream in self._streams.order_streams():
            while True:
                due = await self._due(stream, at)
                retracted += await self._settle(publisher, stream, due)
                if len(due) < SWEEP_BATCH:
                    break
        return retracted

    async def _forget_settled(self) -> None:
        by_stream: dict[str, list[str]] = defaultdict(list)
        for key, stream in self._settled.items():
            by_stream[stream].append(key)
        for stream, keys in by_stream.items():
            await self._forget(stream, keys)
            for key in keys:  # only once gone from Redis: a failure keeps them for next time
                self._settled.pop(key, None)

    async def _due(self, stream: str, now: float) -> list[Due]:
        keys = [
            k.decode() if isinstance(k, bytes) else str(k)
            for k in await self._client.zrangebyscore(
                self.due_key(stream), "-inf", now, start=0, num=SWEEP_BATCH
            )
        ]
        if not keys:
            return []
        seen = self._streams.seen_order_prefix(stream)
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.hmget(self.fills_key(stream), keys)
            for key in keys:
                pipe.exists(seen + key)
                pipe.exists(seen + key + ":pending")
            replies = await pipe.execute()
        raws, flags = replies[0], replies[1:]
        return [
            Due(key, _fill(raw), bool(flags[2 * i]), bool(flags[2 * i + 1]))
            for i, (key, raw) in enumerate(zip(keys, raws, strict=True))
        ]

    async def _settle(self, publisher: Publisher, stream: str, due: list[Due]) -> int:
        retractions: list[OrderFill] = []
        for entry in due:
            if entry.confirmed:
                # Confirmed by a source this process did not see (or before a restart).
                self._pending_since.pop(entry.order_key, None)
                self._confirmed(None)
            elif entry.fill is not None and entry.published:
                retractions.append(self._retraction(entry.fill))
            else:
                log.info("pending_never_published", extra={"order_key": entry.order_key})
        new = await publisher.publish_now(retractions) if retractions else 0
        if retractions:
            self.retracted += new
            metrics.PENDING_RETRACTED.inc(new)
            log.info("pending_retracted", extra={"count": new, "overdue": len(retractions)})
        # Forgotten only once the retractions are out: a failure above leaves them for next time.
        await self._forget(stream, [entry.order_key for entry in due])
        return new

    def _retraction(self, fill: OrderFill) -> OrderFill:
        self._pending_since.pop(fill.order_key, None)
        reason = (
            f"pending fill not confirmed within {self.timeout_s:g} s "
            "(PENDING_CONFIRM_TIMEOUT_S): dropped from the mempool"
        )
        return fill.model_copy(update={"status": FillStatus.RETRACTED, "status_reason": reason})

    async def _forget(self, stream: str, keys: list[str]) -> None:
        if not keys:
            return
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.zrem(self.due_key(stream), *keys)
            pipe.hdel(self.fills_key(stream), *keys)
            await pipe.execute()

    async def waiting(self) -> int:
        """Pending fills whose deadline has not been settled yet, over every partition."""
        counts = [
            await self._client.zcard(self.due_key(stream))
            for stream in self._streams.order_streams()
        ]
        return sum(int(count) for count in counts)


def _fill(raw: bytes | str | None) -> OrderFill | None:
    """The kept pending fill; None when missing, or unreadable (written by another version):
    such a deadline is dropped with a log line rather than stopping the sweep."""
    if raw is None:
        return None
    try:
        return OrderFill.model_validate_json(raw)
    except ValueError as exc:
        log.warning("pending_fill_unreadable", extra={"error": str(exc)[:300]})
        return None
