"""A Redis of the suite's own, so it can be killed and restarted without touching anyone else's.

Append-only with `appendfsync always`: every write the server answered is on disk before the
answer, so a SIGKILL loses nothing that a client saw acknowledged; the restart replays the file.
The data directory is a temporary one, removed by `stop`.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from devtools.servers import free_port, port_open

START_TIMEOUT_S = 20.0


class RedisServerError(RuntimeError):
    pass


class ThrowawayRedis:
    def __init__(self, log_dir: Path, password: str | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisServerError("redis-server is not installed: the chaos suite starts its own")
        self.binary = binary
        self.port = free_port()
        self.data_dir = Path(tempfile.mkdtemp(prefix="bb-chaos-redis-"))
        self.log_path = log_dir / "redis-server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.password = password

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def _command(self) -> list[str]:
        return [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--logfile",
            str(self.log_path),
            *(["--requirepass", self.password] if self.password else []),
        ]

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self._command(), stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not port_open("127.0.0.1", self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RedisServerError(f"redis-server did not start; see {self.log_path}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: no shutdown save, no goodbye to clients; only the append-only file remains."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    async def restart(self, down_s: float) -> None:
        self.kill()
        await asyncio.sleep(down_s)
        await asyncio.to_thread(self.start)
        self.restarts += 1

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.data_dir, ignore_errors=True)
