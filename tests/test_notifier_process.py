"""`python -m services.notifier` as a process: it serves, and SIGTERM closes clients with 1001."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import redis.asyncio as aioredis
import websockets
from websockets.asyncio.client import connect

from devtools.servers import free_port
from shared.streams import Streams
from tests.helpers.notifier import make_signal, publish, recv_hello, recv_signals
from tests.helpers.processes import ServiceProcess

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


async def test_process_serves_and_closes_clients_on_sigterm(
    redis_url: str, namespace: str, streams: Streams, redis_client: aioredis.Redis
) -> None:
    port = free_port()
    proc = ServiceProcess(
        "notifier",
        {"REDIS_URL": redis_url, "STREAM_NAMESPACE": namespace, "NOTIFIER_PORT": str(port),
         "NOTIFIER_HOST": "127.0.0.1"},
        health_url=f"http://127.0.0.1:{port}/health",
        tag="notifier-process-",
    )
    try:
        await asyncio.to_thread(proc.wait_healthy)
        async with connect(f"ws://127.0.0.1:{port}/ws") as ws:
            await recv_hello(ws)
            ids = await publish(redis_client, streams.signals, [make_signal(n) for n in range(3)])
            assert [m["id"] for m in await recv_signals(ws, 3)] == ids
            async with httpx.AsyncClient() as http:
                metrics = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
            assert "betterbot_notifier_signals_read_total 3.0" in metrics

            returncode = await asyncio.to_thread(proc.stop)
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            assert ws.close_code == 1001
            assert ws.close_reason == "server shutting down; reconnect and resume"
        assert returncode == 0, proc.log_tail()
    finally:
        proc.stop()
