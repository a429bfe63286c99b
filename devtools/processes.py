"""The one way BetterBot runs its services as processes: `make run`, the benchmark, the chaos suite
and the tests.

`ServiceProcess` is `python -m <module>` with its environment, its output appended to a log file (a
file, not a pipe, so a busy service never blocks on a reader that is not reading), its health, its
memory and its CPU time. Its methods block (a `subprocess.Popen` underneath), so a test calls them
directly and async code awaits the `a`-prefixed forms, which run them in a thread. `Supervisor`
restarts what exits on its own, as Compose's `restart: unless-stopped` would.

Memory comes from `/proc/<pid>/status` (`VmRSS`, resident now; `VmHWM`, the peak so far), CPU time
from `/proc/<pid>/stat` (user + system).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from signal import SIGCONT, SIGKILL, SIGTERM
from typing import IO

import httpx

ROOT = Path(__file__).resolve().parent.parent
HEALTH_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ServiceError(RuntimeError):
    pass


@dataclass(frozen=True)
class Memory:
    rss_mb: float
    peak_mb: float


def read_memory(pid: int) -> Memory | None:
    """Resident and peak resident memory of a live process, in MiB; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values: dict[str, float] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) / 1024
    if "VmRSS" not in values:
        return None
    return Memory(round(values["VmRSS"], 1), round(values.get("VmHWM", values["VmRSS"]), 1))


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a live process has used so far, in seconds; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name (which may hold spaces): utime and stime are the 12th and
    # 13th (fields 14 and 15 of the whole line, proc(5)).
    fields = text.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_of_command(command: str) -> float:
    """CPU seconds used so far by every live process whose command name is `command`."""
    total = 0.0
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() != command:
                continue
        except OSError:
            continue
        total += cpu_seconds(int(comm.parent.name)) or 0.0
    return total


class ServiceProcess:
    """One service process; `start` may be called again after it exited (a restart).

    It remembers how often it started and how it exited, and whether it is held down (killed or
    stopped on purpose): then a `Supervisor` leaves it be until it is started again."""

    def __init__(
        self, name: str, module: str, env: dict[str, str], health_url: str, log_path: Path
    ) -> None:
        self.name = name
        self.module = module
        self.env = env
        self.health_url = health_url
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.held_down = False
        self.starts = 0
        self.exits: list[int] = []
        self._log: IO[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ServiceError(f"{self.name} was never started")
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._close_log()
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module],
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.starts += 1
        self.held_down = False

    def wait_healthy(self, within_s: float = HEALTH_TIMEOUT_S) -> None:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if not self.running:
                raise ServiceError(f"{self.name} exited {self.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.health_url, timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise ServiceError(f"{self.name} not healthy within {within_s:.0f}s:\n{self.log_tail()}")

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.running:
            self.proc.send_signal(sig)

    def kill(self) -> int | None:
        """SIGKILL and keep it down (no supervisor restart) until `start`; the exit code."""
        return self.stop(SIGKILL)

    def stop(self, sig: int = SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """`sig` (after SIGCONT, in case it was paused), SIGKILL if it does not exit within
        `timeout`; keeps it down; the exit code (None when it was never started)."""
        self.held_down = True
        if self.proc is None:
            return None
        if self.running:
            self.proc.send_signal(SIGCONT)
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.exits.append(self.proc.returncode)
        self._close_log()
        return self.proc.returncode

    async def await_healthy(self, within_s: float = HEALTH_TIMEOUT_S) -> None:
        await asyncio.to_thread(self.wait_healthy, within_s)

    async def astop(self, sig: int = SIGTERM) -> int | None:
        return await asyncio.to_thread(self.stop, sig)

    async def akill(self) -> int | None:
        return await asyncio.to_thread(self.kill)

    def memory(self) -> Memory | None:
        return read_memory(self.pid) if self.running else None

    def cpu(self) -> float | None:
        return cpu_seconds(self.pid) if self.running else None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def service(
    name: str, env: dict[str, str], health_url: str, log_dir: Path, tag: str = ""
) -> ServiceProcess:
    """`python -m services.<name>`, logging to `<log_dir>/<tag><name>.log` (not started)."""
    return ServiceProcess(name, f"services.{name}", env, health_url, log_dir / f"{tag}{name}.log")


async def start_all(procs: Sequence[ServiceProcess]) -> None:
    """Start the processes together (imports overlap), then wait until each one is healthy."""
    for proc in procs:
        proc.start()
    await asyncio.gather(*(proc.await_healthy() for proc in procs))


async def stop_all(procs: Sequence[ServiceProcess]) -> None:
    await asyncio.gather(*(proc.astop() for proc in procs))


@dataclass(frozen=True)
class Restart:
    service: str
    exit_code: int
    at: float


class Supervisor:
    """Restart what exits on its own after `delay_s`, as `restart: unless-stopped` would.

    With a `limit`, more than `limit` exits within `window_s` give up instead: restarting forever
    would hide a broken configuration (`gave_up` is set, and `on_exit` told each one)."""

    def __init__(
        self,
        services: list[ServiceProcess],
        *,
        delay_s: float = 1.0,
        limit: int | None = None,
        window_s: float = 60.0,
        on_exit: Callable[[ServiceProcess, int], None] | None = None,
    ) -> None:
        self.services = services
        self.delay_s = delay_s
        self.limit = limit
        self.window_s = window_s
        self.on_exit = on_exit
        self.restarts: list[Restart] = []
        self.gave_up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def add(self, service: ServiceProcess) -> None:
        self.services.append(service)

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            for service in list(self.services):
                code = service.returncode
                if service.proc is None or service.held_down or code is None:
                    continue
                service.exits.append(code)
                self.restarts.append(Restart(service.name, code, time.time()))
                if self.on_exit is not None:
                    self.on_exit(service, code)
                if self._too_many():
                    self.gave_up.set()
                    return
                await asyncio.sleep(self.delay_s)
                if not service.held_down:
                    service.start()

    def _too_many(self) -> bool:
        if self.limit is None:
            return False
        recent = [r for r in self.restarts if time.time() - r.at < self.window_s]
        return len(recent) > self.limit

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
