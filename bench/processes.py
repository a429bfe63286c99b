"""Service processes for the benchmark: `python -m services.<name>` (devtools/processes.py), each
logging to `.run/bench/<tag><name>.log`, started together and stopped together.
"""

from __future__ import annotations

import asyncio

from bench.environment import LOG_DIR
from devtools import processes
from devtools.processes import Memory, cpu_of_command

__all__ = ["Memory", "ServiceProcess", "cpu_of_command", "start_all", "stop_all"]


class ServiceProcess(processes.ServiceProcess):
    """`services.<name>`, logging to `.run/bench/<tag><name>.log`."""

    def __init__(self, name: str, env: dict[str, str], health_url: str, tag: str = "") -> None:
        super().__init__(name, f"services.{name}", env, health_url, LOG_DIR / f"{tag}{name}.log")


async def start_all(procs: list[ServiceProcess]) -> None:
    """Start the processes together (imports overlap), then wait until each one is healthy."""
    for proc in procs:
        await proc.start()
    await asyncio.gather(*(proc.wait_healthy() for proc in procs))


async def stop_all(procs: list[ServiceProcess]) -> None:
    await asyncio.gather(*(proc.stop() for proc in procs))
