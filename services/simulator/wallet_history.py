"""Polymarket's Data API `/closed-positions` and `/v1/leaderboard`, computed from the emitted trades
(the tape so far, plus what tests emit) and the resolution file (SIM_RESOLUTION).

Each wallet's holding of each token is followed in trade order at its average cost: a BUY adds
shares and cost; a SELL realises `shares x (price - average cost)` on the shares held (a sale of
more than the tape shows bought realises only what was held: the rest has no known cost). A
resolved market pays each share its payout.

`/closed-positions?user=` (Polymarket's fields: `proxyWallet, asset, conditionId, avgPrice,
totalBought, realizedPnl, curPrice, timestamp, title, slug, outcome, outcomeIndex,
oppositeOutcome, oppositeAsset, eventSlug, endDate, icon`): the holdings sold down to nothing, and
those of a resolved market that paid (redeemed). As at Polymarket, a losing holding of a resolved
market is never redeemed and so is *not* listed: it stays a position worth 0 (`/positions`).
`limit` 0..50 (default 10), `offset` 0..100000, `sortBy` REALIZEDPNL (default) | TIMESTAMP |
TITLE | PRICE | AVGPRICE, `sortDirection` DESC (default) | ASC.

`/v1/leaderboard` (`rank, proxyWallet, userName, vol, pnl, profileImage, xUsername,
verifiedBadge`): every wallet over the trades of the `timePeriod` (DAY | WEEK | MONTH | ALL,
default DAY, counted back from the newest trade, the simulator's "now"), `pnl` = realised plus the
open holdings marked at their payout (resolved) or the token's last price, `vol` = the USDC traded.
`orderBy` PNL (default) | VOL, `category` OVERALL (default) or a tag slug of the markets
(SIM_TAGS: `POLITICS` matches markets tagged `politics`), `limit` 1..50 (default 25), `offset`
0..1000. Unknown values are a 400, as Polymarket answers them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.simulator.gamma import TagBook
from services.simulator.history import QueryError
from services.simulator.trades import Trade

EMPTY = 1e-6  # shares: below this a holding is gone (float dust of partial sales)
PERIODS = {"DAY": 86_400, "WEEK": 7 * 86_400, "MONTH": 30 * 86_400, "ALL": None}
ORDER_BY = ("PNL", "VOL")
CLOSED_SORT = ("REALIZEDPNL", "TIMESTAMP", "TITLE", "PRICE", "AVGPRICE")
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_CATEGORY = re.compile(r"^[A-Za-z_-]{1,40}$")

Payouts = Mapping[str, Mapping[str, float]]


@dataclass
class Holding:
    """One wallet's holding of one token, at average cost."""

    trade: Trade
    shares: float = 0.0
    cost: float = 0.0
    bought_shares: float = 0.0
    bought_usd: float = 0.0
    realised: float = 0.0
    sold: bool = False
    last_ts: int = 0
    volume: float = 0.0

    def apply(self, trade: Trade) -> None:
        size, price = trade.shares_normalized, trade.price
        self.volume += size * price
        self.last_ts = trade.timestamp
        if trade.side == "BUY":
            self.shares += size
            self.cost += size * price
            self.bought_shares += size
            self.bought_usd += size * price
            return
        held = min(size, self.shares)
        average = self.cost / self.shares if self.shares > 0 else 0.0
        self.realised += held * (price - average)
        self.shares -= held
        self.cost -= held * average
        self.sold = True

    @property
    def avg_price(self) -> float:
        return self.bought_usd / self.bought_shares if self.bought_shares else 0.0


@dataclass
class Book:
    """Every holding built from a run of trades, and each token's last price."""

    holdings: dict[tuple[str, str], Holding] = field(default_factory=dict)
    last_price: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, trades: Iterable[Trade]) -> Book:
        book = cls()
        for trade in trades:
            key = (trade.user.lower(), trade.token_id)
            holding = book.holdings.setdefault(key, Holding(trade))
            holding.apply(trade)
            book.last_price[trade.token_id] = trade.price
        return book


def payout_of(holding: Holding, resolution: Payouts) -> float | None:
    payouts = resolution.get(holding.trade.condition_id.lower())
    if payouts is None:
        return None
    return float(payouts.get(holding.trade.token_label, 0.0))


def closed_positions(
    trades: Sequence[Trade], resolution: Payouts, params: Mapping[str, str]
) -> list[dict[str, Any]]:
    """The `/closed-positions` answer for `params` (QueryError for a bad query)."""
    user = _user(params)
    limit = _integer(params, "limit", 10, 0, 50)
    offset = _integer(params, "offset", 0, 0, 100_000)
    sort_by = _choice(params, "sortBy", "REALIZEDPNL", CLOSED_SORT)
    descending = _choice(params, "sortDirection", "DESC", ("DESC", "ASC")) == "DESC"
    book = Book.of(trades)
    rows = [
        _closed_row(h, payout_of(h, resolution), book)
        for (owner, _), h in book.holdings.items()
        if owner == user
    ]
    closed = [row for row in rows if row is not None]
    closed.sort(key=lambda row: _sort_key(row, sort_by), reverse=descending)
    return closed[offset : offset + limit]


def _closed_row(holding: Holding, payout: float | None, book: Book) -> dict[str, Any] | None:
    trade = holding.trade
    realised = holding.realised
    cur_price = book.last_price.get(trade.token_id, trade.price)
    if holding.shares > EMPTY:
        if not payout:
            return None  # still held, or a loser never redeemed: not a closed position
        # A winner redeemed: each share paid `payout`.
        realised += holding.shares * payout - holding.cost
        cur_price = payout
    elif not holding.sold:
        return None
    elif payout is not None:
        cur_price = payout
    return {
        "proxyWallet": trade.user.lower(),
        "asset": trade.token_id,
        "conditionId": trade.condition_id,
        "avgPrice": holding.avg_price,
        "totalBought": holding.bought_shares,
        "realizedPnl": realised,
        "curPrice": cur_price,
        "timestamp": holding.last_ts,
        "title": trade.title,
        "slug": trade.market_slug,
        "icon": "",
        "eventSlug": "",
        "outcome": trade.token_label,
        "outcomeIndex": 0 if trade.token_label == "Yes" else 1,
        "oppositeOutcome": "No" if trade.token_label == "Yes" else "Yes",
        "oppositeAsset": "",
        "endDate": "",
    }


def _sort_key(row: Mapping[str, Any], sort_by: str) -> Any:
    field_of = {
        "REALIZEDPNL": "realizedPnl",
        "TIMESTAMP": "timestamp",
        "TITLE": "title",
        "PRICE": "curPrice",
        "AVGPRICE": "avgPrice",
    }
    return (row[field_of[sort_by]], row["asset"])


def leaderboard(
    trades: Sequence[Trade], resolution: Payouts, tags: TagBook, params: Mapping[str, str]
) -> list[dict[str, Any]]:
    """The `/v1/leaderboard` answer for `params` (QueryError for a bad query)."""
    period = _choice(params, "timePeriod", "DAY", tuple(PERIODS))
    order_by = _choice(params, "orderBy", "PNL", ORDER_BY)
    category = params.get("category", "OVERALL").strip()
    if not _CATEGORY.match(category):
        raise QueryError("category must be a category name such as OVERALL or POLITICS")
    limit = _integer(params, "limit", 25, 1, 50)
    offset = _integer(params, "offset", 0, 0, 1000)
    window = _in_window(trades, PERIODS[period])
    if category.upper() != "OVERALL":
        window = [t for t in window if _tagged(t.market_slug, category.lower(), tags)]
    book = Book.of(window)
    totals: dict[str, list[float]] = {}
    for (owner, _), holding in book.holdings.items():
        pnl_vol = totals.setdefault(owner, [0.0, 0.0])
        pnl_vol[0] += _pnl(holding, payout_of(holding, resolution), book)
        pnl_vol[1] += holding.volume
    column = 0 if order_by == "PNL" else 1
    ranked = sorted(totals.items(), key=lambda item: (-item[1][column], item[0]))
    return [
        {
            "rank": str(rank),
            "proxyWallet": owner,
            "userName": "",
            "vol": round(pnl_vol[1], 6),
            "pnl": round(pnl_vol[0], 6),
            "profileImage": "",
            "xUsername": "",
            "verifiedBadge": False,
        }
        for rank, (owner, pnl_vol) in enumerate(ranked, start=1)
    ][offset : offset + limit]


def _pnl(holding: Holding, payout: float | None, book: Book) -> float:
    mark = payout if payout is not None else book.last_price.get(holding.trade.token_id, 0.0)
    return holding.realised + holding.shares * mark - holding.cost


def _in_window(trades: Sequence[Trade], seconds: int | None) -> list[Trade]:
    if seconds is None or not trades:
        return list(trades)
    now = max(t.timestamp for t in trades)
    return [t for t in trades if t.timestamp > now - seconds]


def _tagged(slug: str, category: str, tags: TagBook) -> bool:
    return any(t["slug"].lower() == category for t in tags.get("", []) + tags.get(slug, []))


def _user(params: Mapping[str, str]) -> str:
    user = params.get("user", "")
    if not _ADDRESS.match(user):
        raise QueryError("user must be a 0x address of 40 hex digits")
    return user.lower()


def _integer(params: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise QueryError(f"{name} must be an integer") from None
    if not low <= value <= high:
        raise QueryError(f"{name} must be {low}..{high}")
    return value


def _choice(params: Mapping[str, str], name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = params.get(name, default).upper()
    if value not in allowed:
        raise QueryError(f"{name} must be one of {', '.join(allowed)}")
    return value
