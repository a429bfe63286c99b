"""The detector's Redis side on a real Redis: the atomic apply step (Lua), the batch processor
against the reference semantics (`serial.py`), ordering between consumers, and reclaiming."""

from __future__ import annotations

import asyncio
import random
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import orjson
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.detector import rules
from services.detector.pipeline import BatchProcessor, RawEntry
from services.detector.rules import RuleSettings
from services.detector.serial import run
from services.detector.state import (
    CONFLICT,
    DUPLICATE,
    WAITING,
    ApplyStep,
    DetectorState,
    UnitWrite,
    encode_apply,
)
from shared.consumer import ConsumerGroup, Entry, GroupConfig, Handled
from shared.models import OrderFill, Signal, TrackedWallet
from shared.redis_streams import encode, ensure_group
from shared.streams import DETECTOR_GROUP, Streams
from tests.test_detector_rules import (
    OTHER,
    TRACKED,
    TS,
    WALLET,
    bookkeeping,
    make_order,
    wallet,
)

pytestmark = pytest.mark.integration

TTL = 3600


def make_state(client: aioredis.Redis, streams: Streams, script_batch: int = 250) -> DetectorState:
    return DetectorState(
        client, streams, maxlen=10_000, done_ttl_s=TTL, script_batch=script_batch, retry_s=1
    )


def processor(
    state: DetectorState,
    wallets: Sequence[TrackedWallet],
    rule_settings: RuleSettings,
    consumer: str = "c1",
    wait_s: float = 10.0,
) -> BatchProcessor:
    return BatchProcessor(
        state, wallets, rule_settings, consumer=consumer, wait_s=wait_s, touch_every_s=0.05
    )


async def signals_of(client: aioredis.Redis, streams: Streams) -> list[dict[str, Any]]:
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], await client.xrange(streams.signals))
    assert all(set(fields) == {b"data"} for _, fields in entries)
    return [orjson.loads(fields[b"data"]) for _, fields in entries]


def fields_of(order: OrderFill) -> dict[bytes, bytes]:
    """The entry fields the ingestor writes for an order."""
    return cast(dict[bytes, bytes], encode(order))


def identity(signal: Signal | dict[str, Any]) -> tuple[Any, ...]:
    """What must match between the reference and the detector (times aside)."""
    data = signal.model_dump(mode="json") if isinstance(signal, Signal) else signal
    return (
        data["signal_id"],
        data["kind"],
        data["wallet"],
        data["token_id"],
        round(data["confidence"], 12),
        tuple(data["order_keys"]),
        tuple(data["reasons"]),
    )


# --- the apply step -----------------------------------------------------------------------------


def write(unit: str, expected: bytes, value: bytes, ttl: int = 0) -> UnitWrite:
    return UnitWrite(unit, expected, value, ttl)


async def test_keys_share_the_signals_slot(redis_client: aioredis.Redis, streams: Streams) -> None:
    state = make_state(redis_client, streams)
    tag = "{" + streams.signals + "}"
    assert state.done_key("k").startswith(tag)
    assert state.unit_key(rules.wallet_unit(WALLET, "m")).startswith(tag)


async def test_apply_writes_state_emits_and_marks_done(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    state = make_state(redis_client, streams)
    step = ApplyStep(
        "k1", (), (write("u:a", b"", b"A1"), write("u:b", b"", b"B1", ttl=99)), (b'{"n": 1}',)
    )
    assert await state.apply([step]) == [1]
    assert await redis_client.get(state.unit_key("u:a")) == b"A1"
    assert await redis_client.ttl(state.unit_key("u:a")) == -1
    assert 0 < await redis_client.ttl(state.unit_key("u:b")) <= 99
    assert 0 < await redis_client.ttl(state.done_key("k1")) <= TTL
    assert [s["n"] for s in await signals_of(redis_client, streams)] == [1]
    # Delivered again: nothing, whatever it carries.
    assert await state.apply([step]) == [DUPLICATE]
    assert await redis_client.xlen(streams.signals) == 1
    # An empty value deletes the unit; a value without TTL clears an earlier TTL.
    clear = ApplyStep("k2", (), (write("u:a", b"A1", b""), write("u:b", b"B1", b"B2")), ())
    assert await state.apply([clear]) == [0]
    assert await redis_client.exists(state.unit_key("u:a")) == 0
    assert await redis_client.ttl(state.unit_key("u:b")) == -1


async def test_apply_waits_for_prerequisites_and_detects_conflicts(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    state = make_state(redis_client, streams, script_batch=2)
    first = ApplyStep("a", ("earlier",), (write("u:x", b"", b"X1"),), (b'{"n": 1}',))
    then = ApplyStep("b", (), (write("u:x", b"X1", b"X2"),), (b'{"n": 2}',))
    independent = ApplyStep("c", (), (write("u:y", b"", b"Y1"),), (b'{"n": 3}',))
    # across the script-call boundary (script_batch 2): still blocked behind `first`
    later = ApplyStep("d", (), (write("u:x", b"X2", b"X3"),), ())
    stale = ApplyStep("e", (), (write("u:y", b"something else", b"Y2"),), ())
    assert await state.apply([first, then, independent, later, stale]) == [
        WAITING,
        WAITING,
        1,
        WAITING,
        CONFLICT,
    ]
    assert [s["n"] for s in await signals_of(redis_client, streams)] == [3]
    assert await redis_client.exists(state.done_key("a"), state.done_key("b")) == 0
    await redis_client.set(state.done_key("earlier"), "1")
    assert await state.apply([first, then, later]) == [1, 1, 0]
    assert await redis_client.get(state.unit_key("u:x")) == b"X3"
    assert [s["n"] for s in await signals_of(redis_client, streams)] == [3, 1, 2]


async def test_a_unit_is_compared_at_its_first_order_and_blocked_after_one_not_applied(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    state = make_state(redis_client, streams)
    await redis_client.set(state.done_key("seen"), "1")
    opens = ApplyStep("o", (), (write("u:z", b"", b"Z1"),), (b'{"n": 1}',))
    grows = ApplyStep("g", (), (write("u:z", b"Z1", b"Z2"),), (b'{"n": 2}',))
    redelivered = ApplyStep("seen", (), (write("u:z", b"Z2", b"Z3"),), (b'{"n": 3}',))
    after = ApplyStep("t", (), (write("u:z", b"Z3", b"Z4"),), (b'{"n": 4}',))
    # The redelivered order changes nothing, so `after` (decided as if it had) must not apply.
    assert await state.apply([opens, grows, redelivered, after]) == [1, 1, DUPLICATE, WAITING]
    assert await redis_client.get(state.unit_key("u:z")) == b"Z2"
    assert [s["n"] for s in await signals_of(redis_client, streams)] == [1, 2]
    assert await redis_client.exists(state.done_key("o"), state.done_key("g")) == 2
    assert await redis_client.exists(state.done_key("t")) == 0
    # Decided again from what is there now, it applies.
    again = ApplyStep("t", (), (write("u:z", b"Z2", b"Z3"),), (b'{"n": 4}',))
    assert await state.apply([again]) == [1]
    assert await redis_client.get(state.unit_key("u:z")) == b"Z3"


async def test_a_step_held_back_before_its_call_holds_back_the_later_ones_on_its_units(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    """Found in review: `x` waits behind `p` from the previous call; `y` comes after `x` on unit v
    in the same call, decided as if `x` had applied. It must not go without `x`, even though `w`
    already made v's first comparison of the call."""
    state = make_state(redis_client, streams, script_batch=3)
    await redis_client.set(state.unit_key("u:v"), b"V0")
    p = ApplyStep("p", ("missing",), (write("u:u", b"", b"U1"),), ())
    f1 = ApplyStep("f1", (), (write("u:f1", b"", b"F"),), ())
    f2 = ApplyStep("f2", (), (write("u:f2", b"", b"F"),), ())
    w = ApplyStep("w", (), (write("u:v", b"V0", b"V1"),), ())
    x = ApplyStep("x", (), (write("u:u", b"U1", b"U2"), write("u:v", b"V1", b"V2")), ())
    y = ApplyStep("y", (), (write("u:v", b"V2", b"V3"),), ())
    assert await state.apply([p, f1, f2, w, x, y]) == [WAITING, 0, 0, 0, WAITING, WAITING]
    assert await redis_client.get(state.unit_key("u:v")) == b"V1"
    assert await redis_client.exists(state.done_key("x"), state.done_key("y")) == 0


async def test_read_entries_reads_a_span_then_one_by_one_and_names_trimmed_ones(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    state = make_state(redis_client, streams)
    ids = [
        (await redis_client.xadd(streams.orders_raw, {"data": str(n)})).decode()
        for n in range(3000)
    ]
    await redis_client.xdel(streams.orders_raw, ids[5])
    # Two wanted near the start, one far past the span bound (4 x 3 + 1000 entries), one trimmed.
    wanted = [ids[2900], ids[1], ids[3], ids[5]]
    found = await state.read_entries(wanted)
    assert list(found) == wanted
    assert found[ids[1]] == {b"data": b"1"} and found[ids[3]] == {b"data": b"3"}
    assert found[ids[2900]] == {b"data": b"2900"}
    assert found[ids[5]] is None
    assert await state.read_entries([]) == {}


# --- the batch processor against the reference --------------------------------------------------

SMALL = RuleSettings(
    whale_min_notional_usd=100,
    signal_cooldown_s=10,
    exit_min_fraction=0.8,
    consensus_min_wallets=2,
    consensus_window_s=50,
    # Runs of small fills reach it within a few orders of the examples below.
    accumulation_min_notional_usd=60,
    accumulation_window_s=60,
    accumulation_min_fills=2,
)
WALLETS = [wallet(1, 0.9), wallet(2, None), wallet(3, 0.2)]
USERS = [w.address for w in WALLETS] + [OTHER]

orders_st = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=3),  # who (3 = untracked)
        st.sampled_from(["yes", "no", "other-market"]),
        st.sampled_from(["BUY", "BUY", "SELL"]),
        st.sampled_from([1.0, 50.0, 120.0, 400.0]),
        st.sampled_from([0.3, 0.5, 0.96]),
        st.integers(min_value=0, max_value=30),  # seconds after the previous order
        st.booleans(),  # delivered a second time, later in the stream
    ),
    min_size=1,
    max_size=30,
)


def build_orders(spec: list[tuple[int, str, str, float, float, int, bool]]) -> list[OrderFill]:
    orders: list[OrderFill] = []
    replays: list[OrderFill] = []
    ts = TS
    for who, token, side, shares, price, gap, again in spec:
        ts += gap
        market = "0x" + ("22" if token == "other-market" else "11") * 32
        order = make_order(
            user=USERS[who],
            token_id=token,
            side=side,
            shares=shares,
            price=price,
            timestamp=ts,
            condition_id=market,
        )
        orders.append(order)
        if again:
            replays.append(order)
    return orders + replays


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    orders_st,
    st.integers(min_value=1, max_value=7),
    st.integers(min_value=1, max_value=4),
    st.randoms(use_true_random=False),
)
def test_processor_matches_the_reference(
    redis_url: str,
    spec: list[tuple[int, str, str, float, float, int, bool]],
    batch: int,
    script_batch: int,
    rnd: random.Random,
) -> None:
    """Any batch split and script size, redeliveries included: the signals of `serial.run`."""
    asyncio.run(_check_processor(redis_url, build_orders(spec), batch, script_batch, rnd))


async def _check_processor(
    redis_url: str, orders: list[OrderFill], batch: int, script_batch: int, rnd: random.Random
) -> None:
    streams = Streams(f"t{uuid.uuid4().hex[:10]}:")
    client = aioredis.Redis.from_url(redis_url)
    try:
        state = make_state(client, streams, script_batch)
        await ensure_group(client, streams.orders_raw, DETECTOR_GROUP)
        decider = processor(state, WALLETS, SMALL)
        entries = [RawEntry(f"{i + 1}-0", fields_of(order)) for i, order in enumerate(orders)]
        for start in range(0, len(entries), batch):
            chunk = entries[start : start + batch]
            outcome = await decider.process(chunk)
            assert sorted(outcome.settled) == sorted(e.entry_id for e in chunk)
            if rnd.random() < 0.3:  # the whole batch redelivered (a crash before the ack)
                again = await decider.process(chunk)
                assert sum(again.signals.values()) == 0
        expected = [identity(s) for s in run(orders, WALLETS, SMALL)]
        assert [identity(s) for s in await signals_of(client, streams)] == expected
    finally:
        keys = [k async for k in client.scan_iter(match=f"*{streams.namespace}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def test_redelivered_batch_changes_nothing(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    """A batch processed again (crash before the ack) emits nothing and moves no position."""
    state = make_state(redis_client, streams)
    await ensure_group(redis_client, streams.orders_raw, DETECTOR_GROUP)
    decider = processor(state, [TRACKED], bookkeeping(signal_cooldown_s=0))
    orders = [
        make_order(shares=4000, price=0.5),
        make_order(shares=10, price=0.5, token_id="tok-2"),
        make_order(shares=4, price=0.5, side="SELL"),
    ]
    entries = [RawEntry(f"{i + 1}-0", fields_of(order)) for i, order in enumerate(orders)]

    first = await decider.process(entries)
    assert (first.orders, first.duplicates) == (3, 0)
    assert first.signals == {"whale_order": 1, "trader_entry": 2}
    assert await redis_client.xlen(streams.signals) == 3
    unit = state.unit_key(rules.wallet_unit(WALLET, orders[0].condition_id))
    positions = orjson.loads(cast(bytes, await redis_client.get(unit)))["positions"]
    assert positions == {"tok-1": 3996_000_000, "tok-2": 10_000_000}

    again = await decider.process(entries)
    assert (again.orders, again.duplicates, sum(again.signals.values())) == (3, 3, 0)
    assert await redis_client.xlen(streams.signals) == 3
    assert orjson.loads(cast(bytes, await redis_client.get(unit)))["positions"] == positions


# --- ordering between consumers -----------------------------------------------------------------


@pytest.fixture
async def group_state(
    redis_client: aioredis.Redis, streams: Streams
) -> AsyncIterator[DetectorState]:
    await ensure_group(redis_client, streams.orders_raw, DETECTOR_GROUP)
    yield make_state(redis_client, streams)


async def deliver(
    client: aioredis.Redis, streams: Streams, consumer: str, orders: Sequence[OrderFill]
) -> list[RawEntry]:
    """XADD the orders, then XREADGROUP them to `consumer`: they are pending there."""
    for order in orders:
        await client.xadd(streams.orders_raw, encode(order))
    reply: Any = await client.xreadgroup(
        DETECTOR_GROUP, consumer, {streams.orders_raw: ">"}, count=len(orders)
    )
    return [RawEntry(entry_id.decode(), fields) for entry_id, fields in reply[0][1]]


async def test_an_order_waits_for_an_earlier_order_held_by_another_consumer(
    redis_client: aioredis.Redis, streams: Streams, group_state: DetectorState
) -> None:
    """B holds BUY-again and SELL of a position whose BUY A holds: B waits for A, then decides
    exactly what one consumer reading in order would; B's unrelated order does not wait."""
    no_cooldown = bookkeeping(signal_cooldown_s=0)
    buy, other_token = (
        make_order(shares=100),
        make_order(shares=5, token_id="tok-9", condition_id="0x" + "33" * 32),
    )
    sell, again = make_order(side="SELL", shares=100), make_order(shares=30)
    unrelated = make_order(user=OTHER, shares=4000, token_id="tok-7")
    a_entries = await deliver(redis_client, streams, "A", [buy, other_token])
    b_entries = await deliver(redis_client, streams, "B", [unrelated, sell, again])
    a = processor(group_state, [TRACKED], no_cooldown, "A")
    b = processor(group_state, [TRACKED], no_cooldown, "B")

    b_task = asyncio.ensure_future(b.process(b_entries))
    await asyncio.sleep(0.3)
    assert not b_task.done()
    early = await signals_of(redis_client, streams)
    assert [s["order_keys"] for s in early] == [[unrelated.order_key]]  # only the unrelated whale

    a_outcome = await a.process(a_entries)
    b_outcome = await asyncio.wait_for(b_task, 10)
    assert b_outcome.waits > 0 and not b_outcome.unsettled
    assert sorted(a_outcome.settled + b_outcome.settled) == sorted(
        e.entry_id for e in a_entries + b_entries
    )
    found = {identity(s)[:2] for s in await signals_of(redis_client, streams)}
    expected = {
        identity(s)[:2]
        for s in run([buy, other_token, unrelated, sell, again], [TRACKED], no_cooldown)
    }
    assert found == expected
    assert {kind for _, kind in found} == {"trader_entry", "trader_exit", "whale_order"}


async def test_a_repeated_fill_does_not_let_later_orders_overtake(
    redis_client: aioredis.Redis, streams: Streams, group_state: DetectorState
) -> None:
    """Stream: BUY (decided), SELL (held by A, undecided), the BUY again (held by C), BUY (held
    by B). The repeat's done key exists from the first BUY; still neither C nor B may settle
    before A's SELL, or B's BUY would see the position the SELL closes."""
    no_cooldown = bookkeeping(signal_cooldown_s=0)
    buy, sell, later = (
        make_order(shares=100),
        make_order(side="SELL", shares=100),
        make_order(shares=50),
    )
    first = await deliver(redis_client, streams, "P", [buy])
    await processor(group_state, [TRACKED], no_cooldown, "P").process(first)
    await redis_client.xack(streams.orders_raw, DETECTOR_GROUP, *[e.entry_id for e in first])
    a_entries = await deliver(redis_client, streams, "A", [sell])
    c_entries = await deliver(redis_client, streams, "C", [buy])
    b_entries = await deliver(redis_client, streams, "B", [later])
    c_task = asyncio.ensure_future(
        processor(group_state, [TRACKED], no_cooldown, "C").process(c_entries)
    )
    b_task = asyncio.ensure_future(
        processor(group_state, [TRACKED], no_cooldown, "B").process(b_entries)
    )
    await asyncio.sleep(0.3)
    assert not c_task.done() and not b_task.done()
    await processor(group_state, [TRACKED], no_cooldown, "A").process(a_entries)
    c_outcome, b_outcome = await asyncio.wait_for(asyncio.gather(c_task, b_task), 10)
    assert (c_outcome.duplicates, len(b_outcome.settled)) == (1, 1)
    found = [(s["order_keys"][0], s["kind"]) for s in await signals_of(redis_client, streams)]
    assert found == [
        (buy.order_key, "trader_entry"),
        (sell.order_key, "trader_exit"),
        (later.order_key, "trader_entry"),
    ]


async def test_a_batch_leaves_pending_what_waited_too_long(
    redis_client: aioredis.Redis, streams: Streams, group_state: DetectorState
) -> None:
    buy = make_order(shares=100)
    sell, unrelated = make_order(side="SELL", shares=100), make_order(user=OTHER, shares=4000)
    await deliver(redis_client, streams, "A", [buy])
    b_entries = await deliver(redis_client, streams, "B", [sell, unrelated])
    b = processor(group_state, [TRACKED], bookkeeping(), "B", wait_s=0.2)
    outcome = await b.process(b_entries)
    assert outcome.unsettled == [b_entries[0].entry_id]
    assert outcome.settled == [b_entries[1].entry_id]
    # The entry stays with B, idle-refreshed while it waited: not stealable as idle.
    pending: Any = await redis_client.xpending_range(
        streams.orders_raw, DETECTOR_GROUP, min="-", max="+", count=10, consumername="B"
    )
    assert [p["message_id"].decode() for p in pending] == [e.entry_id for e in b_entries]
    assert all(p["times_delivered"] == 1 for p in pending)


# --- in the consumer runtime ---------------------------------------------------------------------


def runtime(
    client: aioredis.Redis, streams: Streams, decider: BatchProcessor, max_deliveries: int = 3
) -> ConsumerGroup:
    """The processor as the detector runs it: the handler of group `detector`."""

    async def handle(batch: list[Entry]) -> Handled:
        outcome = await decider.process([RawEntry(eid, fields) for eid, fields in batch])
        return Handled(outcome.settled, outcome.failed)

    config = GroupConfig(
        stream=streams.orders_raw,
        group=DETECTOR_GROUP,
        consumer=decider.consumer,
        dead_stream=streams.orders_dead,
        origin="detector",
        batch_size=2,
        claim_min_idle_ms=50,
        max_deliveries=max_deliveries,
        max_deliveries_setting="DETECTOR_MAX_DELIVERIES",
    )
    return ConsumerGroup(client, config, handle)


async def test_entries_of_a_dead_consumer_are_reclaimed_and_decided(
    redis_client: aioredis.Redis, streams: Streams, group_state: DetectorState
) -> None:
    orders = [make_order(shares=10, token_id=f"tok-{i}") for i in range(5)]
    await deliver(redis_client, streams, "dead", orders)
    live = processor(group_state, [TRACKED], bookkeeping(signal_cooldown_s=0), "live")
    sweeper = runtime(redis_client, streams, live)
    assert await sweeper.reclaim() == 0  # not idle long enough yet
    await asyncio.sleep(0.1)
    assert await sweeper.reclaim() == 5
    assert await redis_client.xpending(streams.orders_raw, DETECTOR_GROUP) == {
        "pending": 0,
        "min": None,
        "max": None,
        "consumers": [],
    }
    found = await signals_of(redis_client, streams)
    assert sorted(s["order_keys"][0] for s in found) == sorted(o.order_key for o in orders)


async def test_one_poisoned_entry_does_not_take_its_batch_with_it(
    redis_client: aioredis.Redis, streams: Streams, group_state: DetectorState
) -> None:
    """An entry whose state step fails for good (here its unit's key has the wrong type) is kept
    pending alone, with its error, until it is dead-lettered; the valid orders batched with it
    are decided now (security finding 8)."""
    orders = [
        make_order(shares=10, token_id=f"{n}", condition_id=f"0x{n:064x}") for n in (11, 22, 33)
    ]
    poison = orders[1]
    plan = rules.plan(poison, TRACKED, RuleSettings())
    assert plan is not None
    for unit in plan.units:
        await redis_client.sadd(group_state.unit_key(unit), "not a unit state")
    entries = await deliver(redis_client, streams, "c1", orders)
    c1 = processor(group_state, [TRACKED], bookkeeping(signal_cooldown_s=0), "c1")
    group = runtime(redis_client, streams, c1, max_deliveries=1)

    settled = await group.handle([(e.entry_id, e.fields) for e in entries])
    assert settled == [entries[0].entry_id, entries[2].entry_id]
    found = await signals_of(redis_client, streams)
    assert {s["order_keys"][0] for s in found} == {orders[0].order_key, orders[2].order_key}

    await asyncio.sleep(0.06)
    assert await group.reclaim() == 1
    dead = cast(
        list[tuple[bytes, dict[bytes, bytes]]], await redis_client.xrange(streams.orders_dead)
    )
    assert [orjson.loads(fields[b"raw"])["order_key"] for _, fields in dead] == [poison.order_key]
    assert b"WRONGTYPE" in dead[0][1][b"reason"]
    assert b"DETECTOR_MAX_DELIVERIES 1" in dead[0][1][b"reason"]
    assert (await redis_client.xpending(streams.orders_raw, DETECTOR_GROUP))["pending"] == 0


# --- the apply script's argument layout ----------------------------------------------------------


class _Layout:
    def done_key(self, order_key: str) -> str:
        return f"done:{order_key}"

    def unit_key(self, unit: str) -> str:
        return f"unit:{unit}"


def _decode_apply(keys: list[str], args: list[Any]) -> list[ApplyStep]:
    """The layout read back the way the script walks it (KEYS/ARGV cursors), independently of the
    encoder: per order, its done key, np prerequisite keys, nu unit keys and nf forgotten keys;
    np, nu, nf, the done value, nu triples and ns payloads."""
    steps, k, a = [], 1, 2
    while a < len(args):
        head = args[a].split(b",", 4)
        np, nu, nf, position, done_value = int(head[0]), int(head[1]), int(head[2]), *head[3:]
        position = position.decode()
        done, prereqs = keys[k], keys[k + 1 : k + 1 + np]
        units = keys[k + 1 + np : k + 1 + np + nu]
        forgets = keys[k + 1 + np + nu : k + 1 + np + nu + nf]
        k += 1 + np + nu + nf
        triples = args[a + 1 : a + 1 + 3 * nu]
        ns = int(args[a + 1 + 3 * nu])
        payloads = args[a + 2 + 3 * nu : a + 2 + 3 * nu + ns]
        a += 2 + 3 * nu + ns
        writes = tuple(
            UnitWrite(unit.removeprefix("unit:"), *triples[3 * i : 3 * i + 3])
            for i, unit in enumerate(units)
        )
        steps.append(
            ApplyStep(
                done.removeprefix("done:"),
                tuple(p.removeprefix("done:") for p in prereqs),
                writes,
                tuple(payloads),
                done_value,
                tuple(f.removeprefix("done:") for f in forgets),
                position,
            )
        )
    assert k == len(keys) and a == len(args)
    return steps


unit_names = st.sampled_from(["u1", "u2", "u3"])
apply_steps = st.builds(
    ApplyStep,
    st.text("0123456789abcdef", min_size=1, max_size=8),
    st.lists(st.text("0123456789abcdef", min_size=1, max_size=8), max_size=3).map(tuple),
    st.lists(
        st.builds(
            UnitWrite,
            unit_names,
            st.binary(max_size=8),
            st.binary(max_size=8),
            st.integers(0, 10**6),
        ),
        max_size=3,
        unique_by=lambda w: w.unit,
    ).map(tuple),
    st.lists(st.binary(min_size=1, max_size=20), max_size=3).map(tuple),
    st.binary(min_size=1, max_size=30),
    st.lists(st.text("0123456789abcdef:", min_size=1, max_size=8), max_size=2).map(tuple),
    st.tuples(st.integers(0, 2**45), st.integers(0, 99)).map(lambda p: f"{p[0]}-{p[1]}"),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(apply_steps, max_size=6))
def test_the_apply_layout_round_trips(steps: list[ApplyStep]) -> None:
    keys, args = encode_apply(steps, "signals", 1000, 60, _Layout())
    assert keys[0] == "signals" and args[:2] == [1000, 60]
    decoded = _decode_apply(keys, args)
    # Only a unit's first expected value in a call is sent; later ones go as b"".
    seen: set[str] = set()
    expected = []
    for step in steps:
        writes = []
        for w in step.units:
            writes.append(
                UnitWrite(w.unit, b"" if w.unit in seen else w.expected, w.value, w.ttl_s)
            )
            seen.add(w.unit)
        expected.append(
            ApplyStep(
                step.order_key,
                step.prerequisites,
                tuple(writes),
                step.payloads,
                step.done_value,
                step.forgets,
                step.position,
            )
        )
    assert decoded == expected


def test_the_script_returns_the_named_codes() -> None:
    """The script's codes are the Python constants (built into its text), not literals."""
    from services.detector.state import _APPLY

    assert f"= {DUPLICATE}, {WAITING}, {CONFLICT}" in _APPLY
    assert not re.search(r"code = -\d", _APPLY)
