"""`betterbot wallets list|add|remove`: the tracked wallets, through the shared wallet registry.

The registry in Redis (`shared.wallet_registry`) is what the running services follow: a change
written there (hash and `wallets.control` entry in one MULTI) reaches the ingestor's
subscriptions and the detector's profiles while they run. Before the first change the registry is
seeded from WALLETS_FILE exactly as the services seed it, so adding one wallet to an empty
registry never hides the file's wallets from services started later.

Postgres: when DATABASE_URL answers and has the store's table `tracked_wallets`, the same change
is written there too, so the store's history API shows it even while the store is down. The row
follows the store's conventions where the table has the columns: `control_ms`/`control_seq` hold
the id of the control entry (so the store, applying that entry later, finds it already applied),
and removal sets `removed_at` (a tombstone) instead of deleting. `--db off` skips Postgres;
`--db require` turns a Postgres failure into an error (exit 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import asyncpg
import redis.asyncio as aioredis

from shared import wallet_registry
from shared.models import TrackedWallet
from shared.redis_streams import entry_position
from shared.streams import Streams

DbMode = Literal["auto", "require", "off"]
DB_TIMEOUT_S = 3.0
TABLE = "tracked_wallets"


class MirrorError(RuntimeError):
    pass


@dataclass(frozen=True)
class Mirror:
    """Where a change went in Postgres: `done`, or why it was skipped."""

    done: bool
    detail: str


async def add(
    client: aioredis.Redis, streams: Streams, wallet: TrackedWallet, seed: Sequence[TrackedWallet]
) -> str:
    """Track (or relabel) a wallet; returns the control entry id."""
    await wallet_registry.seed(client, streams, seed)
    return await wallet_registry.upsert(client, streams, wallet)


async def remove(
    client: aioredis.Redis, streams: Streams, address: str, seed: Sequence[TrackedWallet]
) -> tuple[TrackedWallet | None, str | None]:
    """Stop tracking; returns (the wallet as it was, control entry id), or (None, None)."""
    await wallet_registry.seed(client, streams, seed)
    raw = await client.hget(streams.wallets_key(), address)
    previous = TrackedWallet.model_validate_json(raw) if raw is not None else None
    control_id = await wallet_registry.remove(client, streams, address)
    return previous, control_id


async def _columns(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = $1",
        TABLE,
    )
    return {r["column_name"] for r in rows}


def _newer_than_row(columns: set[str]) -> str:
    """SQL guard: the row was not already changed by a later control entry."""
    if {"control_ms", "control_seq"} <= columns:
        return (
            f" WHERE {TABLE}.control_ms IS NULL"
            f" OR ({TABLE}.control_ms, {TABLE}.control_seq) < ($4, $5)"
        )
    return ""


async def _upsert_row(
    conn: asyncpg.Connection, columns: set[str], wallet: TrackedWallet, control_id: str
) -> None:
    names, values = ["address", "label", "score"], [wallet.address, wallet.label, wallet.score]
    updates = ["label = EXCLUDED.label", "score = EXCLUDED.score"]
    if {"control_ms", "control_seq"} <= columns:
        names += ["control_ms", "control_seq"]
        values += list(entry_position(control_id))
        updates += ["control_ms = EXCLUDED.control_ms", "control_seq = EXCLUDED.control_seq"]
    if "updated_at" in columns:
        updates.append("updated_at = now()")
    if "removed_at" in columns:
        updates.append("removed_at = NULL")
    placeholders = ", ".join(f"${i}" for i in range(1, len(values) + 1))
    await conn.execute(
        f"INSERT INTO {TABLE} ({', '.join(names)}) VALUES ({placeholders}) "
        f"ON CONFLICT (address) DO UPDATE SET {', '.join(updates)}{_newer_than_row(columns)}",
        *values,
    )


async def _remove_row(
    conn: asyncpg.Connection, columns: set[str], address: str, control_id: str
) -> None:
    if "removed_at" not in columns:
        await conn.execute(f"DELETE FROM {TABLE} WHERE address = $1", address)
        return
    sets = ["removed_at = now()"]
    args: list[object] = [address]
    guard = ""
    if {"control_ms", "control_seq"} <= columns:
        sets += ["control_ms = $2", "control_seq = $3"]
        args += list(entry_position(control_id))
        guard = " AND (control_ms IS NULL OR (control_ms, control_seq) < ($2, $3))"
    if "updated_at" in columns:
        sets.append("updated_at = now()")
    await conn.execute(f"UPDATE {TABLE} SET {', '.join(sets)} WHERE address = $1{guard}", *args)


async def mirror(
    database_url: str,
    mode: DbMode,
    op: Literal["upsert", "remove"],
    wallet: TrackedWallet,
    control_id: str,
) -> Mirror:
    """Write the change to Postgres; raises MirrorError only in `require` mode."""
    if mode == "off":
        return Mirror(False, "skipped (--db off)")
    try:
        conn = await asyncpg.connect(database_url, timeout=DB_TIMEOUT_S)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return _skipped(mode, f"unreachable ({type(exc).__name__})")
    try:
        columns = await _columns(conn)
        if "address" not in columns:
            return _skipped(mode, f"no table {TABLE}")
        if op == "upsert":
            await _upsert_row(conn, columns, wallet, control_id)
        else:
            await _remove_row(conn, columns, wallet.address, control_id)
    except asyncpg.PostgresError as exc:
        return _skipped(mode, f"failed: {exc}")
    finally:
        await conn.close()
    return Mirror(True, f"{TABLE} updated")


def _skipped(mode: DbMode, why: str) -> Mirror:
    if mode == "require":
        raise MirrorError(f"postgres: {why}")
    return Mirror(False, why)


async def db_addresses(database_url: str, mode: DbMode) -> set[str] | None:
    """The wallets Postgres tracks (rows without a tombstone), or None when it cannot say."""
    if mode == "off":
        return None
    try:
        conn = await asyncpg.connect(database_url, timeout=DB_TIMEOUT_S)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        _skipped(mode, f"unreachable ({type(exc).__name__})")
        return None
    try:
        columns = await _columns(conn)
        if "address" not in columns:
            _skipped(mode, f"no table {TABLE}")
            return None
        active = " WHERE removed_at IS NULL" if "removed_at" in columns else ""
        rows = await conn.fetch(f"SELECT address FROM {TABLE}{active}")
    finally:
        await conn.close()
    return {r["address"] for r in rows}
