"""Polymarket's Data API v2 feeds, `GET /v2/trades` and `GET /v2/activity`, over the emitted trades.

The contract (docs.polymarket.com, "Migrating to Data API v2" and the v2 OpenAPI):
- the answer is `{"data": [rows], "pagination": {"next_cursor": str | null, "has_more": bool}}`;
  rows are snake_case (`proxy_wallet`, `condition_id`, `transaction_hash`, ...);
- paging is by cursor only: an `offset` parameter is a 400. The cursor is opaque and signed, typed
  per route (a `/v2/trades` cursor on `/v2/activity` is a 400), and carries the page size and a
  keyset anchor `(block_timestamp, sequence_id)`: the next page is the rows strictly past the
  anchor, so rows arriving meanwhile neither shift nor repeat a page, and rows of one second keep
  one order (the `unstable_ties` quirk of v1 has no effect here). Filters are sent again with it;
- `limit` 0..1000 (default 100; past the cap a 400), the first page's size;
- `start` / `end` (epoch seconds, inclusive) bound the block's time (`Trade.block_time`, which a
  timestamp quirk does not change: the row's `timestamp` may still be odd); omitted or 0, `start` is
  three years back (`start=1`: all history) and `end` now plus a day. On `/v2/trades` they are
  honoured with `user` only (the market and global shapes ignore them);
- `/v2/trades`: `user`, `condition` (aliases `condition_id`, `conditionId`), `side`, `taker_only`
  (alias `takerOnly`; default true, which hides a wallet's maker fills); newest first;
- `/v2/activity`: `user` required; `type` (comma-separated, of `ACTIVITY_TYPES`, default every type
  but TIP; the simulated world has trades only, so other types list nothing), `side`,
  `condition`, `sort_direction` (DESC default, or ASC). It lists the wallet's fills as maker and
  taker alike (no `taker_only`).

Not modelled: `filter_type` / `filter_amount` (at Polymarket the default hides fills under 0.01
shares, and 0 means the same), `event_id`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from services.simulator.data_api import data_api_trade
from services.simulator.history import History, QueryError
from services.simulator.trades import Trade

TRADES, ACTIVITY = "trades", "activity"
LIMIT_DEFAULT, LIMIT_MAX = 100, 1000
THREE_YEARS_S = 3 * 365 * 86_400
DAY_S = 86_400
ACTIVITY_TYPES = frozenset(
    {
        "TRADE", "SPLIT", "MERGE", "REDEEM", "CONVERSION", "MIGRATION", "REWARD", "YIELD",
        "MAKER_REBATE", "TAKER_REBATE", "REFERRAL_REWARD", "DEPOSIT", "WITHDRAWAL", "TIP",
    }
)  # fmt: skip
_BOOLEANS = {"true": True, "false": False}
# Signs cursors, so a client cannot forge an anchor (new every process, as a server's key rotates).
_CURSOR_KEY = secrets.token_bytes(16)


@dataclass(frozen=True, slots=True)
class FeedQuery:
    route: str
    user: str | None
    markets: frozenset[str] | None
    side: str | None
    start: int | None
    end: int | None
    limit: int
    anchor: tuple[int, int] | None = None
    ascending: bool = False
    taker_only: bool = True
    trades_listed: bool = True  # /v2/activity: whether the types asked include TRADE

    def matches(self, trade: Trade) -> bool:
        if not self.trades_listed or (self.taker_only and trade.maker):
            return False
        if self.user is not None and trade.user.lower() != self.user:
            return False
        if self.markets is not None and trade.condition_id.lower() not in self.markets:
            return False
        if self.side is not None and trade.side != self.side:
            return False
        return (self.start is None or trade.block_time >= self.start) and (
            self.end is None or trade.block_time <= self.end
        )

    def past_anchor(self, trade: Trade) -> bool:
        if self.anchor is None:
            return True
        key = (trade.block_time, trade.seq)
        return key > self.anchor if self.ascending else key < self.anchor


def encode_cursor(route: str, anchor: Trade, limit: int, ascending: bool) -> str:
    payload = orjson.dumps(
        {"r": route, "t": anchor.block_time, "s": anchor.seq, "n": limit, "a": ascending}
    )
    signature = hmac.new(_CURSOR_KEY, payload, hashlib.sha256).digest()[:12]
    return base64.urlsafe_b64encode(payload + signature).decode().rstrip("=")


def decode_cursor(route: str, cursor: str) -> tuple[tuple[int, int], int, bool]:
    """The anchor, page size and direction of a cursor this server issued for `route`."""
    bad = QueryError(f"cursor is not one this server issued for /v2/{route}")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except (binascii.Error, ValueError):
        raise bad from None
    payload, signature = raw[:-12], raw[-12:]
    expected = hmac.new(_CURSOR_KEY, payload, hashlib.sha256).digest()[:12]
    if len(raw) <= 12 or not hmac.compare_digest(signature, expected):
        raise bad
    fields = orjson.loads(payload)
    if fields.get("r") != route:
        raise bad
    return (fields["t"], fields["s"]), fields["n"], fields["a"]


def _integer(params: Mapping[str, str], name: str, high: int | None = None) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise QueryError(f"{name} must be an integer, got {raw[:40]!r}") from None
    if value < 0 or (high is not None and value > high):
        raise QueryError(f"{name} must be 0..{high if high is not None else 'any'}, got {value}")
    return value


def _window(params: Mapping[str, str], now: float) -> tuple[int, int]:
    start, end = _integer(params, "start"), _integer(params, "end")
    return (start or int(now) - THREE_YEARS_S, end or int(now) + DAY_S)


def _common(params: Mapping[str, str], route: str) -> dict[str, Any]:
    if "offset" in params:
        raise QueryError(f"/v2/{route} pages by cursor only: offset is not accepted")
    side = params.get("side")
    if side is not None and side.upper() not in ("BUY", "SELL"):
        raise QueryError(f"side must be BUY or SELL, got {side[:20]!r}")
    market = params.get("condition") or params.get("condition_id") or params.get("conditionId")
    user = params.get("user")
    fields: dict[str, Any] = {
        "route": route,
        "user": user.lower() if user else None,
        "markets": frozenset(m.strip().lower() for m in market.split(",")) if market else None,
        "side": side.upper() if side else None,
        "limit": _integer(params, "limit", LIMIT_MAX) or LIMIT_DEFAULT,
    }
    if cursor := params.get("cursor"):
        fields["anchor"], fields["limit"], fields["ascending"] = decode_cursor(route, cursor)
    return fields


def parse_trades_query(params: Mapping[str, str], now: float | None = None) -> FeedQuery:
    fields = _common(params, TRADES)
    raw = params.get("taker_only", params.get("takerOnly", "true")).lower()
    if raw not in _BOOLEANS:
        raise QueryError(f"taker_only must be true or false, got {raw[:20]!r}")
    if fields["user"] is not None:  # the window is honoured on the user shape only
        fields["start"], fields["end"] = _window(params, time.time() if now is None else now)
    else:
        fields["start"] = fields["end"] = None
    return FeedQuery(**fields, taker_only=_BOOLEANS[raw])


def parse_activity_query(params: Mapping[str, str], now: float | None = None) -> FeedQuery:
    fields = _common(params, ACTIVITY)
    if fields["user"] is None:
        raise QueryError("/v2/activity needs user")
    types = {t.strip().upper() for t in params.get("type", "").split(",") if t.strip()}
    if unknown := types - ACTIVITY_TYPES:
        raise QueryError(f"type must be among {sorted(ACTIVITY_TYPES)}, got {sorted(unknown)}")
    direction = params.get("sort_direction", "DESC").upper()
    if direction not in ("ASC", "DESC"):
        raise QueryError(f"sort_direction must be ASC or DESC, got {direction[:20]!r}")
    if "anchor" not in fields:  # a cursor keeps the direction it was minted under
        fields["ascending"] = direction == "ASC"
    fields["start"], fields["end"] = _window(params, time.time() if now is None else now)
    return FeedQuery(**fields, taker_only=False, trades_listed=not types or "TRADE" in types)


def feed_page(history: History, query: FeedQuery) -> dict[str, Any]:
    """The response body: matching rows past the cursor's anchor, in keyset order."""
    rows = sorted(
        (t for t in _candidates(history, query) if query.matches(t) and query.past_anchor(t)),
        key=lambda t: (t.block_time, t.seq),
        reverse=not query.ascending,
    )
    page, more = rows[: query.limit], len(rows) > query.limit
    cursor = encode_cursor(query.route, page[-1], query.limit, query.ascending) if more else None
    row = trade_row if query.route == TRADES else activity_row
    return {
        "data": [row(trade) for trade in page],
        "pagination": {"next_cursor": cursor, "has_more": more and bool(page)},
    }


def _candidates(history: History, query: FeedQuery) -> Sequence[Trade]:
    return history.trades(query.user) if query.user is not None else history.trades()


def trade_row(trade: Trade) -> dict[str, Any]:
    """One emitted trade as a `/v2/trades` row: the v1 item's fields in snake_case."""
    return {_snake(name): value for name, value in data_api_trade(trade).items()}


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


def activity_row(trade: Trade) -> dict[str, Any]:
    """One emitted trade as a `/v2/activity` row of type TRADE."""
    row = trade_row(trade)
    row["type"] = "TRADE"
    row["usdc_size"] = round(trade.shares_normalized * trade.price, 6)
    return row
