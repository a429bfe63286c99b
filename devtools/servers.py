"""Where the tests and `make run` find real Redis and Postgres.

In order: REDIS_URL / DATABASE_URL from the environment; a server already answering on the default
local port; a testcontainers container when a Docker engine answers; a throwaway server started from
the installed binaries. A server that cannot be had is a failure, never a skip.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg


def port_open(host: str, port: int, timeout: float = 0.3) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


# Below Linux's ephemeral range (32768-60999 by default): a port chosen there could be taken by
# any outgoing connection (a service's own Redis clients) between the choice and the bind.
LISTEN_PORTS = (20_000, 32_000)


def free_port() -> int:
    """A loopback port nothing listens on, outside the range outgoing connections draw from."""
    # A generator of its own: tests may seed the global one (hypothesis does).
    draw = random.SystemRandom()
    for _ in range(200):
        port = draw.randrange(*LISTEN_PORTS)
        with socket.socket() as sock, contextlib.suppress(OSError):
            sock.bind(("127.0.0.1", port))
            return port
    raise RuntimeError(f"no free port in {LISTEN_PORTS}")


def docker_answers() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _wait_port(port: int, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open("127.0.0.1", port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not open port {port} within {timeout}s")


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    if url := os.environ.get("REDIS_URL"):
        yield url
        return
    if port_open("127.0.0.1", 6379):
        yield "redis://127.0.0.1:6379/0"
        return
    if docker_answers():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7") as container:
            host, port = container.get_container_host_ip(), container.get_exposed_port(6379)
            yield f"redis://{host}:{port}/0"
        return
    binary = shutil.which("redis-server")
    if not binary:
        raise RuntimeError("no Redis: set REDIS_URL, start one on 6379, or install redis-server")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        _wait_port(port, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def database_url(server_url: str, name: str) -> str:
    """The URL of database `name` on the server of `server_url` (same user, password, options)."""
    return urlsplit(server_url)._replace(path=f"/{name}").geturl()


async def create_database(server_url: str, name: str, *, exist_ok: bool = False) -> str:
    """Create database `name` (names are ours, never user input); returns its URL."""
    conn = await asyncpg.connect(server_url)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not (exists and exist_ok):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return database_url(server_url, name)


async def drop_database(server_url: str, name: str) -> None:
    """Drop it even if a killed service left connections open (WITH FORCE)."""
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def throwaway_database(server_url: str, prefix: str = "bb") -> AsyncIterator[str]:
    """A fresh, empty database of its own, dropped afterwards; yields its URL."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    url = await create_database(server_url, name)
    try:
        yield url
    finally:
        await drop_database(server_url, name)


def _pg_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


def _unprivileged_prefix(data_dir: str) -> list[str]:
    """initdb and postgres refuse to run as root: run them as the `postgres` user instead."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if not runuser:
        raise RuntimeError("running as root without runuser: cannot start a throwaway Postgres")
    shutil.chown(data_dir, user="postgres")
    os.chmod(data_dir, 0o700)
    return [runuser, "-u", "postgres", "--"]


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    if url := os.environ.get("DATABASE_URL"):
        yield url
        return
    if port_open("127.0.0.1", 5432):
        yield "postgresql://postgres@127.0.0.1:5432/postgres"
        return
    if docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16", driver=None) as container:
            yield container.get_connection_url()
        return
    initdb, postgres = _pg_binary("initdb"), _pg_binary("postgres")
    if not (initdb and postgres):
        raise RuntimeError(
            "no Postgres: set DATABASE_URL, start one on 5432, or install postgresql"
        )
    with tempfile.TemporaryDirectory(prefix="bb-pg-") as data:
        as_user = _unprivileged_prefix(data)
        subprocess.run(
            [*as_user, initdb, "-D", data, "-U", "postgres", "-A", "trust"],
            check=True,
            capture_output=True,
        )
        port = free_port()
        proc = subprocess.Popen(
            [
                *as_user,
                postgres,
                "-D",
                data,
                "-p",
                str(port),
                "-k",
                data,
                "-c",
                "listen_addresses=127.0.0.1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_port(port, "postgres")
            yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
        finally:
            proc.terminate()
            proc.wait(20)


CHAIN_DIR = Path(__file__).resolve().parent / "chain"


def _chain_tool(name: str) -> str:
    binary = CHAIN_DIR / "node_modules" / ".bin" / name
    if not binary.exists():
        raise RuntimeError(
            f"{name} is not installed: run `make install` (npm ci in {CHAIN_DIR.name}/)"
        )
    return str(binary)


@contextlib.contextmanager
def ganache_node(block_time_s: float = 0) -> Iterator[str]:
    """A throwaway local EVM node (ganache, from the npm registry) on a loopback port; yields its
    WebSocket URL (the same port answers JSON-RPC over HTTP). `block_time_s` 0 mines a block per
    transaction; above 0, a block every that many seconds, as a real chain does."""
    port = free_port()
    proc = subprocess.Popen(
        [
            _chain_tool("ganache"),
            "--server.host=127.0.0.1",
            f"--server.port={port}",
            "--chain.chainId=137",
            f"--miner.blockTime={block_time_s}",
            "--wallet.totalAccounts=2",
            "--logging.quiet",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(port, "ganache", timeout=60)
        yield f"ws://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def compile_exchanges() -> dict[str, dict[str, object]]:
    """devtools/chain/Exchanges.sol compiled by solc-js: {contract: {abi, bytecode}}."""
    import json

    node = shutil.which("node")
    if not node:
        raise RuntimeError("node is not installed (Node 20 from the system's packages)")
    _chain_tool("solcjs")
    result = subprocess.run(
        [node, str(CHAIN_DIR / "compile.js")], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"solc failed: {result.stderr[:2000]}")
    compiled: dict[str, dict[str, object]] = json.loads(result.stdout)
    return compiled
