"""`python -m services.detector`: settings, logging, broker, `/health` + `/metrics`, until SIGTERM.

Startup: load the wallets file, create the consumer group (XGROUP CREATE orders.raw detector 0
MKSTREAM; an existing group is kept), start the batch subscriber under a consumer name unique to
this process (`<hostname>-<pid>-<random>`), so any number of replicas share the group. Shutdown
(SIGTERM or SIGINT): stop reading, let the in-flight batch finish and ack (up to
`DETECTOR_SHUTDOWN_GRACE_S`), process and ack whatever else is pending under this consumer (a read
that the stop cut short may have been delivered without reaching us), then leave the group (XGROUP
DELCONSUMER) if nothing is pending here any more; entries still pending (Redis failing during the
shutdown) stay in the group's pending list for a reclaimer. If the
subscriber stops on its own (e.g. the group was deleted), the process exits with an error so that
its supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import sys
from typing import Any

from services.detector.handlers import build_broker
from services.detector.pipeline import BatchProcessor, RawEntry
from services.detector.settings import DetectorSettings
from services.detector.state import DetectorState
from shared.logs import configure_logging, redact_url
from shared.models import TrackedWallet
from shared.ops import ops_server, run_until_stopped, stop_event
from shared.redis_streams import connect
from shared.streams import DETECTOR_GROUP
from shared.wallets import WalletFileError, load_wallets

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 1.0


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Detector:
    """One running detector replica: its Redis client, broker and subscriber."""

    def __init__(
        self, settings: DetectorSettings, wallets: list[TrackedWallet], consumer: str | None = None
    ) -> None:
        self.settings = settings
        self.consumer = consumer or consumer_name()
        self.client = connect(settings.redis_url)
        self.state = DetectorState(
            self.client,
            settings.streams,
            maxlen=settings.stream_maxlen,
            done_ttl_s=settings.detector_done_ttl_s,
            script_batch=settings.detector_script_batch,
            retry_s=settings.detector_state_retry_s,
        )
        self.processor = BatchProcessor(self.state, wallets, settings.rules())
        self.broker, self.subscriber = build_broker(
            settings.redis_url,
            settings.streams.orders_raw,
            self.consumer,
            self.processor,
            batch_size=settings.detector_batch_size,
            block_ms=settings.detector_block_ms,
            graceful_timeout=settings.detector_shutdown_grace_s,
        )
        self._stopping = False

    async def start(self) -> None:
        await self.state.ensure_group(DETECTOR_GROUP)
        await self.broker.start()
        log.info(
            "detector_started",
            extra={
                "consumer": self.consumer, "stream": self.settings.streams.orders_raw,
                "signals": self.settings.streams.signals, "group": DETECTOR_GROUP,
                "wallets": len(self.processor.wallets),
                "redis": redact_url(self.settings.redis_url),
            },
        )

    async def stop(self) -> None:
        """Finish the in-flight batch, then leave the group if nothing is pending here."""
        self._stopping = True
        try:
            await self.broker.stop()
            await self._drain_own_pending()
            await self._leave_group()
        finally:
            await self.client.aclose()

    async def _leave_group(self) -> None:
        try:
            released = await self.state.release_consumer(DETECTOR_GROUP, self.consumer)
        except Exception:
            log.exception("leave_group_failed", extra={"consumer": self.consumer})
            released = False
        log.info("detector_stopped", extra={"consumer": self.consumer, "released": released})

    async def _drain_own_pending(self) -> None:
        """Process what was delivered here but not acked, e.g. by a read cut short by the stop."""
        try:
            while pending := await self.state.own_pending(
                DETECTOR_GROUP, self.consumer, self.settings.detector_batch_size
            ):
                entries = [RawEntry(entry_id, fields) for entry_id, fields in pending if fields]
                if trimmed := len(pending) - len(entries):
                    log.warning("pending_entries_trimmed", extra={"count": trimmed})
                if entries:
                    await self.processor.process(entries)
                await self.state.ack(DETECTOR_GROUP, [entry_id for entry_id, _ in pending])
        except Exception:
            # Shutdown goes on: what stays pending is kept in the group for a reclaimer.
            log.exception("drain_failed", extra={"consumer": self.consumer})

    async def health(self) -> tuple[bool, dict[str, Any]]:
        redis_ok = await self.state.ping()
        running = bool(self.subscriber.running)
        return redis_ok and running, {
            "redis": redis_ok, "subscriber": running, "consumer": self.consumer,
        }

    async def watch(self) -> None:
        """Raise when the subscriber stops unasked: FastStream would not restart it."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            if not self.subscriber.running and not self._stopping:
                raise RuntimeError("the orders.raw subscriber stopped; see the errors logged above")


async def run(settings: DetectorSettings) -> None:
    wallets = load_wallets(settings.wallets_file)
    stop = stop_event()
    detector = Detector(settings, wallets)
    await detector.start()
    try:
        server = ops_server(detector.health, settings.ops_host, settings.ops_port)
        await run_until_stopped(stop, detector.watch(), servers=(server,))
    finally:
        await detector.stop()


def main() -> None:
    settings = DetectorSettings()
    configure_logging("detector", settings.log_level)
    try:
        asyncio.run(run(settings))
    except WalletFileError as exc:
        log.error("wallets_file_error", extra={"error": str(exc)})
        sys.exit(2)
