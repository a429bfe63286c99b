"""Schema-driven fuzzing of the store's API: schemathesis reads the OpenAPI document of a real
`python -m services.store` process and sends it valid and invalid requests (coverage, fuzzing and
stateful phases; at most 30 examples per operation, a fixed seed so CI is repeatable). Every
check runs: no 500, status codes, content types, headers and bodies as documented, invalid input
refused, valid input accepted (except the opaque cursor: see `tests/schemathesis.toml`)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from devtools.servers import free_port
from shared.streams import Streams
from tests.helpers.processes import ServiceProcess
from tests.test_store_rows import make_fill, make_signal
from tests.test_store_service import wait_until, xadd_all

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

TOKEN = "schemathesis-token-0123456789"
CONFIG = Path(__file__).with_name("schemathesis.toml")
SEED = "20251106"


async def test_the_api_survives_schemathesis(
    redis_url: str,
    database_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    await xadd_all(redis_client, streams.orders_raw, [make_fill(i) for i in range(30)])
    await xadd_all(redis_client, streams.signals, [make_signal(i) for i in range(30)])
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = ServiceProcess(
        "store",
        {
            "REDIS_URL": redis_url,
            "DATABASE_URL": database_url,
            "STREAM_NAMESPACE": namespace,
            "OPS_PORT": str(port),
            "STORE_BLOCK_MS": "20",
            "STORE_API_TOKEN": TOKEN,
        },
        f"{base}/health",
        tag="schemathesis-",
    )
    try:
        await asyncio.to_thread(proc.wait_healthy)
        async with httpx.AsyncClient(base_url=base) as client:

            async def stored() -> bool:
                response = await client.get("/signals", params={"limit": 1000})
                return len(response.json()["items"]) == 30

            await wait_until(stored, "the signals to be stored")
        run = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "schemathesis.cli",
                "--config-file",
                str(CONFIG),
                "run",
                f"{base}/openapi.json",
                "--header",
                f"Authorization: Bearer {TOKEN}",
                "--max-examples",
                "30",
                "--seed",
                SEED,
                "--generation-database",
                "none",
                "--no-color",
                "--workers",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
        assert "No issues found" in run.stdout
        assert "Tested: 6" in run.stdout  # every operation was exercised
    finally:
        proc.stop()
    log = proc.log_text()
    assert "Traceback" not in log, proc.log_tail()
    assert TOKEN not in log
