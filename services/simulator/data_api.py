"""Polymarket's Data API v1 `GET /trades` over the emitted trades, in the Data API's own field names
(the cursor routes `/v2/trades` and `/v2/activity` are in `data_api_v2`).

Parameters (docs.polymarket.com, Data API `/trades`): `user` (a wallet), `market` (condition ids,
comma-separated), `side` (BUY | SELL), `limit` (0..10000, default 100), `offset` (0..10000,
default 0), `takerOnly` (true | false, default true). A value past a cap is a 400, not clamped:
so a listing longer than 10,000 rows cannot be read past its 10,000th row here (there is no time
filter on v1; `/v2/trades` has one, and a cursor). Unknown parameters are ignored. The answer
is a bare JSON list, newest first.

`takerOnly`: at Polymarket the default (true) returns only the taker side of each match, so a
wallet's maker fills (`Trade.maker`: SIM_MAKER_EVERY, or `"maker": true` in `/_sim/emit`) are
missing unless asked with `takerOnly=false`.

Items carry `proxyWallet, side, asset, conditionId, size, price, timestamp, title, slug, icon,
eventSlug, outcome, outcomeIndex, name, pseudonym, bio, profileImage, profileImageOptimized,
transactionHash` (feeds.md), mapped back from the Dome order (see `tape.from_data_api` for the
forward mapping).

Quirk `unstable_ties` (`trades.Quirks`, setting SIM_UNSTABLE_TIES): nothing promises that the API
lists the trades of one second in the same order on every request, and a client paging by offset
must not depend on it. With the quirk on, each second's trades are shuffled by a seed taken from
the page asked for (offset and limit), so two pages cut through one second in different orders:
a client that pages by plain offsets sees some of that second's trades twice and others never.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

from services.simulator.history import History, QueryError
from services.simulator.trades import Quirks, Trade

LIMIT_DEFAULT, LIMIT_MAX, OFFSET_MAX = 100, 10_000, 10_000
_BOOLEANS = {"true": True, "false": False}


@dataclass(frozen=True, slots=True)
class TradesQuery:
    user: str | None = None
    markets: frozenset[str] | None = None
    side: str | None = None
    limit: int = LIMIT_DEFAULT
    offset: int = 0
    taker_only: bool = True

    def matches(self, trade: Trade) -> bool:
        if self.taker_only and trade.maker:
            return False
        if self.user is not None and trade.user.lower() != self.user:
            return False
        if self.markets is not None and trade.condition_id.lower() not in self.markets:
            return False
        return self.side is None or trade.side == self.side


def _bounded(params: Mapping[str, str], name: str, default: int, high: int) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise QueryError(f"{name} must be an integer, got {raw[:40]!r}") from None
    if not 0 <= value <= high:
        raise QueryError(f"{name} must be 0..{high}, got {value}")
    return value


def parse_trades_query(params: Mapping[str, str]) -> TradesQuery:
    taker_raw = params.get("takerOnly", "true").lower()
    if taker_raw not in _BOOLEANS:
        raise QueryError(f"takerOnly must be true or false, got {taker_raw[:20]!r}")
    side = params.get("side")
    if side is not None and side.upper() not in ("BUY", "SELL"):
        raise QueryError(f"side must be BUY or SELL, got {side[:20]!r}")
    market = params.get("market")
    user = params.get("user")
    return TradesQuery(
        user=user.lower() if user else None,
        markets=frozenset(m.strip().lower() for m in market.split(",")) if market else None,
        side=side.upper() if side else None,
        limit=_bounded(params, "limit", LIMIT_DEFAULT, LIMIT_MAX),
        offset=_bounded(params, "offset", 0, OFFSET_MAX),
        taker_only=_BOOLEANS[taker_raw],
    )


def data_api_trade(trade: Trade) -> dict[str, Any]:
    """One emitted trade as a Data API `/trades` item."""
    return {
        "proxyWallet": trade.user,
        "side": trade.side,
        "asset": trade.token_id,
        "conditionId": trade.condition_id,
        "size": trade.shares_normalized,
        "price": trade.price,
        "timestamp": trade.timestamp,
        "title": trade.title,
        "slug": trade.market_slug,
        "icon": "",
        "eventSlug": "",
        "outcome": trade.token_label,
        "outcomeIndex": 1 if trade.token_label.lower() == "no" else 0,
        "name": "",
        "pseudonym": "",
        "bio": "",
        "profileImage": "",
        "profileImageOptimized": "",
        "transactionHash": trade.tx_hash,
    }


# The quirks of each simulator, by its history: the `/trades` route hands over only the history.
_QUIRKS: WeakKeyDictionary[History, Quirks] = WeakKeyDictionary()


def use_quirks(history: History, quirks: Quirks) -> None:
    """Answer `/trades` over `history` with `quirks` (read at every request)."""
    _QUIRKS[history] = quirks


def trades_page(history: History, query: TradesQuery) -> list[dict[str, Any]]:
    """The response body: matching trades, newest first, after `offset`, at most `limit`."""
    if query.limit == 0:
        return []
    matching: Iterator[Trade] = (
        t for t in reversed(history.trades(query.user)) if query.matches(t)
    )
    quirks = _QUIRKS.get(history)
    if quirks is not None and quirks.unstable_ties:
        matching = _ties_shuffled(matching, query)
    page = itertools.islice(matching, query.offset, query.offset + query.limit)
    return [data_api_trade(trade) for trade in page]


def _ties_shuffled(trades: Iterator[Trade], query: TradesQuery) -> Iterator[Trade]:
    """The trades with each second's shuffled, in an order that depends on the page asked for."""
    for _, group in itertools.groupby(trades, key=lambda trade: trade.timestamp):
        second = list(group)
        if len(second) > 1:
            seed = f"{query.offset}|{query.limit}|{second[0].seq}"
            random.Random(seed).shuffle(second)
        yield from second
