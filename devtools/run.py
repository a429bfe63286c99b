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
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import orjson
import websockets

from devtools import servers
from shared.terminal import printable

ROOT = Path(__file__).resolve().parent.parent
LOG_DIR = ROOT / ".run" / "logs"


@dataclass(frozen=True)
class Service:
    name: str
    module: str
    health_url: str
    env: dict[str, str] = field(default_factory=dict)


def pipeline(notifier_port: int) -> list[Service]:
    """The services in start order: consumers first, so the first orders find them ready."""
    return [
        Service("simulator", "services.simulator", "http://127.0.0.1:8765/health"),
        Service("store", "services.store", "http://127.0.0.1:8081/health", {"OPS_PORT": "8081"}),
        Service(
            "detector", "services.detector", "http://127.0.0.1:8083/health", {"OPS_PORT": "8083"}
        ),
        Service(
            "notifier",
            "services.notifier",
            f"http://127.0.0.1:{notifier_port}/health",
            {"NOTIFIER_PORT": str(notifier_port)},
        ),
        Service(
            "ingestor", "services.ingestor", "http://127.0.0.1:8082/health", {"OPS_PORT": "8082"}
        ),
    ]


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


async def _echo_warnings(name: str, stream: asyncio.StreamReader, log_file: Path) -> None:
    """Keep each service's full log in a file; show people only what needs their attention."""
    with log_file.open("ab") as sink:
        while line := await stream.readline():
            sink.write(line)
            sink.flush()
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                print(f"[{name}] {printable(line.decode(errors='replace').rstrip())}", flush=True)
                continue
            if isinstance(entry, dict) and entry.get("level") in ("warning", "error", "critical"):
                details = {k: v for k, v in entry.items() if k not in _LOG_HEAD}
                line_ = f"[{name}] {entry.get('level')}: {entry.get('event')} {details}"
                print(printable(line_), flush=True)


# Keeps the log-echo tasks referenced so they are not garbage-collected mid-run.
_BACKGROUND: set[asyncio.Future[None]] = set()
_LOG_HEAD = {"ts", "level", "service", "logger", "event"}


async def _start(service: Service, base_env: dict[str, str]) -> asyncio.subprocess.Process:
    env = {**base_env, **service.env}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        service.module,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    _BACKGROUND.add(
        asyncio.ensure_future(
            _echo_warnings(service.name, proc.stderr, LOG_DIR / f"{service.name}.log")
        )
    )
    return proc


async def _wait_healthy(
    service: Service, proc: asyncio.subprocess.Process, within_s: float
) -> None:
    import httpx

    deadline = time.monotonic() + within_s
    async with httpx.AsyncClient(timeout=1) as http:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise RuntimeError(
                    f"{service.name} exited with code {proc.returncode}; "
                    f"see {LOG_DIR / (service.name + '.log')}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(service.health_url)).status_code == 200:
                    return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{service.name} not healthy after {within_s:.0f}s at {service.health_url}")


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


async def _stop_all(procs: list[tuple[Service, asyncio.subprocess.Process]]) -> None:
    # Reverse start order: the feed stops first, so consumers drain what was already published.
    for _, proc in reversed(procs):
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
    for service, proc in reversed(procs):
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            print(f"[run] {service.name} ignored SIGTERM for 15 s; killing it", flush=True)
            proc.kill()


async def run(redis_url: str, database_url: str, notifier_port: int) -> int:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    base_env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "PYTHONUNBUFFERED": "1",
    }
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    procs: list[tuple[Service, asyncio.subprocess.Process]] = []
    try:
        for service in pipeline(notifier_port):
            proc = await _start(service, base_env)
            procs.append((service, proc))
            await _wait_healthy(service, proc, within_s=30)
            print(f"[run] {service.name} is up ({service.health_url})", flush=True)
    except RuntimeError as exc:
        print(f"[run] {exc}", flush=True)
        await _stop_all(procs)
        return 1
    print(
        f"[run] pipeline running: dashboard http://127.0.0.1:{notifier_port}/  "
        f"signals ws://127.0.0.1:{notifier_port}/ws  logs {LOG_DIR}  (Ctrl-C stops)",
        flush=True,
    )
    printer = asyncio.ensure_future(_print_signals(f"ws://127.0.0.1:{notifier_port}/ws", stop))
    failed = await _supervise(procs, base_env, stop)
    printer.cancel()
    await _stop_all(procs)
    print("[run] stopped", flush=True)
    return 1 if failed else 0


async def _supervise(
    procs: list[tuple[Service, asyncio.subprocess.Process]],
    base_env: dict[str, str],
    stop: asyncio.Event,
) -> bool:
    """Restart a service that exits, as Compose's `restart: unless-stopped` would.

    A service that keeps failing (RESTART_LIMIT exits within RESTART_WINDOW_S) stops the run:
    restarting it forever would hide a broken configuration. Returns True in that case.
    """
    exits: list[float] = []
    stopping = asyncio.ensure_future(stop.wait())
    while True:
        watchers = {asyncio.ensure_future(proc.wait()): i for i, (_, proc) in enumerate(procs)}
        done, _ = await asyncio.wait([stopping, *watchers], return_when=asyncio.FIRST_COMPLETED)
        for watcher in watchers:
            watcher.cancel()
        if stopping in done:
            return False
        now = time.monotonic()
        exits = [t for t in exits if now - t < RESTART_WINDOW_S]
        for watcher in done:
            index = watchers[watcher]
            service, proc = procs[index]
            exits.append(now)
            if len(exits) > RESTART_LIMIT:
                print(
                    f"[run] services keep exiting ({service.name} last, code "
                    f"{proc.returncode}); stopping the rest",
                    flush=True,
                )
                return True
            print(
                f"[run] {service.name} exited with code {proc.returncode}; restarting it "
                f"(log: {LOG_DIR / (service.name + '.log')})",
                flush=True,
            )
            await asyncio.sleep(1)
            procs[index] = (service, await _start(service, base_env))


RESTART_LIMIT = 5
RESTART_WINDOW_S = 60.0


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
