"""The faults, each a way production breaks, injected into a running `Pipeline`.

A fault has `inject` and `recover` (after `hold_s`); both return a short note for the report.
The process kills catch a replica at its worst moment: it is first frozen (SIGSTOP) until Redis
shows entries delivered to it and not yet acknowledged, then SIGKILLed, so the entries it held are
lost with it unless another consumer takes them over. The cluster fault catches a master the same
way: with writes it acknowledged and its replica never got (chaos/failover.py). A fault may also
`conclude`, once the run settled, with what its recovery achieved (`figures`, in the JSON). A
simulator fault whose control route this simulator does not have is reported as not supported,
never imitated.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import httpx
import orjson
from redis.exceptions import RedisError, ResponseError

from chaos.failover import Failover, lose_acknowledged_writes
from chaos.truth import read_fills, read_stream
from services.notifier.webhooks.handoff import queue_key
from shared import wallet_registry
from shared.models import OrderFill, TrackedWallet
from shared.orders_raw import seen_keys, watermark_key
from shared.streams import DETECTOR_GROUP, STORE_GROUP, WEBHOOKS_GROUP
from shared.wallets import load_wallets

if TYPE_CHECKING:
    from chaos.pipeline import Pipeline
    from devtools.cluster import Cluster
    from devtools.processes import ServiceProcess

# How long a frozen process is given to be handed entries before it is killed anyway.
HOLD_PENDING_WITHIN_S = 8.0
FREEZE_LOOK_S = 0.25
NOT_SUPPORTED = "not supported by this simulator"
CHAIN_ROUTE = "/_sim/chain"


@dataclass
class Fault(ABC):
    """One fault of the suite: each subclass injects its own (and may undo it)."""

    name: ClassVar[str]
    description: ClassVar[str]
    # Settings of every process (the simulator's SIM_* quirks among them) this fault needs.
    env: ClassVar[dict[str, str]] = {}
    hold_s: float = 3.0
    supported: bool = True
    notes: list[str] = field(default_factory=list)
    # Measured numbers for the JSON (e.g. a failover's seconds), beside the notes.
    figures: dict[str, Any] = field(default_factory=dict)

    @abstractmethod
    async def inject(self, pipe: Pipeline) -> None:
        """Cause the fault in the running pipeline."""

    async def recover(self, pipe: Pipeline) -> None:  # noqa: B027 - optional hook
        """Undo the fault; most faults end by themselves, so the default does nothing."""

    async def conclude(self, pipe: Pipeline) -> None:  # noqa: B027 - optional hook
        """Once the run settled, before the pipeline stops: measure what the fault's recovery
        achieved, if the fault has something to say about it."""

    def note(self, text: str) -> None:
        self.notes.append(text)


async def _pending_of(
    pipe: Pipeline, service: ServiceProcess, streams: list[tuple[str, str]]
) -> int:
    """Entries delivered to this process' consumer and not acknowledged, on the given streams."""
    marker = f"-{service.pid}-"
    total = 0
    for stream, group in streams:
        try:
            consumers = await pipe.redis_client.xinfo_consumers(stream, group)
        except ResponseError:
            continue  # no such stream or group yet
        for consumer in consumers:
            if marker in consumer["name"].decode():
                total += int(consumer["pending"])
    return total


async def freeze_until_pending(
    pipe: Pipeline, service: ServiceProcess, streams: list[tuple[str, str]]
) -> int:
    """Freeze the process (SIGSTOP) with entries delivered to it and not acknowledged; how many.

    A consumer holds entries only between a read and its ack, a few milliseconds per batch, and a
    frozen process issues no new read: so freeze, look for `FREEZE_LOOK_S`, and if it holds
    nothing let it run a moment and freeze it again, until it does or `HOLD_PENDING_WITHIN_S` is
    up (then it is killed holding nothing, and the note says so).
    """
    deadline = time.monotonic() + HOLD_PENDING_WITHIN_S
    held = 0
    while True:
        service.signal(signal.SIGSTOP)
        look_until = time.monotonic() + FREEZE_LOOK_S
        while time.monotonic() < look_until:
            try:
                held = await _pending_of(pipe, service, streams)
            except RedisError:
                held = 0
            if held or time.monotonic() > deadline:
                return held
            await asyncio.sleep(0.02)
        service.signal(signal.SIGCONT)
        await asyncio.sleep(random.uniform(0.01, 0.08))


@dataclass
class DetectorKill(Fault):
    name: ClassVar[str] = "detector_kill"
    description: ClassVar[str] = (
        "SIGKILL of one detector replica holding pending entries; the others must reclaim them"
    )

    async def inject(self, pipe: Pipeline) -> None:
        victim = pipe.detectors[0]
        lanes = [(lane.stream, DETECTOR_GROUP) for lane in pipe.streams.lanes()]
        held = await freeze_until_pending(pipe, victim, lanes)
        await victim.akill()
        self.note(f"killed {victim.name} holding {held} pending entries; not restarted")


@dataclass
class StoreKill(Fault):
    name: ClassVar[str] = "store_kill"
    description: ClassVar[str] = "SIGKILL of the store holding pending entries, restart after hold"

    async def inject(self, pipe: Pipeline) -> None:
        store = pipe.services["store"]
        streams = [
            *((stream, STORE_GROUP) for stream in pipe.streams.order_streams()),
            (pipe.streams.signals, STORE_GROUP),
        ]
        held = await freeze_until_pending(pipe, store, streams)
        await store.akill()
        self.note(f"killed the store holding {held} pending entries")

    async def recover(self, pipe: Pipeline) -> None:
        pipe.services["store"].start()
        self.note(f"restarted after {self.hold_s:g}s")


@dataclass
class NotifierKill(Fault):
    name: ClassVar[str] = "notifier_kill"
    description: ClassVar[str] = (
        "SIGKILL of the notifier holding webhook deliveries pending, restart after hold; "
        "subscribers resume, the webhook entries are reclaimed"
    )

    async def inject(self, pipe: Pipeline) -> None:
        notifier = pipe.services["notifier"]
        # The hand-off off `signals` takes a moment; what the notifier holds is mostly in its
        # endpoint queue (the receiver's endpoint is named "chaos").
        watched = [
            (pipe.streams.signals, WEBHOOKS_GROUP),
            (queue_key(pipe.streams, "chaos"), WEBHOOKS_GROUP),
        ]
        held = await freeze_until_pending(pipe, notifier, watched)
        await notifier.akill()
        self.note(f"killed the notifier holding {held} pending webhook entries")

    async def recover(self, pipe: Pipeline) -> None:
        pipe.services["notifier"].start()
        self.note(f"restarted after {self.hold_s:g}s")


@dataclass
class IngestorKill(Fault):
    name: ClassVar[str] = "ingestor_kill"
    description: ClassVar[str] = (
        "SIGKILL of the ingestor, restart after hold; REST backfill must recover the gap"
    )
    emitted_at_kill: int = 0

    async def inject(self, pipe: Pipeline) -> None:
        self.emitted_at_kill = await pipe.emitted()
        await pipe.services["ingestor"].akill()

    async def recover(self, pipe: Pipeline) -> None:
        missed = await pipe.emitted() - self.emitted_at_kill
        pipe.services["ingestor"].start()
        self.note(f"down {self.hold_s:g}s while the simulator emitted {missed} trades")


@dataclass
class FeedDrop(Fault):
    name: ClassVar[str] = "feed_drop"
    description: ClassVar[str] = "the simulator closes every feed WebSocket (1012)"
    hold_s: float = 0.0

    async def inject(self, pipe: Pipeline) -> None:
        body = await _control(pipe, self, "/_sim/drop")
        if body is not None:
            self.note(f"dropped {body.get('dropped')} connection(s)")


@dataclass
class FeedStall(Fault):
    name: ClassVar[str] = "feed_stall"
    description: ClassVar[str] = (
        "every open feed socket freezes without closing (no frames, no pongs)"
    )
    hold_s: float = 0.0

    async def inject(self, pipe: Pipeline) -> None:
        body = await _control(pipe, self, "/_sim/stall")
        if body is not None:
            self.note(f"stalled {body.get('stalled')} connection(s)")


@dataclass
class PostgresCut(Fault):
    name: ClassVar[str] = "postgres_cut"
    description: ClassVar[str] = (
        "the store's Postgres connections reset and refused for the hold, then restored"
    )
    hold_s: float = 4.0

    async def inject(self, pipe: Pipeline) -> None:
        cut = pipe.pg_proxy.cut()
        self.note(f"reset {cut} connection(s)")

    async def recover(self, pipe: Pipeline) -> None:
        pipe.pg_proxy.restore()
        self.note(f"restored after {self.hold_s:g}s, {pipe.pg_proxy.refused} reconnects refused")


@dataclass
class RedisRestart(Fault):
    name: ClassVar[str] = "redis_restart"
    description: ClassVar[str] = (
        "SIGKILL of Redis (append-only, fsync always), restarted on the same port after hold"
    )
    hold_s: float = 2.0

    async def inject(self, pipe: Pipeline) -> None:
        await asyncio.to_thread(pipe.redis.kill)

    async def recover(self, pipe: Pipeline) -> None:
        await asyncio.to_thread(pipe.redis.start)
        pipe.redis.restarts += 1
        self.note(f"down {self.hold_s:g}s")


async def _control(
    pipe: Pipeline, fault: Fault, route: str, body: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """POST a simulator control route (with a JSON body, if any); None (and the fault marked
    unsupported) if it is absent."""
    try:
        response = await pipe.sim.post(route, json=body)
    except httpx.HTTPError as exc:
        fault.note(f"{route} failed: {type(exc).__name__}")
        return None
    if response.status_code in (404, 405):
        fault.supported = False
        fault.note(f"{route}: {NOT_SUPPORTED}")
        return None
    response.raise_for_status()
    answer: dict[str, Any] = response.json()
    return answer


@dataclass
class ChainReorg(Fault):
    name: ClassVar[str] = "chain_reorg"
    description: ClassVar[str] = (
        "three 2-block reorgs of the simulated chain a second apart; every other trade of the "
        "dropped blocks is included again later, the others are orphaned for good"
    )
    hold_s: float = 0.0

    async def inject(self, pipe: Pipeline) -> None:
        orphaned = again = 0
        for _ in range(3):
            body = await _control(pipe, self, CHAIN_ROUTE, {"reorg": {"depth": 2, "keep": 2}})
            if body is None:
                return
            orphaned += int(body["reorg"]["orphaned"])
            again += int(body["reorg"]["included_again"])
            await asyncio.sleep(1.0)
        self.note(f"{orphaned} trade(s) orphaned, {again} included again in later blocks")


@dataclass
class ChainFailover(Fault):
    name: ClassVar[str] = "chain_failover"
    description: ClassVar[str] = (
        "the first RPC endpoint's connections reset and refused for the hold (the ingestor moves "
        "to the second), then restored (it comes back after POLYGON_FAILBACK_AFTER_S)"
    )
    hold_s: float = 5.0

    async def inject(self, pipe: Pipeline) -> None:
        self.note(f"reset {pipe.rpc_proxy.cut()} RPC connection(s)")

    async def recover(self, pipe: Pipeline) -> None:
        pipe.rpc_proxy.restore()
        self.note(f"restored after {self.hold_s:g}s")


@dataclass
class ChainStall(Fault):
    name: ClassVar[str] = "chain_stall"
    description: ClassVar[str] = (
        "the chain's head stops moving on every endpoint for the hold (no block, no error)"
    )
    hold_s: float = 5.0

    async def inject(self, pipe: Pipeline) -> None:
        if await _control(pipe, self, CHAIN_ROUTE, {"stall": True}) is not None:
            self.note("head stalled")

    async def recover(self, pipe: Pipeline) -> None:
        if await _control(pipe, self, CHAIN_ROUTE, {"stall": False}) is not None:
            self.note(f"head moving again after {self.hold_s:g}s")


@dataclass
class ClusterMasterKill(Fault):
    name: ClassVar[str] = "cluster_master_kill"
    description: ClassVar[str] = (
        "Redis Cluster: the master serving the busiest wallet partition acknowledges fills its "
        "replica never gets (replica frozen, link closed), is SIGKILLed and its replica "
        "promoted; restarted after hold, it rejoins as a replica. The ingestor's backfill "
        "after Redis answers again must publish the lost fills again"
    )
    hold_s: float = 1.0
    failover: Failover | None = None

    async def inject(self, pipe: Pipeline) -> None:
        cluster = _cluster_of(pipe)
        stream = await busiest_partition(pipe)
        self.failover = f = await lose_acknowledged_writes(
            cluster, stream, min_unreplicated=UNREPLICATED
        )
        self.figures.update(
            stream=stream.removeprefix(pipe.namespace),
            master=f.master,
            promoted_replica=f.replica,
            replica_frozen_s=round(f.frozen_s, 2),
            failover_s=round(f.failover_s, 2),
            acknowledged_entries_lost=len(f.lost),
        )
        self.note(
            f"killed master :{f.master} serving {self.figures['stream']}, replica :{f.replica} "
            f"promoted in {f.failover_s:.1f}s; {len(f.lost)} acknowledged entries lost"
        )

    async def recover(self, pipe: Pipeline) -> None:
        if self.failover is not None:
            await asyncio.to_thread(_cluster_of(pipe).restart, self.failover.master)
            self.note(f"old master restarted after {self.hold_s:g}s, rejoined as a replica")

    async def conclude(self, pipe: Pipeline) -> None:
        """How many of the lost fills are back on their partition (published again)."""
        if self.failover is None:
            return
        lost = {str(orjson.loads(data)["order_key"]) for _, data in self.failover.lost}
        fills, _ = await read_fills(pipe.redis_client, self.failover.stream)
        recovered = len(lost & {fill.order_key for fill in fills})
        self.figures["lost_entries_recovered"] = recovered
        self.note(f"{recovered} of the {len(lost)} lost fills published again")


async def tracked_addresses(pipe: Pipeline) -> list[str]:
    """The tracked wallets (the wallets file) that trade on the tape, busiest first."""
    wallets = {w.address for w in load_wallets(pipe.services["ingestor"].env["WALLETS_FILE"])}
    counts: dict[str, int] = {}
    for trade in await pipe.trades():
        user = str(trade["user"]).lower()
        if user in wallets:
            counts[user] = counts.get(user, 0) + 1
    return sorted(counts, key=lambda u: -counts[u])


@dataclass
class RestWalletErrors(Fault):
    name: ClassVar[str] = "rest_wallet_errors"
    description: ClassVar[str] = (
        "one tracked wallet's REST history answers 500 while the ingestor is killed and "
        "restarted (a backfill is needed); the others must catch up meanwhile, that one once "
        "the errors are cleared after the hold"
    )
    hold_s: float = 6.0
    wallet: str = ""
    ingestor_down_s: float = 3.0

    async def inject(self, pipe: Pipeline) -> None:
        busiest = await tracked_addresses(pipe)
        if not busiest:
            self.note("no tracked wallet has traded yet")
            return
        self.wallet = busiest[0]
        if await _control(pipe, self, "/_sim/rest_fail", {"user": self.wallet, "status": 500}):
            ingestor = pipe.services["ingestor"]
            before = await pipe.emitted()
            await ingestor.akill()
            await asyncio.sleep(self.ingestor_down_s)
            missed = await pipe.emitted() - before
            ingestor.start()
            self.note(
                f"REST of {self.wallet[:10]}.. answers 500; ingestor down "
                f"{self.ingestor_down_s:g}s while {missed} trades were emitted"
            )

    async def recover(self, pipe: Pipeline) -> None:
        if self.wallet and self.supported:
            await _control(pipe, self, "/_sim/rest_fail", {"user": self.wallet, "clear": True})
            self.note(f"errors cleared after {self.hold_s:g}s more")


@dataclass
class RestIndexLag(Fault):
    name: ClassVar[str] = "rest_index_lag"
    description: ClassVar[str] = (
        "the REST history shows a trade only seconds after its live event, and every feed "
        "socket is dropped: the first backfill pass misses the last seconds, the second pass "
        "(BACKFILL_INDEXING_LAG_S later) must recover them"
    )
    hold_s: float = 8.0
    lag_s: float = 3.0

    async def inject(self, pipe: Pipeline) -> None:
        if await _control(pipe, self, "/_sim/rest_lag", {"seconds": self.lag_s}) is None:
            return
        await asyncio.sleep(1.0)
        body = await _control(pipe, self, "/_sim/drop")
        if body is not None:
            self.note(f"REST lag {self.lag_s:g}s; dropped {body.get('dropped')} connection(s)")

    async def recover(self, pipe: Pipeline) -> None:
        if self.supported:
            await _control(pipe, self, "/_sim/rest_lag", {"seconds": 0})
            self.note(f"lag off after {self.hold_s:g}s")


@dataclass
class LateUpdates(Fault):
    name: ClassVar[str] = "late_updates"
    description: ClassVar[str] = (
        "subscription updates applied seconds after they arrive while an untracked wallet of "
        "the tape is added live (wallet registry): its trades, before and after, are expected"
    )
    hold_s: float = 8.0
    delay_s: float = 3.0
    wallet: str = ""

    async def inject(self, pipe: Pipeline) -> None:
        if await _control(pipe, self, "/_sim/update_delay", {"seconds": self.delay_s}) is None:
            return
        tracked = {w.address for w in load_wallets(pipe.services["ingestor"].env["WALLETS_FILE"])}
        counts: dict[str, int] = {}
        for trade in await pipe.trades():
            user = str(trade["user"]).lower()
            if user not in tracked:
                counts[user] = counts.get(user, 0) + 1
        if not counts:
            self.note("no untracked wallet has traded yet")
            return
        self.wallet = max(counts, key=lambda u: counts[u])
        wallet = TrackedWallet(address=self.wallet, label="chaos-late")
        await wallet_registry.upsert(pipe.redis_client, pipe.streams, wallet)
        self.note(
            f"updates applied {self.delay_s:g}s late; added {self.wallet[:10]}.. "
            f"({counts[self.wallet]} trades so far) to the live registry"
        )

    async def recover(self, pipe: Pipeline) -> None:
        if self.supported:
            await _control(pipe, self, "/_sim/update_delay", {"seconds": 0})

    async def conclude(self, pipe: Pipeline) -> None:
        if self.wallet:
            trades = [t for t in await pipe.trades() if str(t["user"]).lower() == self.wallet]
            self.figures.update(added_wallet=self.wallet, added_wallet_trades=len(trades))


@dataclass
class QuirkOnly(FeedDrop):
    """A quirk of the simulator's feeds, on from the start (its SIM_* settings, in the scenario's
    env), with the feed drop of `FeedDrop` while trades flow so the backfill meets it too."""

    name: ClassVar[str] = "quirk"
    description: ClassVar[str] = "a simulator quirk, and a feed drop"


@dataclass
class OddTimestamps(QuirkOnly):
    name: ClassVar[str] = "odd_timestamps"
    description: ClassVar[str] = (
        "every 37th trade stamped in milliseconds, every 53rd an hour in the future "
        "(SIM_MS_TIMESTAMP_EVERY, SIM_FUTURE_TIMESTAMP_EVERY), and a feed drop: those trades "
        "dead-lettered with the reason, every other once, no watermark in the future"
    )
    env: ClassVar[dict[str, str]] = {
        "SIM_MS_TIMESTAMP_EVERY": "37",
        "SIM_FUTURE_TIMESTAMP_EVERY": "53",
        "SIM_FUTURE_TIMESTAMP_S": "3600",
    }


@dataclass
class TwinFills(QuirkOnly):
    name: ClassVar[str] = "twin_fills"
    description: ClassVar[str] = (
        "every 10th trade has an identical twin in its transaction (SIM_TWIN_EVERY), and a "
        "feed drop: both kept apart (occurrence), live and by backfill, each once"
    )
    env: ClassVar[dict[str, str]] = {"SIM_TWIN_EVERY": "10"}


@dataclass
class UnstableTies(QuirkOnly):
    name: ClassVar[str] = "unstable_ties"
    description: ClassVar[str] = (
        "the Data API orders one second's trades differently on every request "
        "(SIM_UNSTABLE_TIES), polled beside the feed with pages of 20 "
        "(INGEST_SOURCES=dome_ws,data_api), and a feed drop: no fill skipped at a page boundary"
    )
    env: ClassVar[dict[str, str]] = {
        "SIM_UNSTABLE_TIES": "true",
        "INGEST_SOURCES": "dome_ws,data_api",
        "DATA_API_PAGE_LIMIT": "20",
        "DATA_API_POLL_INTERVAL_S": "1",
        "SIM_TWIN_EVERY": "10",
    }


@dataclass
class DataApiCdn(QuirkOnly):
    name: ClassVar[str] = "data_api_cdn"
    description: ClassVar[str] = (
        "the Data API behind its CDN's 300 s cache (SIM_CDN_CACHE_S) with every 5th trade a maker "
        "fill (SIM_MAKER_EVERY), polled beside the feed with pages of 20 "
        "(INGEST_SOURCES=dome_ws,data_api), and a feed drop: no fill missed for a cached answer"
    )
    env: ClassVar[dict[str, str]] = {
        "SIM_CDN_CACHE_S": "300",
        "SIM_MAKER_EVERY": "5",
        "INGEST_SOURCES": "dome_ws,data_api",
        "DATA_API_PAGE_LIMIT": "20",
        "DATA_API_POLL_INTERVAL_S": "1",
    }


@dataclass
class RedisRestartLosesWrites(Fault):
    """What an append-only file with `appendfsync everysec` loses when Redis dies: the last
    second of acknowledged writes. Simulated deterministically: the consumers (store, detectors)
    are frozen so nothing reads the last fills, then the fills the ingestor published during
    `LOSS_WINDOW_S` are deleted from `orders.raw` with their dedupe keys, and the watermarks
    are put back where they were before them (as the lost writes would leave them); then Redis
    is SIGKILLed and restarted from its file. The ingestor must see Redis answer again (or its
    run id change) and backfill every wallet from its watermark."""

    name: ClassVar[str] = "redis_restart_loses_writes"
    description: ClassVar[str] = (
        "Redis SIGKILLed and restarted having lost its last writes (as appendfsync everysec "
        "does): the last fills of orders.raw, their dedupe keys and watermark moves deleted "
        "just before; the re-backfill after the restart must publish them again, once"
    )
    hold_s: float = 2.0
    lost_keys: list[str] = field(default_factory=list)

    async def inject(self, pipe: Pipeline) -> None:
        client = pipe.redis_client
        stream = pipe.streams.orders_raw
        consumers = [pipe.services["store"], *pipe.detectors]
        for process in consumers:
            process.signal(signal.SIGSTOP)
        try:
            marks_key = watermark_key(pipe.streams, stream)
            marks = await client.hgetall(marks_key)
            # The marks as they were before the lost writes (those writes moved them on).
            await asyncio.sleep(LOSS_WINDOW_S)
            # A read blocked before the freeze is served by Redis with the first new entries:
            # those reached a consumer and are not lost. The rest were read by nobody.
            since = max(
                (_entry_id(g["last-delivered-id"]) for g in await client.xinfo_groups(stream)),
                default=(0, 0),
            )
            entries = [e for e in await read_stream(client, stream) if _entry_id(e[0]) > since]
            prefix = pipe.streams.seen_order_prefix(stream)
            pipe_ = client.pipeline(transaction=True)
            for entry_id, fields in entries:
                fill = OrderFill.model_validate_json(fields[b"data"])
                self.lost_keys.append(fill.order_key)
                pipe_.xdel(stream, entry_id)
                pipe_.delete(prefix + seen_keys(fill)[0])
            pipe_.delete(marks_key)
            if marks:
                pipe_.hset(marks_key, mapping={_str(k): _str(v) for k, v in marks.items()})
            await pipe_.execute()
            await asyncio.to_thread(pipe.redis.kill)
        finally:
            for process in consumers:
                if process.running:
                    process.signal(signal.SIGCONT)
        self.figures["acknowledged_entries_lost"] = len(self.lost_keys)
        self.note(
            f"{len(self.lost_keys)} fills published in the last {LOSS_WINDOW_S:g}s deleted with "
            "their dedupe keys and watermark moves, Redis SIGKILLed"
        )

    async def recover(self, pipe: Pipeline) -> None:
        await asyncio.to_thread(pipe.redis.start)
        pipe.redis.restarts += 1
        self.note(f"restarted after {self.hold_s:g}s")

    async def conclude(self, pipe: Pipeline) -> None:
        fills, _ = await read_fills(pipe.redis_client, pipe.streams.orders_raw)
        back = len(set(self.lost_keys) & {fill.order_key for fill in fills})
        self.figures["lost_entries_recovered"] = back
        self.note(f"{back} of the {len(self.lost_keys)} lost fills published again")


@dataclass
class RtdsFreeze(Fault):
    name: ClassVar[str] = "rtds_freeze"
    description: ClassVar[str] = (
        "Polymarket's unofficial RTDS as the only source (INGEST_SOURCES=rtds) with its quirks on "
        "(empty first frame, checksum-cased wallets, outcomeIndex 999, fee on some frames); every "
        "open RTDS socket freezes (pings answered, no payload): the payload watchdog opens a new "
        "socket and the Data API backfill recovers the gap, each fill once"
    )
    env: ClassVar[dict[str, str]] = {
        "INGEST_SOURCES": "rtds",
        "RTDS_PAYLOAD_TIMEOUT_S": "3",
        "SIM_RTDS_EMPTY_FIRST_FRAME": "true",
        "SIM_RTDS_CHECKSUM_WALLETS": "true",
        "SIM_RTDS_OUTCOME_INDEX_999_EVERY": "5",
        "SIM_RTDS_FEE_EVERY": "2",
    }
    hold_s: float = 0.0

    async def inject(self, pipe: Pipeline) -> None:
        body = await _control(pipe, self, "/_sim/rtds", {"freeze": True})
        if body is not None:
            self.note(f"froze {body.get('froze')} RTDS socket(s)")


# The window of acknowledged writes the Redis restart loses (appendfsync everysec: up to 1 s).
LOSS_WINDOW_S = 1.0


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entry_id(value: Any) -> tuple[int, int]:
    ms, _, seq = _str(value).partition("-")
    return int(ms), int(seq or 0)


# The faults of issue 16: REST errors and lag, late subscription updates, the simulator's
# quirks, and a Redis restart that loses acknowledged writes. Each runs alone (chaos/main.py).
QUIRK_FAULTS: dict[str, type[Fault]] = {
    f.name: f
    for f in (
        RestWalletErrors,
        RestIndexLag,
        LateUpdates,
        OddTimestamps,
        TwinFills,
        UnstableTies,
        DataApiCdn,
        RedisRestartLosesWrites,
        RtdsFreeze,
    )
}


# Fills the master acknowledges alone before it dies: at speed 80 the busiest partition takes
# about ten a second, so the replica stays frozen well under a second.
UNREPLICATED = 5


def _cluster_of(pipe: Pipeline) -> Cluster:
    if pipe.cluster is None:
        raise RuntimeError("a cluster fault on a pipeline without a cluster")
    return pipe.cluster


async def busiest_partition(pipe: Pipeline) -> str:
    """The wallet partition with the most fills so far: fills go on landing there."""
    lengths = {s: int(await pipe.redis_client.xlen(s)) for s in pipe.streams.order_streams()}
    return max(lengths, key=lambda stream: lengths[stream])


# The cluster faults run on the suite's Redis Cluster, with STREAM_PARTITIONS=4 (chaos/main.py).
CLUSTER_FAULTS: dict[str, type[Fault]] = {f.name: f for f in (ClusterMasterKill,)}


# The chain faults run with INGEST_SOURCES=polygon (chaos/main.py, CHAIN_ENV); on their own and,
# with the process kills and the Redis restart, in "chain_together".
CHAIN_FAULTS: dict[str, type[Fault]] = {f.name: f for f in (ChainReorg, ChainFailover, ChainStall)}


# Also the order of "together": the kills first, while orders flow to be caught pending, then the
# feed faults while the ingestor is up to suffer them, the Redis restart and the ingestor kill last.
FAULTS: dict[str, type[Fault]] = {
    f.name: f
    for f in (
        DetectorKill,
        StoreKill,
        NotifierKill,
        FeedDrop,
        PostgresCut,
        FeedStall,
        RedisRestart,
        IngestorKill,
    )
}
