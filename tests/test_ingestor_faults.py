"""Every fault the simulator can produce, against real Redis: after each, the set of order_keys in
`orders.raw` equals the simulator's ground truth of tracked-wallet fills exactly (no loss, no
duplicate). Trades emitted while the ingestor is away reach it only through the gap backfill, and
the tests check that the backfill is what recovered them."""

from __future__ import annotations

import itertools
import logging
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from services.ingestor.service import Ingestor
from services.ingestor.sources.dome_ws import DomeWebSocketSource
from shared.orders_raw import watermark_key
from shared.streams import Streams
from tests.helpers.ingestion import (
    WALLETS,
    Sim,
    caught_up,
    converge,
    ingestor_settings,
    metric,
    raw_payloads,
    running,
    simulator,
    subscribed,
    truth_key,
    until,
)

BACKFILLED = "betterbot_ingestor_backfilled_total"


def _ws(ingestor: Ingestor) -> DomeWebSocketSource:
    assert ingestor.websocket is not None
    return ingestor.websocket


async def _sources_of(
    client: aioredis.Redis, streams: Streams, trades: list[dict[str, Any]]
) -> set[str]:
    by_key = {p["order_key"]: p["source"] for p in await raw_payloads(client, streams)}
    return {by_key[truth_key(trade)] for trade in trades}


async def _recovered_by_backfill(
    sim: Sim, ingestor: Ingestor, client: aioredis.Redis, streams: Streams, missed: list[Any]
) -> None:
    await converge(sim, client, streams, WALLETS)
    assert await _sources_of(client, streams, missed) == {"dome_rest"}
    await caught_up(ingestor)


async def test_a_dropped_connection_is_backfilled_with_what_was_emitted_meanwhile(
    redis_url: str, namespace: str, redis_client: aioredis.Redis, streams: Streams
) -> None:
    async with (
        simulator() as sim,
        running(ingestor_settings(sim, redis_url, namespace)) as ingestor,
    ):
        await subscribed(ingestor)
        await sim.emit(WALLETS, 10)
        # Handshakes are refused while the socket is down, so the gap is certain.
        await sim.post("/_sim/auth", {"reject": True})
        await sim.post("/_sim/drop")
        backfilled = metric(BACKFILLED, source="dome_rest")
        missed = await sim.emit(WALLETS, 25)
        await until(lambda: _ws(ingestor).status.reconnects >= 1)
        await sim.post("/_sim/auth", {"reject": False})
        await sim.emit(WALLETS, 5)
        await _recovered_by_backfill(sim, ingestor, redis_client, streams, missed)
        assert metric(BACKFILLED, source="dome_rest") - backfilled >= len(missed)


async def test_a_dropped_connection_mid_tape_loses_nothing(
    redis_url: str, namespace: str, redis_client: aioredis.Redis, streams: Streams
) -> None:
    async with (
        simulator(sim_speed=1500.0) as sim,
        running(ingestor_settings(sim, redis_url, namespace)) as ingestor,
    ):
        await subscribed(ingestor)
        for share in (200, 450, 700):
            await until(lambda n=share: _emitted_at_least(sim, n))
            await sim.post("/_sim/drop")
        await until(lambda: _tape_done(sim))
        await converge(sim, redis_client, streams, WALLETS)
        assert _ws(ingestor).status.reconnects >= 3


async def _emitted_at_least(sim: Sim, count: int) -> bool:
    return bool((await sim.status())["emitted"] >= count)


async def _tape_done(sim: Sim) -> bool:
    return bool((await sim.status())["tape_done"])


def _lost_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        str(record.__dict__["error"])
        for record in caplog.records
        if record.getMessage() == "connection_lost"
    ]


async def test_a_silent_stall_is_caught_by_the_pong_timeout(
    redis_url: str,
    namespace: str,
    redis_client: aioredis.Redis,
    streams: Streams,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="services.ingestor")
    async with simulator() as sim:
        settings = ingestor_settings(
            sim,
            redis_url,
            namespace,
            dome_ping_interval_s=0.2,
            dome_ping_timeout_s=0.3,
            dome_silence_timeout_s=0,
        )
        async with running(settings) as ingestor:
            await subscribed(ingestor)
            assert await sim.post("/_sim/stall") == {"stalled": 1}
            # The stalled socket stays open: these are lost unless the stall is detected.
            missed = await sim.emit(WALLETS, 20)
            await until(lambda: _ws(ingestor).status.reconnects >= 1)
            await _recovered_by_backfill(sim, ingestor, redis_client, streams, missed)
    assert any("keepalive ping timeout" in error for error in _lost_errors(caplog))


async def test_a_stall_is_caught_by_the_silence_bound_when_pings_are_far_apart(
    redis_url: str,
    namespace: str,
    redis_client: aioredis.Redis,
    streams: Streams,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="services.ingestor")
    silences = metric("betterbot_ingestor_silence_timeouts_total", source="dome_ws")
    async with simulator() as sim:
        # Pings far apart: only the silence bound can notice within the test.
        settings = ingestor_settings(
            sim,
            redis_url,
            namespace,
            dome_ping_interval_s=60,
            dome_ping_timeout_s=60,
            dome_silence_timeout_s=0.5,
        )
        async with running(settings) as ingestor:
            await subscribed(ingestor)
            await sim.post("/_sim/stall")
            missed = await sim.emit(WALLETS, 20)
            await until(lambda: _ws(ingestor).status.reconnects >= 1)
            await _recovered_by_backfill(sim, ingestor, redis_client, streams, missed)
    assert any("DOME_SILENCE_TIMEOUT_S" in error for error in _lost_errors(caplog))
    assert metric("betterbot_ingestor_silence_timeouts_total", source="dome_ws") > silences


async def test_a_revoked_key_is_an_auth_failure_retried_slowly_then_recovered(
    redis_url: str,
    namespace: str,
    redis_client: aioredis.Redis,
    streams: Streams,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="services.ingestor")
    async with (
        simulator() as sim,
        running(ingestor_settings(sim, redis_url, namespace)) as ingestor,
    ):
        await subscribed(ingestor)
        closed = await sim.post("/_sim/auth", {"reject": True, "drop": True})
        assert closed == {"reject": True, "dropped": 1}
        missed = await sim.emit(WALLETS, 20)
        await until(lambda: _auth_failures(caplog) >= 3)
        assert _ws(ingestor).status.state == "auth_failed"
        await sim.post("/_sim/auth", {"reject": False})
        await _recovered_by_backfill(sim, ingestor, redis_client, streams, missed)
    failures = [r for r in caplog.records if r.getMessage() == "auth_failed"]
    # The server's close (4001) and the refused handshakes (401) are both auth failures.
    assert "4001" in failures[0].__dict__["error"]
    assert any(r.__dict__["status"] == 401 for r in failures[1:])
    # Retried at the maximum backoff (0.3 s here, less at most a quarter of jitter).
    delays = [
        later.__dict__["in_s"]
        for record, later in itertools.pairwise(caplog.records)
        if record.getMessage() == "auth_failed" and later.getMessage() == "reconnect_scheduled"
    ]
    assert delays and all(0.225 <= delay <= 0.3 for delay in delays)


def _auth_failures(caplog: pytest.LogCaptureFixture) -> int:
    return sum(record.getMessage() == "auth_failed" for record in caplog.records)


async def test_malformed_frames_are_dead_lettered_and_the_stream_goes_on(
    redis_url: str, namespace: str, redis_client: aioredis.Redis, streams: Streams
) -> None:
    untracked = "0x" + "9" * 40
    async with simulator() as sim:
        settings = ingestor_settings(sim, redis_url, namespace, dome_max_frame_bytes=4096)
        async with running(settings) as ingestor:
            await subscribed(ingestor)
            await sim.emit(WALLETS, 5)
            good = {"token_id": "1", "side": "BUY", "shares_normalized": 1, "price": 0.5}
            bad = {
                "bad_json": '{"type":"event",',
                "invalid_event": _event({**good, "price": "0.5", "user": WALLETS[0]}),
                "unknown_type": '{"type":"heartbeat"}',
                "oversized": _event({**good, "title": "x" * 5000, "user": WALLETS[0]}),
                "untracked_wallet": _event({**good, "user": untracked}),
            }
            for frame in bad.values():
                assert await sim.post_raw("/_sim/inject", frame) == {"sent": 1}
            await sim.emit([*WALLETS, untracked], 21)
            await converge(sim, redis_client, streams, WALLETS)
            await until(lambda: _count(redis_client, streams.orders_dead, len(bad)))
            assert _ws(ingestor).status.reconnects == 0
    dead = [fields for _, fields in await redis_client.xrange(streams.orders_dead)]
    for fields, (kind, frame) in zip(dead, bad.items(), strict=True):
        assert fields[b"reason"].decode().startswith(f"{kind}: ")
        if kind != "oversized":
            assert fields[b"raw"] == frame.encode()


def _event(data: dict[str, Any]) -> str:
    payload = {"tx_hash": "0x1", "timestamp": 1, **data}
    return orjson.dumps({"type": "event", "subscription_id": "sub_x", "data": payload}).decode()


async def _count(client: aioredis.Redis, stream: str, expected: int) -> bool:
    return bool(await client.xlen(stream) == expected)


async def test_backfill_honours_429_and_retry_after(
    redis_url: str, namespace: str, redis_client: aioredis.Redis, streams: Streams
) -> None:
    limited = metric("betterbot_ingestor_rate_limited_total", source="dome_rest")
    async with (
        simulator() as sim,
        running(ingestor_settings(sim, redis_url, namespace)) as ingestor,
    ):
        await subscribed(ingestor)
        await caught_up(ingestor)
        await sim.post("/_sim/auth", {"reject": True})
        await sim.post("/_sim/drop")
        missed = await sim.emit(WALLETS, 20)
        # A fractional Retry-After keeps the test short (the client reads seconds as a float).
        await sim.post("/_sim/rate_limit", {"requests": 3, "retry_after": 0.4})
        await sim.post("/_sim/auth", {"reject": False})
        await _recovered_by_backfill(sim, ingestor, redis_client, streams, missed)
    requests = await sim_requests_after_first_429(sim)
    throttled = [r for r in requests if r["status"] == 429]
    assert len(throttled) == 3
    # No request went out before the Retry-After of the 429 before it had passed.
    for before, after in itertools.pairwise(requests):
        if before["status"] == 429:
            assert after["at"] - before["at"] >= 0.4 - 0.01
    assert metric("betterbot_ingestor_rate_limited_total", source="dome_rest") - limited == 3


async def sim_requests_after_first_429(sim: Sim) -> list[dict[str, Any]]:
    requests = list(sim.sim.app.state.faults.requests)
    first = next(i for i, r in enumerate(requests) if r.status == 429)
    return [r.to_json() for r in requests[first:]]


async def test_a_restarted_ingestor_backfills_from_its_watermark_in_redis(
    redis_url: str, namespace: str, redis_client: aioredis.Redis, streams: Streams
) -> None:
    async with simulator() as sim:
        settings = ingestor_settings(sim, redis_url, namespace)
        async with running(settings) as ingestor:
            await subscribed(ingestor)
            await caught_up(ingestor)
            await sim.emit(WALLETS, 20)
            await converge(sim, redis_client, streams, WALLETS)
        marks = await redis_client.hgetall(watermark_key(streams))
        assert {field.decode() for field in marks} >= {f"dome:{w}" for w in WALLETS[:20]}
        # Down for a while: trades go on without it.
        missed = await sim.emit(WALLETS, 30)
        async with running(settings) as ingestor:
            await _recovered_by_backfill(sim, ingestor, redis_client, streams, missed)
        emitted = await sim.get("/_sim/trades")
    marks = {
        field.decode(): int(value)
        for field, value in (await redis_client.hgetall(watermark_key(streams))).items()
    }
    # Each wallet's mark reached its newest fill recovered by the restart's backfill, and no mark
    # is past anything that exists (the tape may still have been emitting newer trades).
    for trade in missed:
        assert marks[f"dome:{trade['user']}"] >= trade["timestamp"]
    assert max(marks.values()) <= max(t["timestamp"] for t in emitted)
