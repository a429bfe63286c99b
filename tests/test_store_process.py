"""`python -m services.store` as a real process: /health, /metrics, and SIGTERM mid-stream (exit 0,
nothing acked that is not committed, the consumer leaves the group when it holds nothing)."""

from __future__ import annotations

import asyncio
import signal

import httpx
import pytest
import redis.asyncio as aioredis

from devtools.servers import free_port
from shared.streams import STORE_GROUP, Streams
from tests.helpers.processes import ServiceProcess
from tests.test_store_rows import make_fill
from tests.test_store_service import count, has_rows, settled, wait_until, xadd_all

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def start_store(redis_url: str, database_url: str, namespace: str, tag: str) -> ServiceProcess:
    port = free_port()
    return ServiceProcess(
        "store",
        {
            "REDIS_URL": redis_url,
            "DATABASE_URL": database_url,
            "STREAM_NAMESPACE": namespace,
            "OPS_PORT": str(port),
            "STORE_BLOCK_MS": "20",
            "LOG_LEVEL": "INFO",
        },
        f"http://127.0.0.1:{port}/health",
        tag=tag,
    )


async def test_runs_as_a_process_and_stops_on_sigterm(
    redis_url: str,
    database_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
) -> None:
    proc = start_store(redis_url, database_url, namespace, "store-process-")
    try:
        await asyncio.to_thread(proc.wait_healthy)
        await xadd_all(redis_client, streams.orders_raw, [make_fill(i) for i in range(100)])
        await wait_until(has_rows(database_url, "orders", 100), "100 orders")
        await wait_until(lambda: settled(redis_client, streams.orders_raw), "all acked")
        base = proc.health_url.rsplit("/", 1)[0]
        async with httpx.AsyncClient() as client:
            health = (await client.get(f"{base}/health")).json()
            metrics = (await client.get(f"{base}/metrics")).text
        assert health["ok"] is True and health["postgres"] == "up" and health["schema"] == "005"
        assert 'betterbot_store_rows_inserted_total{table="orders"} 100.0' in metrics
        assert "betterbot_store_db_up 1.0" in metrics
        assert "betterbot_store_commit_seconds_bucket" in metrics

        # SIGTERM while a backlog is being worked off.
        await xadd_all(redis_client, streams.orders_raw, [make_fill(i) for i in range(100, 5100)])
        assert await asyncio.to_thread(proc.stop, signal.SIGTERM) == 0, proc.log_tail()
    finally:
        proc.stop()

    [group] = await redis_client.xinfo_groups(streams.orders_raw)
    # The batch in flight was finished: whatever was read is committed and acked, nothing pending.
    assert group["pending"] == 0
    assert await count(database_url, "orders") == group["entries-read"]
    assert await redis_client.xinfo_consumers(streams.orders_raw, STORE_GROUP) == []
    assert '"event":"store_started"' in proc.log_text()
    assert "Traceback" not in proc.log_text()


async def test_waits_for_postgres_with_red_health_and_still_stops_on_sigterm(
    redis_url: str, namespace: str
) -> None:
    nowhere = f"postgresql://postgres:s3cret-pw@127.0.0.1:{free_port()}/postgres"
    proc = start_store(redis_url, nowhere, namespace, "store-nopg-")
    try:
        async with httpx.AsyncClient() as client:

            async def red_health() -> bool:
                try:
                    response = await client.get(proc.health_url)
                except httpx.HTTPError:
                    return False
                return (
                    response.status_code == 503
                    and response.json().get("postgres_error") == "ConnectionRefusedError"
                )

            await wait_until(red_health, "a 503 naming the error")
            body = (await client.get(proc.health_url)).text
        assert "s3cret-pw" not in body and "127.0.0.1" not in body
        assert await asyncio.to_thread(proc.stop, signal.SIGTERM) == 0, proc.log_tail()
    finally:
        proc.stop()
    assert "s3cret-pw" not in proc.log_text()
    assert "postgres_unavailable" in proc.log_text()
