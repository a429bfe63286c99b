"""Retractions in the detector, on a real Redis and in the reference: a retracted fill's effect on
positions and consensus is undone as if it had never happened, every signal it gave is repeated with
status `retracted`, a fill included again is decided afresh, and the processor agrees with the
reference (`serial.py`) signal for signal."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from services.detector import rules
from services.detector.pipeline import RawEntry
from services.detector.rules import WalletMarketState
from services.detector.serial import SerialDetector
from shared.models import FillStatus, OrderFill, Signal, TrackedWallet
from shared.redis_streams import ensure_group
from shared.streams import DETECTOR_GROUP, Streams
from tests.test_detector_rules import MARKET, TRACKED, WALLET, bookkeeping, make_order, wallet
from tests.test_detector_state import fields_of, make_state, processor, signals_of

pytestmark = pytest.mark.integration

SETTINGS = bookkeeping(signal_cooldown_s=0, consensus_min_wallets=3)
REASON = "chain reorg: block 7 (0x1234) was replaced"


def retraction(order: OrderFill, reason: str = REASON) -> OrderFill:
    return order.model_copy(update={"status": FillStatus.RETRACTED, "status_reason": reason})


def identity(signal: Signal | dict[str, Any]) -> tuple[Any, ...]:
    s = signal if isinstance(signal, Signal) else Signal.model_validate(signal)
    return (s.signal_id, s.kind.value, s.status.value, s.status_reason, tuple(s.order_keys))


async def run_through_processor(
    client: aioredis.Redis,
    streams: Streams,
    orders: list[OrderFill],
    wallets: list[TrackedWallet],
    batch: int,
) -> list[dict[str, Any]]:
    await ensure_group(client, streams.orders_raw, DETECTOR_GROUP)
    decider = processor(make_state(client, streams), wallets, SETTINGS)
    entries = [RawEntry(f"{i + 1}-0", fields_of(order)) for i, order in enumerate(orders)]
    for start in range(0, len(entries), batch):
        chunk = entries[start : start + batch]
        outcome = await decider.process(chunk, wait_s=5)
        assert sorted(outcome.settled) == sorted(e.entry_id for e in chunk)
    return await signals_of(client, streams)


def reference(orders: list[OrderFill], wallets: list[TrackedWallet]) -> list[Signal]:
    detector = SerialDetector(wallets, SETTINGS)
    return [s for order in orders for s in detector.process(order)]


@pytest.mark.parametrize("batch", [1, 10])
async def test_a_retracted_buy_is_undone_and_its_entry_retracted(
    redis_client: aioredis.Redis, streams: Streams, batch: int
) -> None:
    first, second = make_order(shares=100), make_order(shares=50)
    again = first  # a later block includes the fill again: same order_key, confirmed
    orders = [first, second, retraction(first), retraction(first), again]
    found = await run_through_processor(redis_client, streams, orders, [TRACKED], batch)

    entry_id = found[0]["signal_id"]
    assert [identity(s) for s in found] == [
        (entry_id, "trader_entry", "confirmed", "", (first.order_key,)),
        (entry_id, "trader_entry", "retracted", REASON, (first.order_key,)),
    ]
    # As if the first buy had never happened, then it happened again (after the second: no
    # new position, no new entry).
    unit = make_state(redis_client, streams).unit_key(rules.wallet_unit(WALLET, MARKET))
    state = WalletMarketState.load(await redis_client.get(unit))
    assert state.positions == {first.token_id: 150_000_000}
    assert [identity(s) for s in reference(orders, [TRACKED])] == [identity(s) for s in found]


async def test_a_retracted_sell_gives_the_shares_back(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    buy, sell = make_order(shares=100), make_order(side="SELL", shares=100)
    orders = [buy, sell, retraction(sell)]
    found = await run_through_processor(redis_client, streams, orders, [TRACKED], 10)
    assert [(s["kind"], s["status"]) for s in found] == [
        ("trader_entry", "confirmed"),
        ("trader_exit", "confirmed"),
        ("trader_exit", "retracted"),
    ]
    unit = make_state(redis_client, streams).unit_key(rules.wallet_unit(WALLET, MARKET))
    state = WalletMarketState.load(await redis_client.get(unit))
    assert state.positions == {buy.token_id: 100_000_000}


async def test_a_retracted_buy_leaves_the_consensus_and_its_signal_is_retracted(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    wallets = [wallet(n) for n in (1, 2, 3)]
    buys = [make_order(user=w.address, shares=10) for w in wallets]
    orders = [*buys, retraction(buys[2])]
    found = await run_through_processor(redis_client, streams, orders, wallets, 10)
    consensus = [s for s in found if s["kind"] == "consensus"]
    assert [s["status"] for s in consensus] == ["confirmed", "retracted"]
    assert consensus[0]["signal_id"] == consensus[1]["signal_id"]
    token = make_state(redis_client, streams).unit_key(rules.token_unit(buys[0].token_id))
    members = orjson.loads(await redis_client.get(token))["members"]
    assert sorted(members) == sorted(w.address for w in wallets[:2])
    assert [identity(s) for s in reference(orders, wallets)] == [identity(s) for s in found]


async def test_a_retraction_of_a_fill_never_decided_changes_nothing(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    lone = make_order(shares=100)
    found = await run_through_processor(redis_client, streams, [retraction(lone)], [TRACKED], 1)
    assert found == []
    assert reference([retraction(lone)], [TRACKED]) == []


async def test_a_fill_orphaned_twice_is_retracted_twice(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    fill = make_order(shares=100)
    orders = [fill, retraction(fill), fill, retraction(fill, "chain reorg: block 9 (0x5678)")]
    found = await run_through_processor(redis_client, streams, orders, [TRACKED], 1)
    assert [s["status"] for s in found] == ["confirmed", "retracted", "confirmed", "retracted"]
    assert len({s["signal_id"] for s in found}) == 1
    assert [identity(s) for s in reference(orders, [TRACKED])] == [identity(s) for s in found]


async def test_a_fill_replayed_after_its_retraction_is_still_a_repeat(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    """The fill and its retraction applied, then both entries handled again (a crash before the
    ack, a reclaim): nothing moves, nothing is emitted again (from review)."""
    fill = make_order(shares=100)
    entries = [RawEntry("1-0", fields_of(fill)), RawEntry("2-0", fields_of(retraction(fill)))]
    await ensure_group(redis_client, streams.orders_raw, DETECTOR_GROUP)
    decider = processor(make_state(redis_client, streams), [TRACKED], SETTINGS)
    await decider.process(entries, wait_s=5)
    again = await decider.process(entries, wait_s=5)
    assert sum(again.signals.values()) == 0 and again.duplicates == 2
    found = await signals_of(redis_client, streams)
    assert [s["status"] for s in found] == ["confirmed", "retracted"]
    unit = make_state(redis_client, streams).unit_key(rules.wallet_unit(WALLET, MARKET))
    assert (
        await redis_client.get(unit) is None
        or not WalletMarketState.load(await redis_client.get(unit)).positions
    )


async def test_the_same_reason_twice_still_retracts_twice(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    """A chain that flips back and forth removes the same block twice: same reason, two
    retractions (from review)."""
    fill = make_order(shares=100)
    orders = [fill, retraction(fill), fill, retraction(fill)]
    found = await run_through_processor(redis_client, streams, orders, [TRACKED], 1)
    assert [s["status"] for s in found] == ["confirmed", "retracted", "confirmed", "retracted"]
    assert [identity(s) for s in reference(orders, [TRACKED])] == [identity(s) for s in found]


COOLDOWN = bookkeeping(signal_cooldown_s=300, consensus_min_wallets=3)


async def test_a_fill_included_again_signals_again_despite_the_cooldown_it_left(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    """The cooldown stamp and the consensus episode the fill moved go back with it, so its
    re-inclusion gives its signals again (from review)."""
    wallets = [wallet(n) for n in (1, 2, 3)]
    buys = [make_order(user=w.address, shares=10) for w in wallets]
    orders = [*buys, retraction(buys[2]), buys[2]]
    await ensure_group(redis_client, streams.orders_raw, DETECTOR_GROUP)
    decider = processor(make_state(redis_client, streams), wallets, COOLDOWN)
    entries = [RawEntry(f"{i + 1}-0", fields_of(order)) for i, order in enumerate(orders)]
    for entry in entries:
        await decider.process([entry], wait_s=5)
    found = await signals_of(redis_client, streams)
    third = [(s["kind"], s["status"]) for s in found if buys[2].order_key in s["order_keys"]]
    assert third == [
        ("trader_entry", "confirmed"),
        ("consensus", "confirmed"),
        ("trader_entry", "retracted"),
        ("consensus", "retracted"),
        ("trader_entry", "confirmed"),
        ("consensus", "confirmed"),
    ]
    detector = SerialDetector(wallets, COOLDOWN)
    expected = [s for order in orders for s in detector.process(order)]
    assert [identity(s) for s in expected] == [identity(s) for s in found]
