"""Streamed CSV exports of the history: every matching row, as Postgres reads it.

One server-side cursor in a read-only transaction; the first chunk is read before answering. At
most `STORE_CSV_MAX_STREAMS` exports at once (503 beyond, with Retry-After), each cut after
`STORE_CSV_MAX_SECONDS`: a slow reader holds neither the pool nor a snapshot for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import asyncpg
from fastapi.exceptions import HTTPException
from starlette.responses import StreamingResponse

from services.store import queries
from services.store.database import Database
from services.store.queries import Resource

log = logging.getLogger(__name__)

CSV_CHUNK_ROWS = 500
CSV_MEDIA = "text/csv; charset=utf-8"
CSV_RETRY_AFTER_S = 5
# Postgres ends an export's transaction itself this long after the export's own bound, should
# this process stall; the margin lets the process, which answers the client, normally go first.
CSV_POSTGRES_GRACE_S = 10


@dataclass
class Exports:
    """Streamed CSV exports: at most `limit` at once, each at most `max_seconds` long."""

    limit: int
    max_seconds: float
    running: int = 0

    def start(self) -> bool:
        if self.running >= self.limit:
            return False
        self.running += 1
        return True

    def end(self) -> None:
        self.running -= 1


async def stream_csv(
    db: Database,
    exports: Exports,
    resource: Resource,
    sql: str,
    params: list[Any],
    filename: str,
) -> StreamingResponse:
    """Every row, read through a server-side cursor. The first chunk is read before answering, so
    an unavailable Postgres is still a 503; a failure later can only cut the response short."""
    if not exports.start():
        raise HTTPException(
            503,
            f"too many CSV exports at once (STORE_CSV_MAX_STREAMS={exports.limit}): retry later, "
            "or read pages with `limit`",
            headers={"Retry-After": str(CSV_RETRY_AFTER_S)},
        )
    held = contextlib.AsyncExitStack()
    held.callback(exports.end)
    try:
        conn = await held.enter_async_context(db.connection())
        await held.enter_async_context(conn.transaction(readonly=True))
        idle_ms = round((exports.max_seconds + CSV_POSTGRES_GRACE_S) * 1000)
        await conn.execute(f"SET LOCAL idle_in_transaction_session_timeout = {idle_ms}")
        rows = conn.cursor(sql, *params, prefetch=CSV_CHUNK_ROWS).__aiter__()
        first = await _take(rows, CSV_CHUNK_ROWS)
    except BaseException:
        await held.aclose()
        raise

    async def chunks() -> AsyncGenerator[str, None]:
        chunk = first
        yield queries.csv_lines(resource, chunk, header=True)
        while len(chunk) == CSV_CHUNK_ROWS:
            chunk = await _take(rows, CSV_CHUNK_ROWS)
            yield queries.csv_lines(resource, chunk, header=False)

    return BoundedExport(
        chunks(),
        held,
        exports.max_seconds,
        media_type=CSV_MEDIA,
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


class BoundedExport(StreamingResponse):
    """A streamed export that gives back what it holds (`held`: the connection, the snapshot,
    the export's slot) however it ends: complete, its client gone, or cut after `max_seconds`
    while a slow client keeps the writes waiting. A cut download ends without its last chunk,
    which clients report as an error, as for any failure mid-stream."""

    def __init__(
        self,
        content: AsyncGenerator[str, None],
        held: contextlib.AsyncExitStack,
        max_seconds: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(content, **kwargs)
        self.chunks = content
        self.held = held
        self.max_seconds = max_seconds

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        deadline = asyncio.timeout(self.max_seconds)
        try:
            async with deadline:
                await super().__call__(scope, receive, send)
        except TimeoutError:
            if not deadline.expired():
                raise
            log.warning("csv_export_cut", extra={"max_seconds": self.max_seconds})
        finally:
            await self.chunks.aclose()
            await self.held.aclose()


async def _take(rows: AsyncIterator[asyncpg.Record], count: int) -> list[asyncpg.Record]:
    taken: list[asyncpg.Record] = []
    async for row in rows:
        taken.append(row)
        if len(taken) == count:
            break
    return taken
