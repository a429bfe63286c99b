"""The detector's atomic state step (Lua) on a real Redis: it does what `rules` says it does."""

from __future__ import annotations

import asyncio
import uuid
from typing import cast

import orjson
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.detector import rules
from services.detector.pipeline import BatchProcessor, RawEntry
from services.detector.rules import Condition, RuleSettings
from services.detector.state import DetectorState, Emission, OrderStep
from shared.models import Side, SignalKind
from shared.redis_streams import encode
from shared.streams import Streams
from tests.test_detector_rules import TRACKED, WALLET, make_order

pytestmark = pytest.mark.integration

TTL = 3600


def make_state(client: aioredis.Redis, streams: Streams, script_batch: int = 250) -> DetectorState:
    return DetectorState(
        client, streams, maxlen=10_000, done_ttl_s=TTL, script_batch=script_batch, retry_s=1
    )


def step(key: str, side: Side, size: int, token: str) -> OrderStep:
    payload = orjson.dumps({"order_key": key})
    entry = Emission(SignalKind.TRADER_ENTRY, Condition.OPENS_POSITION, payload)
    whale = Emission(SignalKind.WHALE_ORDER, Condition.ALWAYS, payload)
    return OrderStep(key, WALLET, token, side, size, True, (entry, whale))


ops_st = st.lists(
    st.tuples(
        st.sampled_from(list(Side)),
        st.integers(min_value=0, max_value=10**15),
        st.sampled_from(["a", "b"]),
        st.booleans(),  # deliver this order a second time
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops_st, st.integers(min_value=1, max_value=6))
def test_script_matches_the_rules_model(
    redis_url: str, ops: list[tuple[Side, int, str, bool]], script_batch: int
) -> None:
    asyncio.run(_check_script(redis_url, ops, script_batch))


async def _check_script(
    redis_url: str, ops: list[tuple[Side, int, str, bool]], script_batch: int
) -> None:
    streams = Streams(f"t{uuid.uuid4().hex[:10]}:")
    client = aioredis.Redis.from_url(redis_url)
    try:
        state = make_state(client, streams, script_batch)
        steps: list[OrderStep] = []
        for i, (side, size, token, again) in enumerate(ops):
            steps.append(step(f"k{i}", side, size, token))
            if again:
                steps.append(step(f"k{i}", side, size, token))

        results = await state.apply(steps)

        positions = {"a": 0, "b": 0}
        seen: set[str] = set()
        expected_signals: list[tuple[str, str]] = []
        for order, result in zip(steps, results, strict=True):
            if order.order_key in seen:
                assert result.duplicate and result.emitted == ()
                continue
            seen.add(order.order_key)
            prior = positions[order.token_id]
            kinds = [SignalKind.WHALE_ORDER]
            if rules.opens_position(order.side, prior):
                kinds.insert(0, SignalKind.TRADER_ENTRY)
            assert not result.duplicate and list(result.emitted) == kinds
            expected_signals += [(order.order_key, kind) for kind in kinds]
            positions[order.token_id] = rules.next_position(order.side, prior, order.micro_shares)

        stored = await client.hgetall(state.position_key(WALLET))
        assert {str(k, "utf-8"): int(v) for k, v in cast(dict[bytes, bytes], stored).items()} == {
            token: size for token, size in positions.items() if size > 0
        }
        written = cast(list[tuple[bytes, dict[bytes, bytes]]], await client.xrange(streams.signals))
        assert [orjson.loads(f[b"data"])["order_key"] for _, f in written] == [
            key for key, _ in expected_signals
        ]
        assert all(set(fields) == {b"data"} for _, fields in written)
        ttl = await client.ttl(state.done_key("k0"))
        assert 0 < ttl <= TTL
    finally:
        keys = [k async for k in client.scan_iter(match=f"*{streams.namespace}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def test_keys_share_the_signals_slot(redis_client: aioredis.Redis, streams: Streams) -> None:
    state = make_state(redis_client, streams)
    tag = "{" + streams.signals + "}"
    assert state.done_key("k").startswith(tag)
    assert state.position_key(WALLET).startswith(tag)


async def test_redelivered_batch_changes_nothing(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    """A batch processed again (crash before the ack) emits nothing and moves no position."""
    state = make_state(redis_client, streams)
    processor = BatchProcessor(state, [TRACKED], RuleSettings())
    orders = [
        make_order(shares=4000, price=0.5),
        make_order(shares=10, price=0.5, token_id="tok-2"),
        make_order(shares=4, price=0.5, side="SELL"),
    ]
    entries = [
        RawEntry(f"{i}-0", encode(order)) for i, order in enumerate(orders)
    ]

    first = await processor.process(entries)
    assert (first.orders, first.duplicates) == (3, 0)
    assert first.signals == {"whale_order": 1, "trader_entry": 2}
    signals_after_first = await redis_client.xlen(streams.signals)
    assert signals_after_first == 3
    assert await state.position(WALLET, "tok-1") == 3996_000_000

    again = await processor.process(entries)
    assert (again.orders, again.duplicates, sum(again.signals.values())) == (3, 3, 0)
    assert await redis_client.xlen(streams.signals) == signals_after_first
    assert await state.position(WALLET, "tok-1") == 3996_000_000
    assert await state.position(WALLET, "tok-2") == 10_000_000
