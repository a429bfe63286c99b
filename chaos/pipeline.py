"""One scenario's pipeline: the simulator, store, detector replicas, notifier and ingestor as
processes on the suite's own Redis (or, for a row on the cluster, on its Redis Cluster with
`REDIS_CLUSTER=true`), a database of the scenario's own behind a cuttable proxy, a webhook
receiver and a resuming WebSocket subscriber.

Recovery settings are shortened from their defaults so a dead consumer's entries are taken over
within seconds rather than a minute (claim idle 2 s instead of 30-60 s, reconnects from 0.2 s,
pings every second); the mechanisms are the production ones. `RECOVERY_ENV` lists them, and the
report repeats them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis.asyncio as aioredis

from chaos.proxy import TcpProxy
from chaos.receiver import WebhookReceiver
from chaos.redis_server import ThrowawayRedis
from chaos.subscriber import ResumingSubscriber
from devtools.cluster import Cluster
from devtools.processes import ROOT, ServiceProcess, Supervisor
from devtools.servers import free_port
from shared.redis_streams import connect
from shared.streams import Streams

WALLETS_FILE = ROOT / "config" / "wallets.example.json"

RECOVERY_ENV = {
    "STORE_CLAIM_IDLE_MS": "2000",
    "STORE_CLAIM_EVERY_S": "0.5",
    "STORE_RETRY_MAX_S": "1",
    "STORE_DB_TIMEOUT_S": "3",
    "DETECTOR_CLAIM_MIN_IDLE_MS": "2000",
    "DETECTOR_RECLAIM_INTERVAL_S": "0.5",
    "DETECTOR_WAIT_S": "5",
    "WEBHOOK_CLAIM_IDLE_MS": "2000",
    "WEBHOOK_BACKOFF_S": "0.1",
    "WEBHOOK_BACKOFF_MAX_S": "1",
    "DOME_RECONNECT_MIN_S": "0.2",
    "DOME_RECONNECT_MAX_S": "2",
    "DOME_PING_INTERVAL_S": "1",
    "DOME_PING_TIMEOUT_S": "2",
}


@dataclass(frozen=True)
class PipelineConfig:
    tape: Path
    speed: float
    detectors: int
    api_key: str
    log_dir: Path
    subscriber_reconnect_s: float = 4.0
    # The tracked wallets (the ingestor's, the detector's, the truth's).
    wallets: Path = WALLETS_FILE
    # Tape seconds from its first trade to its last: the tape plays span / speed seconds.
    tape_span_s: float = 0.0


class Pipeline:
    def __init__(
        self,
        config: PipelineConfig,
        redis: ThrowawayRedis,
        database_url: str,
        namespace: str,
        env: dict[str, str] | None = None,
        cluster: Cluster | None = None,
    ) -> None:
        self.config = config
        self.extra_env = env or {}
        self.redis = redis
        self.cluster = cluster
        self.database_url = database_url
        self.namespace = namespace
        partitions = int(self.extra_env.get("STREAM_PARTITIONS", "1"))
        # The services' layout (on a cluster even one partition has a lane of its own slot).
        self.streams = Streams(namespace, partitions, cluster=cluster is not None)
        target = urlsplit(database_url)
        self.pg_proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5432)
        self.sim_port, self.notifier_port = free_port(), free_port()
        # The polygon source's first endpoint goes through this proxy (cut by chain_failover); the
        # second is the simulator's node itself.
        self.rpc_proxy = TcpProxy("127.0.0.1", self.sim_port)
        self.receiver = WebhookReceiver()
        self.subscriber = ResumingSubscriber(
            f"ws://127.0.0.1:{self.notifier_port}/ws", config.subscriber_reconnect_s
        )
        self.services: dict[str, ServiceProcess] = {}
        self.detectors: list[ServiceProcess] = []
        self.supervisor = Supervisor([])
        self.redis_client: aioredis.Redis = connect(self.redis_url, cluster=cluster is not None)
        self.sim = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.sim_port}", timeout=10)

    @property
    def redis_url(self) -> str:
        """The suite's Redis, or a node of the cluster (clients discover the others from it)."""
        return self.cluster.url if self.cluster is not None else self.redis.url

    def proxied_database_url(self) -> str:
        parts = urlsplit(self.database_url)
        netloc = parts.netloc.rsplit("@", 1)
        user = f"{netloc[0]}@" if len(netloc) == 2 else ""
        return parts._replace(netloc=f"{user}127.0.0.1:{self.pg_proxy.port}").geturl()

    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        return {
            "REDIS_URL": self.redis_url,
            "REDIS_CLUSTER": "true" if self.cluster is not None else "false",
            "STREAM_NAMESPACE": self.namespace,
            "WALLETS_FILE": str(self.config.wallets),
            "LOG_LEVEL": "INFO",
            **RECOVERY_ENV,
            **extra,
            **self.extra_env,
        }

    def _add(self, name: str, module: str, env: dict[str, str], health_url: str) -> ServiceProcess:
        service = ServiceProcess(
            name,
            f"services.{module}",
            self._env(env),
            health_url,
            self.config.log_dir / f"{name}.log",
        )
        self.services[name] = service
        self.supervisor.add(service)
        return service

    def _ops(self, name: str, module: str, env: dict[str, str]) -> ServiceProcess:
        port = free_port()
        return self._add(
            name, module, {"OPS_PORT": str(port), **env}, f"http://127.0.0.1:{port}/health"
        )

    def _declare(self) -> None:
        c = self.config
        self._add(
            "simulator",
            "simulator",
            {
                "SIM_HOST": "127.0.0.1",
                "SIM_PORT": str(self.sim_port),
                "SIM_MODE": "tape",
                "SIM_TAPE": str(c.tape),
                "SIM_SPEED": str(c.speed),
                "SIM_LOOP": "false",
                "SIM_API_KEY": c.api_key,
                "SIM_BLOCK_TIME_S": "0.5",
            },
            f"http://127.0.0.1:{self.sim_port}/health",
        )
        self._ops("store", "store", {"DATABASE_URL": self.proxied_database_url()})
        self.detectors = [self._ops(f"detector-{n}", "detector", {}) for n in range(c.detectors)]
        hooks = self.receiver.write_config(c.log_dir / "webhooks.json")
        self._add(
            "notifier",
            "notifier",
            {
                "NOTIFIER_HOST": "127.0.0.1",
                "NOTIFIER_PORT": str(self.notifier_port),
                "WEBHOOKS_FILE": str(hooks),
            },
            f"http://127.0.0.1:{self.notifier_port}/health",
        )
        self._ops(
            "ingestor",
            "ingestor",
            {
                "DOME_WS_URL": f"ws://127.0.0.1:{self.sim_port}",
                "DOME_API_URL": f"http://127.0.0.1:{self.sim_port}/v1",
                # The Data API (the data_api source, and the rtds source's backfill) and RTDS.
                "DATA_API_URL": f"http://127.0.0.1:{self.sim_port}",
                "RTDS_URL": f"ws://127.0.0.1:{self.sim_port}/rtds",
                "DOME_API_KEY": c.api_key,
                # Used when a scenario sets INGEST_SOURCES=polygon: the key rides in the path, as
                # at real providers, so the log check covers it too.
                "POLYGON_WS_URLS": (
                    f"ws://127.0.0.1:{self.rpc_proxy.port}/rpc/{c.api_key},"
                    f"ws://127.0.0.1:{self.sim_port}/rpc/{c.api_key}"
                ),
                "GAMMA_API_URL": f"http://127.0.0.1:{self.sim_port}",
                "POLYGON_STALL_TIMEOUT_S": "2",
                "POLYGON_FAILBACK_AFTER_S": "5",
                "POLYGON_CALL_TIMEOUT_S": "5",
            },
        )

    async def start(self) -> None:
        """Everything but the ingestor first (the notifier's webhook group starts at the end of
        `signals` the first time), then the ingestor, whose subscription starts the tape."""
        self.config.log_dir.mkdir(parents=True, exist_ok=True)
        await self.pg_proxy.start()
        await self.rpc_proxy.start()
        await self.receiver.start()
        self._declare()
        first = [s for name, s in self.services.items() if name != "ingestor"]
        for service in first:
            service.start()
        await asyncio.gather(*(s.await_healthy() for s in first))
        self.subscriber.start()
        ingestor = self.services["ingestor"]
        ingestor.start()
        await ingestor.await_healthy()
        self.supervisor.start()

    async def status(self) -> dict[str, Any]:
        body: dict[str, Any] = (await self.sim.get("/_sim/status")).json()
        return body

    async def emitted(self) -> int:
        return int((await self.status())["emitted"])

    async def trades(self) -> list[dict[str, Any]]:
        """The trades that happened: emitted, minus those a chain reorg orphaned for good."""
        body: list[dict[str, Any]] = (await self.sim.get("/_sim/trades")).json()
        chain = (await self.sim.get("/_sim/chain")).json()
        orphaned = set(chain.get("orphaned", []))
        return [trade for trade in body if trade["tx_hash"] not in orphaned]

    async def stop(self) -> dict[str, int | None]:
        """SIGTERM everything, the ingestor first; each process' exit code."""
        await self.supervisor.stop()
        await self.subscriber.stop()
        order = ["ingestor", "notifier", *(d.name for d in self.detectors), "store", "simulator"]
        codes: dict[str, int | None] = {}
        for name in order:
            service = self.services.get(name)
            if service is None:
                continue
            was_down = service.held_down and not service.running
            code = await service.astop()
            codes[name] = None if was_down else code
        await self.receiver.stop()
        await self.pg_proxy.stop()
        await self.rpc_proxy.stop()
        await self.sim.aclose()
        await self.redis_client.aclose()
        return codes
