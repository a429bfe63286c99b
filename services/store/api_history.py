"""`GET /signals`, `GET /orders`: the history, filtered, newest first (or `order=asc`).

JSON pages are keyset-paged (`limit` 1..1000, default 100; `next_cursor` continues; the SQL and
the cursors are `queries.py`). `format=csv` or `Accept: text/csv` gives CSV: without `limit`
every matching row is streamed (`api_export.py`); with `limit`, one page and its cursor in
`X-Next-Cursor`. A bad cursor or an empty time range is a 400. Every row carries its `status`
(`pending`, `confirmed`, `retracted`) and `status_reason`; `status=` selects by it. A signal also
carries its validation, after the status: markouts at 5m / 1h / 24h, settlement payout and
result, the fee counted (`queries.VALIDATION_COLUMNS`; the summary is `api_validation.py`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import orjson
from fastapi import Query, Request
from fastapi.exceptions import HTTPException
from pydantic import BaseModel, Field
from starlette.responses import Response

from services.store import queries
from services.store.api_context import ApiContext, Ctx, read_router
from services.store.api_export import CSV_MEDIA, stream_csv
from services.store.api_inputs import ADDRESS_PATTERN, Text, Time, Wallet
from services.store.queries import CursorError, Order, Resource
from shared.models import FillStatus, SignalKind

PAGE_DEFAULT = 100
PAGE_MAX = 1000

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
StatusQ = Annotated[
    list[FillStatus] | None,
    Query(
        description="one or more of pending, confirmed, retracted (default: all); a retracted "
        "row is a fill that did not happen (a chain reorg), or a signal drawn from one"
    ),
]
StatusField = Annotated[FillStatus, Field(description="pending, confirmed or retracted")]
ReasonField = Annotated[str, Field(description="why the status changed (empty when confirmed)")]
MarkoutField = Annotated[
    float | None,
    Field(
        description="price at the horizon - price (SELL: the reverse), ¢ per share, net of fee; "
        "null until recorded or when no price was found"
    ),
]


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
    status: StatusField
    status_reason: ReasonField
    # The signal's validation (docs/signals.md, "Does it pay? Validation"): null until recorded.
    markout_5m_cents: MarkoutField = None
    markout_1h_cents: MarkoutField = None
    markout_24h_cents: MarkoutField = None
    settlement_payout: float | None = Field(
        default=None, description="what a share paid once the market resolved: 0, 0.5 or 1"
    )
    settlement_cents: float | None = Field(
        default=None, description="payout - price (SELL: price - payout), ¢ per share, net of fee"
    )
    validation_fee_cents: float | None = Field(
        default=None, description="the taker fee counted in those figures, ¢ per share"
    )


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
    status: StatusField
    status_reason: ReasonField


class SignalPage(BaseModel):
    items: list[SignalItem]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null: last")


class OrderPage(BaseModel):
    items: list[OrderItem]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null: last")


router = read_router()

_LISTING_CONTENT = {"text/csv": {"schema": {"type": "string"}}}


@router.get(
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
    status: StatusQ = None,
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
        statuses=[s.value for s in status or ()],
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


@router.get(
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
    status: StatusQ = None,
    order: OrderQ = "desc",
    limit: LimitQ = None,
    cursor: CursorQ = None,
    format: FormatQ = None,
) -> Response:
    time_range(since, until)
    where = queries.filters(
        queries.ORDERS,
        wallet=wallet,
        market=market,
        token=token,
        since=since,
        until=until,
        statuses=[s.value for s in status or ()],
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
        return await stream_csv(ctx.db, ctx.exports, resource, sql, params, filename)
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
