"""Tracked wallets: durable in Postgres (`tracked_wallets`), live in the shared registry in Redis.

The registry (`shared.wallet_registry`: a hash plus the `wallets.control` stream) is what the
ingestor and the detector follow while running; Postgres is what survives a Redis that lost its
data. They are kept in step three ways:

- API writes (`put`, `delete`; the quality refresher's `set_score` too): one Postgres
  transaction that takes the wallet's advisory lock, writes the registry (hash + control entry,
  one script), records that entry's id on the row, then commits. Redis refusing rolls the row
  back (the caller gets 503, nothing changed); the rare commit failure after Redis took the
  change is repaired by the follower below, which finds the entry. The per-wallet lock makes
  concurrent writers of one wallet commit in control-stream order.
- The follower (`follow`): every store replica applies every control entry to Postgres, so changes
  made by other writers of the registry (an operator tool) are persisted too. Each row keeps the id
  of the last entry applied to it (`control_ms`, `control_seq`); older entries change nothing, and a
  removed wallet keeps its row as a tombstone (`removed_at`) so an older entry cannot revive it.
- At startup (`sync`), under an exclusive advisory lock (API writes hold it shared):
  * Postgres has no rows yet (first start): the registry is loaded — seeding it from
    `WALLETS_FILE` if it is empty too (`wallet_registry.load`) — and copied into Postgres.
  * Postgres has rows (tombstones count: an emptied list is a choice, not a blank slate): control
    entries newer than the newest one Postgres applied are applied first (changes made while no
    store ran), then **Postgres wins**: every difference is pushed to the registry through
    `upsert`/`remove`, so running ingestors and detectors follow, and the file is not read.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.store import metrics
from services.store.database import Database, Stopping, is_data_error
from shared import wallet_registry
from shared.models import TrackedWallet
from shared.redis_streams import entry_position
from shared.streams import Streams
from shared.wallet_registry import WalletChange
from shared.wallets import WalletFileError, load_wallets

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _lock_key(name: bytes, size: int) -> int:
    return int.from_bytes(hashlib.sha256(name).digest()[:size], "big", signed=True)


# Startup sync: exclusive; API writes: shared. Per-wallet writes: (WALLET_LOCK_CLASS, hash).
SYNC_LOCK = _lock_key(b"betterbot.store.wallets.sync", 8)
WALLET_LOCK_CLASS = _lock_key(b"betterbot.store.wallets.one", 4)
CATCH_UP_CHUNK = 1000

_APPLY = """
INSERT INTO tracked_wallets AS w (address, label, score, removed_at, control_ms, control_seq)
VALUES ($1, $2, $3, CASE WHEN $4::boolean THEN now() END, $5, $6)
ON CONFLICT (address) DO UPDATE SET
    label = EXCLUDED.label,
    score = EXCLUDED.score,
    added_at = CASE WHEN w.removed_at IS NOT NULL AND EXCLUDED.removed_at IS NULL
                    THEN now() ELSE w.added_at END,
    updated_at = now(),
    removed_at = CASE WHEN EXCLUDED.removed_at IS NULL THEN NULL
                      ELSE coalesce(w.removed_at, EXCLUDED.removed_at) END,
    control_ms = EXCLUDED.control_ms,
    control_seq = EXCLUDED.control_seq
WHERE w.control_ms IS NULL
   OR (w.control_ms, w.control_seq) < (EXCLUDED.control_ms, EXCLUDED.control_seq)
"""
_SEED = """
INSERT INTO tracked_wallets (address, label, score) VALUES ($1, $2, $3)
ON CONFLICT (address) DO NOTHING
"""
_ACTIVE = """
SELECT address, label, score, added_at, updated_at FROM tracked_wallets
WHERE removed_at IS NULL ORDER BY address
"""
_ONE_ACTIVE = """
SELECT address, label, score, added_at, updated_at FROM tracked_wallets
WHERE address = $1 AND removed_at IS NULL
"""
# KEYS: the registry's hash, the control stream; ARGV: address, the wallet JSON read, the new
# wallet JSON, the change JSON, MAXLEN. The change and its announcement (as `wallet_registry`
# makes them), only if the wallet is still in the registry as it was read; else nil.
_SET_SCORE = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return false end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'data', ARGV[4])
"""
_NEWEST_APPLIED = """
SELECT control_ms, control_seq FROM tracked_wallets WHERE control_ms IS NOT NULL
ORDER BY control_ms DESC, control_seq DESC LIMIT 1
"""


@dataclass(frozen=True)
class StoredWallet:
    address: str
    label: str
    score: float | None
    added_at: datetime
    updated_at: datetime

    @property
    def tracked(self) -> TrackedWallet:
        return TrackedWallet(address=self.address, label=self.label, score=self.score)


def stored(row: asyncpg.Record) -> StoredWallet:
    return StoredWallet(
        row["address"], row["label"], row["score"], row["added_at"], row["updated_at"]
    )


def differences(
    durable: Iterable[TrackedWallet], live: Iterable[TrackedWallet]
) -> tuple[list[TrackedWallet], list[str]]:
    """What to upsert and which addresses to remove so that `live` becomes `durable`."""
    live_by_address = {w.address: w for w in live}
    durable_by_address = {w.address: w for w in durable}
    upserts = [w for a, w in sorted(durable_by_address.items()) if live_by_address.get(a) != w]
    removals = sorted(set(live_by_address) - set(durable_by_address))
    return upserts, removals


async def apply_change(
    conn: asyncpg.Connection, wallet: TrackedWallet, removed: bool, stream_id: str
) -> bool:
    """Record one control entry on the wallet's row; False when the row already had a newer one."""
    ms, seq = entry_position(stream_id)
    status = await conn.execute(
        _APPLY, wallet.address, wallet.label, wallet.score, removed, ms, seq
    )
    return bool(status.endswith(" 1"))


class Wallets:
    def __init__(
        self,
        db: Database,
        api_db: Database,
        redis: aioredis.Redis,
        streams: Streams,
        wallets_file: str,
    ) -> None:
        self.db = db
        self.api_db = api_db
        self.redis = redis
        self.streams = streams
        self.wallets_file = wallets_file
        self.synced = asyncio.Event()
        self.last_control_id = "0-0"

    # -- startup ------------------------------------------------------------------------------

    async def sync(self) -> str:
        """Bring Postgres and the registry in step (see the module doc); returns what was done."""

        async def run(conn: asyncpg.Connection) -> str:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", SYNC_LOCK)
                if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM tracked_wallets)"):
                    return await self._seed_postgres(conn)
                caught_up = await self._catch_up(conn)
                pushed = await self._push_to_registry(conn)
                return f"postgres_wins: {caught_up} caught up, {pushed} pushed"

        outcome = await self.db.retrying("wallets", run)
        self.synced.set()
        log.info("wallets_synced", extra={"outcome": outcome, "follow_from": self.last_control_id})
        return outcome

    def seed_wallets(self) -> list[TrackedWallet]:
        path = Path(self.wallets_file)
        if not (path.is_absolute() or path.exists()):
            path = PROJECT_ROOT / path
        try:
            return load_wallets(path)
        except WalletFileError as exc:
            # The store's main job does not depend on it: start with whatever the registry holds.
            log.error("wallets_file_error", extra={"error": str(exc)[:500]})
            return []

    async def _seed_postgres(self, conn: asyncpg.Connection) -> str:
        wallets, self.last_control_id = await wallet_registry.load(
            self.redis, self.streams, self.seed_wallets()
        )
        await conn.executemany(_SEED, [(w.address, w.label, w.score) for w in wallets])
        metrics.WALLET_CHANGES.labels("seed", "startup").inc(len(wallets))
        return f"seeded_postgres: {len(wallets)} wallets from the registry"

    async def _catch_up(self, conn: asyncpg.Connection) -> int:
        newest = await conn.fetchrow(_NEWEST_APPLIED)
        start = "-" if newest is None else f"({newest['control_ms']}-{newest['control_seq']}"
        applied = 0
        while True:
            entries: Any = await self.redis.xrange(
                self.streams.wallets_control, min=start, max="+", count=CATCH_UP_CHUNK
            )
            for stream_id, fields in entries:
                start = "(" + stream_id.decode()
                change = _parse(stream_id, fields)
                if change is not None and await self.apply_safely(conn, change, "startup"):
                    applied += 1
            if len(entries) < CATCH_UP_CHUNK:
                break
        return applied

    async def _push_to_registry(self, conn: asyncpg.Connection) -> int:
        durable = [stored(row).tracked for row in await conn.fetch(_ACTIVE)]
        live, self.last_control_id = await wallet_registry.snapshot(self.redis, self.streams)
        upserts, removals = differences(durable, live)
        for wallet in upserts:
            control_id = await wallet_registry.upsert(self.redis, self.streams, wallet)
            await apply_change(conn, wallet, False, control_id)
        for address in removals:
            await wallet_registry.remove(self.redis, self.streams, address)
        metrics.WALLET_CHANGES.labels("upsert", "startup").inc(len(upserts))
        metrics.WALLET_CHANGES.labels("remove", "startup").inc(len(removals))
        return len(upserts) + len(removals)

    # -- while running ------------------------------------------------------------------------

    async def follow(self, stop: asyncio.Event, block_ms: int = 500, retry_s: float = 1.0) -> None:
        """Apply every control entry after the startup snapshot to Postgres, until `stop`.

        Its own XREAD loop rather than `wallet_registry.follow`, so that it checks `stop` between
        reads: a cancellation swallowed somewhere below (asyncio.wait_for on 3.11 can) must not
        keep it running after shutdown.
        """
        last = self.last_control_id
        while not stop.is_set():
            try:
                reply: Any = await self.redis.xread(
                    {self.streams.wallets_control: last}, block=block_ms, count=100
                )
            except (RedisError, OSError) as exc:
                log.warning("wallet_follow_failed", extra={"error": type(exc).__name__})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), retry_s)
                continue
            for _, entries in reply or []:
                for stream_id, fields in entries:
                    change = _parse(stream_id, fields)
                    if change is not None:
                        try:
                            await self.db.retrying("wallets", _applier(self, change))
                        except Stopping:
                            return
                    last = stream_id.decode()

    async def apply_safely(
        self, conn: asyncpg.Connection, change: WalletChange, via: str = "follow"
    ) -> bool:
        """Apply a change; one that Postgres refuses (e.g. a NUL in a label) is logged, skipped."""
        try:
            async with conn.transaction():  # a savepoint inside the startup transaction
                applied = await apply_change(
                    conn, change.wallet, change.op == "remove", change.stream_id
                )
        except Exception as exc:
            if not is_data_error(exc):
                raise
            log.error(
                "wallet_change_refused",
                extra={
                    "entry": change.stream_id,
                    "error": f"{type(exc).__name__}: {exc}"[:300],
                },
            )
            return False
        if applied:
            metrics.WALLET_CHANGES.labels(change.op, via).inc()
        return applied

    # -- the API ------------------------------------------------------------------------------

    async def tracked(self) -> list[StoredWallet]:
        async with self.api_db.connection() as conn:
            return [stored(row) for row in await conn.fetch(_ACTIVE)]

    async def put(self, wallet: TrackedWallet) -> tuple[StoredWallet, bool]:
        """Track the wallet or replace its label and score; True when it was not tracked before."""
        async with self.api_db.connection() as conn, conn.transaction():
            await self._lock(conn, wallet.address)
            created = await conn.fetchrow(_ONE_ACTIVE, wallet.address) is None
            control_id = await wallet_registry.upsert(self.redis, self.streams, wallet)
            await apply_change(conn, wallet, False, control_id)
            row = await conn.fetchrow(_ONE_ACTIVE, wallet.address)
        metrics.WALLET_CHANGES.labels("upsert", "api").inc()
        if row is None:
            # Another writer of the registry removed it in between and its newer entry won.
            now = datetime.now(UTC)
            return StoredWallet(wallet.address, wallet.label, wallet.score, now, now), created
        return stored(row), created

    async def delete(self, address: str) -> bool:
        """Stop tracking; False when neither Postgres nor the registry tracked it."""
        async with self.api_db.connection() as conn, conn.transaction():
            await self._lock(conn, address)
            row = await conn.fetchrow(_ONE_ACTIVE, address)
            control_id = await wallet_registry.remove(self.redis, self.streams, address)
            if row is None and control_id is None:
                return False
            if control_id is not None:
                wallet = stored(row).tracked if row else TrackedWallet(address=address)
                await apply_change(conn, wallet, True, control_id)
            else:
                await conn.execute(
                    "UPDATE tracked_wallets SET removed_at = now(), updated_at = now() "
                    "WHERE address = $1 AND removed_at IS NULL",
                    address,
                )
        metrics.WALLET_CHANGES.labels("remove", "api").inc()
        return True

    async def set_score(self, address: str, score: float) -> bool:
        """Change the score of a wallet that is still tracked, keeping its label; False (nothing
        changed) when it is no longer tracked, or changed in the registry meanwhile.

        For the quality refresher, whose figures come from reads that take a while: an upsert of
        the wallet as it was read before them would track a wallet removed meanwhile again, or
        put back a label replaced meanwhile. Under the wallet's lock, like `put`/`delete`; the
        registry entry is replaced only if it is still the one read (`_SET_SCORE`), so a writer
        of the registry that does not take the lock (the operator CLI) is not overwritten either,
        and the change is announced on the control stream like any other (the detector follows).
        """
        async with self.api_db.connection() as conn, conn.transaction():
            await self._lock(conn, address)
            if await conn.fetchrow(_ONE_ACTIVE, address) is None:
                return False
            raw: Any = await self.redis.hget(self.streams.wallets_key(), address)
            if raw is None:
                return False
            live = TrackedWallet.model_validate_json(raw)
            wallet = TrackedWallet(address=live.address, label=live.label, score=score)
            change = {"v": 1, "op": "upsert", "wallet": wallet.model_dump(mode="json")}
            keys = [self.streams.wallets_key(), self.streams.wallets_control]
            control_id: Any = await self.redis.eval(
                _SET_SCORE,
                len(keys),
                *keys,
                address,
                raw,
                wallet.model_dump_json(),
                orjson.dumps(change | {"at": time.time()}),
                wallet_registry.CONTROL_MAXLEN,
            )
            if control_id is None:
                return False
            entry = control_id.decode() if isinstance(control_id, bytes) else str(control_id)
            await apply_change(conn, wallet, False, entry)
        metrics.WALLET_CHANGES.labels("upsert", "quality").inc()
        return True

    @staticmethod
    async def _lock(conn: asyncpg.Connection, address: str) -> None:
        await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", SYNC_LOCK)
        await conn.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext($2))", WALLET_LOCK_CLASS, address
        )


def _parse(stream_id: bytes, fields: dict[bytes, bytes]) -> WalletChange | None:
    try:
        return wallet_registry.parse_change(stream_id, fields)
    except (ValueError, KeyError, TypeError):
        return None


def _applier(wallets: Wallets, change: WalletChange) -> Callable[[asyncpg.Connection], Any]:
    async def apply(conn: asyncpg.Connection) -> bool:
        return await wallets.apply_safely(conn, change)

    return apply
