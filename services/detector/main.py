"""`python -m services.detector`: settings, logging, broker, `/health` + `/metrics`, until SIGTERM.

Startup: read the rules (env over `DETECTOR_RULES_FILE`) and the wallets file, create the consumer
group (XGROUP CREATE orders.raw detector 0 MKSTREAM; an existing group is kept), load the tracked
wallets from the wallet registry (seeded from the file the first time) and follow its changes, so
label, score and added or removed wallets apply without a restart. Then start the batch subscriber
under a consumer name unique to this process (`<hostname>-<pid>-<random>`), so any number of
replicas share the group, and the reclaim loop (`reclaim.py`) that takes over what dead replicas
left pending.

Shutdown (SIGTERM or SIGINT): stop reading, let the in-flight batch finish and ack (up to
`DETECTOR_SHUTDOWN_GRACE_S`), process and ack whatever else is pending under this consumer (a read
that the stop cut short may have been delivered without reaching us), stop the reclaim loop and the
registry follower, then leave the group (XGROUP DELCONSUMER) if nothing is pending here any more;
entries still pending (Redis failing during the shutdown) stay in the group's pending list for a
reclaimer. If the subscriber or a background loop stops on its own (e.g. the group was deleted),
the process exits with an error so that its supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import sys
from collections.abc import Coroutine
from typing import Any

from pydantic import ValidationError

from services.detector.handlers import build_broker
from services.detector.pipeline import BatchProcessor, RawEntry
from services.detector.reclaim import Reclaimer
from services.detector.rules import describe
from services.detector.settings import DetectorSettings, RulesFileError
from services.detector.state import DetectorState
from shared import wallet_registry
from shared.logs import configure_logging, redact_url
from shared.models import TrackedWallet
from shared.ops import ops_server, run_until_stopped, settle_heap, stop_event
from shared.redis_streams import connect
from shared.streams import DETECTOR_GROUP
from shared.wallets import WalletFileError, load_wallets

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 1.0
TASK_STOP_S = 5.0
TASK_CANCEL_EVERY_S = 0.2


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Detector:
    """One running detector replica: its Redis client, broker, subscriber and background loops.

    `wallets` seeds the wallet registry when it is empty; the registry is the truth after that.
    """

    def __init__(
        self, settings: DetectorSettings, wallets: list[TrackedWallet], consumer: str | None = None
    ) -> None:
        self.settings = settings
        self.seed_wallets = wallets
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
        self.processor = BatchProcessor(
            self.state,
            wallets,
            settings.rules(),
            consumer=self.consumer,
            wait_s=settings.detector_wait_s,
            touch_every_s=settings.touch_every_s,
        )
        self.reclaimer = Reclaimer(
            self.state,
            self.processor,
            group=DETECTOR_GROUP,
            consumer=self.consumer,
            min_idle_ms=settings.detector_claim_min_idle_ms,
            interval_s=settings.detector_reclaim_interval_s,
            max_deliveries=settings.detector_max_deliveries,
            batch_size=settings.detector_batch_size,
        )
        self.broker, self.subscriber = build_broker(
            settings.redis_url,
            settings.streams.orders_raw,
            self.consumer,
            self.processor,
            self.state,
            batch_size=settings.detector_batch_size,
            block_ms=settings.detector_block_ms,
            graceful_timeout=settings.detector_shutdown_grace_s,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self) -> None:
        await self.state.ensure_group(DETECTOR_GROUP)
        wallets, last_id = await wallet_registry.load(
            self.client, self.settings.streams, self.seed_wallets
        )
        self.processor.set_wallets(wallets)
        await self.broker.start()
        self._tasks = [
            self._spawn(self.reclaimer.run(), "reclaim"),
            self._spawn(self.follow_wallets(last_id), "wallets"),
        ]
        log.info(
            "detector_started",
            extra={
                "consumer": self.consumer,
                "stream": self.settings.streams.orders_raw,
                "signals": self.settings.streams.signals,
                "group": DETECTOR_GROUP,
                "wallets": len(self.processor.wallets),
                "rules": describe(self.processor.settings),
                "rules_file": self.settings.detector_rules_file or None,
                "redis": redact_url(self.settings.redis_url),
            },
        )

    @staticmethod
    def _spawn(work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        return asyncio.create_task(work, name=f"detector-{name}")

    async def follow_wallets(self, after_id: str) -> None:
        """Apply every change of the wallet registry as it comes."""
        async for change in wallet_registry.follow(self.client, self.settings.streams, after_id):
            if change.op == "upsert":
                self.processor.upsert_wallet(change.wallet)
            else:
                self.processor.remove_wallet(change.wallet.address)
            log.info(
                "wallet_changed",
                extra={
                    "op": change.op,
                    "wallet": change.wallet.address,
                    "label": change.wallet.label,
                    "score": change.wallet.score,
                    "wallets": len(self.processor.wallets),
                },
            )

    async def stop(self) -> None:
        """Finish the in-flight batch, then leave the group if nothing is pending here."""
        self._stopping = True
        log.info("detector_stopping", extra={"consumer": self.consumer})
        try:
            await self.broker.stop()
            log.debug("stop_phase", extra={"done": "broker"})
            await self._drain_own_pending()
            log.debug("stop_phase", extra={"done": "drain"})
            await self._stop_tasks()
            log.debug("stop_phase", extra={"done": "tasks"})
            await self._leave_group()
        finally:
            await self.client.aclose()

    async def _stop_tasks(self) -> None:
        """Cancel the background loops, again and again until they end (bounded).

        One cancel is not always enough: a cancellation that lands as a blocking Redis read times
        out can come back as a timeout error, which the loops treat as a blip and carry on.
        """
        deadline = asyncio.get_running_loop().time() + TASK_STOP_S
        pending = {task for task in self._tasks if not task.done()}
        while pending and asyncio.get_running_loop().time() < deadline:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=TASK_CANCEL_EVERY_S)
        if pending:
            log.warning("loops_not_stopped", extra={"tasks": sorted(t.get_name() for t in pending)})
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.warning(
                    "loop_failed", extra={"task": task.get_name(), "error": repr(task.exception())}
                )

    async def _leave_group(self) -> None:
        try:
            released = await self.state.release_consumer(DETECTOR_GROUP, self.consumer)
        except Exception:
            log.exception("leave_group_failed", extra={"consumer": self.consumer})
            released = False
        log.info("detector_stopped", extra={"consumer": self.consumer, "released": released})

    async def _drain_own_pending(self) -> None:
        """Process what was delivered here but not acked, e.g. by a read cut short by the stop."""
        after = "0"
        try:
            while pending := await self.state.own_pending(
                DETECTOR_GROUP, self.consumer, self.settings.detector_batch_size, after
            ):
                entries = [RawEntry(entry_id, fields) for entry_id, fields in pending if fields]
                trimmed = [entry_id for entry_id, fields in pending if not fields]
                if trimmed:
                    log.warning("pending_entries_trimmed", extra={"count": len(trimmed)})
                settled = list(trimmed)
                if entries:
                    outcome = await self.processor.process(
                        entries, wait_s=self.settings.detector_shutdown_grace_s
                    )
                    settled += outcome.settled
                await self.state.ack(DETECTOR_GROUP, settled)
                await self.state.forget_errors(settled)
                # What is still waiting stays pending for a reclaimer; read on past it.
                after = pending[-1][0]
        except Exception:
            # Shutdown goes on: what stays pending is kept in the group for a reclaimer.
            log.exception("drain_failed", extra={"consumer": self.consumer})

    async def health(self) -> tuple[bool, dict[str, Any]]:
        redis_ok = await self.state.ping()
        running = bool(self.subscriber.running)
        loops = all(not task.done() for task in self._tasks)
        return redis_ok and running and loops, {
            "redis": redis_ok,
            "subscriber": running,
            "loops": loops,
            "consumer": self.consumer,
            "wallets": len(self.processor.wallets),
        }

    async def watch(self) -> None:
        """Raise when the subscriber or a loop stops unasked: nothing would restart it."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            if self._stopping:
                continue
            if not self.subscriber.running:
                raise RuntimeError("the orders.raw subscriber stopped; see the errors logged above")
            for task in self._tasks:
                if task.done():
                    error = None if task.cancelled() else task.exception()
                    raise RuntimeError(f"{task.get_name()} stopped: {error!r}")


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
    try:
        settings = DetectorSettings()
    except (RulesFileError, ValidationError) as exc:
        configure_logging("detector", "INFO")
        log.error("settings_error", extra={"error": str(exc)})
        sys.exit(2)
    configure_logging("detector", settings.log_level)
    try:
        settle_heap()
        asyncio.run(run(settings))
    except WalletFileError as exc:
        log.error("wallets_file_error", extra={"error": str(exc)})
        sys.exit(2)
