"""`make run`: the whole pipeline as local processes, no Docker.

Uses the Redis and Postgres at REDIS_URL / DATABASE_URL (default: the local servers on 127.0.0.1);
when nothing answers there it starts throwaway servers from the installed binaries. Starts the
simulator and the four services, writes each one's log to .run/logs/, echoes their warnings, and
prints every signal as the notifier pushes it. Ctrl-C (or SIGTERM) stops everything cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Iterator
from signal import SIGINT, SIGKILL, SIGTERM
from urllib.parse import urlsplit

import orjson
import websockets

from devtools import servers
from devtools.processes import ROOT, ServiceError, ServiceProcess, Supervisor, service
from shared.terminal import printable

LOG_DIR = ROOT / ".run" / "logs"


def pipeline(notifier_port: int, env: dict[str, str]) -> list[ServiceProcess]:
    """The services in start order: consumers first, so the first orders find them ready."""
    ports = {"store": 8081, "detector": 8083, "ingestor": 8082}

    def ops(name: str) -> ServiceProcess:
        port = ports[name]
        own = {**env, "OPS_PORT": str(port)}
        return service(name, own, f"http://127.0.0.1:{port}/health", LOG_DIR)

    notifier = service(
        "notifier",
        # The dashboard's history comes from the store started here.
        {
            **env,
            "NOTIFIER_PORT": str(notifier_port),
            "STORE_API_URL": f"http://127.0.0.1:{ports['store']}",
        },
        f"http://127.0.0.1:{notifier_port}/health",
        LOG_DIR,
    )
    simulator = service("simulator", env, "http://127.0.0.1:8765/health", LOG_DIR)
    return [simulator, ops("store"), ops("detector"), notifier, ops("ingestor")]


@contextlib.contextmanager
def backing_servers() -> Iterator[tuple[str, str]]:
    """Redis and Postgres URLs: the configured or local ones, else throwaway servers."""
    try:
        with servers.redis_server() as redis_url, servers.postgres_server() as database_url:
            yield redis_url, database_url
    except RuntimeError as exc:
        sys.exit(
            f"make run: {exc}.\nInstall them (Debian: apt-get install redis-server postgresql) "
            "or point REDIS_URL / DATABASE_URL at running servers."
        )


def _address(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}"


async def _echo_warnings(proc: ServiceProcess, stop: asyncio.Event) -> None:
    """Follow the service's log file (kept whole in .run/logs/); show people only what needs
    their attention."""
    proc.log_path.touch()
    with proc.log_path.open("rb") as log:
        log.seek(0, 2)
        while not stop.is_set():
            line = log.readline()
            if not line:
                await asyncio.sleep(0.2)
                continue
            if text := _attention(proc.name, line):
                print(printable(text), flush=True)


def _attention(name: str, line: bytes) -> str | None:
    try:
        entry = orjson.loads(line)
    except orjson.JSONDecodeError:
        return f"[{name}] {line.decode(errors='replace').rstrip()}"
    if isinstance(entry, dict) and entry.get("level") in ("warning", "error", "critical"):
        details = {k: v for k, v in entry.items() if k not in _LOG_HEAD}
        return f"[{name}] {entry.get('level')}: {entry.get('event')} {details}"
    return None


_LOG_HEAD = {"ts", "level", "service", "logger", "event"}


def format_signal(message: dict[str, object]) -> str:
    signal_ = message["signal"]
    assert isinstance(signal_, dict)
    latency_ms = (signal_["detected_at"] - signal_["received_at"]) * 1000
    who = signal_.get("wallet_label") or signal_["wallet"][:10]
    return printable(
        f"SIGNAL {signal_['kind']:<13} {who:<18.18} {signal_['side']:<4} "
        f"{signal_.get('token_label') or '?':<4.4} {signal_['shares']:>10.2f} "
        f"@ {signal_['price']:.3f}"
        f"  ${signal_['notional_usd']:>9.2f}  conf {signal_['confidence']:.2f}  "
        f"{(signal_.get('title') or signal_.get('market_slug') or '')[:48]}  (+{latency_ms:.1f} ms)"
    )


async def _print_signals(url: str, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            async with websockets.connect(url) as socket:
                async for raw in socket:
                    message = orjson.loads(raw)
                    if message.get("type") == "signal":
                        print(format_signal(message), flush=True)
        except (OSError, websockets.WebSocketException):
            await asyncio.sleep(0.5)


async def _stop_all(procs: list[ServiceProcess]) -> None:
    # Reverse start order: the feed stops first, so consumers drain what was already published.
    for proc in reversed(procs):
        code = await proc.astop()
        if code == -SIGKILL:
            print(f"[run] {proc.name} ignored SIGTERM; killed it", flush=True)


def _restarting(proc: ServiceProcess, code: int) -> None:
    print(f"[run] {proc.name} exited with code {code}; restarting it ({proc.log_path})", flush=True)


async def run(redis_url: str, database_url: str, notifier_port: int) -> int:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    env = {"REDIS_URL": redis_url, "DATABASE_URL": database_url}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (SIGINT, SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    procs: list[ServiceProcess] = []
    echoes = []
    try:
        for proc in pipeline(notifier_port, env):
            proc.start()
            procs.append(proc)
            echoes.append(asyncio.ensure_future(_echo_warnings(proc, stop)))
            await proc.await_healthy(within_s=30)
            print(f"[run] {proc.name} is up ({proc.health_url})", flush=True)
    except ServiceError as exc:
        print(f"[run] {exc}", flush=True)
        await _stop_all(procs)
        return 1
    print(
        f"[run] pipeline running: dashboard http://127.0.0.1:{notifier_port}/  "
        f"signals ws://127.0.0.1:{notifier_port}/ws  logs {LOG_DIR}  (Ctrl-C stops)",
        flush=True,
    )
    printer = asyncio.ensure_future(_print_signals(f"ws://127.0.0.1:{notifier_port}/ws", stop))
    supervisor = Supervisor(procs, limit=RESTART_LIMIT, window_s=60.0, on_exit=_restarting)
    supervisor.start()
    gave_up = asyncio.ensure_future(supervisor.gave_up.wait())
    await asyncio.wait(
        [gave_up, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED
    )
    if supervisor.gave_up.is_set():
        print("[run] services keep exiting; stopping the rest", flush=True)
    stop.set()
    await supervisor.stop()
    printer.cancel()
    await _stop_all(procs)
    for echo in echoes:
        echo.cancel()
    print("[run] stopped", flush=True)
    return 1 if supervisor.gave_up.is_set() else 0


# More exits than this within a minute: a broken configuration, not a blip.
RESTART_LIMIT = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notifier-port", type=int, default=8080)
    args = parser.parse_args()
    with backing_servers() as (redis_url, database_url):
        if "DATABASE_URL" not in os.environ:
            demo = servers.create_database(database_url, "betterbot", exist_ok=True)
            database_url = asyncio.run(demo)
        print(f"[run] Redis {_address(redis_url)}, Postgres {_address(database_url)}", flush=True)
        sys.exit(asyncio.run(run(redis_url, database_url, args.notifier_port)))


if __name__ == "__main__":
    main()
