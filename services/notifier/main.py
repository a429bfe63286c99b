"""Wiring: settings, logging, Redis, the fan-out, the webhooks consumer and the HTTP server.

`python -m services.notifier` serves `/ws`, `/`, `/api/status`, `/health` and `/metrics` on
NOTIFIER_HOST:NOTIFIER_PORT (OPS_PORT is unused: there is one port), and delivers webhooks when
`WEBHOOKS_FILE` names endpoints. A bad webhooks file stops the start with a clear message (exit
code 2). On SIGTERM every client is closed with 1001 and webhook deliveries in flight get a few
seconds to finish (the rest stay pending for another replica), then the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sys
import time
from typing import Any
from urllib.parse import urlsplit

from redis.exceptions import RedisError

from services.notifier.app import FeedPolicy, create_app
from services.notifier.auth import ClientLimits, ConnectionSlots, Site, Tokens
from services.notifier.dashboard_api import DashboardData, StoreReader
from services.notifier.fanout import Backlog, Fanout
from services.notifier.market_tags import MarketTags
from services.notifier.protocol import SHUTDOWN
from services.notifier.settings import NotifierSettings
from services.notifier.status import describe_feed
from services.notifier.webhooks.config import Webhook, WebhookConfigError, load_webhooks
from services.notifier.webhooks.consumer import WebhookConsumer
from services.notifier.webhooks.delivery import RetryPolicy
from shared.consumer import consumer_name
from shared.logs import configure_logging, redact_url, register_secret
from shared.ops import http_server, run_until_stopped, settle_heap, stop_event
from shared.source_lag import read_source_lag
from shared.stream_metrics import public_streams, track_streams

log = logging.getLogger(__name__)

# How long shutdown waits for clients to take their 1001 close, and for webhook deliveries in
# flight to finish, before the process goes anyway.
SHUTDOWN_GRACE_S = 5.0
# uvicorn's own frame limit: above ours, so an oversized message gets our close reason.
_UVICORN_WS_MAX = 1 << 20


class Notifier:
    def __init__(self, settings: NotifierSettings, consumer: str | None = None) -> None:
        self.settings = settings
        stream = settings.streams.signals
        # Short commands (backlog pages, health pings) share a pool; the reader has its own link.
        self.redis = settings.redis()
        self.fanout = Fanout(
            settings.redis_url,
            stream,
            block_ms=settings.notifier_block_ms,
            cluster=settings.redis_cluster,
        )
        self.tokens = Tokens(settings.notifier_tokens)
        self.market_tags = _market_tags(settings)
        self.hooks = _webhooks(settings)
        self.webhooks: WebhookConsumer | None = None
        if self.hooks:
            self.webhooks = WebhookConsumer(
                settings.redis_url,
                settings.streams,
                self.hooks,
                RetryPolicy(
                    settings.webhook_max_attempts,
                    settings.webhook_backoff_s,
                    settings.webhook_backoff_max_s,
                ),
                consumer=consumer or consumer_name(),
                timeout_s=settings.webhook_timeout_s,
                concurrency=settings.webhook_concurrency,
                block_ms=settings.notifier_block_ms,
                claim_idle_ms=settings.webhook_claim_idle_ms,
                max_deliveries=settings.webhook_max_deliveries,
                grace_s=SHUTDOWN_GRACE_S,
                cluster=settings.redis_cluster,
                market_tags=self.market_tags,
            )
        self.slots = ConnectionSlots(settings.notifier_max_clients_per_token)
        self.limits = ClientLimits(
            settings.notifier_max_clients, settings.notifier_max_clients_per_ip
        )
        policy = FeedPolicy(
            tokens=self.tokens,
            slots=self.slots,
            queue_size=settings.notifier_client_queue,
            max_message_bytes=settings.notifier_max_message_bytes,
            max_filter_values=settings.notifier_max_filter_values,
            setup_timeout_s=settings.notifier_setup_timeout_s,
            site=Site(settings.allowed_hosts(), settings.allowed_origins()),
            limits=self.limits,
            max_replay_entries=settings.notifier_max_replay_entries,
            market_tags=self.market_tags,
        )
        # The dashboard's pictures: history from the store, source lags from Redis.
        self.store_reader = StoreReader(
            settings.store_api_url, settings.store_api_timeout_s, settings.store_api_token
        )
        dashboard = DashboardData(
            self.store_reader,
            functools.partial(read_source_lag, self.redis, settings.streams),
            self.tokens,
        )
        self.app = create_app(
            self.fanout,
            Backlog(self.redis, stream),
            self.health,
            self.status,
            policy,
            dashboard=dashboard,
        )
        self.server = http_server(self.app, settings.notifier_host, settings.notifier_port)
        # permessage-deflate would compress every message once per client (tens of microseconds
        # each, the largest per-client cost by far); signals are small, so send them as they are.
        self.server.config.ws_per_message_deflate = False
        self.server.config.ws_max_size = max(
            _UVICORN_WS_MAX, settings.notifier_max_message_bytes + 1
        )

    async def health(self) -> tuple[bool, dict[str, Any]]:
        try:
            redis_ok = bool(await asyncio.wait_for(self.redis.ping(), 2))
        except (RedisError, OSError, TimeoutError):
            redis_ok = False
        reader = self.fanout.status
        details: dict[str, Any] = {
            "redis": "ok" if redis_ok else "unreachable",
            "reader": reader,
            "last_id": self.fanout.last_id,
            "clients": self.fanout.client_count,
        }
        ok = redis_ok and reader == "reading"
        if self.webhooks is not None:
            details["webhooks"] = self.webhooks.status
            ok = ok and self.webhooks.status == "reading"
        return ok, details

    async def status(self) -> dict[str, Any]:
        """The pipeline's state for the dashboard (`/api/status`)."""
        now = time.time()
        feed: dict[str, Any] | None
        try:
            fields: Any = await asyncio.wait_for(
                self.redis.hgetall(self.settings.streams.feed_status_key()), 2
            )
            feed = describe_feed(fields, now)
            redis = "ok"
        except (RedisError, OSError, TimeoutError):
            feed, redis = None, "unreachable"
        webhooks = (
            None
            if self.webhooks is None
            else {
                "endpoints": len(self.hooks),
                "status": self.webhooks.status,
                "in_flight": self.webhooks.in_flight,
            }
        )
        return {
            "now": now,
            "redis": redis,
            "feed": feed,
            "notifier": {
                "reader": self.fanout.status,
                "last_id": self.fanout.last_id,
                "clients": self.fanout.client_count,
                "auth": not self.tokens.open,
            },
            "webhooks": webhooks,
        }

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then close every client with 1001 and return."""
        closed = asyncio.Event()

        async def lifecycle() -> None:
            webhooks = (
                None if self.webhooks is None else asyncio.ensure_future(self.webhooks.run(stop))
            )
            stopping = asyncio.ensure_future(stop.wait())
            try:
                running = [task for task in (webhooks, stopping) if task is not None]
                await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                if webhooks is not None and webhooks.done():
                    webhooks.result()
                await self.fanout.close_all(SHUTDOWN, SHUTDOWN_GRACE_S)
                if webhooks is not None:
                    await webhooks
            finally:
                for task in (webhooks, stopping):
                    if task is not None:
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await asyncio.gather(task, return_exceptions=True)
            closed.set()

        try:
            # Stream gauges (lag, pending, length) are the same from any replica; the notifier runs
            # in every deployment, so it is the one that publishes them.
            tracker = track_streams(self.redis, public_streams(self.settings.streams), closed)
            await run_until_stopped(
                closed, self.fanout.run(), lifecycle(), tracker, servers=(self.server,)
            )
        finally:
            # run_until_stopped cancels uvicorn mid-loop, before it closes its listening sockets.
            for listener in getattr(self.server, "servers", ()):
                listener.close()
            await self.redis.aclose()
            await self.store_reader.aclose()
            if self.market_tags is not None:
                await self.market_tags.aclose()


def _market_tags(settings: NotifierSettings) -> MarketTags | None:
    if not settings.notifier_gamma_url:
        return None
    return MarketTags(
        settings.notifier_gamma_url,
        timeout_s=settings.notifier_tags_timeout_s,
        max_markets=settings.notifier_tags_cache,
        ttl_s=settings.notifier_tags_ttl_s,
    )


def _webhooks(settings: NotifierSettings) -> list[Webhook]:
    if settings.webhooks_file is None:
        return []
    # load_webhooks registers each endpoint's secrets (a Discord or Slack URL, a secret, a bot
    # token) for scrubbing; Telegram's URL is the public API's, not one of them.
    return load_webhooks(settings.webhooks_file)


def main() -> None:
    settings = NotifierSettings()
    configure_logging("notifier", settings.log_level)
    register_secret(urlsplit(settings.redis_url).password)
    for token in settings.notifier_tokens:
        register_secret(token.get_secret_value())
    if settings.store_api_token is not None:
        register_secret(settings.store_api_token.get_secret_value())
    log.info(
        "notifier_starting",
        extra={
            "listen": f"{settings.notifier_host}:{settings.notifier_port}",
            "redis": redact_url(settings.redis_url),
            "stream": settings.streams.signals,
            "client_queue": settings.notifier_client_queue,
            "tokens": len(settings.notifier_tokens),
            "allowed_hosts": list(settings.allowed_hosts()),
            "allowed_origins": list(settings.allowed_origins()),
            "webhooks_file": str(settings.webhooks_file or ""),
        },
    )
    if not settings.notifier_tokens:
        log.warning(
            "notifier_open",
            extra={
                "detail": "NOTIFIER_TOKENS is empty: /ws serves every signal to anyone who can "
                "reach this port"
            },
        )
    try:
        settle_heap()
        asyncio.run(_run(settings))
    except WebhookConfigError as exc:
        log.error("webhooks_file_invalid", extra={"error": str(exc)})
        sys.exit(2)


async def _run(settings: NotifierSettings) -> None:
    notifier = Notifier(settings)
    if notifier.hooks:
        log.info(
            "webhooks_loaded",
            extra={
                "endpoints": [
                    {
                        "name": hook.name,
                        "preset": hook.preset.value,
                        "filters": hook.filters.describe(),
                    }
                    for hook in notifier.hooks
                ]
            },
        )
    await notifier.run(stop_event())
