"""The Dome WebSocket source: the tracked wallets spread over subscriptions and connections within
the tier's limits, each connection streaming its share (see `ws_connection`).

The layout (`subscriptions.SubscriptionLayout`) is planned at start; more wallets than the limits
hold is a `SubscriptionPlanError` naming the numbers, which the service turns into a startup error.
While running, `add_wallet`/`remove_wallet` (driven by the wallet registry's control stream) change
one subscription on one connection, which then sends `update`, `subscribe` or `unsubscribe`
without dropping anything; a wallet the tier has no room for is logged as an error, counted in
`betterbot_ingestor_wallets_over_capacity` and reported by `/health`, never silently dropped, and
is subscribed as soon as room frees up. Events of a wallet removed less than `REMOVED_GRACE_S` ago
(the server may not have applied the change yet) are ignored rather than dead-lettered.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence

from services.ingestor import metrics
from services.ingestor.backfill import CatchUp
from services.ingestor.feed_status import FeedStatus, combine
from services.ingestor.frames import Twins
from services.ingestor.settings import IngestorSettings
from services.ingestor.sources.ws_connection import SOURCE, DomeConnection, FillSink
from services.ingestor.subscriptions import (
    Slot,
    SubscriptionLayout,
    SubscriptionLimits,
    SubscriptionPlanError,
)
from shared.logs import register_secret
from shared.tasks import cancel_and_wait

log = logging.getLogger(__name__)

REMOVED_GRACE_S = 60.0


def limits_of(settings: IngestorSettings) -> SubscriptionLimits:
    return SubscriptionLimits(
        wallets_per_subscription=settings.dome_wallets_per_subscription,
        max_subscriptions=settings.dome_max_subscriptions,
        subscriptions_per_connection=settings.dome_subscriptions_per_connection,
        max_connections=settings.dome_max_connections,
    )


class RecentlyRemoved:
    """Wallets removed less than `grace_s` ago."""

    def __init__(self, grace_s: float = REMOVED_GRACE_S) -> None:
        self._grace = grace_s
        self._at: dict[str, float] = {}

    def add(self, wallet: str) -> None:
        now = time.monotonic()
        self._at = {w: at for w, at in self._at.items() if now - at < self._grace}
        self._at[wallet] = now

    def discard(self, wallet: str) -> None:
        self._at.pop(wallet, None)

    def __contains__(self, wallet: object) -> bool:
        at = self._at.get(wallet) if isinstance(wallet, str) else None
        return at is not None and time.monotonic() - at < self._grace


class DomeWebSocketSource:
    def __init__(
        self,
        settings: IngestorSettings,
        wallets: Sequence[str],
        sink: FillSink,
        catch_up: CatchUp | None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.endpoint = settings.dome_ws_endpoint()
        for secret in settings.secrets():
            register_secret(secret)
        self.layout = SubscriptionLayout(list(wallets), limits_of(settings))
        self.sink = sink
        self.catch_up = catch_up
        self.tracked: set[str] = set(wallets)
        self.removed = RecentlyRemoved()
        # One for every connection: the same event on two connections is one fill.
        self.twins = Twins()
        self.over_capacity: dict[str, None] = {}
        self._rng = rng or random.Random()
        self.connections = [
            DomeConnection(index, self, self._rng) for index in range(len(self.layout.connections))
        ]
        self._tasks: list[asyncio.Task[None]] = []
        self._failure: asyncio.Future[None] | None = None
        self.refreshed()

    @property
    def status(self) -> FeedStatus:
        combined = combine(
            SOURCE, [conn.status for conn in self.connections], wallets=self.layout.wallets
        )
        combined.over_capacity = len(self.over_capacity)
        return combined

    def slots(self, index: int) -> list[Slot]:
        return self.layout.connections[index]

    def catch_up_again(self) -> None:
        """Every connection backfills its wallets again (Redis may have lost recent fills)."""
        log.warning("backfill_after_redis_outage", extra={"source": SOURCE})
        for conn in self.connections:
            conn.catch_up_again()

    def refreshed(self) -> None:
        """Recompute the source-wide gauges after a connection changed."""
        status = self.status
        metrics.CONNECTED.labels(SOURCE).set(1 if status.connected else 0)
        metrics.CONNECTIONS.labels(SOURCE).set(status.connections)
        metrics.SUBSCRIPTIONS.labels(SOURCE).set(status.subscriptions)
        metrics.WALLETS.labels(SOURCE).set(self.layout.wallets)
        metrics.OVER_CAPACITY.labels(SOURCE).set(len(self.over_capacity))
        metrics.WALLETS_BEHIND.labels(SOURCE).set(status.wallets_behind)
        metrics.WALLETS_BEHIND_SINCE.labels(SOURCE).set(status.behind_since or 0)

    async def run(self) -> None:
        """Run every connection until cancelled; a connection's crash is raised here."""
        self._failure = asyncio.get_running_loop().create_future()
        for conn in self.connections:
            self._start(conn)
        try:
            await self._failure
        finally:
            for task in self._tasks:
                await cancel_and_wait(task)

    def _start(self, conn: DomeConnection) -> None:
        task = asyncio.create_task(conn.run(), name=f"dome_ws-{conn.index}")
        task.add_done_callback(self._ended)
        self._tasks.append(task)

    def _ended(self, task: asyncio.Task[None]) -> None:
        failure = self._failure
        if task.cancelled() or failure is None or failure.done():
            return
        if (error := task.exception()) is not None:
            failure.set_exception(error)

    def add_wallet(self, wallet: str) -> bool:
        """Follow one more wallet; False when the tier has no room (logged, kept for later)."""
        self.removed.discard(wallet)
        try:
            index = self.layout.add(wallet)
        except SubscriptionPlanError as exc:
            self.over_capacity[wallet] = None
            log.error("wallet_over_capacity", extra={"wallet": wallet, "reason": str(exc)})
            self.refreshed()
            return False
        self.over_capacity.pop(wallet, None)
        self.tracked.add(wallet)
        if index is not None:
            self._connection(index).changed()
        self.refreshed()
        return True

    def remove_wallet(self, wallet: str) -> None:
        self.over_capacity.pop(wallet, None)
        index = self.layout.remove(wallet)
        if index is not None:
            self.tracked.discard(wallet)
            self.removed.add(wallet)
            self._connection(index).changed()
            for waiting in list(self.over_capacity):
                if not self.add_wallet(waiting):
                    break
        self.refreshed()

    def _connection(self, index: int) -> DomeConnection:
        if index == len(self.connections):
            conn = DomeConnection(index, self, self._rng)
            self.connections.append(conn)
            log.info("connection_added", extra={"source": SOURCE, "connection": index})
            if self._failure is not None:
                self._start(conn)
        return self.connections[index]
