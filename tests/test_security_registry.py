"""The wallets file seeds the registry once, ever (security finding 6): an emptied list stays
empty across restarts, and the seed is announced on the control stream so every follower agrees."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from shared import wallet_registry
from shared.models import TrackedWallet
from shared.redis_streams import decode
from shared.streams import Streams

pytestmark = pytest.mark.integration

FILE = [
    TrackedWallet(address="0x" + "a1" * 20, label="one"),
    TrackedWallet(address="0x" + "a2" * 20, label="two", score=0.5),
]


async def test_removing_every_wallet_is_not_undone_by_the_next_start(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    wallets, _ = await wallet_registry.load(redis_client, streams, FILE)
    assert [w.address for w in wallets] == [w.address for w in FILE]
    for wallet in FILE:
        await wallet_registry.remove(redis_client, streams, wallet.address)

    wallets, _ = await wallet_registry.load(redis_client, streams, FILE)
    assert wallets == []
    assert await wallet_registry.seed(redis_client, streams, FILE) == -1


async def test_the_seed_is_announced_so_a_follower_sees_it(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    _, before = await wallet_registry.snapshot(redis_client, streams)
    follower = wallet_registry.follow(redis_client, streams, before, block_ms=100)
    assert await wallet_registry.seed(redis_client, streams, FILE) == len(FILE)

    seen = [await asyncio.wait_for(anext(follower), 5) for _ in FILE]
    assert [(c.op, c.wallet) for c in seen] == [("upsert", w) for w in FILE]
    entries = await redis_client.xrange(streams.wallets_control)
    assert {decode(fields)["wallet"]["address"] for _, fields in entries} == {
        w.address for w in FILE
    }


async def test_concurrent_starts_seed_once(redis_client: aioredis.Redis, streams: Streams) -> None:
    results = await asyncio.gather(
        *(wallet_registry.seed(redis_client, streams, FILE) for _ in range(8))
    )
    assert sorted(results) == [-1] * 7 + [len(FILE)]
    assert await redis_client.xlen(streams.wallets_control) == len(FILE)


async def test_a_registry_in_use_before_the_marker_is_not_reseeded(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    """A deployment from before the marker, whose list was emptied: its control stream says the
    registry was used, so the file is not read."""
    await wallet_registry.upsert(redis_client, streams, FILE[0])
    await wallet_registry.remove(redis_client, streams, FILE[0].address)
    assert await wallet_registry.seed(redis_client, streams, FILE) == -1
    assert (await wallet_registry.snapshot(redis_client, streams))[0] == []


async def test_an_empty_file_seeds_an_empty_registry_for_good(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    assert await wallet_registry.seed(redis_client, streams, []) == 0
    assert await wallet_registry.seed(redis_client, streams, FILE) == -1
    assert (await wallet_registry.snapshot(redis_client, streams))[0] == []


async def test_an_older_releases_registry_is_adopted_and_merged(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    """`wallets:tracked` (before the keys shared a slot) becomes `{wallets.control}:tracked`;
    when a new CLI already wrote the new hash, the old wallets are merged into it, none lost."""
    old_hash, old_marker = list(streams.legacy_wallet_keys())
    kept = TrackedWallet(address="0x" + "a1" * 20, label="old label")
    await redis_client.hset(old_hash, kept.address, kept.model_dump_json())
    await redis_client.set(old_marker, "1")
    newer = TrackedWallet(address="0x" + "b2" * 20, label="added by a new CLI")
    await redis_client.hset(streams.wallets_key(), newer.address, newer.model_dump_json())
    both = TrackedWallet(address="0x" + "a1" * 20, label="new label")
    await redis_client.hset(streams.wallets_key(), both.address, both.model_dump_json())

    wallets, _ = await wallet_registry.load(redis_client, streams, [])
    assert wallets == [both, newer]  # the new hash's version of a wallet in both wins
    assert not await redis_client.exists(old_hash, old_marker)
    assert await redis_client.exists(streams.wallets_seeded_key())


async def test_an_older_registry_alone_is_renamed(
    redis_client: aioredis.Redis, streams: Streams
) -> None:
    old_hash, _ = list(streams.legacy_wallet_keys())
    kept = TrackedWallet(address="0x" + "c3" * 20)
    await redis_client.hset(old_hash, kept.address, kept.model_dump_json())
    assert (
        await wallet_registry.seed(redis_client, streams, [TrackedWallet(address="0x" + "d4" * 20)])
        == -1
    )
    wallets, _ = await wallet_registry.snapshot(redis_client, streams)
    assert wallets == [kept]
