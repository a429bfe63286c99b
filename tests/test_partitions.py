"""`STREAM_PARTITIONS` > 1 on one Redis: fills routed to their wallet's and token's partitions with
the dedupe and watermarks of each, signals forwarded from the partitions' outboxes exactly once,
and three detector replicas on four partitions emitting exactly the reference signals.

The same runs on a real Redis Cluster: tests/test_cluster.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError

from services.detector.forward import Forwarder
from services.detector.rules import RuleSettings
from services.detector.serial import run
from shared.consumer import errors_key
from shared.models import OrderFill, Side, TrackedWallet
from shared.orders_raw import OrdersRaw, Outgoing, watermark_key
from shared.redis_streams import decode
from shared.settings import CommonSettings
from shared.streams import Scope, Streams, partition_of, slot_tag
from tests.test_detector_replicas import (
    drained,
    identities,
    publish,
    replica_scenario,
    replicas,
)
from tests.test_detector_rules import make_order, wallet
from tests.test_detector_service import read_signals

pytestmark = [pytest.mark.integration]

WALLETS = [wallet(0x51 + i).address for i in range(8)]
TOKENS = [str(10**70 + i) for i in range(6)]


@pytest.fixture(scope="module")
def scenario() -> tuple[list[OrderFill], list[TrackedWallet]]:
    return replica_scenario()


def fills() -> list[OrderFill]:
    return [
        make_order(
            user=WALLETS[i % len(WALLETS)],
            token_id=TOKENS[i % len(TOKENS)],
            side="BUY" if i % 3 else "SELL",
            shares=10 + i,
            timestamp=1_760_000_000 + i,
        )
        for i in range(48)
    ]


async def entries(client: aioredis.Redis, stream: str) -> list[dict[str, Any]]:
    return [decode(fields) for _, fields in await client.xrange(stream)]


def test_partition_of_is_stable_and_spreads() -> None:
    # Fixed values: every process and language must route a wallet to the same partition.
    assert partition_of("0xABC", 4) == partition_of("0xabc", 4) == 0x03ED5F38 % 4 == 0
    spread = {partition_of(address, 4) for address in WALLETS}
    assert spread == {0, 1, 2, 3}
    streams = Streams("x:", 4)
    assert [lane.scope for lane in streams.lanes()] == [Scope.WALLET] * 4 + [Scope.TOKEN] * 4
    assert all(lane.signals == "{" + lane.stream + "}:signals" for lane in streams.lanes())
    outbox = streams.lanes()[0].signals
    assert errors_key(outbox, "g") == "{x:orders.raw.0}:errors:{x:orders.raw.0}:signals:g"
    assert errors_key("x:signals", "g") == "{x:signals}:errors:g"
    assert slot_tag("{signals}:webhook:x") == "{signals}"
    single = Streams("x:").lanes()
    assert [(lane.stream, lane.scope, lane.signals) for lane in single] == [
        ("x:orders.raw", Scope.ALL, "x:signals")
    ]


async def test_fills_go_to_their_wallet_and_token_partitions_once(
    redis_client: aioredis.Redis, namespace: str
) -> None:
    streams = Streams(namespace, 4)
    orders = OrdersRaw(redis_client, streams, stream_maxlen=10_000, dedupe_ttl_s=600)
    batch = fills()
    added = await orders.publish([Outgoing(f, "dome") for f in batch])
    assert added == [True] * len(batch)
    # Again, as a retried batch or a second source would: nothing is added anywhere.
    assert await orders.publish([Outgoing(f, "dome") for f in batch]) == [False] * len(batch)

    by_wallet = {stream: await entries(redis_client, stream) for stream in streams.order_streams()}
    assert sum(len(found) for found in by_wallet.values()) == len(batch)
    for stream, found in by_wallet.items():
        expected = [f.order_key for f in batch if streams.wallet_stream(f.user) == stream]
        assert [e["order_key"] for e in found] == expected  # in publishing order
    by_token = {stream: await entries(redis_client, stream) for stream in streams.token_streams()}
    buys = [f for f in batch if f.side is Side.BUY]
    assert sum(len(found) for found in by_token.values()) == len(buys)
    for stream, found in by_token.items():
        expected = [f.order_key for f in buys if streams.token_stream(f.token_id) == stream]
        assert [e["order_key"] for e in found] == expected
    assert await redis_client.exists(namespace + "orders.raw") == 0

    # Each wallet's watermark lives in its partition's hash, at its newest fill.
    for address in WALLETS:
        newest = max(f.timestamp for f in batch if f.user == address)
        assert await orders.watermark("dome", address) == newest
        key = watermark_key(streams, streams.wallet_stream(address))
        assert await redis_client.hget(key, f"dome:{address}") == str(newest).encode()


async def test_an_outbox_reaches_signals_once_and_in_order_through_its_lease_holder(
    redis_client: aioredis.Redis, namespace: str
) -> None:
    streams = Streams(namespace, 2)
    outbox = streams.lanes()[0].signals

    async def put(*numbers: int) -> list[str]:
        ids = [await redis_client.xadd(outbox, {b"data": b'{"n": %d}' % n}) for n in numbers]
        return [entry_id.decode() for entry_id in ids]

    async def forwarded() -> list[int]:
        return [decode(f)["n"] for _, f in await redis_client.xrange(streams.signals)]

    first = Forwarder(redis_client, streams, outbox, owner="a", maxlen=1000, batch=2)
    second = Forwarder(redis_client, streams, outbox, owner="b", maxlen=1000, batch=2)
    ids = await put(0, 1, 2)
    assert await first.hold() and not await second.hold()
    # Only the holder forwards: the other's batch would overtake the holder's.
    assert not await second.forward([(ids[0], b'{"n": 0}')], read_from="", last=ids[0])
    assert await first.forward_once() == 2 and await first.forward_once() == 1
    assert await forwarded() == [0, 1, 2]
    # A failover of the node of `signals` took back the last signal and the id with it.
    last_signal = (await redis_client.xrevrange(streams.signals, count=1))[0][0]
    await redis_client.xdel(streams.signals, last_signal)
    await redis_client.set(streams.forwarded_key_prefix() + "last:" + outbox, ids[1])
    await put(3)
    assert await first.forward_once() == 0  # finds the id behind where it read from
    assert first.cursor == ids[1]
    assert await first.forward_once() == 2
    assert await forwarded() == [0, 1, 2, 3]
    # The lease passes to the other replica: it goes on from the id, nothing twice.
    await redis_client.delete(streams.forwarded_key_prefix() + "lease:" + outbox)
    assert await second.hold()
    await put(4)
    await redis_client.xadd(outbox, {b"other": b"x"})
    assert await second.forward_once() == 2
    assert await forwarded() == [0, 1, 2, 3, 4]
    dead = await redis_client.xrange(streams.signals_dead)
    assert b"outbox entry has no 'data' field" in dead[0][1][b"reason"]
    assert await redis_client.xlen(outbox) == 6  # kept for RETAIN_S, then trimmed


@pytest.mark.e2e
async def test_three_replicas_on_four_partitions_emit_the_reference(
    redis_url: str,
    namespace: str,
    redis_client: aioredis.Redis,
    tmp_path: Path,
    scenario: tuple[list[OrderFill], list[TrackedWallet]],
) -> None:
    await replicas_emit_the_reference(
        redis_url, redis_client, Streams(namespace, 4), scenario, tmp_path, {}
    )


async def replicas_emit_the_reference(
    redis_url: str,
    client: aioredis.Redis,
    streams: Streams,
    scenario: tuple[list[OrderFill], list[TrackedWallet]],
    tmp_path: Path,
    env: dict[str, str],
) -> None:
    """Three detector processes on `streams`' layout: the serial reference's signals, once each."""
    orders, wallets = scenario
    reference = identities(
        [s.model_dump(mode="json") for s in run(orders, wallets, RuleSettings())]
    )
    env = {**env, "STREAM_PARTITIONS": str(streams.partitions)}
    async with replicas(redis_url, streams.namespace, wallets, tmp_path, "parts-", env) as group:
        await publish(client, streams, orders)
        await drained(client, streams)
        waits = await group.metric("betterbot_detector_order_waits_total")
    assert set(group.stop().values()) == {0}
    found = await read_signals(client, streams)
    assert len(found) == len({s["signal_id"] for s in found}), "a signal was emitted twice"
    assert identities(found) == reference
    print(f"{streams.partitions} partitions: {len(found)} signals, {waits:g} waits")


async def test_batches_published_at_once_reach_every_partition_in_one_order(
    redis_client: aioredis.Redis, namespace: str
) -> None:
    """The live queue and a backfill publish concurrently: a wallet partition and a token
    partition must still see the two batches in the same order."""
    streams = Streams(namespace, 4)
    orders = OrdersRaw(redis_client, streams, stream_maxlen=10_000, dedupe_ttl_s=600)
    token = TOKENS[0]
    batches = [
        [make_order(user=WALLETS[0], token_id=token, shares=10 + n + 100 * b) for n in range(30)]
        for b in range(6)
    ]
    await asyncio.gather(*(orders.publish([Outgoing(f) for f in batch]) for batch in batches))
    wallet_side = [
        e["order_key"] for e in await entries(redis_client, streams.wallet_stream(WALLETS[0]))
    ]
    token_stream = streams.token_stream(token)
    assert token_stream is not None
    token_side = [e["order_key"] for e in await entries(redis_client, token_stream)]
    assert wallet_side == token_side and len(wallet_side) == 180


def test_a_namespace_with_braces_is_refused() -> None:
    with pytest.raises(ValidationError, match="must not contain"):
        CommonSettings(stream_namespace="prod{1}:")


async def test_a_signal_decided_twice_reaches_signals_once_per_status(
    redis_client: aioredis.Redis, namespace: str
) -> None:
    """A failover that loses a lane's last writes makes the re-backfilled fill decided again: its
    signal, already forwarded, must not reach `signals` twice; a retraction and a re-inclusion
    (a new status each) still do."""
    streams = Streams(namespace, 2)
    outbox = streams.lanes()[0].signals
    forwarder = Forwarder(redis_client, streams, outbox, owner="a", maxlen=1000)
    assert await forwarder.hold()

    def signal(status: str) -> bytes:
        return orjson.dumps({"signal_id": "s1", "status": status})

    for status in ("confirmed", "confirmed", "retracted", "retracted", "confirmed", "confirmed"):
        await redis_client.xadd(outbox, {b"data": signal(status)})
    assert await forwarder.forward_once() == 6
    forwarded = [decode(f)["status"] for _, f in await redis_client.xrange(streams.signals)]
    assert forwarded == ["confirmed", "retracted", "confirmed"]
