"""Webhooks end to end: real Redis, in-process notifiers, a local HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from devtools.servers import free_port
from services.notifier.clients import StreamId
from services.notifier.filters import parse_filters
from services.notifier.main import Notifier
from services.notifier.webhooks.handoff import queue_key
from services.notifier.webhooks.signing import verify
from shared.redis_streams import encode, ensure_group
from shared.streams import WEBHOOKS_GROUP, Streams
from tests.helpers.notifier import (
    Receiver,
    make_signal,
    publish,
    running_notifier,
    variant,
    wait_until,
)
from tests.test_notifier_subscribe import mixed_signal

pytestmark = pytest.mark.integration

SECRET = "whsec-" + "0123456789abcdef" * 2
FAST_RETRIES = {"webhook_backoff_s": 0.01, "webhook_backoff_max_s": 0.05}


def hooks_file(tmp_path: Path, hooks: list[dict[str, Any]]) -> Path:
    path = tmp_path / "webhooks.json"
    path.write_bytes(orjson.dumps({"webhooks": hooks}))
    return path


@contextlib.asynccontextmanager
async def notifier_with(
    redis_url: str, namespace: str, path: Path, **overrides: Any
) -> AsyncIterator[Notifier]:
    async with running_notifier(
        redis_url, namespace, webhooks_file=path, **(FAST_RETRIES | overrides)
    ) as notifier:
        yield notifier


async def queues(client: aioredis.Redis, streams: Streams) -> list[bytes]:
    """The endpoints' queues that exist."""
    pattern = queue_key(streams, "*")
    return [key async for key in client.scan_iter(match=pattern)]


async def until_settled(client: aioredis.Redis, streams: Streams, last_id: str) -> None:
    """Until the group has handed off up to `last_id` and every endpoint's queue is empty."""

    async def settled() -> bool:
        groups = await client.xinfo_groups(streams.signals)
        group = next(g for g in groups if g["name"].decode() == WEBHOOKS_GROUP)
        if group["last-delivered-id"].decode() != last_id or group["pending"] != 0:
            return False
        lengths = [await client.xlen(key) for key in await queues(client, streams)]
        return not any(lengths)

    await wait_until(settled, "every webhook entry to be settled")


async def dead_letters(client: aioredis.Redis, streams: Streams) -> list[dict[str, str]]:
    entries: Any = await client.xrange(streams.webhooks_dead)
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


async def test_signed_deliveries_follow_each_endpoints_filters_and_preset(
    redis_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    whales = {"kinds": ["whale_order"]}
    sure = {"min_confidence": 0.9}
    async with Receiver() as receiver:
        path = hooks_file(
            tmp_path,
            [
                {"name": "all", "url": receiver.url("all"), "secret": SECRET},
                {
                    "name": "whales",
                    "url": receiver.url("whales"),
                    "secret": SECRET,
                    "filters": whales,
                },
                {
                    "name": "discord",
                    "url": receiver.url("discord"),
                    "preset": "discord",
                    "filters": sure,
                },
                {"name": "slack", "url": receiver.url("slack"), "preset": "slack", "filters": sure},
            ],
        )
        async with notifier_with(redis_url, namespace, path):
            signals = [mixed_signal(n) for n in range(16)]
            ids = await publish(redis_client, streams.signals, signals)
            await until_settled(redis_client, streams, ids[-1])

    by_id = dict(zip(ids, signals, strict=True))
    everything = receiver.to("all")
    assert sorted((orjson.loads(r.body)["id"] for r in everything), key=StreamId.parse) == ids
    for request in everything:
        message = orjson.loads(request.body)
        assert message["type"] == "signal"
        assert message["signal"] == by_id[message["id"]].model_dump(mode="json")
        assert request.headers["idempotency-key"] == message["signal"]["signal_id"]
        assert request.headers["content-type"] == "application/json"
        assert request.headers["x-betterbot-attempt"] == "1"
        assert verify(
            SECRET,
            request.body,
            request.headers["x-betterbot-timestamp"],
            request.headers["x-betterbot-signature"],
            now=time.time(),
        )
    whale_ids = (orjson.loads(r.body)["id"] for r in receiver.to("whales"))
    assert sorted(whale_ids, key=StreamId.parse) == [
        entry_id for entry_id, s in by_id.items() if parse_filters(whales, max_values=9).matches(s)
    ]
    confident = [s.signal_id for s in signals if s.confidence >= 0.9]
    for name, keys in (
        ("discord", {"content", "embeds", "allowed_mentions"}),
        ("slack", {"text", "blocks"}),
    ):
        requests = receiver.to(name)
        assert sorted(r.headers["idempotency-key"] for r in requests) == sorted(confident)
        assert all(set(orjson.loads(r.body)) == keys for r in requests)
        assert all("x-betterbot-signature" not in r.headers for r in requests)
    assert await dead_letters(redis_client, streams) == []
    # A clean stop leaves the groups: no consumer lingers in them.
    assert await redis_client.xinfo_consumers(streams.signals, WEBHOOKS_GROUP) == []
    for name in ("all", "whales", "discord", "slack"):
        assert await redis_client.xinfo_consumers(queue_key(streams, name), WEBHOOKS_GROUP) == []


async def test_retries_on_500_then_delivers_and_400_is_final_and_dead_lettered(
    redis_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    async with Receiver({"flaky": [500, 502, 200], "bad": [400]}) as receiver:
        path = hooks_file(
            tmp_path,
            [
                {"name": "flaky", "url": receiver.url("flaky"), "secret": SECRET},
                {"name": "bad", "url": receiver.url("bad"), "secret": SECRET},
            ],
        )
        async with notifier_with(redis_url, namespace, path):
            signals = [make_signal(n) for n in range(2)]
            ids = await publish(redis_client, streams.signals, signals)
            await until_settled(redis_client, streams, ids[-1])

    for signal in signals:
        tries = [
            r for r in receiver.to("flaky") if r.headers["idempotency-key"] == signal.signal_id
        ]
        assert [r.headers["x-betterbot-attempt"] for r in tries] == ["1", "2", "3"]
        assert len({r.body for r in tries}) == 1
        assert all(
            verify(
                SECRET,
                r.body,
                r.headers["x-betterbot-timestamp"],
                r.headers["x-betterbot-signature"],
                now=time.time(),
            )
            for r in tries
        )
    assert Counter(r.headers["idempotency-key"] for r in receiver.to("bad")) == {
        s.signal_id: 1 for s in signals
    }

    dead = sorted(
        await dead_letters(redis_client, streams), key=lambda d: StreamId.parse(d["entry_id"])
    )
    assert [d["entry_id"] for d in dead] == ids
    for letter, signal in zip(dead, signals, strict=True):
        assert letter["webhook"] == "bad"
        assert letter["reason"] == "HTTP 400: no (400) (final, not retried)"
        assert letter["deliveries"] == "1" and letter["origin"] == "notifier"
        assert letter["signal_id"] == signal.signal_id
        assert orjson.loads(letter["raw"]) == signal.model_dump(mode="json")


async def test_timeouts_and_refused_connections_are_retried_then_dead_lettered(
    redis_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    async with Receiver(delay_s=1.0) as receiver:
        path = hooks_file(
            tmp_path,
            [
                {"name": "slow", "url": receiver.url("slow"), "secret": SECRET},
                {"name": "gone", "url": f"http://127.0.0.1:{free_port()}/x", "secret": SECRET},
            ],
        )
        async with notifier_with(
            redis_url, namespace, path, webhook_timeout_s=0.2, webhook_max_attempts=2
        ):
            ids = await publish(redis_client, streams.signals, [make_signal(1)])
            await until_settled(redis_client, streams, ids[-1])
    reasons = {d["webhook"]: d["reason"] for d in await dead_letters(redis_client, streams)}
    assert reasons == {
        "slow": "2 attempts, last: timeout (ReadTimeout)",
        "gone": "2 attempts, last: connection error (ConnectError)",
    }
    assert len(receiver.to("slow")) == 2


async def test_two_replicas_deliver_each_signal_once(
    redis_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    # A slow receiver and two deliveries at a time per replica: both replicas must take part.
    async with Receiver(delay_s=0.02) as receiver:
        path = hooks_file(tmp_path, [{"name": "one", "url": receiver.url("one"), "secret": SECRET}])
        async with (
            notifier_with(redis_url, namespace, path, webhook_concurrency=2) as first,
            notifier_with(redis_url, namespace, path, webhook_concurrency=2) as second,
        ):
            signals = [make_signal(n) for n in range(30)]
            ids = await publish(redis_client, streams.signals, signals)
            await until_settled(redis_client, streams, ids[-1])
            assert first.webhooks is not None and second.webhooks is not None
            shares = (first.webhooks.settled, second.webhooks.settled)
    keys = Counter(r.headers["idempotency-key"] for r in receiver.to("one"))
    assert keys == {s.signal_id: 1 for s in signals}
    assert sum(shares) == 30 and min(shares) > 0, shares


async def test_a_slow_delivery_is_not_taken_over_by_another_replica(
    redis_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    # The delivery takes several claim-idle periods; its replica keeps the entry touched.
    async with Receiver(delay_s=1.5) as receiver:
        path = hooks_file(tmp_path, [{"name": "one", "url": receiver.url("one"), "secret": SECRET}])
        quick_claims = {"webhook_claim_idle_ms": 500}
        async with (
            notifier_with(redis_url, namespace, path, **quick_claims),
            notifier_with(redis_url, namespace, path, **quick_claims),
        ):
            ids = await publish(redis_client, streams.signals, [make_signal(1)])
            await until_settled(redis_client, streams, ids[-1])
    assert len(receiver.to("one")) == 1


async def test_a_dead_replicas_pending_entries_are_reclaimed(
    redis_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    signals = [variant(n, confidence=0.5 + n / 10) for n in range(5)]
    ids = await publish(redis_client, streams.signals, signals[:2])
    # A replica that read two entries of `signals` and died before handing them off.
    await ensure_group(redis_client, streams.signals, WEBHOOKS_GROUP, start="0")
    await redis_client.xreadgroup(WEBHOOKS_GROUP, "dead-replica", {streams.signals: ">"})
    # And three it had handed off, then died delivering (signals acked, queued, pending there).
    queue = queue_key(streams, "one")
    await ensure_group(redis_client, queue, WEBHOOKS_GROUP, start="0")
    for n in range(2, 5):
        last = await redis_client.xadd(queue, {"entry_id": f"0-{n}", **encode(signals[n])})
    await redis_client.xreadgroup(WEBHOOKS_GROUP, "dead-replica", {queue: ">"})
    # The last one has already been handed around more than WEBHOOK_MAX_DELIVERIES allows.
    for _ in range(2):
        await redis_client.xclaim(queue, WEBHOOKS_GROUP, "dead-replica", 0, [last])

    async with Receiver() as receiver:
        path = hooks_file(tmp_path, [{"name": "one", "url": receiver.url("one"), "secret": SECRET}])
        async with notifier_with(
            redis_url, namespace, path, webhook_claim_idle_ms=300, webhook_max_deliveries=3
        ):
            await until_settled(redis_client, streams, ids[-1])
    assert sorted(r.headers["idempotency-key"] for r in receiver.to("one")) == sorted(
        s.signal_id for s in signals[:4]
    )
    (letter,) = await dead_letters(redis_client, streams)
    assert (letter["entry_id"], letter["webhook"]) == ("0-4", "one")
    assert letter["signal_id"] == signals[4].signal_id
    assert letter["reason"].startswith("delivered 4 times (WEBHOOK_MAX_DELIVERIES 3);")


async def test_delivery_goes_on_after_the_readers_connection_is_killed(
    redis_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    async with Receiver() as receiver:
        path = hooks_file(tmp_path, [{"name": "one", "url": receiver.url("one"), "secret": SECRET}])
        async with notifier_with(redis_url, namespace, path) as notifier:
            assert notifier.webhooks is not None
            ids = await publish(redis_client, streams.signals, [make_signal(0)])
            await until_settled(redis_client, streams, ids[-1])
            # Every connection blocked in a group read: the hand-off's and the endpoint queue's.
            clients = await redis_client.client_list()
            readers = [c["id"] for c in clients if c["cmd"] == "xreadgroup"]
            assert len(readers) >= 2
            for reader in readers:
                await redis_client.client_kill_filter(_id=reader)
            ids += await publish(redis_client, streams.signals, [make_signal(n) for n in (1, 2)])
            await until_settled(redis_client, streams, ids[-1])
    assert sorted(r.headers["idempotency-key"] for r in receiver.to("one")) == sorted(
        make_signal(n).signal_id for n in range(3)
    )
