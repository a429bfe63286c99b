"""Pure: the history API's queries: filters -> SQL, keyset cursors, rows -> JSON and CSV.

Pages are ordered by (time, key) — `detected_at, signal_id` for signals, `exchange_ts, order_key`
for orders — newest first by default, and continue strictly after the last row of the previous
page (`(time, key) < (t, k)`), never by OFFSET. So a page boundary is a fixed point in that order:
rows inserted while a client pages through can appear on a later page (if they sort after the
boundary) or not at all (if before it), but a row already seen is never repeated and no row that
existed when the first page was read is skipped. The key breaks ties between equal times.

The cursor is opaque to clients: base64url of `[resource, order, time in µs, key]`. Microseconds,
not float seconds, so the boundary is exact (Postgres `timestamptz` has µs resolution). A cursor is
bound to its resource and order; anything else is a `CursorError` (HTTP 400).
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

import orjson

from services.store.rows import ORDERS as ORDER_ROWS
from services.store.rows import SIGNALS as SIGNAL_ROWS
from services.store.rows import STATUS_COLUMNS, Table
from shared.models import FillStatus

Order = Literal["desc", "asc"]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_KEY = re.compile(r"^[^\x00]{1,200}$")
# What encode_cursor makes of the longest key (200 four-byte characters), base64-encoded.
MAX_CURSOR_CHARS = 1200
CONDITION_ID = re.compile(r"^0x[0-9a-fA-F]{64}$")
# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


class CursorError(ValueError):
    pass


@dataclass(frozen=True)
class Resource:
    name: str  # also the cursor's tag
    table: str
    time_column: str
    key_column: str
    columns: tuple[str, ...]  # selected, in output order (JSON and CSV)
    joined: str = ""  # appended to `FROM table`: what the listing adds to the table's columns


SERVED_STATUS = ("status", "status_reason")
_NOT_SERVED = ("v", "payload", *STATUS_COLUMNS)
STATUSES = frozenset(s.value for s in FillStatus)


def served(table: Table) -> tuple[str, ...]:
    """A table's columns as the API serves them: what the store wrote, minus the schema version,
    the raw payload and the stream positions, plus when it was stored, then the status last (so
    the columns a CSV reader already knows keep their places)."""
    data = (c for c in table.columns if c not in _NOT_SERVED)
    return (*data, "stored_at", *SERVED_STATUS)


# Each signal's validation (docs/signals.md, "Does it pay? Validation"), after its status: the
# markouts net of fees, the settlement's payout and result, the fee counted; null until recorded.
# One lateral lookup per listed row on the key of `signal_validation`, so a page still reads
# its signals straight off the keyset index. The lateral exposes only these names, so the
# filters' plain column names keep meaning the signal's.
VALIDATION_COLUMNS = (
    "markout_5m_cents",
    "markout_1h_cents",
    "markout_24h_cents",
    "settlement_payout",
    "settlement_cents",
    "validation_fee_cents",
)
_VALIDATION_JOIN = """ LEFT JOIN LATERAL (
    SELECT max(v.markout_cents) FILTER (WHERE v.horizon = '5m') AS markout_5m_cents,
           max(v.markout_cents) FILTER (WHERE v.horizon = '1h') AS markout_1h_cents,
           max(v.markout_cents) FILTER (WHERE v.horizon = '24h') AS markout_24h_cents,
           max(v.price) FILTER (WHERE v.horizon = 'settlement') AS settlement_payout,
           max(v.markout_cents) FILTER (WHERE v.horizon = 'settlement') AS settlement_cents,
           max(v.fee_cents) FILTER (WHERE v.markout_cents IS NOT NULL) AS validation_fee_cents
    FROM signal_validation v WHERE v.signal_id = signals.signal_id
) AS validation ON true"""

SIGNALS = Resource(
    "signals",
    "signals",
    "detected_at",
    "signal_id",
    (*served(SIGNAL_ROWS), *VALIDATION_COLUMNS),
    _VALIDATION_JOIN,
)

ORDERS = Resource(
    "orders",
    "orders",
    "exchange_ts",
    "order_key",
    served(ORDER_ROWS),
)

_RESOURCES = {r.name: r for r in (SIGNALS, ORDERS)}


@dataclass(frozen=True)
class Cursor:
    resource: str
    order: Order
    time: datetime
    key: str


def micros(moment: datetime) -> int:
    delta = moment - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def encode_cursor(cursor: Cursor) -> str:
    raw = orjson.dumps([cursor.resource, cursor.order, micros(cursor.time), cursor.key])
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(text: str, resource: Resource, order: Order) -> Cursor:
    """The cursor's position, or `CursorError` saying what is wrong with it."""
    if len(text) > MAX_CURSOR_CHARS:
        raise CursorError("invalid cursor: too long")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        name, cursor_order, time_us, key = orjson.loads(raw)
        moment = EPOCH + timedelta(microseconds=time_us)
    except (binascii.Error, orjson.JSONDecodeError, ValueError, TypeError, OverflowError) as exc:
        raise CursorError("invalid cursor: pass back the next_cursor of a previous page") from exc
    if name not in _RESOURCES or cursor_order not in ("asc", "desc") or not isinstance(key, str):
        raise CursorError("invalid cursor: pass back the next_cursor of a previous page")
    if not _KEY.match(key) or not isinstance(time_us, int):
        raise CursorError("invalid cursor: pass back the next_cursor of a previous page")
    if name != resource.name:
        raise CursorError(f"invalid cursor: it belongs to /{name}, not /{resource.name}")
    if cursor_order != order:
        raise CursorError(
            f"invalid cursor: it was made for order={cursor_order}; keep the same order"
        )
    return Cursor(name, cursor_order, moment, key)


def market_column(market: str) -> str:
    """A condition id (0x + 64 hex) is looked up as such; anything else is a market slug."""
    return "condition_id" if CONDITION_ID.match(market) else "market_slug"


@dataclass
class Query:
    """A WHERE clause under construction, with numbered parameters."""

    conditions: list[str]
    params: list[Any]

    def add(self, template: str, *values: Any) -> None:
        """`template` has `{}` per value, replaced by the parameter's `$n`."""
        numbers = [self.param(value) for value in values]
        self.conditions.append(template.format(*numbers))

    def param(self, value: Any) -> str:
        self.params.append(value)
        return f"${len(self.params)}"


def filters(
    resource: Resource,
    *,
    wallet: str | None = None,
    market: str | None = None,
    token: str | None = None,
    kinds: Sequence[str] = (),
    since: datetime | None = None,
    until: datetime | None = None,
    min_confidence: float | None = None,
    statuses: Sequence[str] = (),
) -> Query:
    """The conditions of a listing; `since` is inclusive, `until` exclusive."""
    query = Query([], [])
    if wallet is not None:
        query.add("wallet = {}", wallet)
    if market is not None:
        column = market_column(market)
        query.add(f"{column} = {{}}", market.lower() if column == "condition_id" else market)
    if token is not None:
        query.add("token_id = {}", token)
    if kinds:
        query.add("kind = ANY({}::text[])", list(kinds))
    if since is not None:
        query.add(f"{resource.time_column} >= {{}}", since)
    if until is not None:
        query.add(f"{resource.time_column} < {{}}", until)
    if min_confidence is not None:
        query.add("confidence >= {}", min_confidence)
    if statuses and set(statuses) != STATUSES:
        if "confirmed" not in statuses:
            # Spelled out as the partial indexes' predicate, so the planner can use them with a
            # generic plan too, where the parameter's value is unknown.
            query.conditions.append("status <> 'confirmed'")
        query.add("status = ANY({}::text[])", list(statuses))
    return query


def page_sql(
    resource: Resource, query: Query, order: Order, after: Cursor | None, limit: int | None
) -> tuple[str, list[Any]]:
    """SELECT for one page (`limit` rows; None = all the rest) after the cursor, if any."""
    conditions, params = list(query.conditions), list(query.params)
    keyset = f"({resource.time_column}, {resource.key_column})"
    direction = "DESC" if order == "desc" else "ASC"
    if after is not None:
        params += [after.time, after.key]
        compare = "<" if order == "desc" else ">"
        conditions.append(f"{keyset} {compare} (${len(params) - 1}, ${len(params)})")
    sql = f"SELECT {', '.join(resource.columns)} FROM {resource.table}{resource.joined}"
    if conditions:
        sql += " WHERE " + " AND ".join(conditions)
    sql += f" ORDER BY {resource.time_column} {direction}, {resource.key_column} {direction}"
    if limit is not None:
        params.append(limit)
        sql += f" LIMIT ${len(params)}"
    return sql, params


def next_cursor(resource: Resource, order: Order, last: Mapping[str, Any]) -> str:
    return encode_cursor(
        Cursor(resource.name, order, last[resource.time_column], last[resource.key_column])
    )


def json_value(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else str(value)
    return value


def item(resource: Resource, row: Mapping[str, Any]) -> dict[str, Any]:
    return {column: json_value(row[column]) for column in resource.columns}


def csv_cell(value: Any) -> str:
    """One CSV cell. Every text cell is neutralised, not a list of columns thought to be free
    text: ids come from outside too, and rows stored before ids were checked are still served.
    Numbers, times and nulls are never text, so a negative number stays a number."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, int | float | Decimal):
        return str(json_value(value))
    cell = "; ".join(str(v) for v in value) if isinstance(value, list) else str(value)
    return "'" + cell if cell.startswith(_FORMULA_START) else cell


def csv_lines(resource: Resource, rows: Iterable[Mapping[str, Any]], header: bool) -> str:
    """CSV text for the rows (RFC 4180 quoting, CRLF), with the header line first if asked."""
    out = io.StringIO()
    writer = csv.writer(out)
    if header:
        writer.writerow(resource.columns)
    for row in rows:
        writer.writerow([csv_cell(row[c]) for c in resource.columns])
    return out.getvalue()
