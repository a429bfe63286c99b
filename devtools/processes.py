"""A service as a child process: `python -m <module>` with its environment, its output appended to
a log file (a file, not a pipe, so a busy service never blocks on a reader that is not reading),
its health, its memory and its CPU time. The benchmark and the chaos suite both run services so.

Memory comes from `/proc/<pid>/status` (`VmRSS`, resident now; `VmHWM`, the peak so far), CPU time
from `/proc/<pid>/stat` (user + system).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

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
    """One service process; `start` may be called again after it exited (a restart)."""

    def __init__(
        self, name: str, module: str, env: dict[str, str], health_url: str, log_path: Path
    ) -> None:
        self.name = name
        self.module = module
        self.env = env
        self.health_url = health_url
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ServiceError(f"{self.name} was never started")
        return self.proc.pid

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                self.module,
                cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )

    async def wait_healthy(self, within_s: float = HEALTH_TIMEOUT_S) -> None:
        deadline = time.monotonic() + within_s
        async with httpx.AsyncClient(timeout=1) as http:
            while time.monotonic() < deadline:
                if not self.running:
                    raise ServiceError(f"{self.name} exited; see {self.log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(self.health_url)).status_code == 200:
                        return
                await asyncio.sleep(0.1)
        raise ServiceError(f"{self.name} not healthy within {within_s:.0f}s; see {self.log_path}")

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.running:
            self.proc.send_signal(sig)

    async def kill(self) -> int | None:
        """SIGKILL; the exit code (None when it was never started)."""
        if self.proc is None:
            return None
        self.signal(signal.SIGKILL)
        return await self.proc.wait()

    async def stop(self) -> int | None:
        """SIGTERM (after SIGCONT, in case it was paused), SIGKILL if it does not exit within
        `STOP_TIMEOUT_S`; the exit code (None when it was never started)."""
        if self.proc is None:
            return None
        if self.running:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        return self.proc.returncode

    def memory(self) -> Memory | None:
        return read_memory(self.proc.pid) if self.proc is not None and self.running else None

    def cpu(self) -> float | None:
        return cpu_seconds(self.proc.pid) if self.proc is not None and self.running else None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
