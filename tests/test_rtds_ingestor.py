"""The ingestor's `rtds` source (Polymarket's unofficial RTDS firehose) against the simulator's
RTDS on loopback and real Redis: every tracked fill exactly once (ground truth: the simulator's
trades), through every quirk, a freeze, a silent `trades` type, 429s, live wallet changes, and
beside the Data API."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis

from services.ingestor.service import Ingestor
from shared import wallet_registry
from shared.models import TrackedWallet
from shared.streams import Streams
from tests.helpers.ingestion import (
    WALLETS,
    Sim,
    converge,
    ingestor_settings,
    metric,
    raw_payloads,
    running,
    simulator,
    truth_key,
    until,
)

UNTRACKED = ["0x" + "7" * 40, "0x" + "8" * 40]
EVERY_QUIRK = {
    "sim_rtds_empty_first_frame": True,
    "sim_rtds_checksum_wallets": True,
    "sim_rtds_outcome_index_999_every": 3,
    "sim_rtds_fee_every": 2,
    # Identical fills of one transaction: both must be kept, each once.
    "sim_twin_every": 7,
}


def rtds_settings(sim: Sim, redis_url: str, namespace: str, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "ingest_sources": "rtds",
        "rtds_url": f"{sim.ws_url}/rtds",
        "rtds_payload_timeout_s": 0,
        "backfill_indexing_lag_s": 0.3,
        **overrides,
    }
    return ingestor_settings(sim, redis_url, namespace, **values)


async def connected(ingestor: Ingestor) -> None:
    await until(lambda: ingestor.rtds is not None and ingestor.rtds.status.connected)


async def tape_done(sim: Sim) -> None:
    await until(lambda: _done(sim), what="tape played")


async def _done(sim: Sim) -> bool:
    return bool((await sim.status())["tape_done"])


async def dead_letters(client: aioredis.Redis, streams: Streams) -> int:
    return int(await client.xlen(streams.orders_dead))


async def test_every_tracked_fill_once_from_rtds_alone_with_every_quirk_on(
    redis_url: str, namespace: str, redis_client: aioredis.Redis, streams: Streams
) -> None:
    copies = metric("betterbot_ingestor_duplicates_total", source="rtds")
    untracked = metric("betterbot_ingestor_rtds_frames_total", kind="untracked")
    async with simulator(**EVERY_QUIRK) as sim:
        # No backfill: every fill must come over the socket itself.
        settings = rtds_settings(sim, redis_url, namespace, rtds_backfill_via="off")
        async with running(settings) as ingestor:
            await connected(ingestor)
            await tape_done(sim)
            await sim.emit([*WALLETS, *UNTRACKED], 44)
            keys = await converge(sim, redis_client, streams, WALLETS)
            # The copy on the other type of each trade was read and deduplicated.
            await until(
                lambda: (
                    metric("betterbot_ingestor_duplicates_total", source="rtds") - copies
                    >= len(keys)
                )
            )
            assert await converge(sim, redis_client, streams, WALLETS) == keys
        payloads = await raw_payloads(redis_client, streams)
    assert {p["source"] for p in payloads} == {"rtds"}
    assert {p["user"] for p in payloads} <= set(WALLETS)  # lower-cased, tracked only
    assert any(p["occurrence"] == 1 for p in payloads)  # a twin kept apart
    assert metric("betterbot_ingestor_rtds_frames_total", kind="untracked") > untracked
    # The quirks are the feed's normal shape, not errors.
    assert await dead_letters(redis_client, streams) == 0


async def test_a_freeze_opens_a_new_socket_and_the_backfill_recovers_the_gap(
    redis_url: str, namespace: str, redis_client: aioredis.Redis, streams: Streams
) -> None:
    watchdog = metric("betterbot_ingestor_rtds_watchdog_reconnects_total")
    async with simulator() as sim:
        settings = rtds_settings(sim, redis_url, namespace, rtds_payload_timeout_s=1.0)
        async with running(settings) as ingestor, heartbeat(sim):
            await connected(ingestor)
            await tape_done(sim)
            await sim.emit(WALLETS, 10)
            await converge(sim, redis_client, streams, WALLETS)
            # While payloads flow the watchdog stays quiet.
            await asyncio.sleep(2.0)
            assert metric("betterbot_ingestor_rtds_watchdog_reconnects_total") == watchdog
            assert (await sim.get("/_sim/rtds"))["handshakes"] == 1
            await sim.post("/_sim/rtds", {"freeze": True})
            missed = await sim.emit(WALLETS, 12)
            await until(
                lambda: metric("betterbot_ingestor_rtds_watchdog_reconnects_total") > watchdog
            )
            await converge(sim, redis_client, streams, WALLETS)
            state = await sim.get("/_sim/rtds")
        payloads = await raw_payloads(redis_client, streams)
    # A new socket, not a re-subscribe on the frozen one (which would have recovered nothing).
    assert state["handshakes"] >= 2
    by_key = {p["order_key"]: p["source"] for p in payloads}
    # What the frozen socket never sent came from the Data API backfill.
    assert {by_key[truth_key(t)] for t in missed} == {"data_api"}


@contextlib.asynccontextmanager
async def heartbeat(sim: Sim) -> AsyncIterator[None]:
    """An untracked wallet trading every 0.2 s: the firehose is never quiet at Polymarket."""

    async def beat() -> None:
        while True:
            await sim.emit(UNTRACKED[:1], 1)
            await asyncio.sleep(0.2)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_fills_come_from_orders_matched_while_trades_is_silent_after_429s(
    redis_url: str, namespace: str, redis_client: aioredis.Redis, streams: Streams
) -> None:
    limited = metric("betterbot_ingestor_rate_limited_total", source="rtds")
    sim_settings = {"sim_rtds_trades_silent": True, "sim_rtds_reject_connects": 2}
    async with simulator(**sim_settings) as sim:
        await sim.post("/_sim/rtds", {"retry_after": 0.2})
        settings = rtds_settings(sim, redis_url, namespace, rtds_backfill_via="off")
        async with running(settings) as ingestor:
            await connected(ingestor)
            await tape_done(sim)
            await sim.emit(WALLETS, 20)
            keys = await converge(sim, redis_client, streams, WALLETS)
            state = await sim.get("/_sim/rtds")
    assert state["refused"] == 2
    assert metric("betterbot_ingestor_rate_limited_total", source="rtds") - limited == 2
    # One type only: nothing to deduplicate, and still every fill.
    assert state["sent"] >= len(keys)


async def test_wallets_added_and_removed_live_are_followed(
    redis_url: str, namespace: str, redis_client: aioredis.Redis, streams: Streams
) -> None:
    newcomer, leaver = UNTRACKED[0], WALLETS[0]
    async with simulator() as sim:
        settings = rtds_settings(sim, redis_url, namespace, rtds_backfill_via="off")
        async with running(settings) as ingestor:
            await connected(ingestor)
            await tape_done(sim)
            await wallet_registry.upsert(redis_client, streams, TrackedWallet(address=newcomer))
            await wallet_registry.remove(redis_client, streams, leaver)
            rtds = ingestor.rtds
            assert rtds is not None
            await until(lambda: newcomer in rtds.tracked and leaver not in rtds.tracked)
            emitted = await sim.emit([newcomer, leaver, *WALLETS[1:3]], 12)
            kept = {truth_key(t) for t in emitted if t["user"] != leaver}
            dropped = {truth_key(t) for t in emitted if t["user"] == leaver}
            await until(lambda: _published(redis_client, streams, kept))
            # The leaver's frames came in the same pump passes; give stragglers a moment.
            await asyncio.sleep(0.5)
            published = {p["order_key"] for p in await raw_payloads(redis_client, streams)}
    assert kept <= published and dropped and not dropped & published


async def _published(client: aioredis.Redis, streams: Streams, keys: set[str]) -> bool:
    return keys <= {p["order_key"] for p in await raw_payloads(client, streams)}


async def test_rtds_beside_the_data_api_publishes_each_fill_once(
    redis_url: str, namespace: str, redis_client: aioredis.Redis, streams: Streams
) -> None:
    async with simulator(sim_rtds_checksum_wallets=True) as sim:
        settings = rtds_settings(sim, redis_url, namespace, ingest_sources="rtds,data_api")
        async with running(settings) as ingestor:
            await connected(ingestor)
            await tape_done(sim)
            await sim.emit([*WALLETS, *UNTRACKED], 30)
            keys = await converge(sim, redis_client, streams, WALLETS)
            # RTDS delivered too: first or, when the poller was quicker, as a duplicate.
            publisher = ingestor.publisher
            await until(
                lambda: (
                    publisher.published_by_source["rtds"] + publisher.duplicates_by_source["rtds"]
                    > 0
                )
            )
            assert await converge(sim, redis_client, streams, WALLETS) == keys
            ok, details = await ingestor.health()
    assert ok and "rtds" in details["sources"]
    assert {p["source"] for p in await raw_payloads(redis_client, streams)} <= {"rtds", "data_api"}


async def test_a_socket_that_never_carries_a_payload_is_replaced_only_after_backoff(
    redis_url: str, namespace: str, redis_client: aioredis.Redis, streams: Streams
) -> None:
    async with simulator() as sim:
        settings = rtds_settings(
            sim,
            redis_url,
            namespace,
            rtds_payload_timeout_s=1.0,
            dome_reconnect_min_s=2.0,
            dome_reconnect_max_s=2.0,
        )
        async with running(settings) as ingestor:
            await connected(ingestor)
            await tape_done(sim)
            await converge(sim, redis_client, streams, WALLETS)
            # Nothing trades from now on: every socket times out without one payload.
            first = (await sim.get("/_sim/rtds"))["handshakes"]
            await asyncio.sleep(4.0)
            opened = (await sim.get("/_sim/rtds"))["handshakes"] - first
    # At once after each timeout it would be 4 sockets; with 1.5-2 s of backoff, 1 or 2.
    assert 1 <= opened <= 2
