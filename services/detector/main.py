"""`python -m services.detector`: settings, logging, the consumer group, `/health` + `/metrics`,
until SIGTERM.

Startup: read the rules (env over `DETECTOR_RULES_FILE`) and the wallets file, load the tracked
wallets from the wallet registry (seeded from the file the first time) and follow its changes, so
label, score and added or removed wallets apply without a restart. Then join group `detector` on
`orders.raw` under a consumer name unique to this process through the shared runtime
(`shared/consumer.py`), which reads batches, hands them to `BatchProcessor.process`, acks what it
settled, keeps slow batches claimed, reclaims what dead replicas left pending, dead-letters an entry
delivered `DETECTOR_MAX_DELIVERIES` times, and waits out a Redis restart.

Positions (`positions.py`, with `DETECTOR_SEED_POSITIONS`): before consuming (for up to
`DETECTOR_SEED_STARTUP_S`, then in the background), every tracked wallet not seeded yet gets its
positions from the Data API's `/positions` (`DATA_API_URL`), and so does a wallet added live;
seedings other replicas made are found in Redis, where every decision reads them.

Shutdown (SIGTERM or SIGINT): stop reading, let the in-flight batch finish, process whatever else
is pending under this consumer (up to `DETECTOR_SHUTDOWN_GRACE_S`), then leave the group if nothing
is pending here any more. If the registry follower stops on its own, the process exits with an
error so that its supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import ValidationError

from services.detector.forward import Forwarder
from services.detector.pipeline import BatchProcessor, RawEntry
from services.detector.positions import Seeder
from services.detector.rules import describe
from services.detector.settings import DetectorSettings, RulesFileError
from services.detector.state import TRANSIENT, DetectorState
from shared import layout, wallet_registry
from shared.consumer import ConsumerGroup, Entry, GroupConfig, Handled, consumer_name
from shared.logs import configure_logging, redact_url
from shared.models import TrackedWallet
from shared.ops import ops_server, run_until_stopped, settle_heap, stop_event
from shared.streams import DETECTOR_GROUP, Lane, partition_of
from shared.tasks import cancel_and_wait
from shared.wallets import WalletFileError, load_wallets

log = logging.getLogger(__name__)


@dataclass
class LaneWorker:
    """One lane of the detector (shared/streams.py): its state, its processor and its group."""

    lane: Lane
    state: DetectorState
    processor: BatchProcessor
    group: ConsumerGroup


class Detector:
    """One detector replica: the registry follower and a consumer group per lane around its
    processor (one lane, or one per partition with their outboxes' forwarders).

    `wallets` seeds the wallet registry when it is empty; the registry is the truth after that.
    """

    def __init__(
        self, settings: DetectorSettings, wallets: list[TrackedWallet], consumer: str | None = None
    ) -> None:
        self.settings = settings
        self.seed_wallets = wallets
        self.consumer = consumer or consumer_name()
        self.client = settings.redis()
        self.workers = [self._worker(lane, wallets) for lane in settings.streams.lanes()]
        self.forwarders = [
            self._forwarder(worker.lane) for worker in self.workers if worker.lane.outbox
        ]
        self.seeder = self._seeder() if settings.detector_seed_positions else None
        self.seeding: set[asyncio.Task[None]] = set()

    @property
    def processor(self) -> BatchProcessor:
        """The first lane's processor (the only one without partitions)."""
        return self.workers[0].processor

    @property
    def state(self) -> DetectorState:
        return self.workers[0].state

    @property
    def group(self) -> ConsumerGroup:
        return self.workers[0].group

    def _worker(self, lane: Lane, wallets: list[TrackedWallet]) -> LaneWorker:
        settings = self.settings
        state = DetectorState(
            self.client,
            settings.streams,
            maxlen=settings.stream_maxlen,
            done_ttl_s=settings.detector_done_ttl_s,
            script_batch=settings.detector_script_batch,
            retry_s=settings.detector_state_retry_s,
            lane=lane,
        )
        processor = BatchProcessor(
            state,
            wallets,
            settings.rules(),
            consumer=self.consumer,
            wait_s=settings.detector_wait_s,
            touch_every_s=settings.touch_every_s,
        )

        async def handle(batch: list[Entry]) -> Handled:
            outcome = await processor.process([RawEntry(eid, fields) for eid, fields in batch])
            return Handled(outcome.settled, outcome.failed)

        group = ConsumerGroup(self.client, self._config(lane.stream), handle)
        return LaneWorker(lane, state, processor, group)

    def _forwarder(self, lane: Lane) -> Forwarder:
        return Forwarder(
            self.client,
            self.settings.streams,
            lane.signals,
            owner=self.consumer,
            maxlen=self.settings.stream_maxlen,
            batch=self.settings.detector_batch_size,
            block_ms=self.settings.detector_block_ms,
        )

    def _seeder(self) -> Seeder:
        http = httpx.AsyncClient(timeout=self.settings.detector_seed_timeout_s)
        return Seeder(http, self.settings.data_api_url, self.wallet_lane)

    def wallet_lane(self, wallet: str) -> DetectorState:
        """The state of the lane that holds the wallet's positions (its wallet partition)."""
        streams = self.settings.streams
        stream = streams.order_streams()[partition_of(wallet, streams.partitions)]
        return next(w.state for w in self.workers if w.lane.stream == stream)

    def _config(self, stream: str) -> GroupConfig:
        settings = self.settings
        return GroupConfig(
            stream=stream,
            group=DETECTOR_GROUP,
            consumer=self.consumer,
            dead_stream=settings.streams.orders_dead,
            origin="detector",
            batch_size=settings.detector_batch_size,
            block_ms=settings.detector_block_ms,
            claim_min_idle_ms=settings.detector_claim_min_idle_ms,
            reclaim_every_s=settings.detector_reclaim_interval_s,
            max_deliveries=settings.detector_max_deliveries,
            drain_s=settings.detector_shutdown_grace_s,
            max_deliveries_setting="DETECTOR_MAX_DELIVERIES",
        )

    async def start(self) -> None:
        """Load the wallets, then follow the registry and consume, in the background."""
        last_id = await self.load_wallets()
        await layout.claim(self.client, self.settings.streams)
        for worker in self.workers:
            await worker.group.ensure_group()
        if self.seeder is not None:
            # Before consuming: a backlog is decided against the true positions. The wallets are
            # known tracked as of the registry snapshot's id (their seedings' generation). Up to
            # `DETECTOR_SEED_STARTUP_S`: past it the rest goes on in the background (a wallet
            # unseeded meanwhile is decided as before seeding, `opens_position` null) and a
            # wallet that fails is asked again by the retry.
            startup = self._background(self.seeder.seed_all(self.processor.wallets, last_id))
            within = self.settings.detector_seed_startup_s
            done, _ = await asyncio.wait([startup], timeout=within)
            if not done:
                left = len(self.processor.wallets) - len(self.seeder.seeded)
                log.warning("positions_seeding_continues", extra={"after_s": within, "left": left})
            every = self.settings.detector_seed_retry_s
            self._background(self.seeder.retry(every, lambda: list(self.processor.wallets)))
        self._stop = asyncio.Event()
        self.consuming = asyncio.create_task(self._consume(), name="detector-groups")
        self.following = asyncio.create_task(self.follow_wallets(last_id), name="detector-wallets")

    async def stop(self) -> None:
        """Drain and leave the group (bounded by `DETECTOR_SHUTDOWN_GRACE_S`), then close."""
        log.info("detector_stopping", extra={"consumer": self.consumer})
        self._stop.set()
        try:
            await self.consuming
        finally:
            await cancel_and_wait(self.following)
            for task in list(self.seeding):
                await cancel_and_wait(task)
            if self.seeder is not None:
                await self.seeder.http.aclose()
            await self.client.aclose()
        log.info("detector_stopped", extra={"consumer": self.consumer})

    async def _consume(self) -> None:
        # The forwarders stop last: what the lanes' drain decides still reaches `signals`.
        lanes = [asyncio.create_task(w.group.run(self._stop)) for w in self.workers]
        lanes_done = asyncio.Event()
        grace = self.settings.detector_shutdown_grace_s
        forwarders = [asyncio.create_task(f.run(lanes_done, grace)) for f in self.forwarders]
        try:
            await asyncio.gather(*lanes)
        finally:
            lanes_done.set()
            for task in lanes:
                await cancel_and_wait(task)
            await asyncio.gather(*forwarders, return_exceptions=True)

    async def watch(self) -> None:
        """Raise when the group or the registry follower ends unasked: nothing would restart it."""
        done, _ = await asyncio.wait(
            [self.consuming, self.following], return_when=asyncio.FIRST_COMPLETED
        )
        task = done.pop()
        error = None if task.cancelled() else task.exception()
        raise RuntimeError(f"{task.get_name()} stopped: {error!r}")

    async def handle(self, batch: list[Entry]) -> Handled:
        """The first lane's handler (the only lane without partitions)."""
        return await self.group.handler(batch)

    async def load_wallets(self) -> str:
        """The registry's wallets into the processor; returns the control id to follow from."""
        wallets, last_id = await wallet_registry.load(
            self.client, self.settings.streams, self.seed_wallets
        )
        for worker in self.workers:
            worker.processor.set_wallets(wallets)
        log.info(
            "detector_started",
            extra={
                "consumer": self.consumer,
                "streams": [worker.lane.stream for worker in self.workers],
                "signals": self.settings.streams.signals,
                "group": DETECTOR_GROUP,
                "wallets": len(self.processor.wallets),
                "rules": describe(self.processor.settings),
                "rules_file": self.settings.detector_rules_file or None,
                "redis": redact_url(self.settings.redis_url),
            },
        )
        return last_id

    async def follow_wallets(self, after_id: str) -> None:
        """Apply every change of the wallet registry as it comes."""
        async for change in wallet_registry.follow(self.client, self.settings.streams, after_id):
            address = change.wallet.address
            added = change.op == "upsert" and address not in self.processor.wallets
            for worker in self.workers:
                if change.op == "upsert":
                    worker.processor.upsert_wallet(change.wallet)
                else:
                    worker.processor.remove_wallet(change.wallet.address)
            if self.seeder is not None and added:
                self._background(self.seeder.seed(address, change.stream_id))
            elif self.seeder is not None and change.op != "upsert":
                self.seeder.forget(address)
                # Awaited: a re-add that follows must find the tombstone, not the old seeding.
                await self._forget_seeded(address, change.stream_id)
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

    async def _forget_seeded(self, wallet: str, removed_at: str) -> None:
        """Drop the wallet's seeding (a tombstone at the removal's id, `DetectorState.
        forget_seeded`); Redis unreachable for longer than its retry: logged, the seeding stays
        until the wallet is removed again (the registry follower must not die of it)."""
        try:
            await self.wallet_lane(wallet).forget_seeded(wallet, removed_at)
        except TRANSIENT as exc:
            log.warning("positions_forget_failed", extra={"wallet": wallet, "error": repr(exc)})

    def _background(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self.seeding.add(task)
        task.add_done_callback(self.seeding.discard)
        return task

    async def health(self) -> tuple[bool, dict[str, Any]]:
        redis_ok = await self.state.ping()
        healths = [w.group.health for w in self.workers] + [f.health for f in self.forwarders]
        down = [h.redis_down_since for h in healths if h.redis_down_since is not None]
        reading = not self.consuming.done() and not down
        loops = reading and not self.following.done()
        return redis_ok and loops, {
            "redis": redis_ok,
            "reading": reading,
            "redis_down_since": min(down) if down else None,
            "in_flight": sum(h.in_flight for h in healths),
            "lanes": len(self.workers),
            "consumer": self.consumer,
            "wallets": len(self.processor.wallets),
            "seeded_wallets": len(self.seeder.seeded) if self.seeder is not None else 0,
        }


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
    except layout.LayoutMismatch as exc:
        log.error("layout_mismatch", extra={"error": str(exc)})
        sys.exit(2)
