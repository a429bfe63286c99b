"""Where the benchmark runs: Redis and Postgres as `make run` finds them, a throwaway database, a
unique namespace for every scenario, and the facts about the machine that go into the results.

Servers come from `devtools.servers` (REDIS_URL / DATABASE_URL, else the local ports, else
throwaway servers). The database `bench_<random>` is created for the run, migrated with the
store's own migrations, and dropped at the end; every stream and key the run wrote (all under
`bench<random>-...`) is deleted, so a benchmark leaves nothing behind on a shared Redis.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import itertools
import os
import platform
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from devtools import processes, servers
from devtools.processes import ServiceProcess
from services.store.schema import load as load_migrations
from services.store.schema import migrate
from shared.redis_streams import connect
from shared.streams import Streams

ROOT = Path(__file__).resolve().parent.parent
LOG_DIR = ROOT / ".run" / "bench"
WALLETS_FILE = ROOT / "config" / "wallets.example.json"


@dataclass
class BenchEnv:
    """One benchmark run's servers and names.

    By default the streams live on the suite's Redis, one partition. `on` gives the same run on
    another Redis: a cluster (`REDIS_CLUSTER`), partitioned (`STREAM_PARTITIONS`), and with the
    ports of its local `redis-server` nodes, whose CPU the stages then measure node by node.
    """

    redis_url: str
    database_url: str
    run_id: str = field(default_factory=lambda: secrets.token_hex(4))
    cluster: bool = False
    partitions: int = 1
    # Local redis-server nodes: port -> "master" or "replica" (empty: the server of redis_url).
    redis_nodes: Mapping[int, str] = field(default_factory=dict)
    # A Redis of this run alone: every scenario uses the default namespace, so keys land in the
    # slots (and on the nodes) a default deployment's do; the caller empties it between scenarios.
    private: bool = False
    # Shared by every `on` copy: no two scenarios of the run get the same number (feed seeds).
    _scenarios: Iterator[int] = field(default_factory=lambda: itertools.count(1), repr=False)

    def on(
        self, redis_url: str, nodes: Mapping[int, str], *, cluster: bool, partitions: int
    ) -> BenchEnv:
        """This run on a private Redis (see `private`)."""
        return dataclasses.replace(
            self,
            redis_url=redis_url,
            cluster=cluster,
            partitions=partitions,
            redis_nodes=dict(nodes),
            private=True,
        )

    def scenario(self) -> int:
        return next(self._scenarios)

    def namespace(self, label: str) -> str:
        """A fresh stream/key prefix: every scenario starts from empty streams and state."""
        number = self.scenario()
        return "" if self.private else f"bench{self.run_id}-{number}{label}:"

    def streams(self, namespace: str) -> Streams:
        """The layout the services derive from the same settings (shared/settings.py)."""
        return Streams(namespace, self.partitions, self.cluster)

    def redis_settings(self) -> dict[str, str]:
        """The services' settings for this Redis and layout."""
        return {
            "REDIS_URL": self.redis_url,
            "REDIS_CLUSTER": "true" if self.cluster else "false",
            "STREAM_PARTITIONS": str(self.partitions),
        }

    @property
    def prefix(self) -> str:
        return f"bench{self.run_id}-"

    def redis(self) -> aioredis.Redis:
        return connect(self.redis_url, cluster=self.cluster)

    async def connected(self) -> aioredis.Redis:
        """A client that has found its servers: redis-py's cluster client discovers the nodes
        on its first command, and concurrent first commands race that discovery (redis-py
        8.1: most bursts fail with `'NoneType' object has no attribute 'writelines'`)."""
        client = self.redis()
        await client.initialize()
        return client

    async def redis_cpu(self) -> dict[str, float]:
        """CPU seconds Redis used so far (its own `INFO cpu`): `redis`, or `redis:<port>` for each
        local node."""
        if not self.redis_nodes:
            return {"redis": await _info_cpu(self.redis())}
        ports = list(self.redis_nodes)
        used = [await _info_cpu(connect(f"redis://127.0.0.1:{port}/0")) for port in ports]
        return {f"redis:{port}": seconds for port, seconds in zip(ports, used, strict=True)}

    async def pg(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.database_url)


async def _info_cpu(client: aioredis.Redis) -> float:
    """User + system CPU seconds of the server (every thread), closing the client."""
    try:
        info: Any = await client.info("cpu")
    finally:
        await client.aclose()
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def service(name: str, env: dict[str, str], health_url: str, tag: str = "") -> ServiceProcess:
    """A service of the benchmark, logging to `.run/bench/<tag><name>.log`."""
    return processes.service(name, env, health_url, LOG_DIR, tag)


@contextlib.contextmanager
def backing_servers() -> Iterator[tuple[str, str]]:
    """Redis and Postgres server URLs, found or started as `make run` does."""
    with servers.redis_server() as redis_url, servers.postgres_server() as server_url:
        yield redis_url, server_url


@contextlib.asynccontextmanager
async def bench_environment(redis_url: str, server_url: str) -> AsyncIterator[BenchEnv]:
    """A throwaway, migrated database and a run id; both cleaned up afterwards."""
    run_id = secrets.token_hex(4)
    async with servers.throwaway_database(server_url, "bench") as database_url:
        env = BenchEnv(redis_url, database_url, run_id)
        try:
            conn = await env.pg()
            try:
                await migrate(conn, load_migrations())
            finally:
                await conn.close()
            yield env
        finally:
            await _delete_keys(env)


async def _delete_keys(env: BenchEnv) -> None:
    client = env.redis()
    try:
        # Keys in a stream's hash-tag slot start with "{" + namespace.
        for pattern in (f"{env.prefix}*", f"{{{env.prefix}*"):
            batch: list[bytes] = []
            async for key in client.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    await client.unlink(*batch)
                    batch = []
            if batch:
                await client.unlink(*batch)
    finally:
        await client.aclose()


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_total_mb() -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return None


def _git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        )
        if out.returncode == 0:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            return out.stdout.strip() + ("+changes" if dirty else "")
    return None


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def other_test_runs() -> int:
    """pytest processes running beside the benchmark: a sign its figures were taken under load."""
    count = 0
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if b"pytest" in cmdline.read_bytes():
                count += 1
    return count


async def machine_facts(env: BenchEnv) -> dict[str, Any]:
    """Cores, CPU, memory, versions and the date: what a reader needs to compare two runs."""
    client = env.redis()
    try:
        info = await client.info("server")
    finally:
        await client.aclose()
    conn = await env.pg()
    try:
        pg_version = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory_mb": _memory_total_mb(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "redis": str(info.get("redis_version")),
        "postgres": str(pg_version),
        "os": f"{platform.system()} {platform.release()}",
        "commit": _git_commit(),
        "load_average_at_start": load_average(),
        "pytest_processes_at_start": other_test_runs(),
    }
