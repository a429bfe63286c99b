"""examples/consume_signals.py receives a signal from a running pipeline and acks it.

The real processes (simulator replaying the 40 oldest trades of the tape, ingestor, detector) on a
real Redis; the example runs as a subprocess, as someone else's service would, with its own
consumer group, and stops after one signal.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis

from devtools.servers import free_port
from shared.models import Signal
from shared.streams import Streams
from tests.helpers.processes import ServiceProcess

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

ROOT = Path(__file__).resolve().parent.parent
WALLETS = ROOT / "config" / "wallets.example.json"
GROUP = "example-consumer"


def short_tape(path: Path, trades: int = 40) -> Path:
    items = orjson.loads((ROOT / "data" / "polymarket_trades_nobel2025.json").read_bytes())
    items.reverse()  # newest first in the file; the stable sort keeps same-second order
    items.sort(key=lambda item: item["timestamp"])
    path.write_bytes(orjson.dumps(items[:trades]))
    return path


@pytest.fixture
def processes() -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for proc in reversed(started):
        proc.stop()


async def _group_exists(client: aioredis.Redis, stream: str, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if await client.exists(stream) and any(
            g["name"].decode() == GROUP for g in await client.xinfo_groups(stream)
        ):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the example did not create its group on {stream}")


async def test_example_consumer_gets_and_acks_a_signal(
    redis_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
    processes: list[ServiceProcess],
    tmp_path: Path,
) -> None:
    key, sim_port = "ex" + secrets.token_hex(8), free_port()
    det_port, ing_port = free_port(), free_port()
    env = {"REDIS_URL": redis_url, "STREAM_NAMESPACE": namespace, "WALLETS_FILE": str(WALLETS)}
    sim = ServiceProcess(
        "simulator",
        {
            **env,
            "SIM_PORT": str(sim_port),
            "SIM_SPEED": "400",
            "SIM_LOOP": "false",
            "SIM_API_KEY": key,
            "SIM_TAPE": str(short_tape(tmp_path / "tape.json")),
        },
        f"http://127.0.0.1:{sim_port}/health",
        tag="example-",
    )
    det = ServiceProcess(
        "detector",
        {**env, "OPS_PORT": str(det_port)},
        f"http://127.0.0.1:{det_port}/health",
        tag="example-",
    )
    processes += [sim, det]
    await asyncio.gather(asyncio.to_thread(sim.wait_healthy), asyncio.to_thread(det.wait_healthy))

    consumer = await asyncio.create_subprocess_exec(
        *[
            sys.executable,
            str(ROOT / "examples" / "consume_signals.py"),
            "--redis-url",
            redis_url,
            "--stream",
            streams.signals,
            "--group",
            GROUP,
            "--count",
            "1",
        ],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await _group_exists(redis_client, streams.signals, 15)
        ing = ServiceProcess(
            "ingestor",
            {
                **env,
                "OPS_PORT": str(ing_port),
                "DOME_WS_URL": f"ws://127.0.0.1:{sim_port}",
                "DOME_API_URL": f"http://127.0.0.1:{sim_port}/v1",
                "DOME_API_KEY": key,
                "DOME_RECONNECT_MIN_S": "0.2",
            },
            f"http://127.0.0.1:{ing_port}/health",
            tag="example-",
        )
        processes.append(ing)
        await asyncio.to_thread(ing.wait_healthy)
        out, err = await asyncio.wait_for(consumer.communicate(), 60)
    finally:
        if consumer.returncode is None:
            consumer.kill()
            await consumer.wait()
    assert consumer.returncode == 0, err.decode()

    (line,) = out.decode().splitlines()
    signal = Signal.model_validate(json.loads(line))
    entries = await redis_client.xrange(streams.signals)
    first_id, first = entries[0]
    assert Signal.model_validate_json(first[b"data"]) == signal
    (group,) = [
        g for g in await redis_client.xinfo_groups(streams.signals) if g["name"].decode() == GROUP
    ]
    assert group["pending"] == 0, "the example acked what it handled"
    assert group["last-delivered-id"] == first_id
