"""FastStream wiring: two batch subscribers of group `store`, on `orders.raw` and on `signals`.

What FastStream 0.7.8 does here (read in `faststream/redis/subscriber/usecases/
stream_subscriber.py`, `faststream/redis/message.py`, `faststream/middlewares/acknowledgement/`):
- A batch `StreamSub` with a group reads with XREADGROUP `>` (COUNT `max_records`, BLOCK
  `polling_interval` ms) and calls the handler once per read with a `RedisBatchStreamMessage`, whose
  `raw_message` holds `message_ids` (the entry ids, in order) and `data` (each entry's fields):
  that is where `signals.stream_id` comes from.
- Its `ack()` sends one XACK for all `message_ids`. Under the default policy for grouped streams
  (REJECT_ON_ERROR) it is called after the handler returns, and on an exception `reject()` sends
  nothing to Redis; a cancelled handler is not acked either. We set `AckPolicy.MANUAL` and send
  the XACK ourselves after `BatchStore.store` returned, so it visibly follows the commit (the
  handler takes only the entries: the message object would cost dependency injection, below).
- Its own parser turns every entry into JSON and back, and raises on an entry whose bytes are not
  UTF-8 (seen with 0.7.8): the handler is then never called and the whole batch stays pending. The
  parser below skips that work, so a malformed entry reaches `rows.prepare` and is dead-lettered.
- On start it tries XGROUP CREATE at `$` (new entries only) and ignores "already exists": `main.py`
  creates the group at `0` first (`ensure_group`), so entries written before the first start count.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from faststream.message import StreamMessage
from faststream.middlewares import AckPolicy
from faststream.redis import RedisBroker, StreamSub

from services.store.batches import BatchStore, Entry, Feed
from services.store.database import Stopping
from shared.faststream_batches import parse_plain_batch, plain_entries
from shared.stream_metrics import broker_middleware
from shared.streams import STORE_GROUP

log = logging.getLogger(__name__)

Handler = Callable[..., Awaitable[None]]


async def decode_plain_batch(message: StreamMessage[Any]) -> list[Entry]:
    return plain_entries(message)


def handler_for(feed: Feed, batches: BatchStore, batch_max: int, linger_s: float) -> Handler:
    async def store_batch(entries: list[Entry]) -> None:
        await _store(feed, batches, entries)
        if linger_s and len(entries) < batch_max:
            # FastStream reads again when this returns: what arrives meanwhile makes the next
            # transaction bigger instead of the next several.
            await asyncio.sleep(linger_s)

    store_batch.__name__ = store_batch.__qualname__ = f"store_{feed.table.name}"
    return store_batch


async def _store(feed: Feed, batches: BatchStore, entries: list[Entry]) -> None:
    try:
        outcome = await batches.store(feed, entries)
    except Stopping:
        # Shutting down while Postgres is away: no ack, the entries stay pending for a
        # reclaimer. Not an error worth FastStream's traceback.
        log.warning("batch_left_pending", extra={"stream": feed.stream, "count": len(entries)})
        return
    if entries:
        await batches.redis.xack(feed.stream, STORE_GROUP, *(entry_id for entry_id, _ in entries))
    log.debug(
        "batch_stored",
        extra={
            "stream": feed.stream,
            "entries": len(entries),
            "inserted": outcome.inserted,
            "duplicates": outcome.duplicates,
            "dead_lettered": outcome.dead_lettered,
        },
    )


def build_broker(
    redis_url: str,
    consumer: str,
    feeds: Sequence[Feed],
    batches: BatchStore,
    *,
    batch_max: int,
    block_ms: int,
    linger_ms: int,
    graceful_timeout: float,
) -> RedisBroker:
    """The broker with one subscriber per feed; `consumer` must be unique per process."""
    faststream_log = logging.getLogger("services.store.faststream")
    # Its INFO lines (task callbacks at shutdown) are noise; warnings and errors still get through.
    faststream_log.setLevel(logging.WARNING)
    broker = RedisBroker(
        redis_url,
        # On stop, the batch in flight gets this long to commit and ack before it is cancelled.
        graceful_timeout=graceful_timeout,
        # FastStream logs two lines per batch at `log_level`: DEBUG keeps them off the hot path,
        # while its errors still reach our JSON log.
        logger=faststream_log,
        log_level=logging.DEBUG,
        middlewares=[broker_middleware("store")],
        # No dependency injection: FastDepends resolves `NoCast[...]` and `Context` parameters
        # (the message, for `ack()`) with sync functions it runs in a worker thread, two thread
        # hops per batch; the handler gets the decoded entries and XACKs them itself.
        apply_types=False,
    )
    for feed in feeds:
        subscriber = broker.subscriber(
            stream=StreamSub(
                feed.stream,
                group=STORE_GROUP,
                consumer=consumer,
                batch=True,
                max_records=batch_max,
                polling_interval=block_ms,
            ),
            parser=parse_plain_batch,
            decoder=decode_plain_batch,
            ack_policy=AckPolicy.MANUAL,
            title=f"store:{feed.table.name}",
            description=f"Entries of {feed.stream} -> Postgres table {feed.table.name}",
        )
        subscriber(handler_for(feed, batches, batch_max, linger_ms / 1000))
    return broker
