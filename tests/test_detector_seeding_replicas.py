"""A wallet's `/positions` seeding is state in Redis, read with the units and compared with them:
a replica that never saw the seeding happen (its request in flight, failed, or no request at all)
decides on it exactly as the one that made it, a seeding that lands between the read and the
apply makes the order be decided again, and the registry's removals and re-additions cannot
leave a stale seeding nor delete a fresh one (services/detector/positions.py)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from services.detector import rules
from services.detector.pipeline import RawEntry
from services.detector.positions import Seeder
from services.detector.rules import RuleSettings
from services.detector.serial import SerialDetector
from services.detector.state import DetectorState
from shared.redis_streams import ensure_group
from shared.streams import DETECTOR_GROUP, Streams
from tests.test_detector_informative import MARKET, TS, W, fill
from tests.test_detector_state import fields_of, identity, make_state, processor, signals_of

pytestmark = pytest.mark.integration

WALLET = W[0].address
SETTINGS = RuleSettings(signal_cooldown_s=0)
AS_OF = TS + 100
HELD = {MARKET: {"tok-yes": 50_000_000}}  # 50 shares of tok-yes


async def test_a_replica_that_never_saw_the_seeding_decides_on_it(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    """Replica A seeds the wallet; replica B (its own request still in flight) decides the
    wallet's fills: a fill of before the snapshot is in it (no double count, no entry), a later
    BUY of another token is a new position; exactly the seeded reference."""
    state = make_state(redis_client, streams)
    await ensure_group(redis_client, streams.orders_raw, DETECTOR_GROUP)
    assert await state.seed(WALLET, HELD, AS_OF, "1-0") == AS_OF  # replica A's seeding
    b = processor(state, W, SETTINGS, consumer="b")
    orders = [
        fill(WALLET, "BUY", 20, 0.5, TS),  # traded before the snapshot: in it already
        fill(WALLET, "BUY", 20, 0.5, AS_OF + 10, token="tok-no"),  # a new position
        fill(WALLET, "SELL", 45, 0.5, AS_OF + 20),  # 90% of the 50 held: an exit
    ]
    reference = SerialDetector(W, SETTINGS)
    reference.seed(WALLET, HELD, AS_OF)
    expected = [s for o in orders for s in reference.process(o)]
    entries = [RawEntry(f"{i + 1}-0", fields_of(o)) for i, o in enumerate(orders)]
    await b.process(entries)
    got = await signals_of(redis_client, streams)
    assert [identity(s) for s in got] == [identity(s) for s in expected]
    assert [(s["kind"], s["opens_position"]) for s in got] == [
        ("trader_entry", True),
        ("trader_exit", False),
    ]
    assert await state.position(WALLET, MARKET, "tok-yes") == 5_000_000  # 50 - 45, not 70 - 45


async def test_a_seeding_between_the_read_and_the_apply_makes_the_order_decided_again(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    """The seeding changes no unit the order touches (the wallet holds nothing in its market):
    the compare-and-set still catches it, through the seed key, and the order is decided on it."""
    state = make_state(redis_client, streams)
    await ensure_group(redis_client, streams.orders_raw, DETECTOR_GROUP)
    decider = processor(state, W, SETTINGS)
    applied = state.apply
    raced: list[Any] = []

    async def seeded_meanwhile(steps: Any) -> list[int]:
        if not raced:  # another replica's seeding lands just before the first apply
            raced.append(await state.seed(WALLET, {"0xother": {"tok-x": 1}}, AS_OF, "1-0"))
        return await applied(steps)

    state.apply = seeded_meanwhile  # type: ignore[method-assign]
    order = fill(WALLET, "BUY", 20, 0.5, AS_OF + 10)
    await decider.process([RawEntry("1-0", fields_of(order))])
    [signal] = await signals_of(redis_client, streams)
    reference = SerialDetector(W, SETTINGS)
    reference.seed(WALLET, {"0xother": {"tok-x": 1}}, AS_OF)
    [expected] = reference.process(order)
    assert raced == [AS_OF]
    assert identity(signal) == identity(expected)
    assert signal["opens_position"] is True


async def test_removals_leave_no_stale_seeding_and_delete_no_fresh_one(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    state = make_state(redis_client, streams)
    # Added at 10-0 and removed at 20-0: a seeding of the 10-0 addition finishing late is refused.
    await state.forget_seeded(WALLET, "20-0")
    assert await state.seed(WALLET, HELD, AS_OF, "10-0") is None
    assert await state.seeding(WALLET) is None
    assert await state.position(WALLET, MARKET, "tok-yes") == 0
    # Added again at 30-0: seeded afresh; a replica applying the 20-0 removal late leaves it.
    assert await state.seed(WALLET, HELD, AS_OF + 5, "30-0") == AS_OF + 5
    await state.forget_seeded(WALLET, "20-0")
    assert await state.seeding(WALLET) == AS_OF + 5
    # Removed at 40-0: gone; the 30-0 seeding again (a retry) is refused too.
    await state.forget_seeded(WALLET, "40-0")
    assert await state.seeding(WALLET) is None and await state.seeded() == {}
    assert await state.seed(WALLET, HELD, AS_OF + 9, "30-0") is None
    # A seeding made before the removal's tombstone expired is of an older generation: ids
    # compare as stream ids, not as strings.
    assert await state.seed(WALLET, HELD, AS_OF + 9, "100-0") == AS_OF + 9


async def test_a_background_seeding_finishing_after_the_removal_is_dropped(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    state = make_state(redis_client, streams)

    async def data_api(request: httpx.Request) -> httpx.Response:
        # The wallet is removed from the registry while its request is in flight.
        await state.forget_seeded(WALLET, "20-0")
        return httpx.Response(200, json=[{"asset": "tok-yes", "conditionId": MARKET, "size": 5}])

    async with httpx.AsyncClient(transport=httpx.MockTransport(data_api)) as http:
        seeder = Seeder(http, "http://data-api", lambda _: state, lambda: AS_OF)
        await seeder.seed(WALLET, "10-0")
    assert seeder.seeded == {} and seeder.failed == {}
    assert await state.seeding(WALLET) is None
    assert await redis_client.get(state.unit_key(rules.wallet_unit(WALLET, MARKET))) is None


async def test_redis_unreachable_fails_the_seeding_without_raising(streams: Streams) -> None:
    """Startup awaits `seed_all` and the retry task runs `seed`: a Redis error must count as a
    failed seeding (asked again later), after the usual retry, never escape."""
    client = aioredis.Redis.from_url("redis://127.0.0.1:1", socket_connect_timeout=0.2)
    state = DetectorState(client, streams, maxlen=100, done_ttl_s=60, script_batch=10, retry_s=0.3)
    answer = [{"asset": "tok-yes", "conditionId": MARKET, "size": 5}]
    try:
        async with httpx.AsyncClient(
            transport=httpx.MockTransport(lambda _: httpx.Response(200, json=answer))
        ) as http:
            seeder = Seeder(http, "http://data-api", lambda _: state, lambda: AS_OF)
            await seeder.seed_all([WALLET], "7-0")
        assert seeder.failed == {WALLET: "7-0"} and seeder.seeded == {}
    finally:
        await client.aclose()
