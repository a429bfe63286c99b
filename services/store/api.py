"""The store's HTTP API (FastAPI; OpenAPI at /openapi.json, browsable at /docs), on the ops port.

- `GET /signals`, `GET /orders`: history, filtered, newest first (or `order=asc`), keyset-paged
  (`limit` 1..1000, default 100; `next_cursor` continues; see `queries.py`). `format=csv` or
  `Accept: text/csv` gives CSV: without `limit` every matching row is streamed from Postgres as
  it is read (one server-side cursor); with `limit`, one page and its cursor in `X-Next-Cursor`.
  At most `STORE_CSV_MAX_STREAMS` streams at once (503 beyond, with Retry-After), each cut after
  `STORE_CSV_MAX_SECONDS`: a slow reader holds neither the pool nor a snapshot for long.
- `GET /wallets`, `PUT /wallets/{address}`, `DELETE /wallets/{address}`: the tracked wallets,
  persisted in Postgres and published to the live registry (`wallets.py`).
- Auth: write endpoints need `Authorization: Bearer <STORE_API_TOKEN>` (compared on SHA-256
  digests, in constant time); without a configured token they are refused (403), never open.
  Reads need the token too when `STORE_API_READ_AUTH` is true. /health, /metrics and the docs
  stay open.
- Host: a request whose `Host` is not in `STORE_API_ALLOWED_HOSTS` gets 400 (DNS rebinding),
  except /health and /metrics.
- Bad input is a 4xx naming the problem: 422 for a malformed parameter or body (FastAPI's
  validation list), 400 for a bad cursor or an empty time range, 413 for a body over
  `STORE_API_MAX_BODY_BYTES`; 503 while Postgres or Redis cannot answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated, Any, Literal

import asyncpg
import orjson
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Security
from fastapi.exceptions import HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StringConstraints,
    WithJsonSchema,
    field_validator,
)
from redis.exceptions import RedisError
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Match

from services.store import metrics, queries
from services.store.database import Database, Unavailable
from services.store.queries import CursorError, Order, Resource
from services.store.wallets import StoredWallet, Wallets
from shared.models import SignalKind, TrackedWallet, normalize_address
from shared.ops import HealthCheck, ops_routes

log = logging.getLogger(__name__)

PAGE_DEFAULT = 100
PAGE_MAX = 1000
CSV_CHUNK_ROWS = 500
CSV_MEDIA = "text/csv; charset=utf-8"
CSV_RETRY_AFTER_S = 5
# Postgres ends an export's transaction itself this long after the export's own bound, should
# this process stall; the margin lets the process, which answers the client, normally go first.
CSV_POSTGRES_GRACE_S = 10
UNIX_MAX = 20_000_000_000  # Unix seconds (year 2603); larger numbers are more likely mistakes
_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"  # date, time, fraction
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))$"  # offset: Z or +hh:mm
)
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def parse_time(value: Any) -> datetime:
    """An RFC 3339 date-time with its offset, or Unix seconds; always returned in UTC.

    Strict on purpose: a time without an offset would be a guess about its zone.
    """
    if isinstance(value, datetime):
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    text = str(value).strip()
    if _NUMBER.match(text):
        seconds = float(text)
        if not 0 <= seconds < UNIX_MAX:
            raise ValueError(f"Unix seconds must be in [0, {UNIX_MAX})")
        return datetime.fromtimestamp(seconds, UTC)
    match = _RFC3339.match(text)
    if match is None:
        raise ValueError(
            "not a time: give RFC 3339 with an offset (2025-11-06T20:53:11Z) or Unix seconds"
        )
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction, zulu, sign, off_h, off_m = match.groups()[6:]
    try:
        zone = (
            UTC
            if zulu
            else timezone(
                (1 if sign == "+" else -1) * timedelta(hours=int(off_h), minutes=int(off_m))
            )
        )
        moment = datetime(
            year,
            month,
            day,
            hour,
            minute,
            min(second, 59),
            int((fraction or "0")[:6].ljust(6, "0")),
            tzinfo=zone,
        )
        return moment.astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise ValueError(f"not a valid time: {exc}") from exc


def _encodable(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("text is not valid Unicode (lone surrogate)") from exc
    return value


ADDRESS_PATTERN = "^0x[0-9a-fA-F]{40}$"
# The pattern is for the OpenAPI document; the validator gives the clearer message.
Wallet = Annotated[str, AfterValidator(normalize_address)]
Time = Annotated[
    datetime,
    PlainValidator(parse_time),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "format": "date-time"},
                {"type": "number", "minimum": 0, "exclusiveMaximum": UNIX_MAX},
            ]
        }
    ),
]
# Printable text only: a NUL cannot be stored in Postgres, and nothing needs control characters.
Text = Annotated[
    str,
    StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$"),
    AfterValidator(_encodable),
]
Label = Annotated[
    str,
    StringConstraints(max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$"),
    AfterValidator(_encodable),
]
Format = Literal["json", "csv"]

WalletQ = Annotated[
    Wallet | None,
    Query(description="0x address (any case)", json_schema_extra={"pattern": ADDRESS_PATTERN}),
]
MarketQ = Annotated[
    Text | None, Query(description="market slug, or condition id (0x + 64 hex digits)")
]
TokenQ = Annotated[Text | None, Query(description="outcome token id")]
SinceQ = Annotated[
    Time | None,
    Query(description="from this time, inclusive: RFC 3339 with an offset, or Unix seconds"),
]
UntilQ = Annotated[Time | None, Query(description="before this time, exclusive; as `since`")]
OrderQ = Annotated[Order, Query(description="newest first (desc) or oldest first (asc)")]
LimitQ = Annotated[
    int | None,
    Query(
        ge=1,
        le=PAGE_MAX,
        description=f"rows per page (default {PAGE_DEFAULT}; CSV: all rows when absent)",
    ),
]
CursorQ = Annotated[
    str | None, Query(max_length=300, description="`next_cursor` of the previous page")
]
FormatQ = Annotated[
    Format | None, Query(description="json (default) or csv; also `Accept: text/csv`")
]


class Problem(BaseModel):
    detail: str


class SignalItem(BaseModel):
    signal_id: str
    kind: str
    wallet: str
    wallet_label: str
    market_slug: str
    title: str
    condition_id: str
    token_id: str
    token_label: str
    side: str
    price: float
    shares: float
    notional_usd: float
    confidence: float
    reasons: list[str]
    order_keys: list[str]
    source: str
    exchange_ts: datetime
    received_at: datetime
    detected_at: datetime
    stream_id: str
    stored_at: datetime


class OrderItem(BaseModel):
    order_key: str
    wallet: str
    token_id: str
    token_label: str
    side: str
    market_slug: str
    condition_id: str
    title: str
    shares: int | str | None = Field(description="raw units (6 decimals)")
    shares_normalized: float
    price: float
    notional_usd: float
    tx_hash: str
    order_hash: str | None
    taker: str | None
    block_number: int | None
    log_index: int | None
    exchange_ts: datetime
    received_at: datetime
    source: str
    stored_at: datetime


class SignalPage(BaseModel):
    items: list[SignalItem]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null: last")


class OrderPage(BaseModel):
    items: list[OrderItem]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null: last")


class WalletIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: Label = ""
    score: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)

    @field_validator("score", mode="before")
    @classmethod
    def _number_not_bool(cls, value: Any) -> Any:
        if isinstance(value, bool | str):
            raise ValueError(f"must be a number or null, got {type(value).__name__}")
        return value


class WalletOut(BaseModel):
    address: str
    label: str
    score: float | None
    added_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, wallet: StoredWallet) -> WalletOut:
        return cls(
            address=wallet.address,
            label=wallet.label,
            score=wallet.score,
            added_at=wallet.added_at,
            updated_at=wallet.updated_at,
        )


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


@dataclass
class ApiContext:
    db: Database  # the API's own pool: reads never wait behind batch writes, nor they behind us
    wallets: Wallets
    token_digest: bytes | None  # SHA-256 of STORE_API_TOKEN
    read_auth: bool
    allowed_hosts: tuple[str, ...]  # "*" among them: any
    exports: Exports


def _problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": Problem} for code in codes}


def context(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.api
    return ctx


Ctx = Annotated[ApiContext, Depends(context)]
bearer = HTTPBearer(auto_error=False, description="STORE_API_TOKEN")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]


def check_token(ctx: ApiContext, credentials: HTTPAuthorizationCredentials | None) -> None:
    if ctx.token_digest is None:
        raise HTTPException(403, "this store has no STORE_API_TOKEN set: the endpoint is disabled")
    if credentials is None:
        raise HTTPException(
            401,
            "missing 'Authorization: Bearer <token>' header",
            headers={"WWW-Authenticate": "Bearer"},
        )
    # Digests, so the comparison takes the same time whatever the length of the token presented.
    if not hmac.compare_digest(digest(credentials.credentials), ctx.token_digest):
        raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "replace")).digest()


async def require_write_token(ctx: Ctx, credentials: Credentials) -> None:
    check_token(ctx, credentials)


async def require_read_token(ctx: Ctx, credentials: Credentials) -> None:
    if ctx.read_auth:
        check_token(ctx, credentials)


reads = APIRouter(responses=_problems(400, 401, 403, 503))
# 400: a body that is not even text (FastAPI's "error parsing the body").
writes = APIRouter(
    dependencies=[Depends(require_write_token)], responses=_problems(400, 401, 403, 413, 503)
)


def wants_csv(fmt: Format | None, accept: str) -> bool:
    """`format` decides; else the first of text/csv or application/json named in Accept."""
    if fmt is not None:
        return fmt == "csv"
    for part in accept.split(","):
        media = part.split(";", 1)[0].strip().lower()
        if media == "text/csv":
            return True
        if media in ("application/json", "application/*"):
            return False
    return False


def time_range(since: datetime | None, until: datetime | None) -> None:
    if since is not None and until is not None and since >= until:
        raise HTTPException(400, "empty time range: `since` must be before `until`")


async def listing(
    ctx: ApiContext,
    resource: Resource,
    where: queries.Query,
    *,
    order: Order,
    cursor: str | None,
    limit: int | None,
    csv: bool,
    filename: str,
) -> Response:
    try:
        after = None if cursor is None else queries.decode_cursor(cursor, resource, order)
    except CursorError as exc:
        raise HTTPException(400, str(exc)) from exc
    if csv and limit is None:
        sql, params = queries.page_sql(resource, where, order, after, None)
        return await stream_csv(ctx, resource, sql, params, filename)
    page = limit or PAGE_DEFAULT
    sql, params = queries.page_sql(resource, where, order, after, page + 1)
    async with ctx.db.connection() as conn:
        rows = await conn.fetch(sql, *params)
    more = len(rows) > page
    rows = rows[:page]
    token = queries.next_cursor(resource, order, rows[-1]) if more else None
    if csv:
        headers = {"Content-Disposition": f'attachment; filename="{filename}"'}
        if token:
            headers["X-Next-Cursor"] = token
        return Response(
            queries.csv_lines(resource, rows, header=True), media_type=CSV_MEDIA, headers=headers
        )
    body = {"items": [queries.item(resource, row) for row in rows], "next_cursor": token}
    return Response(orjson.dumps(body), media_type="application/json")


async def stream_csv(
    ctx: ApiContext, resource: Resource, sql: str, params: list[Any], filename: str
) -> StreamingResponse:
    """Every row, read through a server-side cursor. The first chunk is read before answering, so
    an unavailable Postgres is still a 503; a failure later can only cut the response short."""
    exports = ctx.exports
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
        conn = await held.enter_async_context(ctx.db.connection())
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


_LISTING_CONTENT = {"text/csv": {"schema": {"type": "string"}}}


@reads.get(
    "/signals",
    response_model=SignalPage,
    summary="Signals, filtered and paged",
    responses={200: {"content": _LISTING_CONTENT}},
)
async def get_signals(
    request: Request,
    ctx: Ctx,
    wallet: WalletQ = None,
    market: MarketQ = None,
    token: TokenQ = None,
    kind: Annotated[list[SignalKind] | None, Query(description="one or more kinds")] = None,
    since: SinceQ = None,
    until: UntilQ = None,
    min_confidence: Annotated[float | None, Query(ge=0, le=1, allow_inf_nan=False)] = None,
    order: OrderQ = "desc",
    limit: LimitQ = None,
    cursor: CursorQ = None,
    format: FormatQ = None,
) -> Response:
    time_range(since, until)
    where = queries.filters(
        queries.SIGNALS,
        wallet=wallet,
        market=market,
        token=token,
        kinds=[k.value for k in kind or ()],
        since=since,
        until=until,
        min_confidence=min_confidence,
    )
    return await listing(
        ctx,
        queries.SIGNALS,
        where,
        order=order,
        cursor=cursor,
        limit=limit,
        csv=wants_csv(format, request.headers.get("accept", "")),
        filename="signals.csv",
    )


@reads.get(
    "/orders",
    response_model=OrderPage,
    summary="Stored order fills, filtered and paged",
    responses={200: {"content": _LISTING_CONTENT}},
)
async def get_orders(
    request: Request,
    ctx: Ctx,
    wallet: WalletQ = None,
    market: MarketQ = None,
    token: TokenQ = None,
    since: SinceQ = None,
    until: UntilQ = None,
    order: OrderQ = "desc",
    limit: LimitQ = None,
    cursor: CursorQ = None,
    format: FormatQ = None,
) -> Response:
    time_range(since, until)
    where = queries.filters(
        queries.ORDERS, wallet=wallet, market=market, token=token, since=since, until=until
    )
    return await listing(
        ctx,
        queries.ORDERS,
        where,
        order=order,
        cursor=cursor,
        limit=limit,
        csv=wants_csv(format, request.headers.get("accept", "")),
        filename="orders.csv",
    )


@reads.get("/wallets", response_model=list[WalletOut], summary="The tracked wallets")
async def get_wallets(ctx: Ctx) -> list[WalletOut]:
    await _synced(ctx)
    return [WalletOut.of(w) for w in await ctx.wallets.tracked()]


AddressPath = Annotated[
    Wallet,
    Path(description="0x address (any case)", json_schema_extra={"pattern": ADDRESS_PATTERN}),
]


@writes.put(
    "/wallets/{address}",
    response_model=WalletOut,
    summary="Track a wallet, or set its label and score",
    responses={201: {"model": WalletOut, "description": "now tracked"}},
)
async def put_wallet(ctx: Ctx, address: AddressPath, body: WalletIn) -> JSONResponse:
    await _synced(ctx)
    wallet = TrackedWallet(address=address, label=body.label, score=body.score)
    saved, created = await ctx.wallets.put(wallet)
    return JSONResponse(
        WalletOut.of(saved).model_dump(mode="json"), status_code=201 if created else 200
    )


@writes.delete(
    "/wallets/{address}",
    status_code=204,
    summary="Stop tracking a wallet",
    responses=_problems(404),
)
async def delete_wallet(ctx: Ctx, address: AddressPath) -> Response:
    await _synced(ctx)
    if not await ctx.wallets.delete(address):
        raise HTTPException(404, f"wallet {address} is not tracked")
    return Response(status_code=204)


async def _synced(ctx: ApiContext) -> None:
    if not ctx.wallets.synced.is_set():
        raise HTTPException(
            503,
            "starting: tracked wallets are not synced yet, retry shortly",
            headers={"Retry-After": "1"},
        )


async def unavailable(_: Request, exc: Exception) -> Response:
    what = "Redis (wallet registry)" if isinstance(exc, RedisError) else "Postgres"
    return JSONResponse(
        {"detail": f"{what} unavailable, retry later"},
        status_code=503,
        headers={"Retry-After": "1"},
    )


async def method_not_allowed(request: Request, exc: Exception) -> Response:
    """405 with an `Allow` naming every method of the path: Starlette's names only the first
    route's (PUT and DELETE /wallets/{address} are two routes)."""
    allowed: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, BaseRoute) and route.matches(request.scope)[0] != Match.NONE:
            allowed |= set(getattr(route, "methods", None) or ())
    return JSONResponse(
        {"detail": "Method Not Allowed"},
        status_code=405,
        headers={"Allow": ", ".join(sorted(allowed))},
    )


ASGIApp = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]


class BodyLimit:
    """Refuses request bodies over `max_bytes` with 413, declared (Content-Length) or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(scope, receive, send)
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
        await self.app(scope, _replay(bytes(body), receive), send)

    async def _refuse(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        response = JSONResponse(
            {"detail": f"request body too large: the limit is {self.max_bytes} bytes"},
            status_code=413,
        )
        await response(scope, receive, send)


def _replay(body: bytes, receive: Any) -> Callable[[], Awaitable[dict[str, Any]]]:
    replayed = False

    async def replay() -> dict[str, Any]:
        nonlocal replayed
        if replayed:
            message: dict[str, Any] = await receive()  # e.g. http.disconnect
            return message
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class HostCheck:
    """Refuses (400) a request whose `Host` header is not one of the API's own names.

    DNS rebinding: a web page on the attacker's name, re-pointed at 127.0.0.1, reaches this port
    from the victim's browser as "same origin", but its requests still carry the attacker's name
    in `Host`. /health and /metrics answer any name: Prometheus scrapes by IP address, and they
    hold no history.
    """

    OPEN_PATHS = frozenset({"/health", "/metrics"})

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...]) -> None:
        self.app = app
        self.allowed = frozenset(allowed)
        self.any = "*" in self.allowed

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or self.any or self._own(scope):
            await self.app(scope, receive, send)
            return
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        response = JSONResponse(
            {
                "detail": f"unknown Host {host[:100]!r}: this API answers to "
                f"{', '.join(sorted(self.allowed))} (STORE_API_ALLOWED_HOSTS)"
            },
            status_code=400,
        )
        await response(scope, receive, send)

    def _own(self, scope: MutableMapping[str, Any]) -> bool:
        if scope["path"] in self.OPEN_PATHS:
            return True
        host = dict(scope["headers"]).get(b"host")
        return host is not None and host_name(host.decode("latin-1")) in self.allowed


_HOST_HEADER = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[^:\[\]/@\s]+)(?::[0-9]{1,5})?$")


def host_name(header: str) -> str | None:
    """The name in a Host header, without its port, lower-cased; None if it is not one."""
    match = _HOST_HEADER.match(header)
    return match[1].lower().rstrip(".") if match else None


class RequestMetrics:
    """`betterbot_store_api_requests_total` and `_api_seconds`, by route template."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                route = _route(scope)
                metrics.API_SECONDS.labels(route).observe(time.perf_counter() - started)
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            metrics.API_REQUESTS.labels(scope["method"], _route(scope), str(status)).inc()


def _route(scope: MutableMapping[str, Any]) -> str:
    route = scope.get("route")
    return str(getattr(route, "path", "unmatched"))


def create_app(ctx: ApiContext, health: HealthCheck, max_body_bytes: int) -> FastAPI:
    app = FastAPI(
        title="BetterBot store",
        version="1",
        description=(
            "History of the order fills and signals the store kept, and the tracked wallets. "
            "Write endpoints need `Authorization: Bearer <STORE_API_TOKEN>`."
        ),
        # A redirect would answer an unauthenticated write with a 3xx pointing elsewhere
        # (`PUT /wallets/%2F` -> 307 to `/wallets`): an unknown path is a plain 404.
        redirect_slashes=False,
    )
    app.state.api = ctx
    read_guard = [Depends(require_read_token)] if ctx.read_auth else []
    app.include_router(reads, dependencies=read_guard)
    app.include_router(writes)
    app.add_exception_handler(Unavailable, unavailable)
    app.add_exception_handler(RedisError, unavailable)
    app.add_exception_handler(405, method_not_allowed)
    app.router.routes.extend(ops_routes(health))
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(HostCheck, allowed=ctx.allowed_hosts)
    app.add_middleware(RequestMetrics)
    return app
