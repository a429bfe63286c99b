"""A wallet added through the store's API reaches a running ingestor's Dome subscription: three
real processes (simulator, store, ingestor) on real Redis and Postgres; the simulator's
`/_sim/subscriptions` shows what the ingestor subscribed to."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from devtools.servers import free_port
from shared.models import TrackedWallet
from tests.helpers.processes import ServiceProcess
from tests.test_store_api import W1, W2, W3, wallets_file
from tests.test_store_service import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

TOKEN = "live-test-token-0123456789"
KEY = "live-test-dome-key"


def addresses(subscriptions: list[dict[str, Any]]) -> set[str]:
    """Every wallet named in any subscription's filters."""
    found: set[str] = set()
    for sub in subscriptions:
        for values in sub["filters"].values():
            if isinstance(values, list):
                found |= {str(v).lower() for v in values}
    return found


@pytest.fixture
def processes() -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for proc in reversed(started):
        proc.stop(signal.SIGTERM)


async def start(
    procs: list[ServiceProcess], name: str, env: dict[str, str], health: str
) -> ServiceProcess:
    proc = ServiceProcess(name, env, health, tag="store-live-")
    procs.append(proc)
    await asyncio.to_thread(proc.wait_healthy)
    return proc


async def test_a_wallet_put_through_the_api_reaches_the_ingestor_subscription(
    redis_url: str,
    database_url: str,
    namespace: str,
    tmp_path: Path,
    redis_client: aioredis.Redis,
    processes: list[ServiceProcess],
) -> None:
    seed = wallets_file(
        tmp_path, TrackedWallet(address=W1, label="one"), TrackedWallet(address=W2, label="two")
    )
    common = {
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "STREAM_NAMESPACE": namespace,
        "WALLETS_FILE": seed,
    }
    sim_port, store_port, ingestor_port = free_port(), free_port(), free_port()
    sim, store = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{store_port}"
    await start(
        processes,
        "simulator",
        common
        | {
            "SIM_HOST": "127.0.0.1",
            "SIM_PORT": str(sim_port),
            "SIM_API_KEY": KEY,
            "SIM_SPEED": "1",
            "SIM_LOOP": "false",
        },
        f"{sim}/health",
    )
    await start(
        processes,
        "store",
        common | {"OPS_PORT": str(store_port), "STORE_API_TOKEN": TOKEN},
        f"{store}/health",
    )
    await start(
        processes,
        "ingestor",
        common
        | {
            "OPS_PORT": str(ingestor_port),
            "DOME_WS_URL": f"ws://127.0.0.1:{sim_port}",
            "DOME_API_URL": f"{sim}/v1",
            "DOME_API_KEY": KEY,
            "DOME_RECONNECT_MIN_S": "0.2",
        },
        f"http://127.0.0.1:{ingestor_port}/health",
    )

    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(timeout=5) as client:

        async def subscribed_to(expected: set[str]) -> bool:
            return addresses((await client.get(f"{sim}/_sim/subscriptions")).json()) == expected

        await wait_until(lambda: subscribed_to({W1, W2}), "the seeded wallets' subscription")
        response = await client.put(f"{store}/wallets/{W3}", json={"label": "three"}, headers=auth)
        assert response.status_code == 201, response.text
        await wait_until(lambda: subscribed_to({W1, W2, W3}), "the new wallet's subscription")
        response = await client.delete(f"{store}/wallets/{W1}", headers=auth)
        assert response.status_code == 204, response.text
        await wait_until(lambda: subscribed_to({W2, W3}), "the removed wallet to go")
