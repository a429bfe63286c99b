"""Postgres side of the store: one batch = one transaction, retried until Postgres takes it.

Write path, chosen by measurement: COPY the batch into a session temp table, then
`INSERT INTO <table> SELECT ... ORDER BY <key> ON CONFLICT (<key>) DO UPDATE ... WHERE <newer>`,
commit. Ordering by key makes replicas that write overlapping batches lock rows in the same order
(no deadlock cycles). The temp table is created on a session's first batch (and again if the
session lost it), not on every batch.

An entry whose key is stored already is a status change or a repeat (docs/streams.md, "Status"). It
changes the row only when it is newer in its stream than the newest entry applied to the row
(`newest_ms`, `newest_seq`): then the row takes its position, and its status when that differs
(with the reason and `status_ms`/`status_seq`, the entry that set it). Otherwise, a redelivered
older entry, it changes nothing. Comparing with the newest entry, not only with the one that set
the status, keeps stream order across batches that commit out of order: a retraction redelivered
after the fill's later confirmation does not win. The row's data stay those of the entry that
stored it first. The statement counts, from the rows it wrote, what it inserted and which statuses
it changed, so every entry is counted exactly once: inserted, status change, or duplicate.

One statement cannot write a row twice, so a key that comes more than once in a batch (an order
and its retraction read together) is written in rounds: the first entry of every key, then the
second, ... in the same transaction; nearly every batch is one round.

Against `executemany` INSERT ... ON CONFLICT, `fetchmany` INSERT ... RETURNING and one INSERT ...
SELECT FROM unnest(...), none was faster beyond noise; COPY was never slower (the figures:
bench/README.md).

Failures are sorted in two:
- data errors (SQLSTATE classes 22 data exception, 23 integrity, 54 program limit, and client-side
  encoding errors such as an int beyond bigint): one row is bad. The batch is redone row by row,
  each row under a savepoint, in one transaction; refused rows come back with the reason.
- anything else from the connection or the server (refused, reset, timeout, shutdown, read-only,
  missing table...): the same batch is retried with exponential backoff, forever, the pool recreated
  between attempts; `up` is false meanwhile. Only `stop()` ends the retrying (raising `Stopping`),
  so a shutdown leaves the batch unacknowledged rather than lost. When the connection dies after
  Postgres committed but before its reply arrived, the retry finds the rows there: they count as
  duplicates, and the batch is still stored exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import TypeVar

import asyncpg

from services.store import metrics
from services.store.rows import REASON_MAX, Row, Table
from services.store.schema import Migration, migrate

log = logging.getLogger(__name__)

T = TypeVar("T")

DATA_ERROR_CLASSES = ("22", "23", "54")
# Serialization failures and deadlocks: retry at once, Postgres itself is fine.
CONFLICT_CLASS = "40"


class Stopping(Exception):
    """Raised by a retry loop once `Database.stop()` was called: the work was not done."""


class Unavailable(Exception):
    """Raised by `Database.connection` when Postgres cannot serve a request now (retry later)."""


@dataclass
class WriteResult:
    inserted: int
    rejected: list[tuple[Row, str]] = field(default_factory=list)
    # Stored rows whose status an entry changed, by the status it set.
    status_changes: Counter[str] = field(default_factory=Counter)

    def add(self, written: Iterable[asyncpg.Record]) -> None:
        """Count the rows of one write statement (`status`, `inserted`, `changed` per status)."""
        for counts in written:
            self.inserted += counts["inserted"]
            if counts["changed"]:
                self.status_changes[counts["status"]] += counts["changed"]


def is_data_error(exc: BaseException) -> bool:
    """True when the error is about the values of a row, not about Postgres being reachable."""
    if isinstance(exc, asyncpg.PostgresError):
        return (exc.sqlstate or "")[:2] in DATA_ERROR_CLASSES
    # asyncpg's client-side encoding error (e.g. an int beyond bigint) is InterfaceError+ValueError.
    return isinstance(exc, asyncpg.InterfaceError) and isinstance(exc, ValueError)


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, OSError | asyncpg.PostgresError | asyncpg.InterfaceError) and not (
        is_data_error(exc)
    )


def is_conflict(exc: BaseException) -> bool:
    return isinstance(exc, asyncpg.PostgresError) and (exc.sqlstate or "").startswith(
        CONFLICT_CLASS
    )


@dataclass(frozen=True)
class Statements:
    create_staging: str
    clear_staging: str
    upsert_from_staging: str
    upsert_one: str
    staging: str


@cache
def statements(table: Table) -> Statements:
    cols = ", ".join(table.columns)
    staging = f"{table.name}_incoming"
    params = ", ".join(f"${i}" for i in range(1, len(table.columns) + 1))
    return Statements(
        # LIKE copies the column types and NOT NULLs (hence the defaults, for `stored_at`), not the
        # key: in-batch repeats are fine.
        create_staging=(
            f"CREATE TEMP TABLE IF NOT EXISTS {staging} (LIKE {table.name} INCLUDING DEFAULTS) "
            "ON COMMIT DELETE ROWS"
        ),
        clear_staging=f"DELETE FROM {staging}",
        upsert_from_staging=upsert(table, f"SELECT {cols} FROM {staging} ORDER BY {table.key}"),
        upsert_one=upsert(table, f"VALUES ({params})"),
        staging=staging,
    )


def upsert(table: Table, source: str) -> str:
    """Write the rows of `source`: insert, or apply to the stored row if newer (module doc); one
    result row per status: how many rows were inserted with it and how many changed to it."""
    # Only a status change moves the reason and the entry that set the status.
    on_change = ",\n        ".join(
        f"{c} = CASE WHEN t.status = EXCLUDED.status THEN t.{c} ELSE EXCLUDED.{c} END"
        for c in ("status_reason", "status_ms", "status_seq")
    )
    # `xmax = 0` only in a row version this statement inserted: an update by ON CONFLICT locked
    # the row first. A changed status was set by the entry just applied, so it is the newest.
    return f"""
WITH written AS (
    INSERT INTO {table.name} AS t ({", ".join(table.columns)})
    {source}
    ON CONFLICT ({table.key}) DO UPDATE SET
        status = EXCLUDED.status,
        {on_change},
        newest_ms = EXCLUDED.newest_ms,
        newest_seq = EXCLUDED.newest_seq
    WHERE (t.newest_ms, t.newest_seq) < (EXCLUDED.newest_ms, EXCLUDED.newest_seq)
    RETURNING status,
              xmax = 0 AS inserted,
              (status_ms, status_seq) = (newest_ms, newest_seq) AS status_set
)
SELECT status,
       count(*) FILTER (WHERE inserted) AS inserted,
       count(*) FILTER (WHERE status_set AND NOT inserted) AS changed
FROM written GROUP BY status
"""


def rounds(rows: Sequence[Row]) -> list[list[Row]]:
    """The rows in rounds that hold each key once: the first entry of every key, the second..."""
    result: list[list[Row]] = []
    seen: Counter[str] = Counter()
    for row in rows:
        number = seen[row.key]
        seen[row.key] += 1
        if number == len(result):
            result.append([])
        result[number].append(row)
    return result


def db_reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"row refused: {type(exc).__name__}: {text}"[:REASON_MAX]


async def write_batch(
    conn: asyncpg.Connection, table: Table, rows: Sequence[Row], copy_timeout: float
) -> WriteResult:
    """Write the rows in one transaction; on a data error, redo them one by one."""
    try:
        try:
            return await _copy_batch(conn, table, rows, copy_timeout, create=False)
        except asyncpg.UndefinedTableError:
            # The session's first batch: a temp table outlives its transactions (not their rows)
            # and the pool's reset keeps it, so it is created only when missing, saving a round
            # trip and a notice per batch.
            return await _copy_batch(conn, table, rows, copy_timeout, create=True)
    except Exception as exc:
        # Binary COPY encodes values itself and raises plain OverflowError/ValueError/TypeError for
        # a value its column cannot hold; the row-by-row pass re-checks each row with asyncpg's
        # parameter encoding, which names the bad ones precisely.
        if not (is_data_error(exc) or isinstance(exc, OverflowError | ValueError | TypeError)):
            raise
        log.info("batch_has_bad_rows", extra={"table": table.name, "error": type(exc).__name__})
    return await write_rows_one_by_one(conn, table, rows)


async def _copy_batch(
    conn: asyncpg.Connection,
    table: Table,
    rows: Sequence[Row],
    copy_timeout: float,
    *,
    create: bool,
) -> WriteResult:
    sql = statements(table)
    result = WriteResult(0)
    async with conn.transaction():
        if create:
            await conn.execute(sql.create_staging)
        for number, batch in enumerate(rounds(rows)):
            if number:
                await conn.execute(sql.clear_staging)
            await conn.copy_records_to_table(
                sql.staging,
                records=[row.values for row in batch],
                columns=table.columns,
                timeout=copy_timeout,
            )
            result.add(await conn.fetch(sql.upsert_from_staging))
    return result


async def write_rows_one_by_one(
    conn: asyncpg.Connection, table: Table, rows: Sequence[Row]
) -> WriteResult:
    sql = statements(table)
    result = WriteResult(0)
    async with conn.transaction():
        for row in rows:
            try:
                async with conn.transaction():  # a savepoint: a bad row undoes only itself
                    written = await conn.fetch(sql.upsert_one, *row.values)
                result.add(written)
            except Exception as exc:
                if not is_data_error(exc):
                    raise
                result.rejected.append((row, db_reason(exc)))
    return result


class Database:
    """A pool that is rebuilt after failures, and retry loops around every use of it."""

    def __init__(
        self, dsn: str, *, pool_size: int, timeout: float, retry_min: float, retry_max: float
    ) -> None:
        self._dsn = dsn
        self._pool_size = pool_size
        self._timeout = timeout
        self._retry_min = retry_min
        self._retry_max = retry_max
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self.up = False
        self.last_error: str | None = None

    async def migrate(
        self, migrations: list[Migration], statement_timeout_s: float | None = None
    ) -> list[str]:
        """Apply pending migrations, waiting for Postgres as long as it takes (or until stop)."""

        async def apply(conn: asyncpg.Connection) -> list[str]:
            return await migrate(conn, migrations, statement_timeout_s)

        return await self._retrying("migrations", apply)

    async def write(self, table: Table, rows: Sequence[Row]) -> WriteResult:
        """Store the rows (idempotently, in stream order whatever the order of `rows`); returns
        only once Postgres has committed them."""
        if not rows:
            return WriteResult(0)

        async def attempt(conn: asyncpg.Connection) -> WriteResult:
            started = time.perf_counter()
            result = await write_batch(conn, table, rows, self._timeout)
            metrics.COMMIT_SECONDS.labels(table.name).observe(time.perf_counter() - started)
            return result

        return await self._retrying(table.name, attempt)

    async def retrying(self, what: str, op: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run `op` on a pooled connection, retried through outages like a batch (until stop)."""
        return await self._retrying(what, op)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection for one request, failing fast: `Unavailable` instead of waiting.

        Meant for a pool of its own (the API's), so it leaves `up` and the metrics, which follow
        the write path, alone; asyncpg replaces a broken connection on its next acquire.
        """
        try:
            pool = await self._get_pool()
            async with pool.acquire(timeout=self._timeout) as conn:
                yield conn
        except Exception as exc:
            if not is_retryable(exc) or is_data_error(exc):
                raise
            raise Unavailable(f"database unavailable ({type(exc).__name__})") from exc

    async def ping(self) -> bool:
        """One round trip; updates `up`. Never raises: whatever fails here means "down"."""
        pool: asyncpg.Pool | None = None
        try:
            pool = await self._get_pool()
            async with pool.acquire(timeout=self._timeout) as conn:
                await conn.fetchval("SELECT 1")
        except Exception as exc:
            await self._failed(exc, pool)
            return False
        self._mark_up()
        return True

    async def watch(self, every: float) -> None:
        """Ping until stopped, so `up` follows Postgres even when no batch is flowing."""
        while not self._stopping.is_set():
            await self.ping()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), every)

    def stop(self) -> None:
        """Make retry loops give up (with `Stopping`) instead of waiting for Postgres."""
        self._stopping.set()

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), self._timeout)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                pool.terminate()

    async def _retrying(self, what: str, op: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        attempt = 0
        while True:
            pool: asyncpg.Pool | None = None
            try:
                pool = await self._get_pool()
                async with pool.acquire(timeout=self._timeout) as conn:
                    result = await op(conn)
            except Exception as exc:
                if not is_retryable(exc):
                    raise
                metrics.DB_RETRIES.labels(what).inc()
                delay = await self._failed(exc, pool, attempt=attempt, what=what)
            else:
                self._mark_up()
                return result
            # Checked only after a failure: once stop() is called, work that can be done still is.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                raise Stopping(f"gave up on {what}: shutting down while Postgres is unavailable")
            attempt += 1

    async def _failed(
        self, exc: BaseException, pool: asyncpg.Pool | None, *, attempt: int = 0, what: str = "ping"
    ) -> float:
        """Record a failure; returns how long to wait before the next attempt."""
        if is_conflict(exc):
            return min(self._retry_min, self._retry_max)
        news = self.up or self.last_error is None
        self.up = False
        self.last_error = type(exc).__name__
        metrics.DB_UP.set(0)
        # One warning when Postgres goes away, then a reminder every 20 attempts of a waiting batch.
        if news or (what != "ping" and attempt % 20 == 19):
            log.warning(
                "postgres_unavailable",
                extra={"during": what, "attempt": attempt + 1, "error": self.last_error},
            )
        else:
            log.debug(
                "postgres_unavailable",
                extra={"during": what, "attempt": attempt + 1, "error": self.last_error},
            )
        await self._drop_pool(pool)
        return min(self._retry_max, self._retry_min * 2.0 ** min(attempt, 32))

    def _mark_up(self) -> None:
        if not self.up:
            if self.last_error is not None:
                log.warning("postgres_available_again")
            self.up = True
            metrics.DB_UP.set(1)

    async def _get_pool(self) -> asyncpg.Pool:
        async with self._pool_lock:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=1,
                    max_size=self._pool_size,
                    timeout=self._timeout,
                    command_timeout=self._timeout,
                )
            return self._pool

    async def _drop_pool(self, pool: asyncpg.Pool | None) -> None:
        """Forget a pool that failed, unless another task already replaced it."""
        async with self._pool_lock:
            current = pool is not None and self._pool is pool
            if current:
                self._pool = None
        if current and pool is not None:
            # Its connections may hang on a dead socket: terminate, do not wait for a clean close.
            pool.terminate()
