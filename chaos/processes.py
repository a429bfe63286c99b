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
import time
from dataclasses import dataclass
from pathlib import Path

from devtools.processes import ROOT, ServiceError, ServiceProcess

__all__ = ["ROOT", "Restart", "Service", "ServiceError", "Supervisor"]

RESTART_DELAY_S = 1.0


class Service(ServiceProcess):
    """A service process that remembers how often it started and how it exited, and whether the
    suite holds it down (killed on purpose, or stopping): then the supervisor leaves it be."""

    def __init__(
        self, name: str, module: str, env: dict[str, str], health_url: str, log_path: Path
    ) -> None:
        super().__init__(name, module, env, health_url, log_path)
        self.held_down = False
        self.starts = 0
        self.exits: list[int] = []

    async def start(self) -> None:
        await super().start()
        self.starts += 1
        self.held_down = False

    async def kill(self) -> int | None:
        """SIGKILL and keep it down (no supervisor restart) until `start`."""
        self.held_down = True
        code = await super().kill()
        if code is not None:
            self.exits.append(code)
        return code

    async def stop(self) -> int | None:
        """SIGTERM (SIGKILL after the stop timeout) and keep it down; the exit code."""
        self.held_down = True
        was_running = self.running
        code = await super().stop()
        if was_running:
            self.exits.append(code or 0)
        return code


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
