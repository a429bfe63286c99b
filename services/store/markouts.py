"""Pure: what following a signal would have paid, in cents per share (docs/signals.md, "Does it
pay? Validation").

For a signal at price `p` (its fill's price, at its fill's exchange time `t`):
- markout at horizon `h` = `price(t + h) - p` for a BUY, `p - price(t + h)` for a SELL;
- settlement = `payout - p` (BUY) or `p - payout` (SELL), once the market has resolved;
- both times 100 (cents), minus the taker fee a follower pays to copy the fill:
  `fee = rate x p x (1 - p)` per share (Polymarket's formula, docs.polymarket.com/trading/fees),
  `rate` = `VALIDATION_FEE_BPS` / 10,000. Redeeming a resolved position costs nothing.

`price(x)` is the token's last price at or before `x`. The store reads it from a price history
(`validator.py`); a tape replay from the tape's own trades (`PriceSeries`). Resolutions come as
payouts per outcome label (`load_resolution`) or as Gamma market objects (`gamma_payouts`).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson


@dataclass(frozen=True)
class Horizon:
    label: str
    seconds: int


HORIZONS = (Horizon("5m", 300), Horizon("1h", 3600), Horizon("24h", 86_400))
SETTLEMENT = "settlement"
# Every horizon a signal is measured at, in report order.
LABELS = (*(h.label for h in HORIZONS), SETTLEMENT)
# Payouts a resolved binary market can give an outcome (a 50-50 resolution pays half).
PAYOUTS = (0.0, 0.5, 1.0)


def fee_cents(price: float, fee_bps: float) -> float:
    """The taker fee per share, in cents, of a fill at `price`."""
    return 100.0 * fee_bps / 10_000 * price * (1.0 - price)


def markout_cents(side: str, price: float, later: float, fee_bps: float) -> float:
    """What one share of a copy of the fill made by the time the token was at `later` (a later
    price, or the payout), net of the fee."""
    move = later - price if side == "BUY" else price - later
    return 100.0 * move - fee_cents(price, fee_bps)


def last_at_or_before(
    points: Sequence[tuple[int, float]], target: float
) -> tuple[int, float] | None:
    """The last `(t, price)` with `t <= target` of points sorted by `t`, or None."""
    index = bisect.bisect_right([t for t, _ in points], target)
    return points[index - 1] if index else None


class PriceSeries:
    """Every trade's price per token, in trade order: a token's price at a time is its last trade
    at or before that time (trades of one second keep the tape's order, the last one wins)."""

    def __init__(self, trades: Iterable[tuple[str, int, float]]) -> None:
        points: dict[str, list[tuple[int, float]]] = {}
        for token, ts, price in trades:
            points.setdefault(token, []).append((ts, price))
        self._times: dict[str, list[int]] = {}
        self._prices: dict[str, list[float]] = {}
        for token, series in points.items():
            series.sort(key=lambda point: point[0])  # stable: same-second trades keep their order
            self._times[token] = [t for t, _ in series]
            self._prices[token] = [p for _, p in series]

    def at(self, token: str, target: float) -> tuple[int, float] | None:
        times = self._times.get(token, [])
        index = bisect.bisect_right(times, target)
        return (times[index - 1], self._prices[token][index - 1]) if index else None


# --- resolutions ---------------------------------------------------------------------------------


class ResolutionError(ValueError):
    pass


def load_resolution(path: str | Path) -> dict[str, dict[str, float]]:
    """A resolution file (data/nobel2025_resolution.json): condition id (lower case) -> payout per
    outcome label. Raises ResolutionError naming what is wrong."""
    try:
        data = orjson.loads(Path(path).read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ResolutionError(f"resolution file {path}: {exc}") from None
    markets = data.get("markets") if isinstance(data, dict) else None
    if not isinstance(markets, list):
        raise ResolutionError(f"resolution file {path}: needs a list under 'markets'")
    resolved: dict[str, dict[str, float]] = {}
    for index, market in enumerate(markets):
        try:
            condition, payouts = _resolved_market(market)
        except (TypeError, ValueError, KeyError) as exc:
            raise ResolutionError(f"resolution file {path}, market {index}: {exc}") from None
        resolved[condition] = payouts
    return resolved


def _resolved_market(market: Any) -> tuple[str, dict[str, float]]:
    condition = market["conditionId"]
    payouts = market["payouts"]
    if not isinstance(condition, str) or not isinstance(payouts, dict) or not payouts:
        raise ValueError("needs a conditionId and payouts {outcome label: 0, 0.5 or 1}")
    checked = {str(label): float(value) for label, value in payouts.items()}
    if any(value not in PAYOUTS for value in checked.values()):
        raise ValueError(f"payouts must be 0, 0.5 or 1, got {checked}")
    return condition.lower(), checked


@dataclass(frozen=True)
class Payouts:
    """What each outcome of a resolved market pays, by token id and by outcome label."""

    by_token: Mapping[str, float]
    by_label: Mapping[str, float]

    def of(self, token_id: str, label: str) -> float | None:
        payout = self.by_token.get(token_id)
        return self.by_label.get(label) if payout is None else payout


def gamma_payouts(market: Mapping[str, Any]) -> Payouts | None:
    """The payouts of a Gamma market object, or None while it is not resolved.

    Gamma sends `outcomes`, `outcomePrices` and `clobTokenIds` as JSON text inside the JSON, in
    one order. A market counts as resolved when `closed` is true and every outcome price is a
    payout (0, 0.5 or 1): a market closed for trading before its oracle answered still shows its
    last prices, which are not what a share pays."""
    if market.get("closed") is not True:
        return None
    try:
        labels = _json_list(market.get("outcomes"))
        prices = [float(p) for p in _json_list(market.get("outcomePrices"))]
        tokens = _json_list(market.get("clobTokenIds") or "[]")
    except (TypeError, ValueError):
        return None
    if not prices or len(labels) != len(prices) or any(p not in PAYOUTS for p in prices):
        return None
    by_token = {str(t): p for t, p in zip(tokens, prices, strict=False)}
    return Payouts(by_token, {str(label): p for label, p in zip(labels, prices, strict=True)})


def _json_list(value: Any) -> list[Any]:
    parsed = orjson.loads(value) if isinstance(value, str | bytes) else value
    if not isinstance(parsed, list):
        raise ValueError("not a list")
    return parsed
