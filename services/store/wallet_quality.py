"""A wallet's quality from its real history, and the score derived from it (docs/store.md,
"Wallet quality"). Pure functions: the history is fetched by `wallet_quality_source`, stored and
refreshed by `wallet_quality_refresh`.

Inputs (Polymarket's Data API, and Gamma for resolutions):
- closed positions (`/closed-positions`: `asset, conditionId, realizedPnl, ...`): sold down to
  nothing, or redeemed after the market resolved;
- open positions (`/positions`: `asset, conditionId, size, initialValue, currentValue,
  realizedPnl, outcome, ...`); an asset listed closed as well is counted once, as closed;
- the wallet's trades (`/trades`, maker fills included): markets, volume and the two flags;
- the payouts of the resolved markets among the open positions (Gamma `closed=true`).

Figures:
- **Survivorship.** A winning position is redeemed and shows up closed; a losing one is worth 0
  and nobody redeems it, so it never does. Every open position of a *resolved* market is therefore
  decided as well: its PnL is `size x payout - initialValue`, a win when positive, a loss when
  negative. Win rate and realised PnL count them; counting closed positions alone would leave out
  nearly every loss.
- `realised_pnl`: closed positions' `realizedPnl`, plus the PnL of the open positions of resolved
  markets, plus what open positions already realised by partial sales (`realizedPnl`).
- `unrealised_pnl`: `currentValue - initialValue` of the open positions of markets not resolved.
- `wins`, `losses` (flat positions count as neither), `win_rate` = wins / (wins + losses).
- `markets_traded`: distinct condition ids over trades and positions; `trades`, `volume_usd`.
- `market_maker`: at least `MM_MIN_TRADES` trades and a round-trip share of at least
  `MM_ROUND_TRIP`: per token, the shares both bought and sold (`2 x min(bought, sold)`) over all
  shares traded. A maker quoting both sides ends with little net position; its fills say little
  about where it thinks the price goes.
- `bot`: at least `BOT_MIN_TRADES` trades and a median gap between consecutive trades of at most
  `BOT_MEDIAN_GAP_S` seconds: faster, for that long, than a person clicks.
- `score` (0..1; None when fewer than `min_decided` positions are decided: too few to judge):
  `0.5 x skill + 0.5 x profit`, where `skill` is the lower bound of the 95 % Wilson interval of
  the win rate (a wallet that won 2 of 3 is not yet known to win 67 %: 0.21) and `profit` =
  `0.5 + 0.5 x tanh((realised + unrealised) / pnl_scale_usd)` (0.5 at break-even, 0.88 at
  `+pnl_scale_usd`); halved for a market maker or a bot.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from services.store.markouts import Payouts
from services.store.validation_report import wilson

MM_MIN_TRADES = 20
MM_ROUND_TRIP = 0.6
BOT_MIN_TRADES = 30
BOT_MEDIAN_GAP_S = 10.0
FLAGGED_FACTOR = 0.5


@dataclass(frozen=True)
class WalletHistory:
    """What the Data API and Gamma said about one wallet (items as they came, checked here)."""

    closed: Sequence[Mapping[str, Any]]
    open: Sequence[Mapping[str, Any]]
    trades: Sequence[Mapping[str, Any]]
    payouts: Mapping[str, Payouts]  # condition id (lower case) -> payouts, resolved only


@dataclass(frozen=True)
class Quality:
    realised_pnl: float
    unrealised_pnl: float
    wins: int
    losses: int
    markets_traded: int
    trades: int
    volume_usd: float
    market_maker: bool
    bot: bool
    score: float | None

    @property
    def win_rate(self) -> float | None:
        decided = self.wins + self.losses
        return self.wins / decided if decided else None


@dataclass(frozen=True)
class ScoreRule:
    min_decided: int = 5
    pnl_scale_usd: float = 10_000.0


def quality_of(history: WalletHistory, rule: ScoreRule) -> Quality:
    closed_assets = {str(item.get("asset", "")) for item in history.closed}
    open_positions = [p for p in history.open if str(p.get("asset", "")) not in closed_assets]
    realised, wins, losses = 0.0, 0, 0
    for item in history.closed:
        pnl = _number(item, "realizedPnl")
        realised += pnl
        wins, losses = wins + (pnl > 0), losses + (pnl < 0)
    unrealised = 0.0
    for position in open_positions:
        realised += _number(position, "realizedPnl")
        decided = _decided_pnl(position, history.payouts)
        if decided is None:
            unrealised += _number(position, "currentValue") - _number(position, "initialValue")
            continue
        realised += decided
        wins, losses = wins + (decided > 0), losses + (decided < 0)
    markets = {str(t.get("conditionId", "")).lower() for t in history.trades}
    markets |= {str(p.get("conditionId", "")).lower() for p in [*history.closed, *history.open]}
    markets.discard("")
    partial = Quality(
        realised_pnl=realised,
        unrealised_pnl=unrealised,
        wins=wins,
        losses=losses,
        markets_traded=len(markets),
        trades=len(history.trades),
        volume_usd=sum(_number(t, "size") * _number(t, "price") for t in history.trades),
        market_maker=is_market_maker(history.trades),
        bot=is_bot(history.trades),
        score=None,
    )
    return _with_score(partial, rule)


def _decided_pnl(position: Mapping[str, Any], payouts: Mapping[str, Payouts]) -> float | None:
    """The PnL of an open position whose market resolved (None while it has not)."""
    resolved = payouts.get(str(position.get("conditionId", "")).lower())
    if resolved is None:
        return None
    payout = resolved.of(str(position.get("asset", "")), str(position.get("outcome", "")))
    if payout is None:
        return None
    return _number(position, "size") * payout - _number(position, "initialValue")


def is_market_maker(trades: Sequence[Mapping[str, Any]]) -> bool:
    if len(trades) < MM_MIN_TRADES:
        return False
    bought: dict[str, float] = {}
    sold: dict[str, float] = {}
    for trade in trades:
        side = bought if str(trade.get("side", "")).upper() == "BUY" else sold
        asset = str(trade.get("asset", ""))
        side[asset] = side.get(asset, 0.0) + _number(trade, "size")
    total = sum(bought.values()) + sum(sold.values())
    both = sum(2 * min(shares, sold.get(asset, 0.0)) for asset, shares in bought.items())
    return total > 0 and both / total >= MM_ROUND_TRIP


def is_bot(trades: Sequence[Mapping[str, Any]]) -> bool:
    if len(trades) < BOT_MIN_TRADES:
        return False
    times = sorted(_number(t, "timestamp") for t in trades)
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    return statistics.median(gaps) <= BOT_MEDIAN_GAP_S


def score_of(quality: Quality, rule: ScoreRule) -> float | None:
    decided = quality.wins + quality.losses
    if decided < max(1, rule.min_decided):
        return None
    skill = wilson(quality.wins, decided)[0]
    pnl = quality.realised_pnl + quality.unrealised_pnl
    profit = 0.5 + 0.5 * math.tanh(pnl / rule.pnl_scale_usd)
    score = 0.5 * skill + 0.5 * profit
    if quality.market_maker or quality.bot:
        score *= FLAGGED_FACTOR
    return round(min(1.0, max(0.0, score)), 4)


def _with_score(quality: Quality, rule: ScoreRule) -> Quality:
    return Quality(**{**quality.__dict__, "score": score_of(quality, rule)})


def _number(item: Mapping[str, Any], name: str) -> float:
    """A numeric field of an outside item; 0 when missing or not a finite number (the Data API
    is outside input: a string or NaN must not poison a sum)."""
    value = item.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value) if math.isfinite(value) else 0.0
