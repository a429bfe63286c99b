"""`betterbot lag` against a real Redis, in-process and through `python -m cli`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from shared.streams import Streams
from tests.helpers.cli import Cli

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def groups(redis_client: aioredis.Redis, streams: Streams) -> None:
    """orders.raw: 8 entries; detector read 5 and acked 3; store read none."""
    for _ in range(8):
        await redis_client.xadd(streams.orders_raw, {b"data": b"{}"})
    for group in ("detector", "store"):
        await redis_client.xgroup_create(streams.orders_raw, group, id="0")
    reply = await redis_client.xreadgroup("detector", "det-1", {streams.orders_raw: ">"}, count=5)
    await redis_client.xack(streams.orders_raw, "detector", *[i for i, _ in reply[0][1][:3]])


@pytest.mark.usefixtures("groups")
async def test_lag_pending_and_consumers(
    redis_url: str, namespace: str, capsys: pytest.CaptureFixture[str], streams: Streams
) -> None:
    cli = Cli(redis_url, namespace, capsys)
    code, report, _ = await cli("lag", "--consumers")
    assert code == 0
    by_stream = {item["stream"]: item for item in report}
    assert set(by_stream) >= {streams.orders_raw, streams.signals, streams.orders_dead}
    orders = by_stream[streams.orders_raw]
    groups = {g["group"]: g for g in orders["groups"]}
    assert orders["length"] == 8
    assert (groups["detector"]["lag"], groups["detector"]["pending"]) == (3, 2)
    assert (groups["store"]["lag"], groups["store"]["pending"]) == (8, 0)
    assert groups["detector"]["consumer_list"][0]["name"] == "det-1"
    assert groups["detector"]["consumer_list"][0]["pending"] == 2
    assert by_stream[streams.signals]["groups"] == []


@pytest.mark.usefixtures("groups")
def test_python_dash_m_cli_prints_the_table(redis_url: str, namespace: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cli", "lag", "--stream", "orders.raw"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "REDIS_URL": redis_url, "STREAM_NAMESPACE": namespace},
    )
    assert result.returncode == 0, result.stderr
    header, detector, store = result.stdout.splitlines()
    assert header.split() == ["STREAM", "LENGTH", "GROUP", "CONSUMERS", "PENDING", "LAG"]
    assert detector.split() == [f"{namespace}orders.raw", "8", "detector", "1", "2", "3"]
    assert store.split() == ["store", "0", "0", "8"]


def test_unreachable_redis_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main
    from devtools.servers import free_port

    with pytest.raises(SystemExit) as exit_info:
        main(["lag", "--redis-url", f"redis://:secret-pw@127.0.0.1:{free_port()}/0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "ConnectionError" in err and "secret-pw" not in err


def test_console_script_points_at_main() -> None:
    import importlib
    import tomllib

    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["betterbot"]
    module, _, name = target.partition(":")
    assert callable(getattr(importlib.import_module(module), name))
