"""FastStream wiring: one batch subscriber of group `detector` on `orders.raw`.

How FastStream 0.7.8 acknowledges here (read from `faststream/redis`): a batch `StreamSub` reads
with XREADGROUP (COUNT `max_records`, BLOCK `polling_interval`) and hands the handler one batch;
its default policy (REJECT_ON_ERROR) would ack after the handler returns and do nothing on an
error. We use `AckPolicy.MANUAL` and XACK ourselves once `BatchProcessor.process` has returned, that
is once every signal of the batch is XADDed (inside the Lua step) and every bad entry is in
`orders.dead`: the ack can never run ahead of the effects. Normally the whole batch is settled and
acked; entries still waiting for other replicas after `DETECTOR_WAIT_S` are left pending (only the
settled ones are acked) for the reclaim loop. When `process` raises (Redis unreachable past the
retry window), nothing is acked and the entries stay pending here. The handler acks with its own
XACK rather than the message's `ack()` because getting the message means dependency injection
(see `apply_types` below).

Entries are plain (`data` = the OrderFill JSON). FastStream's batch parser would turn each entry
into JSON and back (and its body into one more JSON document); the parser below skips that work
and the decoder hands the handler the raw entries, so the handler code and `pipeline.py` see only
(entry id, fields) and never FastStream's or Redis' types. The consumer group is created by
`main.py` before the broker starts (XGROUP CREATE ... 0 MKSTREAM); the subscriber's own attempt then
finds it and reads new entries (`>`).
"""

from __future__ import annotations

import logging
from typing import Any

from faststream.message import StreamMessage
from faststream.middlewares import AckPolicy
from faststream.redis import RedisBroker, StreamSub
from faststream.redis.subscriber.usecases.stream_subscriber import StreamBatchSubscriber

from services.detector.pipeline import BatchProcessor, RawEntry
from services.detector.state import DetectorState
from shared.faststream_batches import parse_plain_batch, plain_entries
from shared.stream_metrics import broker_middleware
from shared.streams import DETECTOR_GROUP


async def decode_plain_batch(message: StreamMessage[Any]) -> list[RawEntry]:
    return [RawEntry(entry_id, fields) for entry_id, fields in plain_entries(message)]


def build_broker(
    redis_url: str,
    stream: str,
    consumer: str,
    processor: BatchProcessor,
    state: DetectorState,
    *,
    batch_size: int,
    block_ms: int,
    graceful_timeout: float,
) -> tuple[RedisBroker, StreamBatchSubscriber]:
    """The broker and its one subscriber; `consumer` must be unique per replica."""
    broker = RedisBroker(
        redis_url,
        graceful_timeout=graceful_timeout,
        # FastStream logs two lines per batch at its log_level: DEBUG keeps them off the hot path,
        # while its errors still reach our JSON log through this logger.
        logger=logging.getLogger("services.detector.faststream"),
        log_level=logging.DEBUG,
        middlewares=[broker_middleware("detector")],
        # No dependency injection: FastDepends resolves `NoCast[...]` and `Context` parameters
        # (the message, for `ack()`) with sync functions it runs in a worker thread, two thread
        # hops per batch, 11% of this process' CPU at 2,000 orders/s in `make bench`.
        apply_types=False,
    )
    subscriber = broker.subscriber(
        stream=StreamSub(
            stream,
            group=DETECTOR_GROUP,
            consumer=consumer,
            batch=True,
            max_records=batch_size,
            polling_interval=block_ms,
        ),
        parser=parse_plain_batch,
        decoder=decode_plain_batch,
        ack_policy=AckPolicy.MANUAL,
        title="detector",
        description=("Order fills -> signals (trader_entry, trader_exit, whale_order, consensus)"),
    )

    @subscriber
    async def on_orders(entries: list[RawEntry]) -> None:
        outcome = await processor.process(entries)
        await state.ack(DETECTOR_GROUP, outcome.settled)

    return broker, subscriber
