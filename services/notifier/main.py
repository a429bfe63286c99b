"""Wiring: settings, logging, Redis, the fan-out task and the HTTP server, until SIGTERM.

`python -m services.notifier` serves `/ws`, `/`, `/health` and `/metrics` on
NOTIFIER_HOST:NOTIFIER_PORT (OPS_PORT is unused: there is one port). On SIGTERM every client is
closed with 1001, then the process exits.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlsplit

from redis.exceptions import RedisError

from services.notifier.app import create_app
from services.notifier.fanout import Backlog, Fanout
from services.notifier.protocol import SHUTDOWN
from services.notifier.settings import NotifierSettings
from shared.logs import configure_logging, redact_url, register_secret
from shared.ops import http_server, run_until_stopped, stop_event
from shared.redis_streams import connect

log = logging.getLogger(__name__)

# How long shutdown waits for clients to take their 1001 close before the process goes anyway.
SHUTDOWN_GRACE_S = 5.0


class Notifier:
    def __init__(self, settings: NotifierSettings) -> None:
        self.settings = settings
        stream = settings.streams.signals
        # Short commands (backlog pages, health pings) share a pool; the reader has its own link.
        self.redis = connect(settings.redis_url)
        self.fanout = Fanout(settings.redis_url, stream, block_ms=settings.notifier_block_ms)
        self.app = create_app(
            self.fanout, Backlog(self.redis, stream), self.health,
            queue_size=settings.notifier_client_queue,
        )
        self.server = http_server(self.app, settings.notifier_host, settings.notifier_port)
        # permessage-deflate would compress every message once per client (tens of microseconds
        # each, the largest per-client cost by far); signals are small, so send them as they are.
        self.server.config.ws_per_message_deflate = False

    async def health(self) -> tuple[bool, dict[str, Any]]:
        try:
            redis_ok = bool(await asyncio.wait_for(self.redis.ping(), 2))
        except (RedisError, OSError, TimeoutError):
            redis_ok = False
        reader = self.fanout.status
        return redis_ok and reader == "reading", {
            "redis": "ok" if redis_ok else "unreachable",
            "reader": reader,
            "last_id": self.fanout.last_id,
            "clients": self.fanout.client_count,
        }

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then close every client with 1001 and return."""
        closed = asyncio.Event()

        async def close_clients_on_stop() -> None:
            await stop.wait()
            await self.fanout.close_all(SHUTDOWN, SHUTDOWN_GRACE_S)
            closed.set()

        try:
            await run_until_stopped(
                closed, self.fanout.run(), close_clients_on_stop(), servers=(self.server,)
            )
        finally:
            # run_until_stopped cancels uvicorn mid-loop, before it closes its listening sockets.
            for listener in getattr(self.server, "servers", ()):
                listener.close()
            await self.redis.aclose()


def main() -> None:
    settings = NotifierSettings()
    configure_logging("notifier", settings.log_level)
    register_secret(urlsplit(settings.redis_url).password)
    log.info("notifier_starting", extra={
        "listen": f"{settings.notifier_host}:{settings.notifier_port}",
        "redis": redact_url(settings.redis_url),
        "stream": settings.streams.signals,
        "client_queue": settings.notifier_client_queue,
    })
    asyncio.run(_run(settings))


async def _run(settings: NotifierSettings) -> None:
    await Notifier(settings).run(stop_event())
