"""shared.stream_metrics against a real Redis: lag, pending and length as Redis reports them, the
estimate when Redis cannot, the gauges `track_streams` sets, and the latency histogram."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from shared.models import Side, Signal, SignalKind, Source
from shared.stream_metrics import (
    observe_signal_latency,
    public_streams,
    stream_stats,
    track_streams,
)
from shared.streams import Streams

pytestmark = pytest.mark.integration


async def _fill(client: aioredis.Redis, stream: str, n: int) -> list[bytes]:
    return [await client.xadd(stream, {b"data": b"{}"}) for _ in range(n)]


async def test_lag_pending_and_length_per_group(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    stream = streams.orders_raw
    await _fill(redis_client, stream, 10)
    await redis_client.xgroup_create(stream, "fast", id="0")
    await redis_client.xgroup_create(stream, "slow", id="0")
    delivered = await redis_client.xreadgroup("fast", "c1", {stream: ">"}, count=10)
    ids = [entry_id for entry_id, _ in delivered[0][1]]
    await redis_client.xack(stream, "fast", *ids[:7])
    await redis_client.xreadgroup("slow", "c2", {stream: ">"}, count=4)

    stats = await stream_stats(redis_client, stream)
    groups = {g.group: g for g in stats.groups}
    assert stats.length == 10
    assert (groups["fast"].lag, groups["fast"].pending, groups["fast"].consumers) == (0, 3, 1)
    assert (groups["slow"].lag, groups["slow"].pending) == (6, 4)
    assert groups["slow"].lag_exact


async def test_lag_is_estimated_when_redis_cannot_tell(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    stream = streams.signals
    ids = await _fill(redis_client, stream, 6)
    await redis_client.xgroup_create(stream, "g", id="0")
    await redis_client.xreadgroup("g", "c", {stream: ">"}, count=2)
    # A deletion inside the unread range makes Redis 7 report the lag as unknown.
    await redis_client.xdel(stream, ids[3])
    (group,) = (await stream_stats(redis_client, stream)).groups
    assert not group.lag_exact
    # entries-added - entries-read: the deleted entry still counts, so at least the 3 unread.
    assert group.lag in (3, 4)


async def test_missing_stream_has_length_zero(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    stats = await stream_stats(redis_client, streams.webhooks_dead)
    assert (stats.length, stats.groups) == (0, ())


async def test_track_streams_sets_and_retires_gauges(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    stream = streams.orders_raw
    await _fill(redis_client, stream, 5)
    await redis_client.xgroup_create(stream, "detector", id="0")
    await redis_client.xreadgroup("detector", "c", {stream: ">"}, count=2)
    stop = asyncio.Event()
    task = asyncio.create_task(track_streams(redis_client, public_streams(streams), stop, 0.05))
    labels = {"stream": stream, "group": "detector"}

    async def value(name: str, **extra: str) -> float | None:
        await asyncio.sleep(0.15)
        return REGISTRY.get_sample_value(name, extra or labels)

    assert await value("betterbot_stream_group_lag") == 3
    assert await value("betterbot_stream_group_pending") == 2
    assert await value("betterbot_stream_group_consumers") == 1
    assert await value("betterbot_stream_length", stream=stream) == 5
    assert await value("betterbot_stream_length", stream=streams.orders_dead) == 0

    await redis_client.xgroup_destroy(stream, "detector")
    assert await value("betterbot_stream_group_lag") is None
    stop.set()
    await asyncio.wait_for(task, 2)


def test_signal_latency_histogram() -> None:
    def count(since: str) -> float:
        value = REGISTRY.get_sample_value(
            "betterbot_signal_latency_seconds_count", {"since": since}
        )
        return value or 0.0

    def total(since: str) -> float:
        value = REGISTRY.get_sample_value("betterbot_signal_latency_seconds_sum", {"since": since})
        return value or 0.0

    before = {s: (count(s), total(s)) for s in ("received", "exchange")}
    signal = Signal(
        signal_id="s",
        kind=SignalKind.WHALE_ORDER,
        wallet="0x" + "12" * 20,
        token_id="1",
        side=Side.BUY,
        price=0.5,
        shares=4000,
        notional_usd=2000,
        confidence=0.9,
        source=Source.DOME_WS,
        exchange_ts=1000,
        received_at=1001.5,
        detected_at=1001.75,
    )
    observe_signal_latency(signal)
    observe_signal_latency(signal.model_dump(mode="json"))
    observe_signal_latency({"detected_at": "bad"})  # a payload without the times: ignored
    assert count("received") == before["received"][0] + 2
    assert total("received") == pytest.approx(before["received"][1] + 0.5)
    assert count("exchange") == before["exchange"][0] + 2
    assert total("exchange") == pytest.approx(before["exchange"][1] + 3.5)
