"""Taking over entries another `store` consumer read but never acknowledged (it crashed, or was
stopped while Postgres was down).

Every `STORE_CLAIM_EVERY_S`, while Postgres is up, XAUTOCLAIM moves entries idle for longer than
`STORE_CLAIM_IDLE_MS` to this consumer; they are stored like any batch (the inserts are idempotent,
so an entry that was in fact committed before the crash is simply counted as a duplicate) and then
acked. An entry whose batch keeps failing for a reason other than Postgres being away (a bug) is
dead-lettered once it has been delivered `STORE_MAX_DELIVERIES` times, so it cannot circulate
forever. Works on Redis 7.0 (no XREADGROUP CLAIM needed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.store import metrics
from services.store.batches import BatchStore, Entry, Feed
from services.store.database import Database, Stopping
from services.store.rows import Rejected, describe, raw_payload

log = logging.getLogger(__name__)


class Reclaimer:
    def __init__(
        self,
        redis: aioredis.Redis,
        db: Database,
        batches: BatchStore,
        *,
        group: str,
        consumer: str,
        min_idle_ms: int,
        count: int,
        max_deliveries: int,
    ) -> None:
        self.redis = redis
        self.db = db
        self.batches = batches
        self.group = group
        self.consumer = consumer
        self.min_idle_ms = min_idle_ms
        self.count = count
        self.max_deliveries = max_deliveries

    async def run(self, feeds: Sequence[Feed], every: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if self.db.up:
                for feed in feeds:
                    try:
                        await self.reclaim(feed)
                    except RedisError as exc:
                        log.warning(
                            "reclaim_failed",
                            extra={"stream": feed.stream, "error": type(exc).__name__},
                        )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)

    async def reclaim(self, feed: Feed) -> int:
        """Claim and store every entry of the feed idle past the bound; returns how many."""
        start: bytes | str = "0-0"
        total = 0
        while True:
            next_id, claimed, *_ = await self.redis.xautoclaim(
                feed.stream,
                self.group,
                self.consumer,
                min_idle_time=self.min_idle_ms,
                start_id=start,
                count=self.count,
            )
            # Redis 6.2 returned trimmed entries as (id, None); 7.x lists them apart and drops them.
            entries = [(eid.decode(), fields) for eid, fields in claimed if fields is not None]
            if entries:
                await self._store(feed, entries)
                total += len(entries)
            if next_id in (b"0-0", "0-0"):
                return total
            start = next_id

    async def drain_own(self, feed: Feed) -> int:
        """Store and ack the entries pending under this very consumer; returns how many.

        For shutdown: a read that was in flight when the subscribers stopped has delivered entries
        that no handler will see. Storing them now saves a reclaimer the wait for them to idle.
        """
        total = 0
        while True:
            reply: Any = await self.redis.xreadgroup(
                self.group, self.consumer, {feed.stream: "0"}, count=self.count
            )
            entries = [
                (eid.decode(), fields) for _, items in reply for eid, fields in items if fields
            ]
            if not entries:
                return total
            await self.batches.store(feed, entries)
            await self.redis.xack(feed.stream, self.group, *[eid for eid, _ in entries])
            total += len(entries)

    async def _store(self, feed: Feed, entries: list[Entry]) -> None:
        ids = [entry_id for entry_id, _ in entries]
        log.info("entries_reclaimed", extra={"stream": feed.stream, "count": len(entries)})
        try:
            await self.batches.store(feed, entries)
        except Stopping:
            raise
        except Exception as exc:
            log.exception("reclaimed_batch_failed", extra={"stream": feed.stream})
            await self._retire_worn(feed, entries, exc)
            return
        await self.redis.xack(feed.stream, self.group, *ids)
        metrics.RECLAIMED.labels(feed.table.name).inc(len(entries))

    async def _retire_worn(self, feed: Feed, entries: list[Entry], exc: Exception) -> None:
        """Dead-letter and ack the entries delivered too often; the others stay pending."""
        counts = await self.deliveries(feed, [entry_id for entry_id, _ in entries])
        worn = [(eid, f) for eid, f in entries if counts.get(eid, 0) >= self.max_deliveries]
        if not worn:
            return
        reason = f"failed {self.max_deliveries} deliveries: {type(exc).__name__}: {describe(exc)}"
        await self.batches.dead_letter(
            feed,
            [Rejected(eid, raw_payload(f), reason) for eid, f in worn],
            "failing",
            deliveries=max(counts[eid] for eid, _ in worn),
        )
        await self.redis.xack(feed.stream, self.group, *[eid for eid, _ in worn])

    async def deliveries(self, feed: Feed, ids: Sequence[str]) -> dict[str, int]:
        """Delivery count of each pending entry (absent when no longer pending)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id in ids:
                pipe.xpending_range(feed.stream, self.group, min=entry_id, max=entry_id, count=1)
            replies = await pipe.execute()
        return {
            reply[0]["message_id"].decode(): int(reply[0]["times_delivered"])
            for reply in replies
            if reply
        }
