"""The gap backfill against a feed as rough as the real ones (issue 16), with the real simulator
and real Redis: one wallet whose REST history keeps failing holds back no other wallet and shows
in /health and the metrics; fills the REST index did not hold yet at the first pass are read by a
second one; a wallet added by an `update` the server applies late loses nothing; a wallet removed
and added again is backfilled from its watermark; a Redis recovery still reads every wallet again.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from services.ingestor.backfill import BackfillSchedule, Outcome
from services.ingestor.feed_status import ConnectionState, FeedStatus, evaluate_health
from services.ingestor.service import Ingestor
from services.ingestor.sources.dome_ws import DomeWebSocketSource
from services.ingestor.sources.ws_connection import DomeConnection
from shared import wallet_registry
from shared.models import TrackedWallet
from shared.streams import Streams
from tests.helpers.ingestion import (
    WALLETS,
    Sim,
    caught_up,
    converge,
    ingestor_settings,
    metric,
    raw_keys,
    raw_payloads,
    running,
    simulator,
    subscribed,
    truth_key,
    until,
)

BEHIND = "betterbot_ingestor_wallets_behind"
BEHIND_SINCE = "betterbot_ingestor_wallets_behind_since_timestamp_seconds"
ORDERS = "/v1/polymarket/orders"
# The wallet the old loop tried first (it sorted them), so its failure held back every other one.
BAD = min(WALLETS)
OTHERS = [wallet for wallet in WALLETS if wallet != BAD]
FAILURES: dict[str, dict[str, Any]] = {
    "http_500": {"status": 500},
    "timeout": {"hang_s": 2},
    "has_more_without_pagination_key": {"no_pagination_key": True},
}


def _ws(ingestor: Ingestor) -> DomeWebSocketSource:
    assert ingestor.websocket is not None
    return ingestor.websocket


def _conn(ingestor: Ingestor) -> DomeConnection:
    [conn] = _ws(ingestor).connections
    return conn


async def _sources_of(
    client: aioredis.Redis, streams: Streams, trades: list[dict[str, Any]]
) -> set[str]:
    by_key = {p["order_key"]: p["source"] for p in await raw_payloads(client, streams)}
    return {by_key.get(truth_key(trade), "missing") for trade in trades}


async def _published(client: aioredis.Redis, streams: Streams, trades: list[Any]) -> bool:
    return {truth_key(t) for t in trades} <= set(await raw_keys(client, streams))


def _reads(sim: Sim, wallet: str, after: float = 0.0) -> list[Any]:
    """The orders requests about `wallet` the simulator answered after `after` (Unix time)."""
    return [
        r
        for r in sim.sim.app.state.faults.requests
        if r.path == ORDERS and r.params.get("user") == wallet and r.at > after
    ]


async def _away(sim: Sim) -> None:
    """Drop the feed and refuse handshakes, so what is emitted next is certainly missed live."""
    await sim.post("/_sim/auth", {"reject": True})
    await sim.post("/_sim/drop")


@pytest.mark.parametrize("failure", list(FAILURES))
async def test_one_wallet_whose_backfill_fails_holds_back_no_other_and_shows_in_health(
    failure: str, redis_url: str, namespace: str, redis_client: aioredis.Redis, streams: Streams
) -> None:
    async with simulator() as sim:
        settings = ingestor_settings(
            sim, redis_url, namespace, http_timeout_s=0.5, health_max_backfill_behind_s=0.5
        )
        async with running(settings) as ingestor:
            await subscribed(ingestor)
            await caught_up(ingestor)
            await _away(sim)
            missed = await sim.emit(WALLETS, 40)
            await sim.post("/_sim/rest_fail", {"user": BAD, **FAILURES[failure]})
            await sim.post("/_sim/auth", {"reject": False})
            theirs = [t for t in missed if t["user"] != BAD]
            await until(lambda: _published(redis_client, streams, theirs), what="others recovered")
            assert await _sources_of(redis_client, streams, theirs) == {"dome_rest"}

            await until(lambda: _degraded(ingestor), what="health degraded by the wallet behind")
            ok, details = await ingestor.health()
            assert ok, details["problems"]  # degraded, not failing
            assert details["sources"]["dome_ws"]["wallets_behind"] == 1
            assert details["sources"]["dome_ws"]["behind_since"] <= time.time() - 0.5
            assert metric(BEHIND, source="dome_ws") == 1
            assert 0 < metric(BEHIND_SINCE, source="dome_ws") <= time.time() - 0.5
            assert BAD not in _conn(ingestor).caught_up
            # Retried on its own, with its own backoff (0.05 s doubling to 0.3 s here).
            await until(lambda: len(_reads(sim, BAD)) >= 4, what="the failing wallet retried")
            # A reconnect reads every wallet again, but does not restart the clock of the one
            # that was behind all along.
            since = details["sources"]["dome_ws"]["behind_since"]
            await _dropped_and_back(sim, ingestor)
            await until(lambda: metric(BEHIND, source="dome_ws") == 1, what="the others read")
            assert metric(BEHIND_SINCE, source="dome_ws") == since

            await sim.post("/_sim/rest_fail", {"user": BAD, "clear": True})
            await converge(sim, redis_client, streams, WALLETS)
            await caught_up(ingestor)
            await until(lambda: metric(BEHIND, source="dome_ws") == 0)
            ok, details = await ingestor.health()
            assert ok and details["degraded"] == [], details
            assert metric(BEHIND_SINCE, source="dome_ws") == 0


async def _dropped_and_back(sim: Sim, ingestor: Ingestor) -> None:
    reconnects = _ws(ingestor).status.reconnects
    await sim.post("/_sim/drop")
    await until(lambda: _ws(ingestor).status.reconnects > reconnects, what="reconnected")
    await subscribed(ingestor)


async def _degraded(ingestor: Ingestor) -> bool:
    _, details = await ingestor.health()
    return any("behind" in line for line in details.get("degraded", []))


async def test_fills_not_yet_in_the_rest_index_at_the_first_pass_are_read_by_a_second(
    redis_url: str, namespace: str, redis_client: aioredis.Redis, streams: Streams
) -> None:
    async with simulator() as sim:
        settings = ingestor_settings(sim, redis_url, namespace, backfill_indexing_lag_s=6)
        async with running(settings) as ingestor:
            await subscribed(ingestor)
            await caught_up(ingestor)
            # From now on REST lists a fill only 5 s after its live event.
            await sim.post("/_sim/rest_lag", {"seconds": 5})
            await _away(sim)
            missed = await sim.emit(WALLETS, 20)
            reconnects = _ws(ingestor).status.reconnects
            await sim.post("/_sim/auth", {"reject": False})
            await until(lambda: _ws(ingestor).status.reconnects > reconnects)
            await subscribed(ingestor)
            await caught_up(ingestor)
            # The first pass is done and could not see them: the fault bites.
            assert not await _published(redis_client, streams, missed)
            # Live fills after the reconnect move every watermark past the missed ones.
            await sim.emit(WALLETS, 20)
            await converge(sim, redis_client, streams, WALLETS)
            assert await _sources_of(redis_client, streams, missed) == {"dome_rest"}


async def test_a_wallet_added_by_an_update_the_server_applies_late_loses_nothing(
    redis_url: str, namespace: str, redis_client: aioredis.Redis, streams: Streams
) -> None:
    newcomer = "0x" + "d4" * 20
    async with simulator() as sim:
        settings = ingestor_settings(
            sim, redis_url, namespace, backfill_indexing_lag_s=0.5, dome_update_apply_s=4
        )
        async with running(settings) as ingestor:
            await subscribed(ingestor)
            await caught_up(ingestor)
            # The server applies a subscription update 3 s after it arrives (and never says so).
            await sim.post("/_sim/update_delay", {"seconds": 3})
            early = await sim.emit([newcomer], 2)
            await wallet_registry.upsert(redis_client, streams, TrackedWallet(address=newcomer))
            await until(lambda: _reads(sim, newcomer), what="the newcomer's first REST read")
            # Past the indexing lag's re-read window: only a read after the update bound helps.
            await asyncio.sleep(1.2)
            # Read once, but not confirmed: it does not count as caught up yet.
            assert newcomer not in _conn(ingestor).caught_up
            between = await sim.emit([newcomer], 3)
            assert not await _subscribed_to(sim, newcomer)  # the fault bites: not applied yet
            await until(lambda: _subscribed_to(sim, newcomer), what="the update applied")
            live = await sim.emit([newcomer], 2)
            await converge(sim, redis_client, streams, [*WALLETS, newcomer])
            assert await _sources_of(redis_client, streams, early + between) == {"dome_rest"}
            assert await _sources_of(redis_client, streams, live) == {"dome_ws"}
            await until(lambda: newcomer in _conn(ingestor).caught_up, what="confirmed by re-read")


async def _subscribed_to(sim: Sim, wallet: str) -> bool:
    return any(wallet in s["filters"]["users"] for s in await sim.subscriptions())


async def test_a_wallet_removed_and_added_again_is_backfilled_from_its_watermark(
    redis_url: str, namespace: str, redis_client: aioredis.Redis, streams: Streams
) -> None:
    gone = WALLETS[3]
    async with simulator() as sim:
        settings = ingestor_settings(sim, redis_url, namespace)
        async with running(settings) as ingestor:
            await subscribed(ingestor)
            await caught_up(ingestor)
            await sim.emit(WALLETS, 20)
            await converge(sim, redis_client, streams, WALLETS)
            await wallet_registry.remove(redis_client, streams, gone)
            await until(lambda: not_subscribed_to(sim, gone))
            # Traded while not followed: only a backfill on its return can bring these in.
            away = await sim.emit([gone], 3)
            await wallet_registry.upsert(redis_client, streams, TrackedWallet(address=gone))
            await until(lambda: _subscribed_to(sim, gone))
            await converge(sim, redis_client, streams, WALLETS)
            assert await _sources_of(redis_client, streams, away) == {"dome_rest"}
            assert _ws(ingestor).status.reconnects == 0


async def not_subscribed_to(sim: Sim, wallet: str) -> bool:
    return not await _subscribed_to(sim, wallet)


async def test_a_redis_recovery_still_reads_every_wallet_again(
    redis_url: str, namespace: str, redis_client: aioredis.Redis, streams: Streams
) -> None:
    async with simulator() as sim:
        settings = ingestor_settings(sim, redis_url, namespace, backfill_indexing_lag_s=0)
        async with running(settings) as ingestor:
            await subscribed(ingestor)
            await caught_up(ingestor)
            since = time.time()
            # What the publisher calls when Redis answers again after an outage.
            _ws(ingestor).catch_up_again()
            await until(lambda: all(_reads(sim, w, since) for w in WALLETS), what="all re-read")
            await caught_up(ingestor)
            assert _ws(ingestor).status.reconnects == 0


class _Clock:
    """Both clocks of a BackfillSchedule (one value, for exact sums), moved by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def wall(self) -> float:
        return self.now

    mono = wall


def _schedule(clock: _Clock, lag: float = 10.0, apply: float = 10.0) -> BackfillSchedule:
    return BackfillSchedule(
        indexing_lag_s=lag,
        update_apply_s=apply,
        retry_min_s=1.0,
        retry_max_s=8.0,
        rng=random.Random(7),
        clock=clock.wall,
        monotonic=clock.mono,
    )


def test_each_wallet_backs_off_on_its_own_and_the_others_are_read_meanwhile() -> None:
    clock = _Clock()
    schedule = _schedule(clock)
    schedule.want(["0xa", "0xb", "0xc"])
    first = schedule.take(2, retries=False)
    assert [r.wallet for r in first] == ["0xa", "0xb"]
    assert [r.wallet for r in schedule.take(5, retries=False)] == ["0xc"]
    bad, good = first
    delays = []
    for _ in range(4):
        delay = schedule.failed(bad, auth=False)
        assert delay is not None
        delays.append(delay)
        clock.now += delay
        # Retried in its own lane: the wallets in good standing are not queued behind it.
        assert schedule.take(5, retries=False) == []
        assert schedule.take(5, retries=True) == [bad]
    # Doubling from 1 s to the 8 s maximum, less at most a quarter of jitter.
    assert all(0.75 * b <= d <= b for d, b in zip(delays, [1, 2, 4, 8], strict=True))
    assert schedule.succeeded(good, clock.wall(), clock.mono()) is Outcome.CAUGHT_UP
    assert schedule.behind() == (2, 1_000_000.0)  # the failing one and the one still running


def test_a_first_pass_is_read_again_after_the_lag_reaching_back_before_it() -> None:
    clock = _Clock()
    schedule = _schedule(clock, lag=10)
    schedule.want(["0xa"])
    [read] = schedule.take(1, retries=False)
    started = clock.wall()
    clock.now += 3
    assert schedule.succeeded(read, started, clock.mono() - 3) is Outcome.CAUGHT_UP
    assert read.reach_back == int(started) - 11
    assert schedule.behind() == (0, None)
    assert schedule.wait_s(retries=False) == pytest.approx(7)
    clock.now += 7
    assert schedule.take(1, retries=False) == [read]
    assert schedule.succeeded(read, clock.wall(), clock.mono()) is Outcome.SETTLED
    assert schedule.reads == {}


def test_without_a_lag_one_pass_settles_a_wallet() -> None:
    clock = _Clock()
    schedule = _schedule(clock, lag=0)
    schedule.want(["0xa"])
    [read] = schedule.take(1, retries=False)
    assert schedule.succeeded(read, clock.wall(), clock.mono()) is Outcome.SETTLED


def test_a_wallet_added_by_an_update_is_read_again_after_the_apply_bound() -> None:
    clock = _Clock()
    schedule = _schedule(clock, lag=2, apply=10)
    schedule.updated(["0xn"])
    schedule.want(["0xn"])
    [read] = schedule.take(1, retries=False)
    assert schedule.succeeded(read, clock.wall(), clock.mono()) is Outcome.UNCONFIRMED
    # Not before the server has surely applied the update, plus the indexing lag.
    assert schedule.wait_s(retries=False) == pytest.approx(12)
    clock.now += 12
    assert schedule.take(1, retries=False) == [read]
    assert schedule.succeeded(read, clock.wall(), clock.mono()) is Outcome.SETTLED
    assert schedule.unconfirmed == {}


def test_reading_everything_again_keeps_behind_since_and_ignores_reads_in_flight() -> None:
    clock = _Clock()
    schedule = _schedule(clock)
    schedule.want(["0xa", "0xb", "0xc"])
    failing, done, flying = schedule.take(3, retries=False)
    schedule.failed(failing, auth=False)
    schedule.succeeded(done, clock.wall(), clock.mono())
    clock.now += 100
    schedule.again()
    schedule.want(["0xa", "0xb", "0xc"])
    # Behind since they first were (failing, or never done); the caught-up one from now.
    assert schedule.reads["0xa"].behind_since == 1_000_000.0
    assert schedule.reads["0xc"].behind_since == 1_000_000.0
    assert schedule.reads["0xb"].behind_since == 1_000_100.0
    assert schedule.succeeded(flying, clock.wall(), clock.mono()) is Outcome.STALE
    schedule.forget({"0xb"})
    assert set(schedule.reads) == {"0xb"}


def test_a_refused_key_holds_every_wallet_at_the_maximum() -> None:
    clock = _Clock()
    schedule = _schedule(clock)
    schedule.want(["0xa", "0xb"])
    [refused] = schedule.take(1, retries=False)
    delay = schedule.failed(refused, auth=True)
    assert delay is not None and 6 <= delay <= 8
    schedule.hold(delay)
    assert schedule.take(5, retries=False) == schedule.take(5, retries=True) == []


def test_health_is_degraded_not_failing_while_a_wallet_stays_behind() -> None:
    status = FeedStatus(source="dome_ws", wallets=3, state=ConnectionState.CONNECTED)
    status.wallets_behind, status.behind_since, status.behind_limit_s = 1, 1000.0, 300.0
    ok, details = evaluate_health(status, redis_ok=True, now=1200.0, max_down_s=60)
    assert ok and details["degraded"] == [] and details["wallets_behind"] == 1
    ok, details = evaluate_health(status, redis_ok=True, now=1301.0, max_down_s=60)
    assert ok and details["problems"] == []
    assert details["degraded"] == [
        "dome_ws: 1 wallets behind on their gap backfill, the oldest for 301s (limit 300s)"
    ]
    assert details["sources"]["dome_ws"]["behind_since"] == 1000.0
