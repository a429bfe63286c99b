"""One tape through 1 detector and through 3 detector processes (one of them SIGKILLed mid-tape):
exactly the same signals, those of the reference semantics (`serial.py`), none twice.

The tape is the real Nobel 2025 morning (1,000 trades, the 20 example wallets tracked) followed by
an adversarial sequence: bursts of one tracked wallet buying and selling one token within seconds
(whose entries/exits depend on the order they are decided in), several wallets buying the same
tokens (consensus), untracked whales, gaps around the cooldown, and fills repeated in the stream.
The replicas read 4 entries per batch, so one wallet's orders land in different replicas' batches
and the ordering between replicas is exercised (their `order_waits` metric proves it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import redis.asyncio as aioredis

from devtools.servers import free_port
from services.detector.forward import unforwarded
from services.detector.main import Detector
from services.detector.replay import tape_orders
from services.detector.rules import RuleSettings
from services.detector.serial import run
from services.detector.settings import DetectorSettings
from shared.models import OrderFill, Side, TrackedWallet
from shared.redis_streams import encode
from shared.streams import DETECTOR_GROUP, Streams
from shared.wallets import dump_wallets, load_wallets
from tests.helpers.processes import ServiceProcess
from tests.test_detector_rules import make_order, wallet
from tests.test_detector_service import read_signals, xadd_all

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[1]
TAPE = ROOT / "data" / "polymarket_trades_nobel2025.json"
EXAMPLE_WALLETS = ROOT / "config" / "wallets.example.json"
ADVERSARIAL = [wallet(0x41 + i, score) for i, score in enumerate([0.9, 0.6, None, 0.3])]
WHALES = ["0x" + "e1" * 20, "0x" + "e2" * 20]
MARKETS = {"adv-yes": "0x" + "a1" * 32, "adv-no": "0x" + "a1" * 32, "adv-x": "0x" + "a2" * 32}
BATCH = 4
REPLICAS = 3
DRAIN_S = 120  # a bound for a loaded machine, not a speed requirement


def adversarial(start_ts: int, seed: int = 20251010) -> list[OrderFill]:
    """Bursts of BUY/SELL by one wallet on one token, seconds apart; whales; repeated fills."""
    rnd = random.Random(seed)
    orders: list[OrderFill] = []
    ts = start_ts
    for _ in range(70):
        ts += rnd.choice([0, 3, 40, 150, 310, 700])
        token = rnd.choice(list(MARKETS))
        who = rnd.choice(ADVERSARIAL).address
        held = 0.0
        for step in range(rnd.randint(2, 6)):
            side = "BUY" if step % 2 == 0 or held <= 0 else "SELL"
            shares = (
                rnd.choice([5.0, 40.0, 200.0])
                if side == "BUY"
                else held * rnd.choice([0.5, 0.85, 1.0])
            )
            held += shares if side == "BUY" else -shares
            price = rnd.choice([0.2, 0.45, 0.7, 0.97])
            orders.append(
                make_order(
                    user=who,
                    token_id=token,
                    side=side,
                    shares=round(shares, 6),
                    price=price,
                    timestamp=ts,
                    condition_id=MARKETS[token],
                    received_at=float(ts),
                )
            )
            ts += rnd.choice([0, 1, 2])
        if rnd.random() < 0.3:
            orders.append(
                make_order(
                    user=rnd.choice(WHALES),
                    token_id=token,
                    shares=rnd.choice([3000.0, 9000.0]),
                    price=0.5,
                    timestamp=ts,
                    condition_id=MARKETS[token],
                    received_at=float(ts),
                )
            )
        if rnd.random() < 0.2:
            orders.append(rnd.choice(orders))  # the same fill again, as a replaying source would
    return orders


@pytest.fixture(scope="module")
def scenario() -> tuple[list[OrderFill], list[TrackedWallet]]:
    return replica_scenario()


def replica_scenario() -> tuple[list[OrderFill], list[TrackedWallet]]:
    """The tape, then the adversarial part; the example wallets and the adversarial ones."""
    tape = tape_orders(TAPE)
    wallets = load_wallets(EXAMPLE_WALLETS) + ADVERSARIAL
    return tape + adversarial(tape[-1].timestamp + 60), wallets


async def drained(client: aioredis.Redis, streams: Streams) -> None:
    """Wait until the group has read and acked every entry of every lane (`orders.raw`, or each
    partition) and forwarded every outbox entry to `signals`."""
    deadline = time.monotonic() + DRAIN_S
    lanes = streams.lanes()
    while time.monotonic() < deadline:
        states = [await lane_drained(client, lane.stream) for lane in lanes]
        outboxes = [
            await unforwarded(client, streams, lane.signals) for lane in lanes if lane.outbox
        ]
        if all(states) and not any(outboxes):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"lanes not drained in {DRAIN_S}s: {states}, outboxes {outboxes}")


async def lane_drained(client: aioredis.Redis, stream: str) -> bool:
    last = await client.xrevrange(stream, count=1)
    if not last:
        return True
    groups = await client.xinfo_groups(stream)
    group = next((g for g in groups if g["name"] == DETECTOR_GROUP.encode()), None)
    return bool(group and group["last-delivered-id"] == last[0][0] and group["pending"] == 0)


async def publish(client: aioredis.Redis, streams: Streams, orders: list[OrderFill]) -> None:
    """Add the orders as they are, repeats included (no dedupe), each to its wallet's partition
    and a BUY also to its token's, as the ingestor routes them (`orders.raw` without partitions).
    """
    if not streams.partitioned:
        await xadd_all(client, streams, orders)
        return
    async with client.pipeline(transaction=False) as pipe:
        for order in orders:
            fields = cast(dict[Any, Any], encode(order))
            pipe.xadd(streams.wallet_stream(order.user), fields)
            token_stream = streams.token_stream(order.token_id)
            if token_stream is not None and order.side is Side.BUY:
                pipe.xadd(token_stream, fields)
        await pipe.execute()


def identities(signals: list[dict[str, Any]]) -> set[tuple[Any, ...]]:
    return {
        (
            s["signal_id"],
            s["kind"],
            s["wallet"],
            s["token_id"],
            round(s["confidence"], 12),
            tuple(s["order_keys"]),
            tuple(s["reasons"]),
        )
        for s in signals
    }


async def one_replica(
    redis_url: str,
    namespace: str,
    client: aioredis.Redis,
    orders: list[OrderFill],
    wallets: list[TrackedWallet],
) -> list[dict[str, Any]]:
    settings = DetectorSettings(redis_url=redis_url, stream_namespace=namespace, ops_port=0)
    streams = Streams(namespace)
    detector = Detector(settings, wallets)
    await detector.start()
    try:
        await xadd_all(client, streams, orders)
        await drained(client, streams)
    finally:
        await detector.stop()
    return await read_signals(client, streams)


class Replicas:
    """N detector processes on one namespace, 4 entries per batch, quick reclaim."""

    def __init__(
        self,
        redis_url: str,
        namespace: str,
        wallets_file: Path,
        tag: str,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.procs: list[ServiceProcess] = []
        self.ports: list[int] = []
        for i in range(REPLICAS):
            port = free_port()
            env = {
                "REDIS_URL": redis_url,
                "STREAM_NAMESPACE": namespace,
                "OPS_PORT": str(port),
                "WALLETS_FILE": str(wallets_file),
                "DETECTOR_BATCH_SIZE": str(BATCH),
                "DETECTOR_CLAIM_MIN_IDLE_MS": "500",
                "DETECTOR_RECLAIM_INTERVAL_S": "0.2",
                # The reference starts from empty positions: no `/positions` seeding here.
                "DETECTOR_SEED_POSITIONS": "false",
                # DEBUG shows each batch and the stop phases when investigating a failure.
                "LOG_LEVEL": os.environ.get("DETECTOR_TEST_LOG_LEVEL", "INFO"),
                **(extra_env or {}),
            }
            url = f"http://127.0.0.1:{port}/health"
            self.procs.append(ServiceProcess("detector", env, url, tag=f"{tag}{i}-"))
            self.ports.append(port)

    async def wait_healthy(self) -> None:
        await asyncio.gather(*(asyncio.to_thread(p.wait_healthy) for p in self.procs))

    async def metric(self, name: str) -> float:
        """The sum of one counter over the replicas still running."""
        total = 0.0
        async with httpx.AsyncClient(timeout=5) as http:
            for proc, port in zip(self.procs, self.ports, strict=True):
                if not proc.running:
                    continue
                text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
                total += sum(
                    float(line.rsplit(" ", 1)[1])
                    for line in text.splitlines()
                    if line.startswith(name + " ") or line.startswith(name + "{")
                )
        return total

    def stop(self) -> dict[int, int]:
        return {p.pid: p.stop() for p in self.procs}


@contextlib.asynccontextmanager
async def replicas(
    redis_url: str,
    namespace: str,
    wallets: list[TrackedWallet],
    tmp_path: Path,
    tag: str,
    env: dict[str, str] | None = None,
) -> AsyncIterator[Replicas]:
    wallets_file = tmp_path / f"{tag}wallets.json"
    wallets_file.write_bytes(dump_wallets(wallets))
    group = Replicas(redis_url, namespace, wallets_file, tag, env)
    try:
        await group.wait_healthy()
        yield group
    finally:
        group.stop()


async def test_three_replicas_emit_what_one_does(
    redis_url: str,
    namespace: str,
    redis_client: aioredis.Redis,
    tmp_path: Path,
    scenario: tuple[list[OrderFill], list[TrackedWallet]],
) -> None:
    orders, wallets = scenario
    expected = run(orders, wallets, RuleSettings())
    kinds = {s.kind.value for s in expected}
    # Every kind, accumulation and distribution included (the tape has runs of small fills).
    assert kinds == {
        "trader_entry",
        "trader_exit",
        "whale_order",
        "consensus",
        "accumulation",
        "distribution",
    }

    single = await one_replica(redis_url, f"{namespace}one:", redis_client, orders, wallets)
    assert len(single) == len({s["signal_id"] for s in single}) == len(expected)
    reference = identities([s.model_dump(mode="json") for s in expected])
    assert identities(single) == reference

    three_ns = f"{namespace}three:"
    async with replicas(redis_url, three_ns, wallets, tmp_path, "replicas-") as group:
        await xadd_all(redis_client, Streams(three_ns), orders)
        await drained(redis_client, Streams(three_ns))
        waits = await group.metric("betterbot_detector_order_waits_total")
        processed = await group.metric("betterbot_detector_orders_processed_total")
    assert set(group.stop().values()) == {0}
    three = await read_signals(redis_client, Streams(three_ns))
    assert len(three) == len({s["signal_id"] for s in three}), "a signal was emitted twice"
    assert identities(three) == reference
    # The replicas shared the work and some orders did wait for another replica's earlier ones.
    print(f"replicas: {len(three)} signals, {waits:g} waits, {processed:g} orders processed")
    assert processed >= len(orders) and waits > 0
    assert await redis_client.xinfo_consumers(Streams(three_ns).orders_raw, DETECTOR_GROUP) == []


async def test_three_replicas_one_killed_mid_tape(
    redis_url: str,
    namespace: str,
    redis_client: aioredis.Redis,
    tmp_path: Path,
    scenario: tuple[list[OrderFill], list[TrackedWallet]],
) -> None:
    orders, wallets = scenario
    reference = identities(
        [s.model_dump(mode="json") for s in run(orders, wallets, RuleSettings())]
    )
    streams = Streams(f"{namespace}kill:")
    async with replicas(redis_url, streams.namespace, wallets, tmp_path, "killed-") as group:
        victim = group.procs[0].proc
        sent = 0
        while True:
            chunk = orders[sent : sent + 150]
            assert chunk, "never caught the victim holding entries"
            await xadd_all(redis_client, streams, chunk)
            sent += len(chunk)
            held = await kill_while_holding(redis_client, streams, victim.pid)
            if held:
                break
        await xadd_all(redis_client, streams, orders[sent:])
        await drained(redis_client, streams)
        reclaimed = await group.metric("betterbot_consumer_entries_reclaimed_total")
    codes = group.stop()
    assert codes.pop(victim.pid) == -signal.SIGKILL
    assert set(codes.values()) == {0}
    print(f"killed holding {held} entries; {reclaimed:g} reclaimed")
    assert reclaimed >= held > 0

    found = await read_signals(redis_client, streams)
    assert len(found) == len({s["signal_id"] for s in found}), "a signal was emitted twice"
    assert identities(found) == reference
    # Only the killed consumer is left in the group, with nothing pending.
    consumers = await redis_client.xinfo_consumers(streams.orders_raw, DETECTOR_GROUP)
    assert [(c["name"].decode().split("-")[-2], c["pending"]) for c in consumers] == [
        (str(victim.pid), 0)
    ]


async def kill_while_holding(client: aioredis.Redis, streams: Streams, pid: int) -> int:
    """SIGKILL the process once it holds pending entries; returns how many it held, 0 if it never
    did within a second. The count is taken while the process is SIGSTOPped, after a pause that
    lets Redis run the commands it sent just before the stop (an XACK in flight), so it is exact.
    """
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        if await pending_of(client, streams, pid):
            os.kill(pid, signal.SIGSTOP)
            await asyncio.sleep(0.1)
            held = await pending_of(client, streams, pid)
            if held:
                os.kill(pid, signal.SIGKILL)
                return held
            os.kill(pid, signal.SIGCONT)
        await asyncio.sleep(0.001)
    return 0


async def pending_of(client: aioredis.Redis, streams: Streams, pid: int) -> int:
    summary: Any = await client.xpending(streams.orders_raw, DETECTOR_GROUP)
    return sum(int(c["pending"]) for c in summary["consumers"] if f"-{pid}-" in c["name"].decode())


def test_scenario_is_order_sensitive(scenario: tuple[list[OrderFill], list[TrackedWallet]]) -> None:
    """The adversarial part matters: deciding each wallet's orders out of order changes signals."""
    orders, wallets = scenario
    in_order = {s.signal_id for s in run(orders, wallets, RuleSettings())}
    swapped = list(orders)
    for i in range(0, len(swapped) - 1, 2):
        swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
    assert {s.signal_id for s in run(swapped, wallets, RuleSettings())} != in_order
