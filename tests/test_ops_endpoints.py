"""Every service, started as its own process, answers /health (200, JSON with `ok`) and /metrics
(Prometheus text with its `betterbot_` metrics) — what the compose healthchecks and Prometheus use.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devtools.servers import free_port
from tests.helpers.processes import ServiceProcess

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

ROOT = Path(__file__).resolve().parent.parent
WALLETS = ROOT / "config" / "wallets.example.json"
# The metric each service must export (its own prefix), proof that /metrics is the service's own.
OWN_PREFIX = {
    "simulator": "betterbot_sim_",
    "ingestor": "betterbot_ingestor_",
    "detector": "betterbot_detector_",
    "store": "betterbot_store_",
    "notifier": "betterbot_notifier_",
}


@pytest.fixture
def services(redis_url: str, database_url: str, namespace: str) -> Iterator[dict[str, str]]:
    """Start all five; yields name -> base URL; stops them (SIGTERM) afterwards."""
    key = "ops" + secrets.token_hex(8)
    ports = {name: free_port() for name in OWN_PREFIX}
    sim = f"127.0.0.1:{ports['simulator']}"
    common = {
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "STREAM_NAMESPACE": namespace,
        "WALLETS_FILE": str(WALLETS),
    }
    env = {
        "simulator": {"SIM_PORT": str(ports["simulator"]), "SIM_API_KEY": key, "SIM_LOOP": "false"},
        "ingestor": {
            "OPS_PORT": str(ports["ingestor"]),
            "DOME_WS_URL": f"ws://{sim}",
            "DOME_API_URL": f"http://{sim}/v1",
            "DOME_API_KEY": key,
        },
        "detector": {"OPS_PORT": str(ports["detector"])},
        "store": {"OPS_PORT": str(ports["store"])},
        "notifier": {"NOTIFIER_PORT": str(ports["notifier"])},
    }
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    procs = [
        ServiceProcess(name, {**common, **env[name]}, f"{urls[name]}/health", tag="ops-")
        for name in OWN_PREFIX
    ]
    try:
        yield urls
    finally:
        for proc in reversed(procs):
            proc.stop()


async def test_every_service_serves_health_and_metrics(services: dict[str, str]) -> None:
    async with httpx.AsyncClient(timeout=5) as client:

        async def healthy(name: str) -> httpx.Response:
            for _ in range(300):
                try:
                    response = await client.get(f"{services[name]}/health")
                    if response.status_code == 200:
                        return response
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
            raise AssertionError(f"{name} not healthy in 30 s")

        responses = await asyncio.gather(*(healthy(name) for name in services))
        for name, response in zip(services, responses, strict=True):
            assert response.headers["content-type"].startswith("application/json"), name
            assert response.json()["ok"] is True, (name, response.json())

            metrics = await client.get(f"{services[name]}/metrics")
            assert metrics.status_code == 200, name
            assert metrics.headers["content-type"].startswith("text/plain"), name
            names = {f.name for f in text_string_to_metric_families(metrics.text)}
            assert any(n.startswith(OWN_PREFIX[name]) for n in names), (name, sorted(names))
