"""Polymarket's Data API `GET /positions?user=<wallet>`: a wallet's current holdings per token.

Here the holdings are what the wallet's trades add up to: the trades of SIM_POSITIONS_TAPE (an
earlier tape: the wallet's history before the replay window) and those emitted since, BUY adds,
SELL subtracts, floored at 0 per token, in integer micro-shares (exactly as the detector counts a
position, so a position seeded from here equals the one the same fills would have made). Real
holdings also move by what is no fill (splits, merges, conversions, redemptions); the tape has
none of those.

Parameters (docs.polymarket.com, Data API `/positions`): `user` (required), `sizeThreshold`
(default 1: smaller holdings are left out), `limit` (1..500, default 100), `offset` (default 0).
Others are ignored. The answer is a bare JSON list, largest holding first, each item
`proxyWallet, asset, conditionId, size, avgPrice, initialValue, currentValue, curPrice, outcome,
title, slug` (`curPrice`: the token's last trade; `avgPrice`: the mean price of the BUYs).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.simulator.history import QueryError

MICRO = 1_000_000
LIMIT_DEFAULT, LIMIT_MAX = 100, 500


class Fill(Protocol):
    """What a trade needs for holdings: a tape template and an emitted trade both have it."""

    @property
    def user(self) -> str: ...
    @property
    def token_id(self) -> str: ...
    @property
    def condition_id(self) -> str: ...
    @property
    def token_label(self) -> str: ...
    @property
    def title(self) -> str: ...
    @property
    def market_slug(self) -> str: ...
    @property
    def side(self) -> str: ...
    @property
    def shares_normalized(self) -> float: ...
    @property
    def price(self) -> float: ...


@dataclass
class Holding:
    """One wallet's holding of one token: micro-shares, and what its BUYs cost."""

    asset: str
    condition_id: str
    outcome: str
    title: str
    slug: str
    micro: int = 0
    bought_micro: int = 0
    bought_usd: float = 0.0
    last_price: float = 0.0

    def add(self, fill: Fill) -> None:
        size = round(fill.shares_normalized * MICRO)
        if fill.side == "BUY":
            self.micro += size
            self.bought_micro += size
            self.bought_usd += fill.shares_normalized * fill.price
        else:
            self.micro = max(0, self.micro - size)


@dataclass
class Holdings:
    """Holdings of every wallet, built from trades in the order they happened."""

    by_wallet: dict[str, dict[str, Holding]] = field(default_factory=dict)
    last_price: dict[str, float] = field(default_factory=dict)

    def add(self, fills: Iterable[Fill]) -> Holdings:
        for fill in fills:
            wallet = self.by_wallet.setdefault(fill.user.lower(), {})
            holding = wallet.get(fill.token_id)
            if holding is None:
                holding = Holding(
                    fill.token_id,
                    fill.condition_id,
                    fill.token_label,
                    fill.title,
                    fill.market_slug,
                )
                wallet[fill.token_id] = holding
            holding.add(fill)
            self.last_price[fill.token_id] = fill.price
        return self

    def of(self, user: str) -> list[Holding]:
        """The wallet's holdings that are not empty, largest first."""
        held = [h for h in self.by_wallet.get(user.lower(), {}).values() if h.micro > 0]
        return sorted(held, key=lambda h: (-h.micro, h.asset))


def wallet_fills(user: str, fills: Iterable[Fill]) -> list[Fill]:
    """The wallet's fills among `fills`, in their order: all one answer needs."""
    return [fill for fill in fills if fill.user.lower() == user]


def last_prices(fills: Iterable[Fill]) -> dict[str, float]:
    """Each token's last trade price among `fills` (in their order), whoever traded it: the
    `curPrice` a holding is marked at."""
    return {fill.token_id: fill.price for fill in fills}


@dataclass(frozen=True)
class PositionsQuery:
    user: str
    size_threshold: float = 1.0
    limit: int = LIMIT_DEFAULT
    offset: int = 0


def parse_positions_query(params: Mapping[str, str]) -> PositionsQuery:
    user = (params.get("user") or "").strip().lower()
    if not user:
        raise QueryError("user is required")
    try:
        threshold = float(params.get("sizeThreshold") or 1)
        limit = int(params.get("limit") or LIMIT_DEFAULT)
        offset = int(params.get("offset") or 0)
    except ValueError:
        raise QueryError("sizeThreshold, limit and offset must be numbers") from None
    if threshold < 0 or not 1 <= limit <= LIMIT_MAX or offset < 0:
        raise QueryError(f"sizeThreshold >= 0, limit in 1..{LIMIT_MAX}, offset >= 0")
    return PositionsQuery(user, threshold, limit, offset)


def positions_page(holdings: Holdings, query: PositionsQuery) -> list[dict[str, Any]]:
    held = [h for h in holdings.of(query.user) if h.micro / MICRO >= query.size_threshold]
    page = held[query.offset : query.offset + query.limit]
    return [_item(query.user, h, holdings.last_price.get(h.asset, 0.0)) for h in page]


def _item(user: str, holding: Holding, price: float) -> dict[str, Any]:
    size = holding.micro / MICRO
    average = holding.bought_usd / (holding.bought_micro / MICRO) if holding.bought_micro else 0.0
    return {
        "proxyWallet": user,
        "asset": holding.asset,
        "conditionId": holding.condition_id,
        "size": size,
        "avgPrice": average,
        "initialValue": size * average,
        "currentValue": size * price,
        "curPrice": price,
        "outcome": holding.outcome,
        "title": holding.title,
        "slug": holding.slug,
    }
