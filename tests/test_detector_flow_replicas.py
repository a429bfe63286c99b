"""Accumulation / distribution through Redis (the apply step, done keys, units) decide exactly as
the reference: bounded runs, retracted members (the signal retracted once, whichever member goes)
and pending members, at any batch size."""

from __future__ import annotations

import random

import pytest
import redis.asyncio as aioredis

from services.detector.pipeline import RawEntry
from services.detector.rules import RuleSettings
from services.detector.serial import SerialDetector
from shared.models import FillStatus, OrderFill
from shared.redis_streams import ensure_group
from shared.streams import DETECTOR_GROUP, Streams
from tests.test_detector_informative import TS, W, fill
from tests.test_detector_state import fields_of, make_state, processor, signals_of

pytestmark = pytest.mark.integration

SETTINGS = RuleSettings(signal_cooldown_s=0)


def stream(seed: int) -> list[OrderFill]:
    """Small fills of two wallets, some pending, and retractions of earlier ones."""
    rnd = random.Random(seed)
    orders: list[OrderFill] = []
    for i in range(160):
        wallet = W[rnd.randrange(2)].address
        side = "BUY" if rnd.random() < 0.7 else "SELL"
        order = fill(wallet, side, rnd.uniform(100, 500), 0.5, TS + i * 20, rnd.choice(["a", "b"]))
        if rnd.random() < 0.3:
            order = order.model_copy(update={"status": FillStatus.PENDING})
        orders.append(order)
        if orders and rnd.random() < 0.15:
            earlier = rnd.choice(orders[-12:])
            if earlier.status is not FillStatus.RETRACTED:
                update = {"status": FillStatus.RETRACTED, "status_reason": "reorg"}
                orders.append(earlier.model_copy(update=update))
    return orders


def signature(signal: dict[str, object]) -> tuple[object, ...]:
    keys = signal["order_keys"]
    assert isinstance(keys, list)
    return (signal["signal_id"], signal["kind"], signal["status"], tuple(keys))


@pytest.mark.parametrize("batch", [1, 3, 16])
async def test_flows_through_redis_are_the_reference(
    redis_client: aioredis.Redis, streams: Streams, batch: int
) -> None:
    orders = stream(batch)
    await ensure_group(redis_client, streams.orders_raw, DETECTOR_GROUP)
    decider = processor(make_state(redis_client, streams), W, SETTINGS)
    entries = [RawEntry(f"{i + 1}-0", fields_of(o)) for i, o in enumerate(orders)]
    for start in range(0, len(entries), batch):
        await decider.process(entries[start : start + batch])
    reference = SerialDetector(W, SETTINGS)
    expected = [s.model_dump(mode="json") for o in orders for s in reference.process(o)]
    got = await signals_of(redis_client, streams)
    assert [signature(s) for s in got] == [signature(s) for s in expected]
    kinds = {(s["kind"], s["status"]) for s in expected}
    assert {("accumulation", "retracted"), ("accumulation", "pending")} <= kinds
