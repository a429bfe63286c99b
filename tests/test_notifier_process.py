"""`python -m services.notifier` as a process: it serves, and SIGTERM closes clients with 1001."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import orjson
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
        {
            "REDIS_URL": redis_url,
            "STREAM_NAMESPACE": namespace,
            "NOTIFIER_PORT": str(port),
            "NOTIFIER_HOST": "127.0.0.1",
        },
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


async def test_open_feed_is_announced_and_a_bad_webhooks_file_stops_the_start(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    hooks = tmp_path / "webhooks.yaml"
    hooks.write_text("webhooks:\n  - url: https://example.com/h\n    secret: too-short\n")
    port = free_port()
    proc = ServiceProcess(
        "notifier",
        {
            "REDIS_URL": redis_url,
            "STREAM_NAMESPACE": namespace,
            "NOTIFIER_PORT": str(port),
            "WEBHOOKS_FILE": str(hooks),
            "NOTIFIER_TOKENS": "",
        },
        health_url=f"http://127.0.0.1:{port}/health",
        tag="notifier-badhooks-",
    )
    returncode = await asyncio.to_thread(proc.proc.wait, 30)
    proc.stop()
    lines = [orjson.loads(line) for line in proc.log_text().splitlines() if line.startswith("{")]
    events = {line["event"]: line for line in lines}
    assert returncode == 2, proc.log_tail()
    assert events["notifier_open"]["level"] == "warning"
    assert events["webhooks_file_invalid"]["error"] == (
        f"{hooks}: webhook 1: secret: must be at least 16 characters"
    )
