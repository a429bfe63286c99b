"""The detector end to end on a real Redis: orders XADDed to `orders.raw` -> entries on `signals`.

Signals are read back with bare redis-py and json, as any outside consumer would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import redis.asyncio as aioredis

from devtools.servers import free_port
from services.detector import rules
from services.detector.main import Detector
from services.detector.pipeline import BatchOutcome, RawEntry
from services.detector.settings import DetectorSettings
from shared import wallet_registry
from shared.models import OrderFill, TrackedWallet
from shared.redis_streams import encode
from shared.streams import DETECTOR_GROUP, Streams
from tests.helpers.processes import ServiceProcess
from tests.test_detector_rules import MARKET, OTHER, TRACKED, WALLET, make_order
from tests.test_simulator_service import simulator

pytestmark = pytest.mark.integration

WAIT_S = 20


def detector_settings(redis_url: str, namespace: str, **overrides: Any) -> DetectorSettings:
    """Settings for one test; the cooldown and the notional filter are off unless asked for, as
    most tests here send many small orders of one wallet and market at one exchange time; and
    positions are not seeded (no Data API here) unless asked for."""
    defaults = {"signal_cooldown_s": 0, "signal_min_notional_usd": 0, "detector_seed_positions": 0}
    return DetectorSettings(
        redis_url=redis_url,
        stream_namespace=namespace,
        ops_port=0,
        **{**defaults, **overrides},
    )


@contextlib.asynccontextmanager
async def running(
    settings: DetectorSettings, wallets: list[TrackedWallet] | None = None
) -> AsyncIterator[Detector]:
    detector = Detector(settings, [TRACKED] if wallets is None else wallets)
    await detector.start()
    try:
        yield detector
    finally:
        await detector.stop()


async def xadd_all(
    client: aioredis.Redis, streams: Streams, items: Sequence[OrderFill | dict[bytes, bytes]]
) -> None:
    """XADD order fills (in the ingestor's plain format) or raw field dicts, in one round trip."""
    async with client.pipeline(transaction=False) as pipe:
        for item in items:
            fields = item if isinstance(item, dict) else encode(item)
            pipe.xadd(streams.orders_raw, cast(dict[Any, Any], fields))
        await pipe.execute()


async def drained(client: aioredis.Redis, streams: Streams) -> None:
    """Wait until the group has read every entry of orders.raw and acked all of them."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        last = await client.xrevrange(streams.orders_raw, count=1)
        groups = await client.xinfo_groups(streams.orders_raw)
        group = next(g for g in groups if g["name"] == DETECTOR_GROUP.encode())
        if last and group["last-delivered-id"] == last[0][0] and group["pending"] == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"orders.raw not drained in {WAIT_S}s: {groups}")


Entry = tuple[bytes, dict[bytes, bytes]]


async def xrange(client: aioredis.Redis, stream: str, **kwargs: Any) -> list[Entry]:
    return cast(list[Entry], await client.xrange(stream, **kwargs))


async def until(check: Callable[[], Awaitable[Any]]) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"condition not met in {WAIT_S}s")


async def read_signals(client: aioredis.Redis, streams: Streams) -> list[dict[str, Any]]:
    entries = await xrange(client, streams.signals)
    assert all(set(fields) == {b"data"} for _, fields in entries), entries
    return [json.loads(fields[b"data"]) for _, fields in entries]


def kinds_by_order(signals: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(s["order_keys"][0], s["kind"]) for s in signals]


async def test_orders_become_signals(
    redis_url: str, namespace: str, streams: Streams, redis_client: aioredis.Redis
) -> None:
    small_entry = make_order(shares=100, price=0.5)
    whale_entry = make_order(shares=5000, price=0.4, token_id="tok-2")
    untracked_whale = make_order(user=OTHER, shares=3000, price=0.6, side="SELL")
    near_certain = make_order(shares=50_000, price=0.97, token_id="tok-3")
    untracked_small = make_order(user=OTHER, shares=10, price=0.5)
    orders = [small_entry, whale_entry, untracked_whale, near_certain, untracked_small]

    async with running(detector_settings(redis_url, namespace)) as detector:
        await xadd_all(redis_client, streams, orders)
        await drained(redis_client, streams)
        ok, details = await detector.health()
        assert ok and details["redis"] and details["reading"]

    signals = await read_signals(redis_client, streams)
    assert kinds_by_order(signals) == [
        (small_entry.order_key, "trader_entry"),
        (whale_entry.order_key, "whale_order"),
        (whale_entry.order_key, "trader_entry"),
        (untracked_whale.order_key, "whale_order"),
    ]
    for signal in signals:
        order = next(o for o in orders if o.order_key == signal["order_keys"][0])
        assert_signal_matches(signal, order)
    assert signals[0]["wallet_label"] == "sharp"
    assert signals[3]["wallet_label"] == "" and signals[3]["side"] == "SELL"
    # The filtered fill emitted nothing but still opened the position.
    assert await detector.state.position(WALLET, MARKET, "tok-3") == 50_000_000_000


def assert_signal_matches(signal: dict[str, Any], order: OrderFill) -> None:
    assert signal["v"] == 1
    assert len(signal["signal_id"]) == 32
    assert signal["wallet"] == order.user
    for field in ("market_slug", "title", "condition_id", "token_id", "token_label", "price"):
        assert signal[field] == getattr(order, field), field
    assert signal["side"] == order.side.value
    assert signal["shares"] == order.shares_normalized
    assert signal["notional_usd"] == pytest.approx(order.notional_usd)
    assert 0 <= signal["confidence"] <= 1
    assert signal["reasons"] and all(isinstance(r, str) for r in signal["reasons"])
    assert signal["order_keys"] == [order.order_key]
    assert signal["source"] == order.source.value
    assert signal["exchange_ts"] == order.timestamp
    assert signal["received_at"] == order.received_at
    assert signal["received_at"] <= signal["detected_at"] <= time.time()


async def test_duplicated_order_signals_once_and_moves_position_once(
    redis_url: str, namespace: str, streams: Streams, redis_client: aioredis.Redis
) -> None:
    order = make_order(shares=4000, price=0.5)
    async with running(detector_settings(redis_url, namespace, detector_batch_size=1)) as detector:
        await xadd_all(redis_client, streams, [order, order])
        await drained(redis_client, streams)
        await xadd_all(redis_client, streams, [order])
        await drained(redis_client, streams)
        position = await detector.state.position(WALLET, MARKET, order.token_id)

    signals = await read_signals(redis_client, streams)
    assert kinds_by_order(signals) == [
        (order.order_key, "whale_order"),
        (order.order_key, "trader_entry"),
    ]
    assert position == 4000_000_000


async def test_entry_exit_and_entry_again_after_flat(
    redis_url: str, namespace: str, streams: Streams, redis_client: aioredis.Redis
) -> None:
    first = make_order(shares=100, price=0.4)
    add = make_order(shares=50, price=0.4)
    sell_part = make_order(shares=120, price=0.5, side="SELL")
    sell_rest = make_order(shares=500, price=0.5, side="SELL")  # more than held: floors at 0
    other_token = make_order(shares=10, price=0.4, token_id="tok-2")
    reopen = make_order(shares=20, price=0.3)
    orders = [first, add, sell_part, other_token, sell_rest, reopen]

    async with running(detector_settings(redis_url, namespace)) as detector:
        await xadd_all(redis_client, streams, orders)
        await drained(redis_client, streams)
        position = await detector.state.position(WALLET, MARKET, "tok-1")

    signals = await read_signals(redis_client, streams)
    assert kinds_by_order(signals) == [
        (first.order_key, "trader_entry"),
        (sell_part.order_key, "trader_exit"),  # 120 of 150 held: 80%
        (other_token.order_key, "trader_entry"),
        (sell_rest.order_key, "trader_exit"),
        (reopen.order_key, "trader_entry"),
    ]
    assert position == 20_000_000


async def test_bad_entries_are_dead_lettered_and_good_ones_still_signal(
    redis_url: str, namespace: str, streams: Streams, redis_client: aioredis.Redis
) -> None:
    good = make_order(shares=10, price=0.5)
    valid = json.loads(make_order().model_dump_json())
    missing = {k: v for k, v in valid.items() if k != "user"}
    wrong_type = {**valid, "price": "0.5"}
    bad: list[tuple[dict[bytes, bytes], str]] = [
        ({b"data": b"{not json"}, "not JSON"),
        ({b"data": json.dumps(missing).encode()}, "user: Field required"),
        ({b"data": json.dumps(wrong_type).encode()}, "price: Value error, must be a number"),
        ({b"payload": b"hello"}, "no 'data' field"),
        ({b"data": b"42"}, "invalid order"),
    ]

    async with running(detector_settings(redis_url, namespace)):
        await xadd_all(redis_client, streams, [fields for fields, _ in bad] + [good])
        await drained(redis_client, streams)

    dead = await xrange(redis_client, streams.orders_dead)
    assert len(dead) == len(bad)
    raw_ids = [entry_id for entry_id, _ in await xrange(redis_client, streams.orders_raw)]
    for (_, fields), (sent, reason_part), raw_id in zip(dead, bad, raw_ids, strict=False):
        reason = fields[b"reason"].decode()
        assert reason_part in reason and raw_id.decode() in reason
        assert fields[b"origin"] == b"detector"
        assert fields[b"raw"] == sent.get(b"data", b'{"payload":"hello"}')
    signals = await read_signals(redis_client, streams)
    assert kinds_by_order(signals) == [(good.order_key, "trader_entry")]


async def test_two_replicas_emit_each_signal_exactly_once(
    redis_url: str, namespace: str, streams: Streams, redis_client: aioredis.Redis
) -> None:
    # One token per order: each order's signals do not depend on which replica sees it first.
    orders = [make_order(shares=3000, price=0.5, token_id=f"tok-{i}") for i in range(300)]
    # The same fills again, as a replaying source would send them.
    replayed = orders[::7]
    settings = detector_settings(redis_url, namespace, detector_batch_size=10)

    async with running(settings) as one, running(settings) as two:
        assert one.consumer != two.consumer
        handled = {one.consumer: 0, two.consumer: 0}
        for replica in (one, two):
            process = replica.processor.process
            replica.processor.process = counting(process, handled, replica.consumer)  # type: ignore[method-assign,assignment]
        await xadd_all(redis_client, streams, orders[:150])
        await xadd_all(redis_client, streams, orders[150:] + replayed)
        await drained(redis_client, streams)
        consumers = await redis_client.xinfo_consumers(streams.orders_raw, DETECTOR_GROUP)

    signals = await read_signals(redis_client, streams)
    assert len(signals) == 2 * len(orders)
    assert len({s["signal_id"] for s in signals}) == len(signals)
    assert {(o.order_key, k) for o in orders for k in ("whale_order", "trader_entry")} == set(
        kinds_by_order(signals)
    )
    assert {c["name"].decode() for c in consumers} <= {one.consumer, two.consumer}
    assert all(handled.values()), handled  # both replicas took part
    assert await redis_client.xinfo_consumers(streams.orders_raw, DETECTOR_GROUP) == []


Process = Callable[[Sequence[RawEntry]], Coroutine[Any, Any, BatchOutcome]]


def counting(process: Process, handled: dict[str, int], name: str) -> Process:
    async def wrapper(entries: Sequence[RawEntry]) -> BatchOutcome:
        handled[name] += len(entries)
        return await process(entries)

    return wrapper


async def test_stop_finishes_the_batch_and_leaves_the_group(
    redis_url: str, namespace: str, streams: Streams, redis_client: aioredis.Redis
) -> None:
    orders = [make_order(shares=10, price=0.5, token_id=f"tok-{i}") for i in range(2000)]
    await xadd_all(redis_client, streams, orders)
    settings = detector_settings(redis_url, namespace, detector_batch_size=500)
    detector = Detector(settings, [TRACKED])
    await detector.start()
    await until(lambda: redis_client.xlen(streams.signals))
    await detector.stop()

    group = (await redis_client.xinfo_groups(streams.orders_raw))[0]
    assert group["pending"] == 0
    assert await redis_client.xinfo_consumers(streams.orders_raw, DETECTOR_GROUP) == []
    # Everything delivered before the stop was processed: one entry signal per delivered order.
    delivered = await xrange(redis_client, streams.orders_raw, max=group["last-delivered-id"])
    assert await redis_client.xlen(streams.signals) == len(delivered)


async def test_failed_batch_stays_pending_until_shutdown_finishes_it(
    redis_url: str,
    namespace: str,
    streams: Streams,
    redis_client: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No ack before the effects: a batch whose state step fails stays pending here."""
    order = make_order(shares=10, price=0.5)
    caplog.set_level(logging.WARNING, logger="shared.consumer")
    detector = Detector(detector_settings(redis_url, namespace), [TRACKED])
    # A state key of the wrong type makes the script fail with a real Redis error.
    position_key = detector.state.unit_key(rules.wallet_unit(WALLET, MARKET))
    await redis_client.hset(position_key, "not", "a string")
    await detector.start()
    try:
        await xadd_all(redis_client, streams, [order])

        async def failure_logged() -> bool:
            return any("WRONGTYPE" in getattr(r, "error", "") for r in caplog.records)

        await until(failure_logged)
        group = (await redis_client.xinfo_groups(streams.orders_raw))[0]
        assert group["pending"] == 1
        assert await redis_client.xlen(streams.signals) == 0
        await redis_client.delete(position_key)
    finally:
        await detector.stop()

    assert (await redis_client.xinfo_groups(streams.orders_raw))[0]["pending"] == 0
    assert kinds_by_order(await read_signals(redis_client, streams)) == [
        (order.order_key, "trader_entry")
    ]
    assert await redis_client.xinfo_consumers(streams.orders_raw, DETECTOR_GROUP) == []


@pytest.mark.e2e
async def test_runs_as_a_process_and_stops_on_sigterm(
    redis_url: str, namespace: str, streams: Streams, redis_client: aioredis.Redis
) -> None:
    port = free_port()
    env = {
        "REDIS_URL": redis_url,
        "STREAM_NAMESPACE": namespace,
        "OPS_PORT": str(port),
        "WALLETS_FILE": "config/wallets.example.json",
        "LOG_LEVEL": "INFO",
    }
    health_url = f"http://127.0.0.1:{port}/health"
    service = ServiceProcess("detector", env, health_url, tag="sigterm-")
    try:
        await asyncio.to_thread(service.wait_healthy)
        influenz = "0xe8dd7741ccb12350957ec71e9ee332e0d1e6ec86"  # in the example wallets file
        orders = [make_order(user=influenz, shares=2500, price=0.5) for _ in range(3)]
        await xadd_all(redis_client, streams, orders)
        await drained(redis_client, streams)
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
            health = (await http.get(f"http://127.0.0.1:{port}/health")).json()
    finally:
        code = await asyncio.to_thread(service.stop)

    assert code == 0, service.log_tail()
    assert health["ok"] and health["reading"]
    signals = await read_signals(redis_client, streams)
    # Three whales of one token at one exchange time: one entry (the first BUY), one whale_order;
    # the default cooldown (300 s per wallet x market x kind) holds back the other two whales.
    assert [s["kind"] for s in signals] == ["whale_order", "trader_entry"]
    assert {s["wallet_label"] for s in signals} == {"influenz.eth"}
    assert 'betterbot_detector_signals_emitted_total{kind="whale_order"} 1.0' in metrics
    assert 'betterbot_detector_signals_suppressed_total{kind="whale_order"} 2.0' in metrics
    assert "betterbot_detector_processing_latency_seconds_count 3.0" in metrics
    assert await redis_client.xinfo_consumers(streams.orders_raw, DETECTOR_GROUP) == []
    lines = [json.loads(line) for line in service.log_text().splitlines() if line.startswith("{")]
    events = [line["event"] for line in lines]
    assert "detector_started" in events and "detector_stopped" in events
    assert not any(
        line["level"] == "info" and line["event"] in {"Received", "Processed"} for line in lines
    )


async def test_wallet_registry_changes_apply_without_restart(
    redis_url: str, namespace: str, streams: Streams, redis_client: aioredis.Redis
) -> None:
    """Added, relabelled/rescored and removed wallets take effect on the next orders."""

    async def signals_after(order: OrderFill) -> list[dict[str, Any]]:
        before = await redis_client.xlen(streams.signals)
        await xadd_all(redis_client, streams, [order])
        await drained(redis_client, streams)
        return (await read_signals(redis_client, streams))[before:]

    async with running(detector_settings(redis_url, namespace)) as detector:
        assert await signals_after(make_order(user=OTHER, shares=10)) == []

        await wallet_registry.upsert(
            redis_client, streams, TrackedWallet(address=OTHER, label="newbie", score=0.3)
        )
        await until(lambda: _true(OTHER in detector.processor.wallets))
        [added] = await signals_after(make_order(user=OTHER, shares=10, token_id="tok-5"))
        assert (added["kind"], added["wallet_label"]) == ("trader_entry", "newbie")
        assert added["confidence"] == pytest.approx(0.5 * 0.3 + 0.5 * 5 / 1000)

        await wallet_registry.upsert(
            redis_client, streams, TrackedWallet(address=WALLET, label="sharper", score=1.0)
        )
        await until(lambda: _true(detector.processor.wallets[WALLET].label == "sharper"))
        [relabelled] = await signals_after(make_order(shares=10, token_id="tok-6"))
        assert relabelled["wallet_label"] == "sharper"
        assert relabelled["confidence"] == pytest.approx(0.5 + 0.5 * 5 / 1000)

        await wallet_registry.remove(redis_client, streams, OTHER)
        await until(lambda: _true(OTHER not in detector.processor.wallets))
        assert await signals_after(make_order(user=OTHER, shares=10, token_id="tok-7")) == []
        ok, details = await detector.health()
        assert ok and details["wallets"] == 1


async def _true(value: bool) -> bool:
    return value


def test_a_bad_rules_file_stops_the_start(tmp_path: Path) -> None:
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text("whale_threshold: 5\n")
    env = {**os.environ, "DETECTOR_RULES_FILE": str(rules_file), "OPS_PORT": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "services.detector"],
        env=env,
        capture_output=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 2
    assert b"unknown setting(s) ['whale_threshold']" in done.stderr + done.stdout


def holding_trade(user: str, token: str, size: float, ts: int) -> dict[str, Any]:
    """A Data-API trade of an earlier tape: the holding `/positions` will show."""
    return {
        "proxyWallet": user,
        "side": "BUY",
        "asset": token,
        "conditionId": MARKET,
        "size": size,
        "price": 0.5,
        "timestamp": ts,
        "outcome": "Yes",
        "transactionHash": "0x" + f"{abs(hash((user, token))):064x}"[:64],
    }


async def test_positions_are_seeded_at_start_and_when_a_wallet_is_added(
    redis_url: str, namespace: str, streams: Streams, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """The simulator's `/positions` says WALLET holds tok-held and OTHER holds tok-other: their
    BUYs of those give no entry, a BUY of anything else is a new position."""
    now = int(time.time())
    earlier = tmp_path / "earlier.json"
    earlier.write_text(
        json.dumps(
            [
                holding_trade(WALLET, "tok-held", 300, now - 3600),
                holding_trade(OTHER, "tok-other", 40, now - 1800),
            ]
        )
    )

    async def signals_after(order: OrderFill) -> list[dict[str, Any]]:
        before = await redis_client.xlen(streams.signals)
        await xadd_all(redis_client, streams, [order])
        await drained(redis_client, streams)
        return (await read_signals(redis_client, streams))[before:]

    later = now + 60  # after the snapshots: these fills are not in them
    async with simulator(sim_positions_tape=str(earlier)) as sim:
        settings = detector_settings(
            redis_url, namespace, detector_seed_positions=True, data_api_url=str(sim.http.base_url)
        )
        async with running(settings) as detector:
            assert detector.seeder is not None and set(detector.seeder.seeded) == {WALLET}
            held = make_order(token_id="tok-held", shares=10, timestamp=later)
            assert await signals_after(held) == []
            [new] = await signals_after(make_order(token_id="tok-new", shares=10, timestamp=later))
            assert (new["kind"], new["opens_position"]) == ("trader_entry", True)

            await wallet_registry.upsert(redis_client, streams, TrackedWallet(address=OTHER))
            await until(lambda: _true(OTHER in detector.seeder.seeded))
            other_held = make_order(user=OTHER, token_id="tok-other", shares=10, timestamp=later)
            assert await signals_after(other_held) == []
            sold = make_order(
                user=OTHER, token_id="tok-other", shares=40, side="SELL", timestamp=later + 1
            )
            [exit_] = await signals_after(sold)
            assert exit_["kind"] == "trader_exit" and exit_["opens_position"] is False
            assert (
                "sold 80% of its position (50.00 shares held, per its /positions"
                in (exit_["reasons"][0])
            )
            ok, details = await detector.health()
            assert ok and details["seeded_wallets"] == 2
        # Restarted: the seedings are adopted from Redis, the API is not asked again.
        asked = len(
            [r for r in (await sim.http.get("/_sim/requests")).json() if r["path"] == "/positions"]
        )
        async with running(settings) as again:
            assert again.seeder is not None and set(again.seeder.seeded) == {WALLET, OTHER}
        after = [r for r in (await sim.http.get("/_sim/requests")).json()]
        assert len([r for r in after if r["path"] == "/positions"]) == asked == 2
