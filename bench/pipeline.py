"""The whole pipeline as real processes, with the simulator as a feed that can be restarted at a new
rate while the services keep running.

Services: store, detector, notifier, ingestor, all with the benchmark's rule settings
(`WHALE_MIN_NOTIONAL_USD` tiny, `SIGNAL_MAX_PRICE=1`, `SIGNAL_COOLDOWN_S=0`: every fill is a
whale_order, every opening BUY also a trader_entry). The measuring subscriber is connected to the
notifier before any order flows. The simulator runs in synthetic mode at `SIM_RATE` with the
tracked wallets; the ingestor reconnects to each new simulator within half a second (short
reconnect backoff) and the simulator's clock starts at that subscription.

Bench-only settings, and why: `NOTIFIER_CLIENT_QUEUE=100000` so the measuring client is not cut
off as a slow consumer by a momentary hiccup of its own (it is the instrument, not a user);
`DOME_RECONNECT_MIN_S/MAX_S=0.05/0.5` so a feed restart costs no long backoff.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import httpx
import redis.asyncio as aioredis

from bench.environment import WALLETS_FILE, BenchEnv, service
from bench.probes import (
    GroupState,
    entries_added,
    groups_state,
    total_added,
    unforwarded_signals,
)
from bench.subscriber import Subscriber
from devtools.processes import Memory, ServiceProcess, cpu_of_command, start_all, stop_all
from devtools.servers import free_port
from shared.streams import DETECTOR_GROUP, STORE_GROUP

# Every fill a whale_order, none suppressed by a cooldown, a price band or a notional floor, and no
# positions asked of a Data API (names unknown to a service are ignored).
RULES = {
    "WHALE_MIN_NOTIONAL_USD": "0.0001",
    "SIGNAL_MAX_PRICE": "1",
    "SIGNAL_MIN_PRICE": "0",
    "SIGNAL_MIN_NOTIONAL_USD": "0",
    "SIGNAL_COOLDOWN_S": "0",
    "DETECTOR_SEED_POSITIONS": "false",
}
FEED_START_TIMEOUT_S = 20.0
# Polygon's block time: the simulator's node mines at this pace in every bench pipeline.
CHAIN_BLOCK_TIME_S = 2.0
API_KEY = "bench-key"


def service_env(env: BenchEnv, namespace: str) -> dict[str, str]:
    return {
        **env.redis_settings(),
        "DATABASE_URL": env.database_url,
        "STREAM_NAMESPACE": namespace,
        "WALLETS_FILE": str(WALLETS_FILE),
        "LOG_LEVEL": "INFO",
        **RULES,
    }


def ops_service(name: str, base: dict[str, str], tag: str, **extra: str) -> ServiceProcess:
    port = free_port()
    return service(
        name, {**base, "OPS_PORT": str(port), **extra}, f"http://127.0.0.1:{port}/health", tag
    )


@dataclass(frozen=True)
class Snapshot:
    """The pipeline's counters at one moment (monotonic `at`)."""

    at: float
    emitted: int
    ingested: int
    signalled: int
    detector: GroupState
    store_orders: GroupState
    store_signals: GroupState
    delivered: int
    # Signals in the lanes' outboxes, not yet forwarded to `signals` (0 without outboxes).
    unforwarded: int = 0

    @property
    def stored(self) -> int:
        """Entries the store has committed and acked, both streams."""
        return sum(g.entries_read - g.pending for g in (self.store_orders, self.store_signals))

    def backlogs(self, ingested_before: int) -> dict[str, int]:
        """Work waiting at each stage: fed but not in orders.raw, unread or unacked, undelivered."""
        return {
            "ingestor": max(0, self.emitted - (self.ingested - ingested_before)),
            "detector": self.detector.backlog + self.unforwarded,
            "store": self.store_orders.backlog + self.store_signals.backlog,
            "notifier": max(0, self.signalled - self.delivered),
        }


def chain_source(sim_port: int, confirmations: int) -> dict[str, str]:
    """The ingestor reading the simulator's node (`/rpc`) as source `polygon`."""
    return {
        "INGEST_SOURCES": "polygon",
        "POLYGON_WS_URLS": f"ws://127.0.0.1:{sim_port}/rpc",
        "GAMMA_API_URL": f"http://127.0.0.1:{sim_port}",
        "POLYGON_CONFIRMATIONS": str(confirmations),
    }


class Pipeline:
    def __init__(
        self, env: BenchEnv, tag: str = "e2e-", ingest: dict[str, str] | None = None
    ) -> None:
        self.env = env
        self.tag = tag
        # The ingestor's source settings over the default (the Dome feed): see `chain_source`.
        self.ingest = ingest or {}
        # The simulator's settings over the bench's (a feed's documented delays: bench/sources.py).
        self.sim_env: dict[str, str] = {}
        self.namespace = env.namespace(tag.rstrip("-"))
        self.streams = env.streams(self.namespace)
        # Each pipeline's feeds draw their own orders: a later one must not repeat an earlier
        # one's, which Postgres would then drop as duplicates.
        self.seed = int(env.run_id, 16) + 1000 * env.scenario()
        self.base = service_env(env, self.namespace)
        self.sim_port = free_port()
        self.notifier_port = free_port()
        self.services: dict[str, ServiceProcess] = {}
        self.simulator: ServiceProcess | None = None
        self.subscriber = Subscriber(f"ws://127.0.0.1:{self.notifier_port}/ws")
        self.redis: aioredis.Redis = env.redis()
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.sim_port}", timeout=30)
        self.feeds = 0
        self._pg_before = (0, 0)

    async def start(self) -> None:
        tag = self.tag
        await self.redis.initialize()  # before any concurrent probe: see BenchEnv.connected
        consumers = [
            ops_service("store", self.base, tag),
            ops_service("detector", self.base, tag),
            service(
                "notifier",
                {
                    **self.base,
                    "NOTIFIER_PORT": str(self.notifier_port),
                    "NOTIFIER_CLIENT_QUEUE": "100000",
                },
                f"http://127.0.0.1:{self.notifier_port}/health",
                tag,
            ),
        ]
        # Registered before starting, so `stop` ends them even when one fails to come up.
        self.services = {p.name: p for p in consumers}
        await start_all(consumers)
        await self.subscriber.start()
        feed = {
            "DOME_WS_URL": f"ws://127.0.0.1:{self.sim_port}",
            "DOME_API_URL": f"http://127.0.0.1:{self.sim_port}/v1",
            "DOME_API_KEY": API_KEY,
            "DOME_RECONNECT_MIN_S": "0.05",
            "DOME_RECONNECT_MAX_S": "0.5",
        }
        ingestor = ops_service("ingestor", self.base, tag, **(feed | self.ingest))
        self.services[ingestor.name] = ingestor
        await start_all([ingestor])
        self._pg_before = await self.postgres_counts()

    async def start_feed(self, rate: float, *, keep_history: bool) -> None:
        """A new simulator at `rate` orders/s; returns once its clock has started."""
        await self.stop_feed()
        self.feeds += 1
        self.simulator = service(
            "simulator",
            {
                **self.base,
                "SIM_HOST": "127.0.0.1",
                "SIM_PORT": str(self.sim_port),
                "SIM_MODE": "synthetic",
                "SIM_RATE": str(rate),
                "SIM_SEED": str(self.seed + self.feeds),
                "SIM_WALLETS_FILE": str(WALLETS_FILE),
                "SIM_API_KEY": API_KEY,
                "SIM_HISTORY_MAX": "1000000" if keep_history else "1000",
                "SIM_BLOCK_TIME_S": str(CHAIN_BLOCK_TIME_S),
                **self.sim_env,
            },
            f"http://127.0.0.1:{self.sim_port}/health",
            f"{self.tag}{self.feeds}-",
        )
        await start_all([self.simulator])
        deadline = time.monotonic() + FEED_START_TIMEOUT_S
        while not (await self.sim_status())["started"]:
            if time.monotonic() > deadline:
                raise RuntimeError("the ingestor did not subscribe to the simulator in time")
            await asyncio.sleep(0.02)

    async def stop_feed(self) -> None:
        if self.simulator is not None:
            await self.simulator.astop()
            self.simulator = None

    async def sim_status(self) -> dict[str, Any]:
        response = await self.http.get("/_sim/status")
        response.raise_for_status()
        status: dict[str, Any] = response.json()
        return status

    async def mined_at(self) -> dict[str, float]:
        """Each trade's tx hash -> when its block was mined (the simulator's node)."""
        response = await self.http.get("/_sim/chain/mined")
        response.raise_for_status()
        times: dict[str, float] = response.json()
        return times

    async def sim_trades(self) -> list[dict[str, Any]]:
        response = await self.http.get("/_sim/trades")
        response.raise_for_status()
        trades: list[dict[str, Any]] = response.json()
        return trades

    async def snapshot(self) -> Snapshot:
        streams = self.streams
        emitted = (await self.sim_status())["emitted"] if self.simulator else 0
        # Partitioned (or on a cluster), the detector's work is every lane's group and every
        # outbox not forwarded yet; the store's orders are every wallet partition.
        lanes = [(lane.stream, DETECTOR_GROUP) for lane in streams.lanes()]
        (
            ingested,
            signalled,
            detector,
            store_orders,
            store_signals,
            unforwarded,
        ) = await asyncio.gather(
            total_added(self.redis, streams.order_streams()),
            entries_added(self.redis, streams.signals),
            groups_state(self.redis, lanes),
            groups_state(self.redis, [(s, STORE_GROUP) for s in streams.order_streams()]),
            groups_state(self.redis, [(streams.signals, STORE_GROUP)]),
            unforwarded_signals(self.redis, streams),
        )
        return Snapshot(
            time.monotonic(),
            emitted,
            ingested,
            signalled,
            detector,
            store_orders,
            store_signals,
            self.subscriber.received,
            unforwarded,
        )

    async def drained(self, within_s: float) -> bool:
        """Wait until every stage has caught up with what was ingested (feed stopped first)."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            snap = await self.snapshot()
            backlog = snap.backlogs(snap.ingested)
            if not any(backlog[stage] for stage in ("detector", "store", "notifier")):
                return True
            await asyncio.sleep(0.1)
        return False

    def memory(self) -> dict[str, Memory]:
        procs = [*self.services.values(), *([self.simulator] if self.simulator else [])]
        return {p.name: m for p in procs if (m := p.memory()) is not None}

    async def cpu(self) -> dict[str, float]:
        """CPU seconds used so far: each service, the simulator, Redis (each node of a private
        one), every Postgres process and this process (the measuring subscriber and the probes)."""
        procs = [*self.services.values(), *([self.simulator] if self.simulator else [])]
        used = {p.name: c for p in procs if (c := p.cpu()) is not None}
        used.update(await self.env.redis_cpu())
        used["postgres"] = cpu_of_command("postgres")
        used["bench"] = time.process_time()
        return used

    async def postgres_counts(self) -> tuple[int, int]:
        conn = await self.env.pg()
        try:
            orders = await conn.fetchval("SELECT count(*) FROM orders")
            signals = await conn.fetchval("SELECT count(*) FROM signals")
        finally:
            await conn.close()
        return int(orders), int(signals)

    async def consistency(self) -> dict[str, Any]:
        """Everything ingested since the start is in Postgres, signalled and delivered (drained)."""
        snap = await self.snapshot()
        orders, signals = await self.postgres_counts()
        return {
            "orders_ingested": snap.ingested,
            "postgres_orders_added": orders - self._pg_before[0],
            "signals_written": snap.signalled,
            "postgres_signals_added": signals - self._pg_before[1],
            "signals_delivered": snap.delivered,
            "orders_dead_lettered": await entries_added(self.redis, self.streams.orders_dead),
            "signals_dead_lettered": await entries_added(self.redis, self.streams.signals_dead),
        }

    async def stop(self) -> None:
        await self.stop_feed()
        await self.subscriber.stop()
        await stop_all(list(self.services.values()))
        await self.http.aclose()
        await self.redis.aclose()
