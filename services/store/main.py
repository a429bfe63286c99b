"""Wiring: settings, logging, Postgres, one consumer group per stream, the tracked wallets, and
one HTTP server for the API, /health and /metrics.

Start: the HTTP server at once (/health red, the API 503 until ready), migrations (waiting for
Postgres as long as it takes), the tracked-wallets sync (`wallets.py`), then group `store` on
`orders.raw` and on `signals` through the shared runtime (`shared/consumer.py`: reads, acks,
reclaims while Postgres is up, dead-letters after `STORE_MAX_DELIVERIES`, waits out a Redis
restart), each handing its batches to `BatchStore.store`, and the wallet follower; the
validator (`validator.py`: markouts and settlements of the signals) runs beside them as a task of
its own, with its own small pool.

SIGTERM: the batch in flight finishes (commit, XACK) and what is still pending here is stored once
more, within `STORE_SHUTDOWN_TIMEOUT_S`; a batch waiting for an unavailable Postgres is abandoned
unacknowledged (it stays pending and is reclaimed later). Then the consumer leaves each group where
it holds nothing pending, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from redis.exceptions import RedisError

from services.store.api import ApiContext, Exports, create_app, digest
from services.store.batches import BatchStore, Feed, feeds
from services.store.database import Database, Stopping
from services.store.schema import load
from services.store.settings import StoreSettings
from services.store.validator import ValidationConfig, Validator
from services.store.wallet_quality_refresh import QualityConfig, QualityRefresher
from services.store.wallets import Wallets
from shared import layout
from shared.consumer import ConsumerGroup, Entry, GroupConfig, Handled, consumer_name
from shared.logs import configure_logging, redact_url, register_secret
from shared.ops import http_server, settle_heap, stop_event
from shared.streams import STORE_GROUP

log = logging.getLogger(__name__)

# How often Postgres is pinged so /health follows it even when no batch is flowing.
DB_WATCH_EVERY_S = 1.0


class Store:
    def __init__(self, settings: StoreSettings, consumer: str | None = None) -> None:
        self.settings = settings
        self.consumer = consumer or consumer_name()
        self.feeds = feeds(settings.streams)
        self.db = Database(
            settings.database_url,
            pool_size=settings.store_pool_size,
            timeout=settings.store_db_timeout_s,
            retry_min=settings.store_retry_min_s,
            retry_max=settings.store_retry_max_s,
        )
        # The API's own pool, so queries and exports never queue behind batch writes (or the
        # reverse); it fails fast instead of retrying.
        self.api_db = Database(
            settings.database_url,
            pool_size=settings.store_api_pool_size,
            timeout=settings.store_db_timeout_s,
            retry_min=settings.store_retry_min_s,
            retry_max=settings.store_retry_max_s,
        )
        self.redis = settings.redis()
        self.wallets = Wallets(
            self.db, self.api_db, self.redis, settings.streams, settings.wallets_file
        )
        self.batches = BatchStore(self.db, self.redis)
        self.validator = self._validator() if settings.validation_enabled else None
        self.quality = self._quality() if settings.wallet_quality_enabled else None
        self.groups = [self._group(feed) for feed in self.feeds]
        self.schema: list[str] = []
        self.running = False
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._consuming: list[asyncio.Task[None]] = []

    def _validator(self) -> Validator:
        """The validation task, on a small pool of its own: its reads scan signals and wait on
        HTTP, and must never hold a connection the batch writes or the API are waiting for."""
        s = self.settings
        db = Database(
            s.database_url,
            pool_size=2,
            timeout=s.store_db_timeout_s,
            retry_min=s.store_retry_min_s,
            retry_max=s.store_retry_max_s,
        )
        return Validator(db, ValidationConfig.of(s))

    def _quality(self) -> QualityRefresher:
        """The wallet-quality refresher, on one connection of its own: a tick holds it (and its
        advisory lock) while it waits on the Data API."""
        s = self.settings
        db = Database(
            s.database_url,
            pool_size=1,
            timeout=s.store_db_timeout_s,
            retry_min=s.store_retry_min_s,
            retry_max=s.store_retry_max_s,
        )
        return QualityRefresher(db, self.wallets, QualityConfig.of(s))

    def _group(self, feed: Feed) -> ConsumerGroup:
        settings = self.settings
        config = GroupConfig(
            stream=feed.stream,
            group=STORE_GROUP,
            consumer=self.consumer,
            dead_stream=feed.dead_stream,
            origin="store",
            batch_size=settings.store_batch_max,
            block_ms=settings.store_block_ms,
            claim_min_idle_ms=settings.store_claim_idle_ms,
            reclaim_every_s=settings.store_claim_every_s,
            max_deliveries=settings.store_max_deliveries,
            drain_s=settings.store_shutdown_timeout_s,
            max_deliveries_setting="STORE_MAX_DELIVERIES",
        )
        return ConsumerGroup(
            self.redis, config, self._handler(feed), can_reclaim=lambda: self.db.up
        )

    def _handler(self, feed: Feed) -> Callable[[list[Entry]], Awaitable[Handled]]:
        linger_s = self.settings.store_linger_ms / 1000

        async def store(batch: list[Entry]) -> Handled:
            try:
                await self.batches.store(feed, batch)
            except Stopping:
                # Shutting down while Postgres is away: nobody's fault, nothing settled.
                log.warning(
                    "batch_left_pending", extra={"stream": feed.stream, "count": len(batch)}
                )
                return Handled([])
            if linger_s and len(batch) < self.settings.store_batch_max:
                # What arrives meanwhile makes the next transaction bigger instead of several.
                await asyncio.sleep(linger_s)
            return Handled([entry_id for entry_id, _ in batch])

        return store

    async def start(self) -> None:
        """Migrate, sync the wallets, start consuming. Raises `Stopping` if stopped meanwhile."""
        migrations = load()
        applied = await self.db.migrate(migrations, self.settings.store_migration_timeout_s)
        self.schema = [m.version for m in migrations]
        log.info("schema_ready", extra={"applied_now": applied, "versions": self.schema})
        await self.wallets.sync()
        await layout.claim(self.redis, self.settings.streams)
        for group in self.groups:
            await group.ensure_group()
        self._tasks = [
            asyncio.create_task(self.db.watch(DB_WATCH_EVERY_S)),
            asyncio.create_task(self.wallets.follow(self._stop)),
        ]
        if self.validator is not None:
            self._tasks.append(asyncio.create_task(self.validator.run(self._stop)))
        if self.quality is not None:
            self._tasks.append(asyncio.create_task(self.quality.run(self._stop)))
        self._consuming = [asyncio.create_task(group.run(self._stop)) for group in self.groups]
        self.running = True
        log.info(
            "store_started",
            extra={
                "consumer": self.consumer,
                "streams": [f.stream for f in self.feeds],
                "database": redact_url(self.settings.database_url),
            },
        )

    async def stop(self) -> None:
        self.running = False
        self._stop.set()
        # The groups drain what is pending here and leave; a Postgres that is away ends the
        # drain at once (`Stopping`) rather than holding the shutdown.
        if not self.db.up:
            self.db.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                asyncio.gather(*self._consuming), self.settings.store_shutdown_timeout_s + 5
            )
        self.db.stop()
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.db.close()
        await self.api_db.close()
        if self.validator is not None:
            await self.validator.close()
        if self.quality is not None:
            await self.quality.close()
        await self.redis.aclose()
        log.info("store_stopped", extra={"consumer": self.consumer})

    async def run(self, stop: asyncio.Event) -> None:
        """Start, run until `stop` is set, stop. A stop during startup interrupts the wait for
        Postgres."""
        starting = asyncio.create_task(self.start())
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                self.db.stop()
            with contextlib.suppress(Stopping):
                await starting
                await stopped
        finally:
            stopped.cancel()
            await self.stop()

    def api(self) -> ApiContext:
        settings = self.settings
        token = settings.store_api_token
        return ApiContext(
            db=self.api_db,
            wallets=self.wallets,
            token_digest=None if token is None else digest(token.get_secret_value()),
            read_auth=settings.store_api_read_auth,
            allowed_hosts=settings.allowed_hosts,
            exports=Exports(settings.store_csv_max_streams, settings.store_csv_max_seconds),
        )

    async def health(self) -> tuple[bool, dict[str, Any]]:
        try:
            redis_ok = bool(await asyncio.wait_for(self.redis.ping(), timeout=1.0))
        except (RedisError, OSError):
            redis_ok = False
        consuming = self.running and all(
            not task.done() and group.health.redis_down_since is None
            for task, group in zip(self._consuming, self.groups, strict=True)
        )
        details: dict[str, Any] = {
            "consuming": consuming,
            "postgres": "up" if self.db.up else "down",
            "redis": "up" if redis_ok else "down",
            "consumer": self.consumer,
            "schema": self.schema[-1] if self.schema else None,
        }
        if not self.db.up and self.db.last_error:
            details["postgres_error"] = self.db.last_error
        return consuming and self.db.up and redis_ok, details


async def run(settings: StoreSettings) -> None:
    stop = stop_event()
    store = Store(settings)
    app = create_app(store.api(), store.health, settings.store_api_max_body_bytes)
    ops = http_server(app, settings.ops_host, settings.ops_port)
    serving = asyncio.create_task(ops.serve())
    try:
        await store.run(stop)
    finally:
        ops.should_exit = True
        await serving


def main() -> None:
    settings = StoreSettings()
    for url in (settings.database_url, settings.redis_url):
        register_secret(urlsplit(url).password)
    if settings.store_api_token is not None:
        register_secret(settings.store_api_token.get_secret_value())
    configure_logging("store", settings.log_level)
    settle_heap()
    try:
        asyncio.run(run(settings))
    except layout.LayoutMismatch as exc:
        log.error("layout_mismatch", extra={"error": str(exc)})
        sys.exit(2)
