"""The machine's own ceilings: what one Python process gets from Redis and Postgres with no service
code, using the same client libraries the services use (redis.asyncio, asyncpg).

- XADD: pipelines of `BATCH` XADDs (MAXLEN ~, as the services write) of a real `orders.raw`
  payload, back to back, for a fixed time.
- XREADGROUP + XACK: the entries just added, read by one consumer with XREADGROUP COUNT 500 and
  acknowledged with one XACK per read, until the stream is drained or the time is up.
- COPY: asyncpg `copy_records_to_table` of real `orders` rows into a table shaped like `orders`
  (same columns, keys and indexes), `COPY_BATCH` rows per committed transaction.

They bound the stages: the ingestor cannot add faster than XADD, a detector replica cannot consume
faster than XREADGROUP + XACK, the store cannot insert faster than COPY.
"""

from __future__ import annotations

import time
from typing import Any

import asyncpg

from bench.environment import BenchEnv
from bench.fixtures import dome_orders, fill_payloads, order_fills
from services.store.rows import ORDERS, prepare

BATCH = 500
READ_COUNT = 500
COPY_BATCH = 5000
MAXLEN = 1_000_000


async def xadd_and_readgroup(env: BenchEnv, seconds: float) -> dict[str, Any]:
    """Both Redis ceilings, on one stream: the XADD phase fills what the read phase drains."""
    payload = fill_payloads(order_fills(dome_orders(1, "ceiling")))[0]
    stream = env.namespace("ceiling") + "stream"
    client = env.redis()
    try:
        added = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            async with client.pipeline(transaction=False) as pipe:
                for _ in range(BATCH):
                    pipe.xadd(stream, {b"data": payload}, maxlen=MAXLEN, approximate=True)
                await pipe.execute()
            added += BATCH
        xadd_s = time.perf_counter() - start

        await client.xgroup_create(stream, "ceiling", id="0")
        read = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            reply: Any = await client.xreadgroup("ceiling", "c1", {stream: ">"}, count=READ_COUNT)
            if not reply:
                break
            ids = [entry_id for entry_id, _ in reply[0][1]]
            await client.xack(stream, "ceiling", *ids)
            read += len(ids)
        read_s = time.perf_counter() - start
        await client.unlink(stream)
    finally:
        await client.aclose()
    return {
        "xadd_per_s": round(added / xadd_s),
        "xadd_detail": f"{added} XADD in pipelines of {BATCH}, {len(payload)}-byte payload",
        "readgroup_ack_per_s": round(read / read_s),
        "readgroup_detail": f"{read} entries, XREADGROUP COUNT {READ_COUNT} + one XACK per read",
    }


async def copy_rows(env: BenchEnv, rows: int) -> dict[str, Any]:
    """asyncpg COPY into a copy of `orders`; rows/s over `rows` rows, committed per batch."""
    fills = order_fills(dome_orders(rows, f"copy-{env.run_id}"))
    entries = [(f"{n}-0", {b"data": p}) for n, p in enumerate(fill_payloads(fills))]
    values = [row.values for row in prepare(ORDERS, entries).rows]
    conn: asyncpg.Connection = await env.pg()
    try:
        await conn.execute("CREATE TABLE bench_copy_orders (LIKE orders INCLUDING ALL)")
        start = time.perf_counter()
        for offset in range(0, len(values), COPY_BATCH):
            async with conn.transaction():
                await conn.copy_records_to_table(
                    "bench_copy_orders",
                    records=values[offset : offset + COPY_BATCH],
                    columns=ORDERS.columns,
                )
        elapsed = time.perf_counter() - start
        await conn.execute("DROP TABLE bench_copy_orders")
    finally:
        await conn.close()
    return {
        "copy_rows_per_s": round(len(values) / elapsed),
        "copy_detail": f"{len(values)} orders rows, {COPY_BATCH} per committed COPY, "
        "table LIKE orders INCLUDING ALL",
    }
