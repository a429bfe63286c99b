"""Pending fills in the detector, on a real Redis and in the reference (`serial.py`): a fill
decided while pending gives its signals with status `pending`; its confirmation (from any source,
also in the same batch) repeats them once as `confirmed` under the same ids and fires no rule
again; a redelivered confirmation repeats nothing; a retracted pending fill is undone."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from services.detector import rules
from services.detector.rules import WalletMarketState
from shared.models import FillStatus, OrderFill, Source
from shared.streams import Streams
from tests.test_detector_retractions import (
    identity,
    reference,
    retraction,
    run_through_processor,
)
from tests.test_detector_rules import MARKET, TRACKED, WALLET, make_order
from tests.test_detector_state import make_state

pytestmark = pytest.mark.integration


def seen(order: OrderFill, status: FillStatus, source: Source = Source.PREDEXON) -> OrderFill:
    return order.model_copy(update={"status": status, "source": source})


@pytest.mark.parametrize("batch", [1, 10])
async def test_a_confirmation_repeats_the_pending_signals_once_and_changes_nothing(
    redis_client: aioredis.Redis, streams: Streams, batch: int
) -> None:
    fill = make_order(shares=100)
    pending = seen(fill, FillStatus.PENDING)
    confirmed = seen(fill, FillStatus.CONFIRMED, Source.POLYGON)
    orders = [pending, confirmed, confirmed]  # the last: another source, or a redelivery
    found = await run_through_processor(redis_client, streams, orders, [TRACKED], batch)

    entry_id = found[0]["signal_id"]
    assert [identity(s) for s in found] == [
        (entry_id, "trader_entry", "pending", "", (fill.order_key,)),
        (entry_id, "trader_entry", "confirmed", "", (fill.order_key,)),
    ]
    # The position counts the fill once.
    unit = make_state(redis_client, streams).unit_key(rules.wallet_unit(WALLET, MARKET))
    raw = await redis_client.get(unit)
    assert isinstance(raw, bytes)
    state = WalletMarketState.load(raw)
    assert state.positions == {fill.token_id: 100_000_000}
    assert [identity(s) for s in reference(orders, [TRACKED])] == [identity(s) for s in found]


@pytest.mark.parametrize("batch", [1, 10])
async def test_a_pending_fill_that_never_confirms_is_undone_with_its_signals(
    redis_client: aioredis.Redis, streams: Streams, batch: int
) -> None:
    fill = make_order(shares=100)
    pending = seen(fill, FillStatus.PENDING)
    reason = "pending fill not confirmed within 60 s"
    orders = [pending, retraction(pending, reason)]
    found = await run_through_processor(redis_client, streams, orders, [TRACKED], batch)

    entry_id = found[0]["signal_id"]
    assert [identity(s) for s in found] == [
        (entry_id, "trader_entry", "pending", "", (fill.order_key,)),
        (entry_id, "trader_entry", "retracted", reason, (fill.order_key,)),
    ]
    unit = make_state(redis_client, streams).unit_key(rules.wallet_unit(WALLET, MARKET))
    assert await redis_client.get(unit) is None  # as if it never happened
    assert [identity(s) for s in reference(orders, [TRACKED])] == [identity(s) for s in found]


async def test_a_plain_confirmed_fill_is_not_repeated(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    fill = make_order(shares=100)
    found = await run_through_processor(redis_client, streams, [fill, fill], [TRACKED], 10)
    assert [s["status"] for s in found] == ["confirmed"]
