"""One ingestor run: startup checks, then the sources, the publisher, the wallet follower, the
status writer and the ops server side by side until stopped.

Startup: the wallets file is read (a missing or invalid file is a `StartupError`), the wallet
registry in Redis is seeded from it the first time and read (`shared.wallet_registry.load`;
retried while Redis is unreachable), and the sources are built from INGEST_SOURCES. More wallets
than the Dome tier's subscriptions hold is a `StartupError` naming the numbers. While running,
the registry's control stream is followed (`wallet_registry.follow`): an added or removed wallet
reaches every source at once (the WebSocket sends update/subscribe/unsubscribe on the live
connection; the pollers change their round). The wallets file is only the seed: editing it later
changes nothing; change wallets through the registry.

Shutdown order matters: the sources stop first (closing the sockets, so nothing new arrives), then
the publisher flushes what is queued (up to SHUTDOWN_FLUSH_TIMEOUT_S), then the rest stops and a
last status (`stopped`) is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Coroutine, Iterator
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.ingestor import metrics
from services.ingestor.backfill import CatchUp, WalletHistory
from services.ingestor.chain import polygon_source
from services.ingestor.chain.source import PolygonSource
from services.ingestor.feed_status import (
    ConnectionState,
    FeedStatus,
    evaluate_health,
    feed_report,
)
from services.ingestor.http_api import JsonApi
from services.ingestor.pending import PendingTracker
from services.ingestor.publisher import Publisher
from services.ingestor.settings import IngestorSettings
from services.ingestor.sources.data_api import DataApiHistory, data_api
from services.ingestor.sources.dome_rest import DomeRestHistory, dome_rest_api
from services.ingestor.sources.dome_ws import DomeWebSocketSource
from services.ingestor.sources.poller import WalletPoller
from services.ingestor.sources.rtds import RTDS_FEED, RtdsSource
from services.ingestor.sources.ws_connection import DOME_FEED
from services.ingestor.subscriptions import SubscriptionPlanError
from shared import layout, wallet_registry
from shared.backoff import Backoff
from shared.logs import register_secret
from shared.models import TrackedWallet
from shared.ops import ops_server
from shared.tasks import cancel_and_wait
from shared.wallets import WalletFileError, load_wallets

log = logging.getLogger(__name__)

FINAL_STATUS_TIMEOUT_S = 2.0
DATA_API_FEED = "data_api"


class StartupError(Exception):
    """A configuration the ingestor cannot run with; the message says what to change."""


class WalletSource(Protocol):
    """What the service needs from every source."""

    @property
    def status(self) -> FeedStatus: ...

    async def run(self) -> None: ...

    def add_wallet(self, wallet: str) -> bool: ...

    def remove_wallet(self, wallet: str) -> None: ...


class Ingestor:
    def __init__(self, settings: IngestorSettings) -> None:
        self.settings = settings
        for secret in settings.secrets():
            register_secret(secret)
        try:
            self.seed: list[TrackedWallet] = load_wallets(settings.wallets_path())
        except WalletFileError as exc:
            raise StartupError(str(exc)) from exc
        self.redis: aioredis.Redis = settings.redis()
        self.publisher = Publisher(
            self.redis,
            settings.streams,
            stream_maxlen=settings.stream_maxlen,
            dedupe_ttl_s=settings.dedupe_ttl_s,
            queue_size=settings.publish_queue_size,
            batch_max=settings.publish_batch_max,
        )
        # Pending fills not confirmed in time are retracted (deadlines kept in Redis).
        self.pending = PendingTracker(
            self.redis,
            settings.streams,
            timeout_s=settings.pending_confirm_timeout_s,
            sweep_interval_s=settings.pending_sweep_interval_s,
        )
        self.publisher.pending = self.pending
        self.tracked: set[str] = set()
        self.sources: list[WalletSource] = []
        self.websocket: DomeWebSocketSource | None = None
        self.pollers: list[WalletPoller] = []
        self.polygon: PolygonSource | None = None
        self.rtds: RtdsSource | None = None
        self._apis: dict[str, JsonApi] = {}
        self._wallets_after = "0-0"
        self._started_at = time.time()
        self.ops = ops_server(self.health, settings.ops_host, settings.ops_port)

    # --- startup -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Read the tracked wallets from the registry and build the sources (once)."""
        if self.sources:
            return
        streams = self.settings.streams
        try:
            await layout.claim(self.redis, streams)
        except layout.LayoutMismatch as exc:
            raise StartupError(str(exc)) from exc
        wallets, self._wallets_after = await wallet_registry.load(self.redis, streams, self.seed)
        addresses = [wallet.address for wallet in wallets]
        try:
            self._build_sources(addresses)
        except SubscriptionPlanError as exc:
            raise StartupError(str(exc)) from exc
        self.tracked = set(addresses)
        if not addresses:
            log.warning("no_tracked_wallets", extra={"registry": streams.wallets_key()})

    def _build_sources(self, wallets: list[str]) -> None:
        s = self.settings
        bounds = s.exchange_time_bounds()
        for name in s.sources():
            if name == "dome_ws":
                self.websocket = DomeWebSocketSource(
                    s, wallets, self.publisher, self._backfill_catch_up()
                )
                self.publisher.on_recovered(self.websocket.catch_up_again)
                self.sources.append(self.websocket)
            elif name == "polygon":
                self.polygon = polygon_source(s, wallets, self.publisher, self.redis)
                self.publisher.on_recovered(self.polygon.catch_up_again)
                self.sources.append(self.polygon)
            elif name == "rtds":
                self.rtds = RtdsSource(s, wallets, self.publisher, self._rtds_catch_up())
                self.publisher.on_recovered(self.rtds.catch_up_again)
                self.sources.append(self.rtds)
            elif name == "dome_rest":
                self._poller(
                    DomeRestHistory(self._api("dome_rest"), s.dome_rest_page_limit, bounds),
                    DOME_FEED,
                    wallets,
                    s.dome_poll_interval_s,
                )
            else:
                self._poller(
                    DataApiHistory(self._api("data_api"), s.data_api_page_limit, bounds),
                    DATA_API_FEED,
                    wallets,
                    s.data_api_poll_interval_s,
                )

    def _api(self, name: str) -> JsonApi:
        if name not in self._apis:
            builder = dome_rest_api if name == "dome_rest" else data_api
            self._apis[name] = builder(self.settings)
        return self._apis[name]

    def _catch_up(self, history: WalletHistory, feed: str, *, backfill: bool) -> CatchUp:
        return CatchUp(
            history,
            self.publisher,
            feed=feed,
            overlap_s=self.settings.backfill_overlap_s,
            initial_lookback_s=self.settings.backfill_initial_lookback_s,
            backfill=backfill,
            dedupe_ttl_s=self.settings.dedupe_ttl_s,
        )

    def _backfill_catch_up(self) -> CatchUp | None:
        history = self._history(self.settings.backfill_via)
        return None if history is None else self._catch_up(history, DOME_FEED, backfill=True)

    def _rtds_catch_up(self) -> CatchUp | None:
        """RTDS's gap backfill after each new socket, with a watermark of its own."""
        history = self._history(self.settings.rtds_backfill_via)
        return None if history is None else self._catch_up(history, RTDS_FEED, backfill=True)

    def _history(self, via: str) -> WalletHistory | None:
        """The REST history a gap backfill reads (`dome_rest` or `data_api`); None for `off`."""
        s = self.settings
        bounds = s.exchange_time_bounds()
        if via == "dome_rest":
            return DomeRestHistory(self._api("dome_rest"), s.dome_rest_page_limit, bounds)
        if via == "data_api":
            return DataApiHistory(self._api("data_api"), s.data_api_page_limit, bounds)
        return None

    def _poller(
        self, history: WalletHistory, feed: str, wallets: list[str], interval_s: float
    ) -> None:
        poller = WalletPoller(
            self._catch_up(history, feed, backfill=False),
            wallets,
            interval_s=interval_s,
            retry_min_s=self.settings.dome_reconnect_min_s,
            retry_max_s=self.settings.dome_reconnect_max_s,
        )
        self.pollers.append(poller)
        self.sources.append(poller)

    async def _start_until(self, stop: asyncio.Event) -> bool:
        """Start, retrying while Redis is unreachable; False when stopped first."""
        retry = Backoff(0.1, 5.0)
        while not stop.is_set():
            try:
                await self.start()
                return True
            except (RedisError, OSError) as exc:
                log.warning(
                    "startup_waiting_for_redis", extra={"error": f"{type(exc).__name__}: {exc}"}
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), retry.next_delay())
        return False

    # --- state ---------------------------------------------------------------------------------

    @property
    def statuses(self) -> list[FeedStatus]:
        return [source.status for source in self.sources]

    def _own_statuses(self) -> Iterator[FeedStatus]:
        """The statuses the sources keep (one per WebSocket connection, one per poller)."""
        if self.websocket is not None:
            yield from (conn.status for conn in self.websocket.connections)
        yield from (poller.status for poller in self.pollers)
        if self.polygon is not None:
            yield self.polygon.status
        if self.rtds is not None:
            yield self.rtds.status

    async def health(self) -> tuple[bool, dict[str, Any]]:
        redis_ok = await self.publisher.ping()
        # RTDS is unofficial and opportunistic: beside another source its trouble only degrades.
        extra = self.rtds.status if self.rtds is not None and len(self.sources) > 1 else None
        ok, details = evaluate_health(
            [status for status in self.statuses if status is not extra],
            redis_ok=redis_ok,
            now=time.time(),
            max_down_s=self.settings.health_max_disconnected_s,
            max_event_silence_s=self.settings.health_max_event_silence_s,
        )
        if extra is not None:
            self._opportunistic_health(extra, details)
        if not self.sources:
            details["state"] = ConnectionState.STARTING.value
        if self.polygon is not None:
            problems, details["chain"] = self.polygon.chain_health(time.time())
            details["problems"] += problems
            ok = ok and not problems
        details["queued"] = self.publisher.unfinished
        return ok, details

    def _opportunistic_health(self, status: FeedStatus, details: dict[str, Any]) -> None:
        """An extra source's state in `details`, its problems as `degraded` (still 200)."""
        _, own = evaluate_health(
            status,
            redis_ok=True,
            now=time.time(),
            max_down_s=self.settings.health_max_disconnected_s,
            max_event_silence_s=self.settings.health_max_event_silence_s,
        )
        details["sources"].update(own["sources"])
        details["degraded"] += own["degraded"] + [
            f"{problem} (unofficial, opportunistic source)" for problem in own["problems"]
        ]

    # --- running -------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> int:
        """Run until `stop` is set or a part fails; returns how many items could not be flushed."""
        publisher = _task(self.publisher.run(), "publisher")
        status = _task(self._write_status_forever(), "status")
        server = _task(self.ops.serve(), "ops")
        try:
            started = await self._start_until(stop)
        except BaseException:
            await self._wind_down([], publisher, status, server, flush=False)
            raise
        workers = [_task(source.run(), f"source-{i}") for i, source in enumerate(self.sources)]
        if started:
            workers.append(_task(self._follow_wallets(), "wallets"))
            workers.append(_task(self.pending.run(self.publisher), "pending"))
        stopper = _task(stop.wait(), "stop")
        parts = (*workers, publisher, status, server)
        done, _ = await asyncio.wait((*parts, stopper), return_when=asyncio.FIRST_COMPLETED)
        log.info("stopping", extra={"cause": ",".join(sorted(t.get_name() for t in done))})
        stopper.cancel()
        left = await self._wind_down(workers, publisher, status, server, flush=True)
        for task in parts:
            if task in done and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return left

    async def _wind_down(
        self,
        workers: list[asyncio.Task[Any]],
        publisher: asyncio.Task[Any],
        status: asyncio.Task[Any],
        server: asyncio.Task[Any],
        *,
        flush: bool,
    ) -> int:
        for task in workers:
            await _cancel(task)
        now = time.time()
        for own in self._own_statuses():
            own.mark_down(ConnectionState.STOPPED, "", now)
        left = await self.publisher.flush(self.settings.shutdown_flush_timeout_s) if flush else 0
        if left:
            log.error("unpublished_at_shutdown", extra={"items": left})
        for task in (publisher, status):
            await _cancel(task)
        if flush:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await asyncio.wait_for(self._write_status(), FINAL_STATUS_TIMEOUT_S)
        self.ops.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await server
        for api in self._apis.values():
            await api.aclose()
        if self.polygon is not None:
            await self.polygon.markets.aclose()
        await self.redis.aclose()
        return left

    async def _follow_wallets(self) -> None:
        """Apply every change of the wallet registry to every source, resuming after failures."""
        retry = Backoff(0.1, 5.0)
        streams = self.settings.streams
        while True:
            try:
                async for change in wallet_registry.follow(
                    self.redis, streams, self._wallets_after
                ):
                    self._wallets_after = change.stream_id
                    self._apply(change)
                    retry.reset()
            except (RedisError, OSError) as exc:
                log.warning("wallet_follow_failed", extra={"error": type(exc).__name__})
                await asyncio.sleep(retry.next_delay())

    def _apply(self, change: wallet_registry.WalletChange) -> None:
        address = change.wallet.address
        if change.op == "upsert" and address not in self.tracked:
            self.tracked.add(address)
            followed = [source.add_wallet(address) for source in self.sources]
            log.info("wallet_added", extra={"wallet": address, "followed": all(followed)})
        elif change.op == "remove" and address in self.tracked:
            self.tracked.discard(address)
            for source in self.sources:
                source.remove_wallet(address)
            log.info("wallet_removed", extra={"wallet": address})

    async def _write_status_forever(self) -> None:
        while True:
            try:
                await self._write_status()
            except (RedisError, OSError) as exc:
                # The publisher reports Redis outages; one line per failed write would flood.
                log.debug("status_write_failed", extra={"error": type(exc).__name__})
            await asyncio.sleep(self.settings.status_interval_s)

    async def _write_status(self) -> None:
        now = time.time()
        statuses = self.statuses
        for feed in statuses:
            metrics.SECONDS_SINCE_LAST_EVENT.labels(feed.source).set(
                feed.seconds_since_last_event(now)
            )
        if not statuses:
            statuses = [FeedStatus(source=",".join(self.settings.sources()), wallets=0)]
        fields = feed_report(
            statuses,
            now,
            published=self.publisher.published,
            duplicates=self.publisher.duplicates,
            queued=self.publisher.unfinished,
        ).to_fields()
        key = self.settings.streams.feed_status_key()
        # Expires when no ingestor refreshes it, so a dead ingestor never looks connected.
        ttl = max(5, math.ceil(self.settings.status_interval_s * 10))
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
            pipe.expire(key, ttl)
            await pipe.execute()


def _task(coroutine: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
    return asyncio.create_task(coroutine, name=name)


async def _cancel(task: asyncio.Task[Any]) -> None:
    await cancel_and_wait(task)
