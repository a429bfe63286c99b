"""One ingestor run: startup checks, then the source, the publisher, the status writer and the
ops server side by side until stopped.

Shutdown order matters: the source stops first (closing the socket, so nothing new arrives), then
the publisher flushes what is queued (up to SHUTDOWN_FLUSH_TIMEOUT_S), then the rest stops and a
last status (`stopped`) is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Coroutine
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.ingestor import metrics
from services.ingestor.feed_status import ConnectionState, FeedStatus, evaluate_health
from services.ingestor.publisher import Publisher
from services.ingestor.settings import IngestorSettings
from services.ingestor.sources.dome_ws import SOURCE, DomeWebSocketSource
from services.ingestor.subscriptions import SubscriptionPlanError, plan_subscriptions
from shared.ops import ops_server
from shared.redis_streams import connect
from shared.wallets import WalletFileError, load_wallets

log = logging.getLogger(__name__)

FINAL_STATUS_TIMEOUT_S = 2.0


class StartupError(Exception):
    """A configuration the ingestor cannot run with; the message says what to change."""


def plan(settings: IngestorSettings) -> list[tuple[str, ...]]:
    """The subscriptions to make, or a StartupError saying why this configuration cannot run."""
    if not settings.dome_use_websocket:
        raise StartupError(
            "DOME_USE_WEBSOCKET=false selects REST polling, which this version of the ingestor "
            "does not have; set DOME_USE_WEBSOCKET=true"
        )
    try:
        wallets = load_wallets(settings.wallets_path())
        return plan_subscriptions(
            [wallet.address for wallet in wallets],
            settings.dome_wallets_per_subscription,
            settings.dome_max_subscriptions,
        )
    except (WalletFileError, SubscriptionPlanError) as exc:
        raise StartupError(str(exc)) from exc


class Ingestor:
    def __init__(self, settings: IngestorSettings) -> None:
        subscriptions = plan(settings)
        self.settings = settings
        self.redis: aioredis.Redis = connect(settings.redis_url)
        self.status = FeedStatus(source=SOURCE, wallets=sum(len(chunk) for chunk in subscriptions))
        self.publisher = Publisher(
            self.redis,
            settings.streams,
            stream_maxlen=settings.stream_maxlen,
            dedupe_ttl_s=settings.dedupe_ttl_s,
            queue_size=settings.publish_queue_size,
            batch_max=settings.publish_batch_max,
        )
        self.source = DomeWebSocketSource(settings, subscriptions, self.publisher, self.status)
        self.ops = ops_server(self.health, settings.ops_host, settings.ops_port)

    async def health(self) -> tuple[bool, dict[str, Any]]:
        redis_ok = await self.publisher.ping()
        ok, details = evaluate_health(
            self.status,
            redis_ok=redis_ok,
            now=time.time(),
            max_down_s=self.settings.health_max_disconnected_s,
        )
        details["queued"] = self.publisher.unfinished
        return ok, details

    async def run(self, stop: asyncio.Event) -> int:
        """Run until `stop` is set or a part fails; returns how many items could not be flushed."""
        source = _task(self.source.run(), "source")
        publisher = _task(self.publisher.run(), "publisher")
        status = _task(self._write_status_forever(), "status")
        server = _task(self.ops.serve(), "ops")
        stopper = _task(stop.wait(), "stop")
        parts = (source, publisher, status, server)
        done, _ = await asyncio.wait((*parts, stopper), return_when=asyncio.FIRST_COMPLETED)
        log.info("stopping", extra={"cause": ",".join(sorted(t.get_name() for t in done))})

        await _cancel(source)
        self.status.mark_down(ConnectionState.STOPPED, "", time.time())
        left = await self.publisher.flush(self.settings.shutdown_flush_timeout_s)
        if left:
            log.error("unpublished_at_shutdown", extra={"items": left})
        for task in (publisher, status, stopper):
            await _cancel(task)
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await asyncio.wait_for(self._write_status(), FINAL_STATUS_TIMEOUT_S)
        self.ops.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await server
        await self.redis.aclose()
        for task in parts:
            if task in done and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return left

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
        metrics.SECONDS_SINCE_LAST_EVENT.labels(SOURCE).set(
            self.status.seconds_since_last_event(now)
        )
        fields = self.status.as_fields(
            now,
            published=self.publisher.published,
            duplicates=self.publisher.duplicates,
            queued=self.publisher.unfinished,
        )
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
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(task, return_exceptions=True)
