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

`BackfillSchedule` decides, for one WebSocket connection, which wallets still need reading, when,
and how far back; it does no I/O (the connection runs the reads):
- every wallet has its own read and its own retry backoff, so one wallet whose history keeps
  failing (an HTTP 500 for that user, a timeout, a broken page chain) holds back no other. Reads
  go in two lanes: wallets in good standing one at a time (the provider sees one request at a
  time, and a 429's Retry-After holds every later one), wallets whose last read failed retried on
  the side, several at once, so a slow failure (a timeout) never stalls the others. The wallets
  not caught up, and since when, are what /health and the metrics report as behind;
- a provider's REST index trails its live feed: right after a reconnect it may not hold the last
  seconds of fills yet, and live fills then raise the watermark past them. So each first pass is
  followed, BACKFILL_INDEXING_LAG_S later, by a re-read that reaches back to the lag before the
  first pass began, whatever the watermark says by then. (Holding the watermark at "now minus the
  lag" instead would only help the next reconnect, which may be hours away; the overlap,
  BACKFILL_OVERLAP_S, still covers a crash between the two passes.)
- a wallet added to a live subscription by an `update` gets no reply (Dome documents none), so
  nothing says when the server starts sending its fills. It is read at once (its history), then
  again once DOME_UPDATE_APPLY_S plus the indexing lag have passed since the update was sent,
  reaching back to before the first read; only after that re-read does it count as caught up
  (its live fills may then raise its watermark).

`run_backfills` is the dispatcher both WebSocket sources (Dome's connections, RTDS) run over their
schedule: it starts the due reads of each lane as tasks, up to the lane's limit, and waits for the
earliest next read or a wake-up (a finished read frees its lane; a wallet change needs a look).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Container, Coroutine, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any, NoReturn, Protocol

import orjson
from pydantic import ValidationError

from services.ingestor import metrics
from shared.backoff import Backoff
from shared.errors import validation_reason
from shared.models import DomeOrder, OrderFill, Source
from shared.tasks import cancel_and_wait

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

    async def since(self, wallet: str, reach_back: int | None = None) -> int:
        """Where a read starts; with `reach_back`, no later than that exchange time."""
        start = await self._start(wallet)
        return start if reach_back is None else max(0, min(start, reach_back))

    async def _start(self, wallet: str) -> int:
        mark = await self._publisher.watermark(self.feed, wallet)
        now = int(self._clock())
        if mark is None:
            return max(0, now - self._lookback)
        since = mark - self._overlap
        if self._remembered is not None and since < now - self._remembered:
            return mark + 1
        return max(0, since)

    async def wallet(self, wallet: str, reach_back: int | None = None) -> int:
        """Read and publish everything since the wallet's watermark (and at least since
        `reach_back`, an exchange time); returns the new fills."""
        since = await self.since(wallet, reach_back)
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


class Outcome(Enum):
    """What a successful read means for its wallet."""

    # The read was replaced meanwhile (the wallet left, or everything is read again): ignore it.
    STALE = "stale"
    # First pass done; a re-read follows; live fills may raise the watermark.
    CAUGHT_UP = "caught_up"
    # First pass done for a wallet added by an update not known to be applied: re-read first.
    UNCONFIRMED = "unconfirmed"
    # Nothing left to read for this wallet.
    SETTLED = "settled"


@dataclass(eq=False)
class WalletRead:
    """One wallet's outstanding backfill on one connection: a first pass, then maybe a re-read."""

    wallet: str
    behind_since: float
    backoff: Backoff
    # Monotonic time before which it is not attempted (retry backoff, or the re-read's wait).
    due: float
    # Set for the re-read: it reads back at least to this exchange time.
    reach_back: int | None = None
    failures: int = 0
    running: bool = False

    @property
    def behind(self) -> bool:
        """Not caught up: the first pass is not done, or the re-read keeps failing."""
        return self.reach_back is None or self.failures > 0


class BackfillSchedule:
    """Which wallets of one connection still need reading, when, and how far back (see the
    module docstring). Pure: the clocks are injected, the caller runs the reads."""

    def __init__(
        self,
        *,
        indexing_lag_s: float,
        update_apply_s: float,
        retry_min_s: float,
        retry_max_s: float,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lag = indexing_lag_s
        self._apply = update_apply_s
        self._retry = (retry_min_s, retry_max_s)
        self._rng = rng or random.Random()
        self._clock = clock
        self._monotonic = monotonic
        self.reads: dict[str, WalletRead] = {}
        # wallet -> monotonic time by which the server has surely applied the update adding it.
        self.unconfirmed: dict[str, float] = {}
        # Wallets behind when everything was queued afresh keep their "behind since".
        self._carried: dict[str, float] = {}

    def reset(self) -> None:
        """A new connection: nothing is subscribed, so nothing is waiting for an update."""
        self.again()
        self.unconfirmed.clear()

    def again(self) -> None:
        """Every wallet is to be read afresh (a reconnect, or Redis lost recent writes)."""
        self._carried.update((w, r.behind_since) for w, r in self.reads.items() if r.behind)
        self.reads.clear()

    def updated(self, wallets: Iterable[str]) -> None:
        """These wallets were just added by an `update`: read them afresh, and again later."""
        applied_by = self._monotonic() + self._apply
        for wallet in wallets:
            self.unconfirmed[wallet] = applied_by
            self.reads.pop(wallet, None)

    def want(self, wallets: Iterable[str]) -> None:
        """Queue a first pass for each wallet without a read yet."""
        now = self._monotonic()
        for wallet in wallets:
            if wallet not in self.reads:
                since = self._carried.pop(wallet, None) or self._clock()
                backoff = Backoff(*self._retry, rng=self._rng)
                self.reads[wallet] = WalletRead(wallet, since, backoff, due=now)

    def forget(self, keep: Container[str]) -> None:
        """Drop the reads of wallets no longer subscribed here."""
        for table in (self.reads, self.unconfirmed, self._carried):
            for wallet in [w for w in table if w not in keep]:
                del table[wallet]

    def take(self, limit: int, *, retries: bool) -> list[WalletRead]:
        """Up to `limit` reads of one lane (`retries`: those whose last attempt failed) that are
        due, earliest first, marked running."""
        now = self._monotonic()
        due = sorted(
            (r for r in self._waiting(retries) if r.due <= now),
            key=lambda r: r.due,
        )[: max(0, limit)]
        for read in due:
            read.running = True
        return due

    def wait_s(self, *, retries: bool) -> float | None:
        """Seconds until the lane's next read is due; None when it has none waiting."""
        waiting = [r.due for r in self._waiting(retries)]
        return max(0.0, min(waiting) - self._monotonic()) if waiting else None

    def _waiting(self, retries: bool) -> Iterable[WalletRead]:
        return (r for r in self.reads.values() if not r.running and (r.failures > 0) == retries)

    def succeeded(self, read: WalletRead, started_at: float, started_mono: float) -> Outcome:
        """Record a read that completed; it began at `started_at` (Unix) / `started_mono`."""
        if self.reads.get(read.wallet) is not read:
            return Outcome.STALE
        read.running, read.failures = False, 0
        read.backoff.reset()
        applied_by = self.unconfirmed.get(read.wallet)
        if read.reach_back is not None or (self._lag <= 0 and applied_by is None):
            del self.reads[read.wallet]
            self.unconfirmed.pop(read.wallet, None)
            return Outcome.SETTLED
        # Fills up to the lag before this read began may not have been indexed yet.
        read.reach_back = max(0, int(started_at - self._lag) - 1)
        read.due = max(started_mono, applied_by or 0.0) + self._lag
        return Outcome.CAUGHT_UP if applied_by is None else Outcome.UNCONFIRMED

    def failed(self, read: WalletRead, *, auth: bool) -> float | None:
        """Record a failed read; returns its retry delay (None: the read was replaced)."""
        if self.reads.get(read.wallet) is not read:
            return None
        read.running = False
        if read.reach_back is not None and not read.failures:
            read.behind_since = self._clock()  # behind from the re-read's first failure
        read.failures += 1
        delay = read.backoff.max_delay() if auth else read.backoff.next_delay()
        read.due = self._monotonic() + delay
        return delay

    def hold(self, delay_s: float) -> None:
        """No read before `delay_s` from now (a refused key: retrying sooner cannot fix it)."""
        until = self._monotonic() + delay_s
        for read in self.reads.values():
            read.due = max(read.due, until)

    def behind(self) -> tuple[int, float | None]:
        """How many wallets are behind, and since when the oldest of them has been."""
        times = [r.behind_since for r in self.reads.values() if r.behind]
        return len(times), (min(times) if times else None)


async def run_backfills(
    schedule: BackfillSchedule,
    *,
    retry_concurrency: int,
    forget: Callable[[], None],
    wanted: Callable[[], Iterable[str]],
    read: Callable[[WalletRead], Coroutine[Any, Any, None]],
    report: Callable[[], None],
    wake: asyncio.Event,
    task_name: str,
) -> NoReturn:
    """Run `schedule`'s reads until cancelled; cancelling cancels every read still running.

    Each round: `forget()` drops wallets that left, the schedule wants `wanted()`, each lane takes
    its due reads up to its room (wallets in good standing one at a time, retries of failed reads
    `retry_concurrency` at once) and runs each as a task `read(read)` named `task_name`, then
    `report()` is called; the next round comes when a read is due in a lane with room, or `wake`
    is set (by the source, or by a read that finished: it frees its lane)."""
    # Lane (True: retries of failed reads) -> its reads running, and how many it may run.
    lanes: dict[bool, set[asyncio.Task[None]]] = {False: set(), True: set()}
    limits = {False: 1, True: retry_concurrency}

    def start(wallet_read: WalletRead, running: set[asyncio.Task[None]]) -> None:
        task = asyncio.create_task(read(wallet_read), name=task_name)
        running.add(task)

        def finished(done: asyncio.Task[None]) -> None:
            # Wake the dispatcher only now: before, the lane still counts this read as running.
            running.discard(done)
            wake.set()

        task.add_done_callback(finished)

    try:
        while True:
            forget()
            schedule.want(wanted())
            for retries, running in lanes.items():
                room = limits[retries] - len(running)
                for wallet_read in schedule.take(room, retries=retries):
                    start(wallet_read, running)
            report()
            waits = [
                schedule.wait_s(retries=retries)
                for retries, running in lanes.items()
                if len(running) < limits[retries]
            ]
            timeout_s = min((w for w in waits if w is not None), default=None)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await wake.wait()
            wake.clear()
    finally:
        for task in [*lanes[False], *lanes[True]]:
            await cancel_and_wait(task)
