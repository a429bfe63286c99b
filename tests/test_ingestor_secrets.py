"""Neither the Dome key nor the polynode or Predexon key appears in any log line, error message,
status field, dead letter or metric label, through auth failures (refused handshakes, a revoking
close, refused REST calls) and several reconnects, in every dialect.

Log records are checked as they were created (message, arguments, extras, exception text), not
only as the JSON formatter prints them: the formatter scrubs registered secrets, and the point is
that the code never puts a key there in the first place (the one deliberate exception is the
websockets library's request line, which a filter scrubs at the source)."""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client import generate_latest

from shared.streams import Streams
from tests.helpers.ingestion import (
    WALLETS,
    converge,
    ingestor_settings,
    running,
    simulator,
    subscribed,
    until,
)

DOME_KEY = "sk-dome-leakcheck-93e1f0c2a7b4"
POLYNODE_KEY = "pn-leakcheck-5d8a2e6b1c0f"
PREDEXON_KEY = "pdx-leakcheck-2c7f9b0e4a61"


def _record_texts(records: list[logging.LogRecord]) -> list[str]:
    formatter = logging.Formatter()
    texts = []
    for record in records:
        texts.append(record.getMessage())
        texts.append(repr(record.__dict__))
        if record.exc_info:
            texts.append(formatter.formatException(record.exc_info))
    return texts


@pytest.mark.parametrize("dialect", ["dome", "polynode", "predexon"])
async def test_no_key_in_any_log_error_or_metric_through_auth_failures_and_reconnects(
    dialect: str,
    redis_url: str,
    namespace: str,
    redis_client: aioredis.Redis,
    streams: Streams,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    overrides: dict[str, Any] = {"dome_api_key": DOME_KEY, "dome_reconnect_max_s": 0.1}
    if dialect == "polynode":
        overrides.update(dome_dialect="polynode", polynode_api_key=POLYNODE_KEY)
    if dialect == "predexon":
        overrides.update(dome_dialect="predexon", predexon_api_key=PREDEXON_KEY)
    # No key of its own: the simulator takes any key, and refuses all while auth is rejected.
    async with simulator(sim_api_key="") as sim:
        if dialect == "polynode":
            overrides["dome_ws_url"] = f"{sim.ws_url}/ws"
        if dialect == "predexon":
            overrides["dome_ws_url"] = f"{sim.ws_url}/v1"
        settings = ingestor_settings(sim, redis_url, namespace, **overrides)
        snapshots: list[str] = [str(settings), repr(settings), repr(settings.model_dump())]
        await sim.post("/_sim/auth", {"reject": True})
        async with running(settings) as ingestor:
            await until(lambda: _count(caplog, "auth_failed") >= 2)
            snapshots += await _errors(ingestor, redis_client, streams)
            await sim.post("/_sim/auth", {"reject": False})
            for _ in range(2):
                await subscribed(ingestor)
                await sim.post("/_sim/drop")
            await subscribed(ingestor)
            await sim.post_raw("/_sim/inject", "not json")
            await sim.emit(WALLETS, 10)
            await converge(sim, redis_client, streams, WALLETS)
            await sim.post("/_sim/auth", {"reject": True, "drop": True})
            await until(lambda: _count(caplog, "auth_failed") >= 4)
            await sim.post("/_sim/auth", {"reject": False})
            await subscribed(ingestor)
            snapshots += await _errors(ingestor, redis_client, streams)
        assert ingestor.websocket is not None and ingestor.websocket.status.reconnects >= 4
    snapshots += await _errors(ingestor, redis_client, streams, health=False)
    snapshots.append(generate_latest().decode())
    texts = [*_record_texts(caplog.records), caplog.text, *snapshots]
    # The test would prove nothing if the failures had not been logged with their reasons.
    assert any("4001" in text for text in texts) and any("401" in text for text in texts)
    for key in (DOME_KEY, POLYNODE_KEY, PREDEXON_KEY):
        leaks = [text[:300] for text in texts if key in text]
        assert leaks == [], f"{key[:6]}... leaked"


def _count(caplog: pytest.LogCaptureFixture, event: str) -> int:
    return sum(record.getMessage() == event for record in caplog.records)


async def _errors(
    ingestor: Any, client: aioredis.Redis, streams: Streams, *, health: bool = True
) -> list[str]:
    """Every place an error message surfaces: health, status hash, dead letters, statuses."""
    texts = [repr(await client.hgetall(streams.feed_status_key()))]
    texts.append(repr(await client.xrange(streams.orders_dead)))
    texts += [repr(status) for status in ingestor.statuses]
    if ingestor.websocket is not None:
        texts += [repr(conn.status) for conn in ingestor.websocket.connections]
    if health:
        texts.append(orjson.dumps((await ingestor.health())[1]).decode())
    return texts
