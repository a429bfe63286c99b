"""Services as real processes in tests: the one runner (devtools/processes.py), started at once,
each logging to tests/output/<tag><name>.log."""

from __future__ import annotations

from pathlib import Path

from devtools import processes

ROOT = Path(__file__).resolve().parents[2]
OUTPUT = ROOT / "tests" / "output"


class ServiceProcess(processes.ServiceProcess):
    """`python -m services.<name>` with the given environment, started."""

    def __init__(self, name: str, env: dict[str, str], health_url: str, tag: str = "") -> None:
        super().__init__(name, f"services.{name}", env, health_url, OUTPUT / f"{tag}{name}.log")
        # A test's log holds this run only.
        self.log_path.unlink(missing_ok=True)
        self.start()
