"""Catch one wallet up from an HTTP history: the gap backfill after a (re)connect, and one poll.

`CatchUp.wallet(w)` reads every fill of `w` since its watermark less BACKFILL_OVERLAP_S (or, with no
watermark yet, since now less BACKFILL_INITIAL_LOOKBACK_S), following pagination to the end, and
publishes each page through the same atomic dedupe as the live feed, so the overlap and anything
the live feed also delivered are absorbed. Only after the last page has been read and published
does the watermark move, to the newest exchange timestamp actually read: a walk that fails half
way leaves the watermark where it was, and the next attempt reads the same span again.

Items that do not validate, or belong to another wallet, are dead-lettered with the reason (they
were read, so they do not hold the watermark back).

The overlap never reaches back past what the dedupe still remembers (DEDUPE_TTL_S): after an
outage longer than that, the walk starts just after the watermark instead, so fills published
long ago are not published again (a fill indexed late by more than the outage's excess over the
TTL would then be missed; the lesser evil next to doubling everything in the overlap).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import orjson
from pydantic import ValidationError

from services.ingestor import metrics
from shared.errors import validation_reason
from shared.models import DomeOrder, OrderFill, Source

log = logging.getLogger(__name__)


class WalletHistory(Protocol):
    """An HTTP API that lists one wallet's fills (Dome REST orders, Data API trades)."""

    source: Source

    def read_since(self, wallet: str, since: int) -> AsyncIterator[list[Any]]:
        """Pages of raw items with exchange timestamp >= `since`, until the end."""
        ...

    def to_order(self, item: Any) -> DomeOrder:
        """One raw item as a Dome order; raises ValueError/ValidationError when unusable."""
        ...


class Publishing(Protocol):
    async def publish_now(self, fills: list[OrderFill]) -> int: ...

    async def submit_dead(self, raw: bytes, reason: str, source: str) -> None: ...

    async def watermark(self, feed: str, wallet: str) -> int | None: ...

    async def advance_watermark(self, feed: str, wallet: str, timestamp: int) -> None: ...


class CatchUp:
    def __init__(
        self,
        history: WalletHistory,
        publisher: Publishing,
        *,
        feed: str,
        overlap_s: int,
        initial_lookback_s: int,
        backfill: bool,
        dedupe_ttl_s: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.history = history
        self.source = history.source.value
        self._publisher = publisher
        self.feed = feed
        self._overlap = overlap_s
        self._lookback = initial_lookback_s
        self._remembered = dedupe_ttl_s
        # True when this reads what a live feed missed: new fills are counted as backfilled.
        self._backfill = backfill
        self._clock = clock
        # The newest exchange timestamp read by the last call of `wallet` (None: nothing read).
        self.newest: int | None = None

    async def since(self, wallet: str) -> int:
        mark = await self._publisher.watermark(self.feed, wallet)
        now = int(self._clock())
        if mark is None:
            return max(0, now - self._lookback)
        since = mark - self._overlap
        if self._remembered is not None and since < now - self._remembered:
            return mark + 1
        return max(0, since)

    async def wallet(self, wallet: str) -> int:
        """Read and publish everything since the wallet's watermark; returns the new fills."""
        since = await self.since(wallet)
        newest: int | None = None
        new = 0
        async for page in self.history.read_since(wallet, since):
            fills = await self._fills(wallet, page)
            if fills:
                newest = max(newest or 0, max(fill.timestamp for fill in fills))
                new += await self._publisher.publish_now(fills)
        self.newest = newest
        if newest is not None:
            await self._publisher.advance_watermark(self.feed, wallet, newest)
        if new and self._backfill:
            metrics.BACKFILLED.labels(self.source).inc(new)
            log.debug("backfilled", extra={"source": self.source, "wallet": wallet, "fills": new})
        return new

    async def _fills(self, wallet: str, page: list[Any]) -> list[OrderFill]:
        received_at = time.time()
        fills = []
        for item in page:
            try:
                order = self.history.to_order(item)
            except (ValidationError, ValueError, TypeError) as exc:
                await self._dead(item, f"invalid_item: {_reason(exc)}")
                continue
            if order.user != wallet:
                await self._dead(item, f"wrong_wallet: an item of {order.user} for {wallet}")
                continue
            fills.append(OrderFill.from_dome(order, self.history.source, received_at))
        if fills:
            metrics.EVENTS_RECEIVED.labels(self.source).inc(len(fills))
        return fills

    async def _dead(self, item: Any, reason: str) -> None:
        metrics.REJECTED.labels(self.source, reason.partition(":")[0]).inc()
        log.warning("item_rejected", extra={"source": self.source, "reason": reason})
        await self._publisher.submit_dead(orjson.dumps(item, default=str), reason, self.source)


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "invalid order: " + validation_reason(exc)
    return str(exc)[:300]
