"""The services as processes, the way a supervisor (Compose's `restart: unless-stopped`) runs them.

Each `Service` is `python -m services.<module>` with its environment; its output (JSON log lines)
goes to one file per service, appended across restarts. `Supervisor` restarts a process that exits
on its own, after `RESTART_DELAY_S`, and records it: the services are built to exit when they
cannot go on (a lost consumer group, say) and to be restarted; the table reports how often that
happened. A process the suite kills on purpose is left down until the fault brings it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
HEALTH_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
RESTART_DELAY_S = 1.0


class ServiceError(RuntimeError):
    pass


@dataclass
class Service:
    name: str
    module: str
    env: dict[str, str]
    health_url: str
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    # True while the suite wants it down (killed on purpose, or stopping): no supervisor restart.
    held_down: bool = False
    starts: int = 0
    exits: list[int] = field(default_factory=list)

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
        self.starts += 1
        self.held_down = False

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
        if self.running:
            self.proc.send_signal(sig)  # type: ignore[union-attr]

    async def kill(self) -> int | None:
        """SIGKILL and keep it down (no supervisor restart) until `start`."""
        self.held_down = True
        if self.proc is None:
            return None
        if self.running:
            self.proc.send_signal(signal.SIGKILL)
        code = await self.proc.wait()
        self.exits.append(code)
        return code

    async def stop(self) -> int | None:
        """SIGTERM (SIGKILL after STOP_TIMEOUT_S); the exit code."""
        self.held_down = True
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
            self.exits.append(self.proc.returncode or 0)
        return self.proc.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@dataclass(frozen=True)
class Restart:
    service: str
    exit_code: int
    at: float


class Supervisor:
    """Restart what exits on its own, as `restart: unless-stopped` would."""

    def __init__(self, services: list[Service]) -> None:
        self.services = services
        self.restarts: list[Restart] = []
        self._task: asyncio.Task[None] | None = None

    def add(self, service: Service) -> None:
        self.services.append(service)

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            for service in list(self.services):
                proc = service.proc
                if proc is None or service.held_down or proc.returncode is None:
                    continue
                code = proc.returncode
                service.exits.append(code)
                self.restarts.append(Restart(service.name, code, time.time()))
                await asyncio.sleep(RESTART_DELAY_S)
                if not service.held_down:
                    await service.start()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
