"""Migrations on a real Postgres: applied once, re-run is a no-op, concurrent runners serialize."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from services.store.rows import ORDERS, STATUS_COLUMNS, prepare
from services.store.schema import MigrationError, load, migrate
from tests.test_store_rows import entry, make_fill

pytestmark = pytest.mark.integration


async def test_applied_once_then_a_no_op(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        assert await migrate(conn, load()) == ["001", "002", "003", "004", "005"]
        assert await migrate(conn, load()) == []
        rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
        assert [(r["version"], r["name"]) for r in rows] == [
            ("001", "001_init.sql"),
            ("002", "002_wallets_and_history_api.sql"),
            ("003", "003_status.sql"),
            ("004", "004_signal_validation.sql"),
            ("005", "005_wallet_quality.sql"),
        ]
        tables = {
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")
        }
        assert {"orders", "signals", "tracked_wallets", "schema_migrations"} <= tables
        assert "signal_validation" in tables and "wallet_quality" in tables
        indexes = {
            r["indexname"]
            for r in await conn.fetch("SELECT indexname FROM pg_indexes WHERE schemaname='public'")
        }
        assert {
            "orders_wallet_time",
            "orders_market_time",
            "orders_time",
            "signals_wallet_time",
            "signals_market_time",
            "signals_kind_time",
            "signals_time",
            "orders_token_time",
            "orders_condition_time",
            "signals_condition_time",
            "signals_token_time",
            "orders_unconfirmed_time",
            "signals_unconfirmed_time",
        } <= indexes
        # Every listing index ends with (time, key), the API's keyset.
        definition = await conn.fetchval(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'signals_wallet_time'"
        )
        assert definition.endswith("(wallet, detected_at DESC, signal_id DESC)")
    finally:
        await conn.close()


async def test_rows_stored_before_statuses_are_confirmed_and_take_only_known_ones(
    database_url: str,
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn, load()[:2])
        [row] = prepare(ORDERS, [entry(make_fill(1), "5-0")]).rows
        columns = [c for c in ORDERS.columns if c not in STATUS_COLUMNS]
        values = [v for c, v in zip(ORDERS.columns, row.values, strict=True) if c in columns]
        params = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
        await conn.execute(f"INSERT INTO orders ({', '.join(columns)}) VALUES ({params})", *values)
        await migrate(conn, load())
        stored = await conn.fetchrow(f"SELECT {', '.join(STATUS_COLUMNS)} FROM orders")
        assert dict(stored) == {
            "status": "confirmed",
            "status_reason": "",
            "status_ms": 0,
            "status_seq": 0,
            "newest_ms": 0,
            "newest_seq": 0,
        }
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("UPDATE orders SET status = 'gone'")
    finally:
        await conn.close()


async def test_concurrent_runners_do_not_conflict(database_url: str) -> None:
    conns = [await asyncpg.connect(database_url) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(conn, load()) for conn in conns))
        assert sorted(results) == [[], [], [], ["001", "002", "003", "004", "005"]]
        assert await conns[0].fetchval("SELECT count(*) FROM schema_migrations") == 5
    finally:
        for conn in conns:
            await conn.close()


async def test_later_migrations_run_in_order_and_changed_ones_are_refused(
    database_url: str, tmp_path: Path
) -> None:
    (tmp_path / "001_first.sql").write_text("CREATE TABLE a (x int);")
    (tmp_path / "010_third.sql").write_text("INSERT INTO a VALUES (2);")
    (tmp_path / "002_second.sql").write_text("INSERT INTO a VALUES (1);")
    conn = await asyncpg.connect(database_url)
    try:
        assert await migrate(conn, load(tmp_path)) == ["001", "002", "010"]
        assert [r["x"] for r in await conn.fetch("SELECT x FROM a")] == [1, 2]
        (tmp_path / "002_second.sql").write_text("INSERT INTO a VALUES (100);")
        with pytest.raises(MigrationError, match=r"002_second\.sql changed"):
            await migrate(conn, load(tmp_path))
    finally:
        await conn.close()


async def test_a_failing_migration_applies_nothing(database_url: str, tmp_path: Path) -> None:
    (tmp_path / "001_ok.sql").write_text("CREATE TABLE b (x int);")
    (tmp_path / "002_broken.sql").write_text("INSERT INTO missing_table VALUES (1);")
    conn = await asyncpg.connect(database_url)
    try:
        with pytest.raises(asyncpg.exceptions.UndefinedTableError):
            await migrate(conn, load(tmp_path))
        assert await conn.fetchval("SELECT to_regclass('b')") is None
        assert await conn.fetchval("SELECT to_regclass('schema_migrations')") is None
    finally:
        await conn.close()
