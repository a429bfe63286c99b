"""The live set of tracked wallets, shared by every service through Redis.

- The hash `streams.wallets_key()` (`{wallets.control}:tracked`) maps address -> TrackedWallet
  JSON: the current set. It and the seed marker carry the control stream's name as their hash
  tag, so the scripts below each stay in one Redis Cluster slot.
- The stream `streams.wallets_control` announces each change as a plain `data` entry:
  `{"v": 1, "op": "upsert" | "remove", "wallet": {address, label, score}, "at": <unix s>}`.

The wallets file seeds the registry once, ever: the first service to start runs one script that
sets the marker `streams.wallets_seeded_key()` and, unless the registry was already in use, writes
each wallet and announces it on the control stream like any other change, so every follower sees
the seed. Concurrent starts agree (the script is atomic), and an emptied list stays empty: a
registry that once existed is never re-seeded, whatever the file says. Writers (the store's API,
the operator CLI) call `upsert`/`remove`, which change the hash and announce the change in one
script. Readers call `snapshot` and then `follow` from the id `snapshot` returned, so no change
between the two is missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from shared.backoff import Backoff
from shared.errors import describe
from shared.models import TrackedWallet, normalize_address
from shared.redis_streams import UNREACHABLE, calling, decode
from shared.streams import Streams

log = logging.getLogger(__name__)

CONTROL_MAXLEN = 100_000


@dataclass(frozen=True)
class WalletChange:
    op: Literal["upsert", "remove"]
    wallet: TrackedWallet
    stream_id: str


# Seeded already when the marker exists, or when the registry was used before the marker existed
# (a hash, or any control entry: a list emptied by removals is a choice, not a blank slate).
_SEED_ONCE = """
if redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
redis.call('SET', KEYS[3], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('XLEN', KEYS[2]) > 0 then return -1 end
local n = 0
for i = 4, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i - 1], ARGV[i])
  n = n + 1
end
for i = 4, #ARGV, 2 do
  local change = cjson.decode(ARGV[i])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'data', cjson.encode(
    {v = 1, op = 'upsert', wallet = change, at = tonumber(ARGV[1])}))
end
return n
"""


# KEYS: the control stream, the hash. The last control id and every wallet, at one instant.
_SNAPSHOT = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
return {last[1] and last[1][1] or '0-0', redis.call('HGETALL', KEYS[2])}
"""

# KEYS: the hash, the control stream; ARGV: set|del, address, wallet JSON, change JSON, MAXLEN.
# A change and its announcement together (scripts rather than MULTI: redis-py 8.1's cluster
# client loses a transaction that is its very first command, see docs/operations.md).
_ANNOUNCE = """
if ARGV[1] == 'set' then
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
else
  redis.call('HDEL', KEYS[1], ARGV[2])
end
return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'data', ARGV[4])
"""


async def seed(client: aioredis.Redis, streams: Streams, wallets: Iterable[TrackedWallet]) -> int:
    """Put the file's wallets in the registry the first time ever; returns how many (-1: not
    seeded, the registry exists or existed)."""
    await adopt_legacy_keys(client, streams)
    args: list[str] = [f"{time.time():.6f}", str(CONTROL_MAXLEN)]
    for wallet in wallets:
        args += [wallet.address, wallet.model_dump_json()]
    keys = [streams.wallets_key(), streams.wallets_control, streams.wallets_seeded_key()]
    return int(await client.eval(_SEED_ONCE, len(keys), *keys, *args))


async def adopt_legacy_keys(client: aioredis.Redis, streams: Streams) -> None:
    """Move the registry's keys of an older release (`wallets:tracked`, in no shared slot) to
    their names now: renamed when the new one does not exist yet, else merged into it (a wallet
    the new hash has wins) and dropped, so a `betterbot wallets add` run before the services were
    upgraded loses no wallet. Only a single Redis can hold them (no release ran on a cluster
    before)."""
    for old, new in streams.legacy_wallet_keys().items():
        if not await client.exists(old):
            continue
        with contextlib.suppress(ResponseError):  # renamed meanwhile by another service
            if await client.renamenx(old, new):
                continue
        if new == streams.wallets_key():
            legacy: Any = await client.hgetall(old)
            for address, raw in legacy.items():
                await client.hsetnx(new, address, raw)
        await client.delete(old)
        log.warning("wallet_registry_legacy_merged", extra={"legacy_key": old, "key": new})


async def snapshot(client: aioredis.Redis, streams: Streams) -> tuple[list[TrackedWallet], str]:
    """The current wallets and the control-stream id to follow changes from, read at one instant
    (one script: no change can fall between the two)."""
    keys = [streams.wallets_control, streams.wallets_key()]
    reply: Any = await client.eval(_SNAPSHOT, len(keys), *keys)
    last_id, flat = reply[0], reply[1]
    last = last_id.decode() if isinstance(last_id, bytes) else str(last_id)
    wallets = [TrackedWallet.model_validate_json(raw) for raw in flat[1::2]]
    return sorted(wallets, key=lambda w: w.address), last


async def load(
    client: aioredis.Redis, streams: Streams, seed_wallets: Iterable[TrackedWallet]
) -> tuple[list[TrackedWallet], str]:
    await seed(client, streams, seed_wallets)
    return await snapshot(client, streams)


async def _announce(
    client: aioredis.Redis, streams: Streams, op: str, wallet: TrackedWallet, hash_op: str
) -> str:
    change = {"v": 1, "op": op, "wallet": wallet.model_dump(mode="json"), "at": time.time()}
    keys = [streams.wallets_key(), streams.wallets_control]
    args: list[str | bytes | int] = [
        hash_op,
        wallet.address,
        wallet.model_dump_json(),
        orjson.dumps(change),
        CONTROL_MAXLEN,
    ]
    entry_id: Any = await client.eval(_ANNOUNCE, len(keys), *keys, *args)
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


async def upsert(client: aioredis.Redis, streams: Streams, wallet: TrackedWallet) -> str:
    """Track a wallet (or change its label/score); returns the control entry id."""
    return await _announce(client, streams, "upsert", wallet, "set")


async def remove(client: aioredis.Redis, streams: Streams, address: str) -> str | None:
    """Stop tracking a wallet; returns the control entry id, or None if it was not tracked."""
    address = normalize_address(address)
    raw = await client.hget(streams.wallets_key(), address)
    if raw is None:
        return None
    return await _announce(client, streams, "remove", TrackedWallet.model_validate_json(raw), "del")


def parse_change(stream_id: bytes, fields: dict[bytes, bytes]) -> WalletChange:
    payload = decode(fields)
    op = payload.get("op")
    if op not in ("upsert", "remove"):
        raise ValueError(f"unknown wallet change op: {op!r}")
    return WalletChange(op, TrackedWallet.model_validate(payload["wallet"]), stream_id.decode())


async def follow(
    client: aioredis.Redis, streams: Streams, after_id: str, block_ms: int = 1000
) -> AsyncIterator[WalletChange]:
    """Every change after `after_id`, forever; malformed entries are skipped (no effect). A Redis
    outage is waited out (the follower resumes after the last change it saw)."""
    last = after_id
    backoff = Backoff(0.1, 5.0)
    while True:
        try:
            read = functools.partial(
                client.xread, {streams.wallets_control: last}, block=block_ms, count=100
            )
            reply: Any = await calling(read)
        except UNREACHABLE as exc:
            log.warning("wallet_registry_unreachable", extra={"error": describe(exc)})
            await asyncio.sleep(backoff.next_delay())
            continue
        backoff.reset()
        for _, entries in reply or []:
            for stream_id, fields in entries:
                last = stream_id.decode()
                try:
                    yield parse_change(stream_id, fields)
                except (ValueError, KeyError, orjson.JSONDecodeError):
                    continue
        await asyncio.sleep(0)
