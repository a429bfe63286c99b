"""The store's batch write (COPY into a session temp table, then INSERT ... SELECT ON CONFLICT)
against a real Postgres: the temp table is created on a session's first batch only, and again
whenever the session lost it."""

from __future__ import annotations

import asyncpg

from services.store.database import write_batch
from services.store.rows import ORDERS, prepare
from services.store.schema import load, migrate
from tests.test_store_rows import entry, make_fill


async def test_batches_reuse_the_staging_table_and_recreate_it_when_gone(
    database_url: str,
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn, load())
        rows = prepare(ORDERS, [entry(make_fill(n), f"{n}-0") for n in range(1, 31)]).rows
        staging = "SELECT count(*) FROM pg_class WHERE relname = 'orders_incoming'"

        assert (await write_batch(conn, ORDERS, rows[:10], 10)).inserted == 10
        assert await conn.fetchval(staging) == 1
        assert (await write_batch(conn, ORDERS, rows[5:20], 10)).inserted == 10
        await conn.execute("DISCARD TEMP")
        assert await conn.fetchval(staging) == 0
        assert (await write_batch(conn, ORDERS, rows[15:], 10)).inserted == 10

        assert await conn.fetchval("SELECT count(*) FROM orders") == 30
        # The staging table keeps no rows between batches.
        assert await conn.fetchval("SELECT count(*) FROM orders_incoming") == 0
    finally:
        await conn.close()
