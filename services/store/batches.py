"""One batch of stream entries: validate, write and commit, dead-letter what cannot be stored.

`BatchStore.store` returns only when every valid entry is committed in Postgres (a new row, a
status change of a stored row, or a repeat of what was there already) and every invalid or
refused entry is in the feed's dead-letter stream, so the caller may then XACK the whole batch.
It waits through Postgres outages (see `database.py`); it raises only when shutting down
(`Stopping`) or when Redis refuses the dead letters, and then nothing may be acked: the entries
stay pending and are reclaimed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis

from services.store import metrics
from services.store.database import Database
from services.store.rows import ORDERS, SIGNALS, Rejected, Table, prepare
from shared.redis_streams import dead_letter
from shared.streams import Streams

log = logging.getLogger(__name__)

DEAD_LETTER_ORIGIN = "store"

Entry = tuple[str, Mapping[bytes, bytes]]  # (stream id, fields)


@dataclass(frozen=True)
class Feed:
    """A stream the store consumes, the table it fills and where its bad entries go."""

    table: Table
    stream: str
    dead_stream: str


def feeds(streams: Streams) -> tuple[Feed, ...]:
    """`orders.raw` (or each of its wallet partitions) and `signals`."""
    orders = (Feed(ORDERS, stream, streams.orders_dead) for stream in streams.order_streams())
    return (*orders, Feed(SIGNALS, streams.signals, streams.signals_dead))


@dataclass(frozen=True)
class Outcome:
    """What became of the entries of a batch: each is counted once, in one of these."""

    inserted: int
    duplicates: int
    dead_lettered: int
    status_changes: int = 0


class BatchStore:
    def __init__(self, db: Database, redis: aioredis.Redis, dead_maxlen: int = 100_000) -> None:
        self.db = db
        self.redis = redis
        self.dead_maxlen = dead_maxlen

    async def store(self, feed: Feed, entries: Sequence[Entry]) -> Outcome:
        table = feed.table.name
        metrics.BATCH_SIZE.labels(table).observe(len(entries))
        prepared = prepare(feed.table, entries)
        result = await self.db.write(feed.table, prepared.rows)
        refused = [Rejected(row.stream_id, row.raw, reason) for row, reason in result.rejected]
        await self.dead_letter(feed, prepared.rejected, "invalid")
        await self.dead_letter(feed, refused, "rejected")
        changed = sum(result.status_changes.values())
        duplicates = prepared.valid - len(refused) - result.inserted - changed
        metrics.ROWS_INSERTED.labels(table).inc(result.inserted)
        metrics.DUPLICATES.labels(table).inc(duplicates)
        for status, count in result.status_changes.items():
            metrics.STATUS_CHANGES.labels(table, status).inc(count)
        dead = len(prepared.rejected) + len(refused)
        return Outcome(result.inserted, duplicates, dead, changed)

    async def dead_letter(
        self, feed: Feed, rejected: Sequence[Rejected], kind: str, deliveries: int = 1
    ) -> None:
        for item in rejected:
            await dead_letter(
                self.redis,
                feed.dead_stream,
                item.raw,
                f"{item.reason} (entry {item.stream_id})",
                origin=DEAD_LETTER_ORIGIN,
                deliveries=deliveries,
                maxlen=self.dead_maxlen,
            )
            log.warning(
                "entry_dead_lettered",
                extra={
                    "stream": feed.stream,
                    "entry": item.stream_id,
                    "kind": kind,
                    "reason": item.reason[:200],
                },
            )
        metrics.DEAD_LETTERED.labels(feed.table.name, kind).inc(len(rejected))
