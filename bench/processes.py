"""Service processes: `python -m services.<name>` with its environment, its health, its memory.

Each process writes its JSON log to `.run/bench/<tag><name>.log` (a file, not a pipe, so a busy
service never blocks on a benchmark that is not reading). Memory comes from `/proc/<pid>/status`:
`VmRSS` (resident now) and `VmHWM` (the peak resident size of the process so far).
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

from bench.environment import LOG_DIR, ROOT

HEALTH_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0


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


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


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
    for stat in Path("/proc").glob("[0-9]*/comm"):
        try:
            if stat.read_text().strip() != command:
                continue
        except OSError:
            continue
        total += cpu_seconds(int(stat.parent.name)) or 0.0
    return total


class ServiceProcess:
    def __init__(self, name: str, env: dict[str, str], health_url: str, tag: str = "") -> None:
        self.name = name
        self.module = f"services.{name}"
        self.env = env
        self.health_url = health_url
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"{tag}{name}.log"
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} not started"
        return self.proc.pid

    async def start(self) -> None:
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
                if self.proc is None or self.proc.returncode is not None:
                    raise RuntimeError(f"{self.name} exited; see {self.log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(self.health_url)).status_code == 200:
                        return
                await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.name} not healthy within {within_s:.0f}s; see {self.log_path}")

    def memory(self) -> Memory | None:
        if self.proc is None or self.proc.returncode is not None:
            return None
        return read_memory(self.proc.pid)

    def cpu(self) -> float | None:
        if self.proc is None or self.proc.returncode is not None:
            return None
        return cpu_seconds(self.proc.pid)

    async def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time; its exit code."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        return self.proc.returncode


async def start_all(procs: list[ServiceProcess]) -> None:
    """Start the processes together (imports overlap), then wait until each one is healthy."""
    for proc in procs:
        await proc.start()
    await asyncio.gather(*(proc.wait_healthy() for proc in procs))


async def stop_all(procs: list[ServiceProcess]) -> None:
    await asyncio.gather(*(proc.stop() for proc in procs))
