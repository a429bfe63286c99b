"""The reclaim loop: entries left pending by a consumer that died (or failed) get processed.

Every `DETECTOR_RECLAIM_INTERVAL_S`, each replica sweeps the group's pending list with XAUTOCLAIM
(Redis 6.2+; works on 7.0, unlike FastStream's `XREADGROUP ... CLAIM`, which needs 8.4), taking
entries idle for at least `DETECTOR_CLAIM_MIN_IDLE_MS`. A claimed entry whose delivery count (from
XPENDING) exceeds `DETECTOR_MAX_DELIVERIES` goes to `orders.dead` with the last error recorded for
it and its delivery count, and is acked; the others are processed like a batch and the settled
ones acked. Entries a live replica is still working on are not taken: it refreshes their idle time
while it waits (`BatchProcessor`), and a batch is decided in far less than the minimum idle time.
"""

from __future__ import annotations

import asyncio
import logging

from services.detector import metrics
from services.detector.pipeline import DEAD_LETTER_ORIGIN, BatchProcessor, RawEntry
from services.detector.state import Claimed, DetectorState, Rejection

log = logging.getLogger(__name__)


class Reclaimer:
    def __init__(
        self,
        state: DetectorState,
        processor: BatchProcessor,
        *,
        group: str,
        consumer: str,
        min_idle_ms: int,
        interval_s: float,
        max_deliveries: int,
        batch_size: int,
    ) -> None:
        self.state = state
        self.processor = processor
        self.group = group
        self.consumer = consumer
        self.min_idle_ms = min_idle_ms
        self.interval_s = interval_s
        self.max_deliveries = max_deliveries
        self.batch_size = batch_size

    async def run(self) -> None:
        """Sweep forever; a failed sweep (Redis away) is logged and tried again next time."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.sweep()
            except Exception:
                log.exception("reclaim_failed", extra={"consumer": self.consumer})

    async def sweep(self) -> int:
        """One pass over the pending list; returns how many entries were claimed."""
        cursor, total = "0-0", 0
        while True:
            cursor, claimed = await self.state.autoclaim(
                self.group, self.consumer, self.min_idle_ms, cursor, self.batch_size
            )
            if claimed:
                total += len(claimed)
                metrics.RECLAIMED.inc(len(claimed))
                await self.handle(claimed)
            if cursor == "0-0":
                return total

    async def handle(self, claimed: list[Claimed]) -> None:
        exhausted = [c for c in claimed if c.deliveries > self.max_deliveries]
        if exhausted:
            await self._dead_letter(exhausted)
        rest = [c for c in claimed if c.deliveries <= self.max_deliveries]
        # Trimmed from the stream since delivery (Redis 6.2 still lists such entries; 7 drops
        # them): nothing left to decide.
        gone = [c.entry_id for c in rest if not c.fields]
        live = [RawEntry(c.entry_id, c.fields) for c in rest if c.fields]
        log.info(
            "entries_reclaimed",
            extra={
                "consumer": self.consumer,
                "count": len(claimed),
                "dead_lettered": len(exhausted),
                "trimmed": len(gone),
                "first": claimed[0].entry_id,
                "last": claimed[-1].entry_id,
            },
        )
        settled = gone
        if live:
            settled += (await self.processor.process(live)).settled
        await self.state.ack(self.group, settled)
        await self.state.forget_errors(settled)

    async def _dead_letter(self, exhausted: list[Claimed]) -> None:
        ids = [c.entry_id for c in exhausted]
        errors = await self.state.last_errors(ids)
        rejections = [
            Rejection(
                c.entry_id,
                RawEntry(c.entry_id, c.fields).raw() if c.fields else b"",
                f"delivered {c.deliveries} times (DETECTOR_MAX_DELIVERIES {self.max_deliveries});"
                f" last error: {errors.get(c.entry_id, 'none recorded (its consumer died)')}",
                "max_deliveries",
            )
            for c in exhausted
        ]
        deliveries = {c.entry_id: c.deliveries for c in exhausted}
        await self.state.dead_letter(rejections, origin=DEAD_LETTER_ORIGIN, deliveries=deliveries)
        await self.state.ack(self.group, ids)
        await self.state.forget_errors(ids)
        metrics.DEAD_LETTERED.labels("max_deliveries").inc(len(exhausted))
        for rejection in rejections:
            log.warning(
                "entry_dead_lettered",
                extra={"entry_id": rejection.entry_id, "reason": rejection.reason[:500]},
            )
