"""Tracked wallets against the tier's limits and while running, with the real simulator and Redis:
a tier too small fails at startup naming the numbers; 1,200 wallets spread over 3 Dev-tier
subscriptions; subscriptions spread over several connections when one is not enough; and wallets
added or removed through the registry change the live subscriptions without a reconnect."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from services.ingestor.service import Ingestor, StartupError
from services.ingestor.settings import IngestorSettings
from shared import wallet_registry
from shared.models import TrackedWallet
from shared.streams import Streams
from shared.wallets import dump_wallets, load_wallets
from tests.helpers.ingestion import (
    ROOT,
    WALLETS,
    caught_up,
    converge,
    ingestor_settings,
    metric,
    raw_keys,
    running,
    simulator,
    subscribed,
    truth_key,
    until,
)


def wallets_file(tmp_path: Path, count: int, first: list[str] | None = None) -> Path:
    """A wallets file of `first` then made-up addresses, `count` in all."""
    addresses = list(first or [])
    addresses += [f"0x{index:040x}" for index in range(1, count - len(addresses) + 1)]
    path = tmp_path / f"wallets-{count}.json"
    path.write_bytes(dump_wallets([TrackedWallet(address=a) for a in addresses]))
    return path


async def test_45_wallets_on_the_free_tier_fail_at_startup_naming_the_numbers(
    redis_url: str, namespace: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    settings = IngestorSettings(
        _env_file=None,
        redis_url=redis_url,
        stream_namespace=namespace,
        dome_tier="free",
        wallets_file=str(wallets_file(tmp_path, 45)),
    )
    ingestor = Ingestor(settings)
    with pytest.raises(StartupError) as error:
        await ingestor.start()
    await ingestor.redis.aclose()
    message = str(error.value)
    assert "45 tracked wallets exceed the capacity of 2 subscriptions x 5 wallets = 10" in message
    assert "need 9 subscriptions" in message and "DOME_TIER" in message


def test_the_process_exits_2_with_the_numbers_when_the_tier_is_too_small(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.ingestor"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
            "REDIS_URL": redis_url,
            "STREAM_NAMESPACE": namespace,
            "DOME_TIER": "free",
            "WALLETS_FILE": str(wallets_file(tmp_path, 45)),
            "OPS_PORT": "0",
        },
    )
    assert result.returncode == 2, result.stderr
    assert "startup_failed" in result.stderr
    assert "45 tracked wallets exceed the capacity of 2 subscriptions x 5 wallets" in result.stderr


async def test_1200_wallets_on_the_dev_tier_spread_over_3_subscriptions(
    redis_url: str, namespace: str, redis_client: aioredis.Redis, streams: Streams, tmp_path: Path
) -> None:
    path = wallets_file(tmp_path, 1200, first=WALLETS)
    wallets = [wallet.address for wallet in load_wallets(path)]
    async with simulator() as sim:
        settings = ingestor_settings(
            sim,
            redis_url,
            namespace,
            dome_tier="dev",
            wallets_file=str(path),
            # Startup backfill of 1,200 wallets is exercised elsewhere; here only the plan matters.
            backfill_via="off",
        )
        async with running(settings) as ingestor:
            await subscribed(ingestor, subscriptions=3)
            subscriptions = await sim.subscriptions()
            assert sorted(len(s["filters"]["users"]) for s in subscriptions) == [200, 500, 500]
            assert {u for s in subscriptions for u in s["filters"]["users"]} == set(wallets)
            assert (await sim.status())["clients"] == 1
            await until(lambda: _tape_done(sim))
            await sim.emit([wallets[0], wallets[700], wallets[1199]], 30)
            await converge(sim, redis_client, streams, wallets)
            status = await redis_client.hgetall(streams.feed_status_key())
            assert status[b"subscriptions"] == b"3" and status[b"wallets"] == b"1200"
    assert metric("betterbot_ingestor_subscriptions", source="dome_ws") == 0


async def _tape_done(sim: Any) -> bool:
    return bool((await sim.status())["tape_done"])


async def test_subscriptions_spread_over_several_connections_and_all_recover_a_drop(
    redis_url: str, namespace: str, redis_client: aioredis.Redis, streams: Streams
) -> None:
    # The server allows 2 subscriptions per connection: 20 wallets x 5 need 4, on 2 connections.
    async with simulator(sim_max_subscriptions=2) as sim:
        settings = ingestor_settings(
            sim,
            redis_url,
            namespace,
            dome_wallets_per_subscription=5,
            dome_subscriptions_per_connection=2,
        )
        async with running(settings) as ingestor:
            await subscribed(ingestor, subscriptions=4)
            assert ingestor.websocket is not None and len(ingestor.websocket.connections) == 2
            status = await sim.status()
            assert (status["clients"], status["subscriptions"]) == (2, 4)
            await sim.post("/_sim/auth", {"reject": True})
            await sim.post("/_sim/drop")
            missed = await sim.emit(WALLETS, 40)
            await sim.post("/_sim/auth", {"reject": False})
            await converge(sim, redis_client, streams, WALLETS)
            await subscribed(ingestor, subscriptions=4)
            await caught_up(ingestor)
            keys = set(await raw_keys(redis_client, streams))
            assert {truth_key(t) for t in missed} <= keys


async def test_wallets_added_and_removed_live_change_subscriptions_without_a_reconnect(
    redis_url: str, namespace: str, redis_client: aioredis.Redis, streams: Streams
) -> None:
    newcomer, second = "0x" + "a1" * 20, "0x" + "b2" * 20
    async with simulator() as sim:
        settings = ingestor_settings(sim, redis_url, namespace, dome_wallets_per_subscription=7)
        async with running(settings) as ingestor:
            await subscribed(ingestor, subscriptions=3)
            await caught_up(ingestor)
            before = {
                s["subscription_id"]: s["filters"]["users"] for s in await sim.subscriptions()
            }
            # Traded before being tracked: only the backfill of a new wallet can bring it in.
            early = await sim.emit([newcomer], 2)

            await wallet_registry.upsert(redis_client, streams, TrackedWallet(address=newcomer))
            await until(lambda: _subscribed_to(sim, newcomer))
            after = {s["subscription_id"]: s["filters"]["users"] for s in await sim.subscriptions()}
            # One subscription updated in place (same id), the others untouched.
            assert set(after) == set(before)
            changed = [sid for sid in after if after[sid] != before[sid]]
            assert len(changed) == 1 and newcomer in after[changed[0]]
            live = await sim.emit([newcomer], 3)
            await converge(sim, redis_client, streams, [*WALLETS, newcomer])

            # Every subscription is full (7, 7, 7): the next wallet needs a new subscribe.
            await wallet_registry.upsert(redis_client, streams, TrackedWallet(address=second))
            await until(lambda: _subscription_count(sim, 4))
            await sim.emit([second], 2)
            await converge(sim, redis_client, streams, [*WALLETS, newcomer, second])

            # Removing the only wallet of a subscription unsubscribes it; removing one of many
            # updates it.
            await wallet_registry.remove(redis_client, streams, second)
            await wallet_registry.remove(redis_client, streams, WALLETS[0])
            await until(lambda: _subscription_count(sim, 3))
            await until(lambda: _not_subscribed_to(sim, WALLETS[0]))
            after_removal = await sim.emit([second, WALLETS[0]], 4)
            await sim.emit(WALLETS[1:], 5)
            expected = [*WALLETS[1:], newcomer]
            keys = set(await _wait_for_keys(sim, redis_client, streams, expected))
            assert not keys & {truth_key(t) for t in after_removal}
            assert {truth_key(t) for t in early + live} <= keys
            assert ingestor.websocket is not None
            assert ingestor.websocket.status.reconnects == 0
            assert (await sim.status())["clients"] == 1
    assert await redis_client.xlen(streams.orders_dead) == 0


async def _wait_for_keys(
    sim: Any, client: aioredis.Redis, streams: Streams, wallets: list[str]
) -> list[str]:
    """orders.raw once it holds every fill of `wallets` (it also holds earlier-tracked ones')."""
    truth: set[str] = set()

    async def covered() -> bool:
        truth.update(await sim.truth(wallets))
        return truth <= set(await raw_keys(client, streams))

    await until(covered)
    keys = await raw_keys(client, streams)
    assert len(keys) == len(set(keys))
    return keys


async def _subscribed_to(sim: Any, wallet: str) -> bool:
    return any(wallet in s["filters"]["users"] for s in await sim.subscriptions())


async def _not_subscribed_to(sim: Any, wallet: str) -> bool:
    return not await _subscribed_to(sim, wallet)


async def _subscription_count(sim: Any, count: int) -> bool:
    return len(await sim.subscriptions()) == count


async def test_a_wallet_over_the_tier_capacity_is_reported_then_followed_when_room_frees(
    redis_url: str, namespace: str, redis_client: aioredis.Redis, streams: Streams
) -> None:
    extra = "0x" + "c3" * 20
    async with simulator() as sim:
        settings = ingestor_settings(
            sim,
            redis_url,
            namespace,
            dome_wallets_per_subscription=10,
            dome_max_subscriptions=2,
        )
        async with running(settings) as ingestor:
            await subscribed(ingestor, subscriptions=2)
            await wallet_registry.upsert(redis_client, streams, TrackedWallet(address=extra))
            await until(
                lambda: metric("betterbot_ingestor_wallets_over_capacity", source="dome_ws")
            )
            ok, details = await ingestor.health()
            assert not ok and "1 tracked wallets over the tier's capacity" in str(details)
            await wallet_registry.remove(redis_client, streams, WALLETS[5])
            await until(lambda: _subscribed_to(sim, extra))
            ok, details = await ingestor.health()
            assert ok, details
            assert metric("betterbot_ingestor_wallets_over_capacity", source="dome_ws") == 0
