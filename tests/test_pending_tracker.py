"""The pending tracker against real Redis: a pending fill confirmed by any source is left alone,
one never confirmed is retracted once (through the publisher, as a reorg is), the deadlines
survive a restart, a confirmation racing the retraction wins, and the keys sit in the slot of
the fill's wallet partition."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from redis.crc import key_slot

from devtools.cluster import Cluster
from services.ingestor.pending import PendingTracker
from services.ingestor.publisher import Publisher
from shared.models import FillStatus, OrderFill, Source
from shared.redis_streams import connect
from shared.streams import Streams
from tests.test_ingestor_publisher import make_publisher, tape_fills

TIMEOUT_S = 60.0


def started(client: aioredis.Redis, streams: Streams) -> tuple[Publisher, PendingTracker]:
    """A publisher with its tracker, as the ingestor wires them (a new pair = a restart)."""
    publisher = make_publisher(client, streams)
    tracker = PendingTracker(client, streams, timeout_s=TIMEOUT_S)
    publisher.pending = tracker
    return publisher, tracker


def as_status(fill: OrderFill, status: FillStatus, source: Source) -> OrderFill:
    return fill.model_copy(update={"status": status, "source": source})


async def entries(client: aioredis.Redis, streams: Streams) -> list[OrderFill]:
    found = []
    for stream in streams.order_streams():
        read: Any = await client.xrange(stream)
        for _, fields in read:
            found.append(OrderFill.model_validate(orjson.loads(fields[b"data"])))
    return found


METRICS = (
    "betterbot_ingestor_pending_published_total",
    "betterbot_ingestor_pending_confirmed_total",
    "betterbot_ingestor_pending_retracted_total",
    "betterbot_ingestor_pending_confirm_delay_seconds_count",
)


def sample(name: str) -> float:
    """A metric's value now, summed over its labels (0 before it was ever set)."""
    return sum(s.value for metric in REGISTRY.collect() for s in metric.samples if s.name == name)


def overdue() -> float:
    return time.time() + TIMEOUT_S + 1


async def test_a_confirmed_pending_fill_is_not_retracted_whichever_source_confirms(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    publisher, tracker = started(redis_client, streams)
    before = {name: sample(name) for name in METRICS}
    fills = tape_fills(3)
    pending = [as_status(f, FillStatus.PENDING, Source.POLYNODE) for f in fills]
    assert await publisher.publish_now(pending) == 3
    assert await tracker.waiting() == 3
    confirmations = [
        as_status(fills[0], FillStatus.CONFIRMED, Source.POLYNODE),
        as_status(fills[1], FillStatus.CONFIRMED, Source.POLYGON),
        as_status(fills[2], FillStatus.CONFIRMED, Source.DATA_API),
    ]
    assert await publisher.publish_now(confirmations) == 3
    assert await tracker.sweep(publisher, now=overdue()) == 0
    assert await tracker.waiting() == 0
    assert tracker.confirmed == 3 and tracker.retracted == 0
    grown = {name: sample(name) - before[name] for name in METRICS}
    assert grown == {
        "betterbot_ingestor_pending_published_total": 3,
        "betterbot_ingestor_pending_confirmed_total": 3,
        "betterbot_ingestor_pending_retracted_total": 0,
        "betterbot_ingestor_pending_confirm_delay_seconds_count": 3,
    }
    statuses = [(e.order_key, e.status) for e in await entries(redis_client, streams)]
    assert statuses == [(f.order_key, FillStatus.PENDING) for f in fills] + [
        (f.order_key, FillStatus.CONFIRMED) for f in fills
    ]


async def test_an_unconfirmed_pending_fill_is_retracted_once_and_a_late_confirmation_restores_it(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    publisher, tracker = started(redis_client, streams)
    [fill] = tape_fills(1)
    pending = as_status(fill, FillStatus.PENDING, Source.PREDEXON)
    await publisher.publish_now([pending, pending])  # a resent pending event: one deadline
    assert await tracker.sweep(publisher) == 0  # not due yet
    assert await tracker.sweep(publisher, now=overdue()) == 1
    assert await tracker.sweep(publisher, now=overdue()) == 0
    *_, retraction = await entries(redis_client, streams)
    assert retraction.order_key == pending.order_key
    assert retraction.status is FillStatus.RETRACTED and retraction.source is Source.PREDEXON
    assert "not confirmed within 60 s" in retraction.status_reason
    assert retraction.received_at == pending.received_at
    # The mempool resends it: still retracted, nothing published.
    assert await publisher.publish_now([pending]) == 0
    # A confirmation later than the bound (a restart, an outage) is a fill that did happen: it is
    # published, once, whichever source brings it; a second source's copy is a duplicate.
    late = as_status(fill, FillStatus.CONFIRMED, Source.DATA_API)
    assert await publisher.publish_now([late]) == 1
    assert await publisher.publish_now([as_status(fill, FillStatus.CONFIRMED, Source.RTDS)]) == 0
    statuses = [e.status for e in await entries(redis_client, streams)]
    assert statuses == [FillStatus.PENDING, FillStatus.RETRACTED, FillStatus.CONFIRMED]
    # The fill is settled: no second retraction comes for it.
    assert await tracker.sweep(publisher, now=overdue()) == 0


async def test_deadlines_survive_a_restart(redis_client: aioredis.Redis, streams: Streams) -> None:
    before, _ = started(redis_client, streams)
    confirmed_later, never = tape_fills(2)
    await before.publish_now(
        [as_status(f, FillStatus.PENDING, Source.POLYNODE) for f in (confirmed_later, never)]
    )
    after, tracker = started(redis_client, streams)  # the ingestor restarted in between
    await after.publish_now([as_status(confirmed_later, FillStatus.CONFIRMED, Source.POLYGON)])
    assert await tracker.sweep(after, now=overdue()) == 1
    assert tracker.confirmed == 1
    retracted = [
        e.order_key
        for e in await entries(redis_client, streams)
        if e.status is FillStatus.RETRACTED
    ]
    assert retracted == [never.order_key]


async def test_a_confirmation_between_the_look_and_the_retraction_wins(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    publisher, tracker = started(redis_client, streams)
    [fill] = tape_fills(1)
    await publisher.publish_now([as_status(fill, FillStatus.PENDING, Source.POLYNODE)])
    stream = streams.wallet_stream(fill.user)
    due = await tracker._due(stream, overdue())
    assert [d.order_key for d in due] == [fill.order_key] and not due[0].confirmed
    await publisher.publish_now([as_status(fill, FillStatus.CONFIRMED, Source.DOME_REST)])
    assert await tracker._settle(publisher, stream, due) == 0
    assert [e.status for e in await entries(redis_client, streams)] == [
        FillStatus.PENDING,
        FillStatus.CONFIRMED,
    ]
    assert await tracker.waiting() == 0


async def test_deadlines_live_in_the_wallet_partitions_slot(
    redis_client: aioredis.Redis, namespace: str
) -> None:
    streams = Streams(namespace=namespace, partitions=4)
    publisher, tracker = started(redis_client, streams)
    fills = [as_status(f, FillStatus.PENDING, Source.POLYNODE) for f in tape_fills(8)]
    await publisher.publish_now(fills)
    for fill in fills:
        stream = streams.wallet_stream(fill.user)
        slot = key_slot(stream.encode())
        assert key_slot(tracker.due_key(stream).encode()) == slot
        assert key_slot(tracker.fills_key(stream).encode()) == slot
        assert await redis_client.zscore(tracker.due_key(stream), fill.order_key) is not None
    assert await tracker.sweep(publisher, now=overdue()) == len({f.order_key for f in fills})


@pytest.fixture
async def cluster_client(redis_cluster: Cluster, namespace: str) -> AsyncIterator[aioredis.Redis]:
    client = connect(redis_cluster.url, cluster=True)
    yield client
    keys = [key async for key in client.scan_iter(match=f"*{namespace}*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def test_the_tracker_runs_on_a_redis_cluster(
    cluster_client: aioredis.Redis, namespace: str
) -> None:
    streams = Streams(namespace=namespace, partitions=4, cluster=True)
    publisher, tracker = started(cluster_client, streams)
    fills = tape_fills(8)
    confirmed, *never = fills
    await publisher.publish_now([as_status(f, FillStatus.PENDING, Source.POLYNODE) for f in fills])
    await publisher.publish_now([as_status(confirmed, FillStatus.CONFIRMED, Source.DATA_API)])
    restarted, tracker = started(cluster_client, streams)
    expected = len({f.order_key for f in never} - {confirmed.order_key})
    assert await tracker.sweep(restarted, now=overdue()) == expected
    assert await tracker.waiting() == 0


async def test_a_stale_pending_sighting_after_the_confirmation_is_not_published(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    publisher, tracker = started(redis_client, streams)
    confirmed_first, retracted_first = tape_fills(2)
    await publisher.publish_now(
        [
            as_status(confirmed_first, FillStatus.CONFIRMED, Source.POLYGON),
            as_status(retracted_first, FillStatus.PENDING, Source.POLYNODE),
        ]
    )
    assert await tracker.sweep(publisher, now=overdue()) == 1
    # A `since` replay or a snapshot resends both as pending: neither goes out again.
    replayed = [as_status(f, FillStatus.PENDING, Source.POLYNODE) for f in tape_fills(2)]
    assert await publisher.publish_now(replayed) == 0
    assert await tracker.sweep(publisher, now=overdue() + TIMEOUT_S) == 0
    assert [e.status for e in await entries(redis_client, streams)] == [
        FillStatus.CONFIRMED,
        FillStatus.PENDING,
        FillStatus.RETRACTED,
    ]
