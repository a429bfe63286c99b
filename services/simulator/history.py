"""Emitted trades kept in memory (bounded), and Dome's REST `GET /v1/polymarket/orders` over them.

Only trades already emitted on the simulated clock exist here, so REST never shows the future.

Query parameters (Dome's): `user`; one of `market_slug` | `condition_id` | `token_id` (more
than one is a 400); `start_time`, `end_time` (Unix seconds, inclusive); `limit` (1..1000, default
100); `offset` (default 0); `pagination_key`. Unknown parameters are ignored.

Indexing lag (a fault, see `faults.Faults.rest_lag_s`): `page(query, indexed_before=t)` leaves
out trades emitted after `t`, as a provider's REST index trails its live feed; they are neither
listed nor counted in `total` until the index holds them.

Order: newest first, i.e. by emission order descending (timestamps descend with it; trades
emitted in the same second are listed last-emitted first).

Paging: `pagination` is `{limit, offset, total, has_more, pagination_key}`; `total` counts every
order matching the filters now. `pagination_key` (opaque to clients: base64url of JSON holding the
last order's position) continues right after the last order of the previous page, so trades emitted
between two requests cause neither a gap nor a repeat; it is null when `has_more` is false. With a
key, `offset` is ignored. Plain `offset` paging is exact only while no trade is emitted between
pages (as at Dome, new trades shift offsets).
"""

from __future__ import annotations

import base64
import binascii
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from services.simulator.trades import Trade

LIMIT_DEFAULT, LIMIT_MAX = 100, 1000
MARKET_PARAMS = ("market_slug", "condition_id", "token_id")


class QueryError(ValueError):
    """A bad REST query; answered with 400 and this message."""


@dataclass(frozen=True, slots=True)
class OrdersQuery:
    user: str | None = None
    market_param: str | None = None
    market_value: str | None = None
    start_time: int | None = None
    end_time: int | None = None
    limit: int = LIMIT_DEFAULT
    offset: int = 0
    after_seq: int | None = None

    def matches(self, trade: Trade) -> bool:
        if self.user is not None and trade.user.lower() != self.user:
            return False
        if self.market_param == "market_slug" and trade.market_slug != self.market_value:
            return False
        if self.market_param == "condition_id" and trade.condition_id.lower() != self.market_value:
            return False
        if self.market_param == "token_id" and trade.token_id != self.market_value:
            return False
        if self.start_time is not None and trade.timestamp < self.start_time:
            return False
        return self.end_time is None or trade.timestamp <= self.end_time


def encode_pagination_key(seq: int, offset: int) -> str:
    return base64.urlsafe_b64encode(orjson.dumps({"seq": seq, "offset": offset})).decode()


def decode_pagination_key(key: str) -> tuple[int, int]:
    try:
        decoded = orjson.loads(base64.urlsafe_b64decode(key + "=" * (-len(key) % 4)))
    except (binascii.Error, ValueError):
        raise QueryError("pagination_key is not one this server issued") from None
    if not isinstance(decoded, dict):
        raise QueryError("pagination_key is not one this server issued")
    seq, offset = decoded.get("seq"), decoded.get("offset")
    if not (isinstance(seq, int) and isinstance(offset, int) and seq >= 0 and offset >= 0):
        raise QueryError("pagination_key is not one this server issued")
    return seq, offset


def _integer(params: Mapping[str, str], name: str, low: int, high: int | None = None) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise QueryError(f"{name} must be an integer, got {raw[:40]!r}") from None
    if value < low or (high is not None and value > high):
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        raise QueryError(f"{name} must be {bounds}, got {value}")
    return value


def parse_orders_query(params: Mapping[str, str]) -> OrdersQuery:
    given = [name for name in MARKET_PARAMS if params.get(name)]
    if len(given) > 1:
        raise QueryError(f"use at most one of market_slug, condition_id, token_id (got {given})")
    market_param = given[0] if given else None
    market_value = params[market_param] if market_param else None
    if market_param == "condition_id" and market_value is not None:
        market_value = market_value.lower()
    start_time = _integer(params, "start_time", 0)
    end_time = _integer(params, "end_time", 0)
    if start_time is not None and end_time is not None and start_time > end_time:
        raise QueryError("start_time must not be after end_time")
    limit = _integer(params, "limit", 1, LIMIT_MAX)
    offset = _integer(params, "offset", 0)
    after_seq = None
    if key := params.get("pagination_key"):
        after_seq, offset = decode_pagination_key(key)
    user = params.get("user")
    return OrdersQuery(
        user=user.lower() if user else None,
        market_param=market_param,
        market_value=market_value,
        start_time=start_time,
        end_time=end_time,
        limit=LIMIT_DEFAULT if limit is None else limit,
        offset=offset or 0,
        after_seq=after_seq,
    )


_EMPTY: deque[Trade] = deque()


class History:
    """The last `max_trades` emitted trades, indexed by wallet, condition, slug and token."""

    def __init__(self, max_trades: int) -> None:
        self.max_trades = max_trades
        self._trades: deque[Trade] = deque()
        self._by_user: dict[str, deque[Trade]] = {}
        self._by_condition: dict[str, deque[Trade]] = {}
        self._by_slug: dict[str, deque[Trade]] = {}
        self._by_token: dict[str, deque[Trade]] = {}

    def __len__(self) -> int:
        return len(self._trades)

    def _keyed(self, trade: Trade) -> Iterable[tuple[dict[str, deque[Trade]], str]]:
        return (
            (self._by_user, trade.user.lower()),
            (self._by_condition, trade.condition_id.lower()),
            (self._by_slug, trade.market_slug),
            (self._by_token, trade.token_id),
        )

    def append(self, trade: Trade) -> None:
        self._trades.append(trade)
        for index, key in self._keyed(trade):
            trades = index.get(key)
            if trades is None:
                index[key] = trades = deque()
            trades.append(trade)
        if len(self._trades) > self.max_trades:
            self._evict()

    def _evict(self) -> None:
        oldest = self._trades.popleft()
        # Every index deque is in emission order, so the evicted trade is at the left of each.
        for index, key in self._keyed(oldest):
            trades = index[key]
            trades.popleft()
            if not trades:
                del index[key]

    def trades(self, user: str | None = None) -> Sequence[Trade]:
        """Oldest first; all of them, or one wallet's."""
        if user is None:
            return self._trades
        return self._by_user.get(user.lower(), _EMPTY)

    def _candidates(self, query: OrdersQuery) -> deque[Trade]:
        options = []
        if query.user is not None:
            options.append(self._by_user.get(query.user, _EMPTY))
        if query.market_param is not None and query.market_value is not None:
            index = {
                "market_slug": self._by_slug,
                "condition_id": self._by_condition,
                "token_id": self._by_token,
            }[query.market_param]
            options.append(index.get(query.market_value, _EMPTY))
        return min(options, key=len) if options else self._trades

    def page(self, query: OrdersQuery, indexed_before: float | None = None) -> dict[str, Any]:
        """The REST response body for this query (see the module docstring); with
        `indexed_before`, trades emitted after that time are not indexed yet."""
        total, has_more = 0, False
        page: list[Trade] = []
        skip = query.offset if query.after_seq is None else 0
        for trade in reversed(self._candidates(query)):
            if indexed_before is not None and trade.emitted_at > indexed_before:
                continue
            if not query.matches(trade):
                continue
            total += 1
            if query.after_seq is not None and trade.seq >= query.after_seq:
                continue
            if skip:
                skip -= 1
            elif len(page) < query.limit:
                page.append(trade)
            else:
                has_more = True
        key = encode_pagination_key(page[-1].seq, query.offset + len(page)) if has_more else None
        return {
            "orders": [trade.order() for trade in page],
            "pagination": {
                "limit": query.limit,
                "offset": query.offset,
                "total": total,
                "has_more": has_more,
                "pagination_key": key,
            },
        }
