"""The detection rules: plain functions from one order fill (and its wallet) to candidate signals.

A rule returns a `Candidate`: the finished Signal plus the `Condition` under which it is emitted.
Whether a rule applies depends only on the order and the settings; what depends on state (the
wallet's position before this order) is a condition that `state.py` checks inside its atomic Lua
step, so that replicas sharing the same Redis agree and a redelivered order changes nothing twice.
`opens_position` and `next_position` say in Python exactly what the script does.

Rules (all thresholds are `RuleSettings`, from the env names in `settings.py`):

- Filters, applied to every rule: no signal when `price >= SIGNAL_MAX_PRICE` (default 0.95; a fill
  at 0.95+ buys a near-certain outcome and says little) or when `notional <
  SIGNAL_MIN_NOTIONAL_USD` (default 0). Filtered fills still move the wallet's position.
- `trader_entry`: a tracked wallet (in `WALLETS_FILE`) BUYs a token in which it held no position.
  Positions are the sum of the fills the detector has seen since tracking started (BUY adds, SELL
  subtracts, floored at 0), in micro-shares: a position held before tracking started, or built from
  fills the feed missed, is unknown to it. So the first BUY of a token after tracking starts is an
  entry, and so is the next BUY after the position went back to 0.
- `whale_order`: any fill in the feed (BUY or SELL) with `notional = shares_normalized * price >=
  WHALE_MIN_NOTIONAL_USD` (default 1000). Untracked wallets have no label and the default score.

Confidence (always in [0, 1]); `score` is the wallet's score from the wallets file, 0.5 when absent,
`T = WHALE_MIN_NOTIONAL_USD`, `n` the notional:
- entry: `clamp(0.5 * score + 0.5 * min(1, n / T))`
- whale: `clamp(0.7 * (0.6 + 0.4 * min(1, log10(n / T))) + 0.3 * score)` — the size part is 0.6
  at the threshold and 1.0 from ten times it, blended with the wallet's score.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from shared.models import (
    SHARE_DECIMALS,
    OrderFill,
    Side,
    Signal,
    SignalKind,
    TrackedWallet,
    signal_id,
)

DEFAULT_SCORE = 0.5
# Above this a fill is implausible (more shares than any market has) and its micro-shares could
# overflow Redis' 64-bit position counters; such fills are rejected before they reach the state.
MAX_SHARES = 1e11


class Condition(StrEnum):
    """When `state.py` emits a candidate, decided atomically with the order's position update."""

    ALWAYS = "always"
    # A BUY while the wallet's position in the token (before this order) is 0.
    OPENS_POSITION = "opens"


@dataclass(frozen=True)
class RuleSettings:
    whale_min_notional_usd: float = 1000.0
    signal_max_price: float = 0.95
    signal_min_notional_usd: float = 0.0


@dataclass(frozen=True)
class Candidate:
    signal: Signal
    condition: Condition

    @property
    def kind(self) -> SignalKind:
        return self.signal.kind


def micro_shares(order: OrderFill) -> int:
    """The fill's size in integer 10^-6 shares: positions add up without float drift."""
    return round(order.shares_normalized * 10**SHARE_DECIMALS)


def opens_position(side: Side, prior_micro_shares: int) -> bool:
    """The `OPENS_POSITION` condition, as `state.py`'s script applies it."""
    return side is Side.BUY and prior_micro_shares <= 0


def next_position(side: Side, prior_micro_shares: int, size_micro_shares: int) -> int:
    """The position after a fill, as the script computes it: BUY adds, SELL subtracts, floor 0."""
    delta = size_micro_shares if side is Side.BUY else -size_micro_shares
    return max(0, prior_micro_shares + delta)


def passes_filters(order: OrderFill, settings: RuleSettings) -> bool:
    """False for fills that emit no signal at all: near-certain prices and tiny notionals."""
    return (
        order.price < settings.signal_max_price
        and order.notional_usd >= settings.signal_min_notional_usd
    )


def clamp(value: float) -> float:
    return min(1.0, max(0.0, value))


def wallet_score(wallet: TrackedWallet | None) -> float:
    if wallet is None or wallet.score is None:
        return DEFAULT_SCORE
    return wallet.score


def size_factor(notional: float, threshold: float) -> float:
    """How big the fill is relative to the whale threshold, capped at 1."""
    return min(1.0, notional / threshold)


def entry_confidence(notional: float, threshold: float, score: float) -> float:
    """`clamp(0.5 * score + 0.5 * min(1, notional / threshold))`."""
    return clamp(0.5 * score + 0.5 * size_factor(notional, threshold))


def whale_magnitude(notional: float, threshold: float) -> float:
    """`min(1, log10(notional / threshold))`, and 0 below the threshold."""
    if notional <= threshold:
        return 0.0
    return min(1.0, math.log10(notional / threshold))


def whale_confidence(notional: float, threshold: float, score: float) -> float:
    """`clamp(0.7 * (0.6 + 0.4 * whale_magnitude) + 0.3 * score)`."""
    return clamp(0.7 * (0.6 + 0.4 * whale_magnitude(notional, threshold)) + 0.3 * score)


def trader_entry(
    order: OrderFill, wallet: TrackedWallet | None, settings: RuleSettings, detected_at: float
) -> Candidate | None:
    """A tracked wallet's BUY: emitted when it opens a position (`Condition.OPENS_POSITION`)."""
    if wallet is None or order.side is not Side.BUY or not passes_filters(order, settings):
        return None
    threshold = settings.whale_min_notional_usd
    score = wallet_score(wallet)
    notional = order.notional_usd
    confidence = entry_confidence(notional, threshold, score)
    reasons = [
        f"{_who(order, wallet)} opened a position: no holding in this token since tracking started",
        _fill_text(order),
        _score_text(wallet),
        f"size factor {size_factor(notional, threshold):.2f} = min(1, {_usd(notional)} / "
        f"{_usd(threshold)})",
        f"confidence {confidence:.2f} = 0.5 x score + 0.5 x size factor",
    ]
    signal = _signal(SignalKind.TRADER_ENTRY, order, wallet, confidence, reasons, detected_at)
    return Candidate(signal, Condition.OPENS_POSITION)


def whale_order(
    order: OrderFill, wallet: TrackedWallet | None, settings: RuleSettings, detected_at: float
) -> Candidate | None:
    """A fill whose notional reaches the whale threshold: always emitted."""
    threshold = settings.whale_min_notional_usd
    notional = order.notional_usd
    if notional < threshold or not passes_filters(order, settings):
        return None
    score = wallet_score(wallet)
    confidence = whale_confidence(notional, threshold, score)
    reasons = [
        f"order of {_usd(notional)} >= whale threshold {_usd(threshold)} "
        f"({notional / threshold:.1f}x)",
        f"{_who(order, wallet)}: {_fill_text(order)}",
        _score_text(wallet),
        f"confidence {confidence:.2f} = 0.7 x (0.6 + 0.4 x min(1, log10(notional / threshold))) "
        "+ 0.3 x score",
    ]
    signal = _signal(SignalKind.WHALE_ORDER, order, wallet, confidence, reasons, detected_at)
    return Candidate(signal, Condition.ALWAYS)


Rule = Callable[[OrderFill, TrackedWallet | None, RuleSettings, float], Candidate | None]

# In emission order: a whale entry lands on `signals` as whale_order, then trader_entry.
RULES: tuple[Rule, ...] = (whale_order, trader_entry)


def candidates(
    order: OrderFill, wallet: TrackedWallet | None, settings: RuleSettings, detected_at: float
) -> list[Candidate]:
    """Every rule's candidate for this order, in `RULES` order."""
    found = (rule(order, wallet, settings, detected_at) for rule in RULES)
    return [candidate for candidate in found if candidate is not None]


def _signal(
    kind: SignalKind,
    order: OrderFill,
    wallet: TrackedWallet | None,
    confidence: float,
    reasons: list[str],
    detected_at: float,
) -> Signal:
    return Signal(
        signal_id=signal_id(kind, order.order_key),
        kind=kind,
        wallet=order.user,
        wallet_label=wallet.label if wallet else "",
        market_slug=order.market_slug,
        title=order.title,
        condition_id=order.condition_id,
        token_id=order.token_id,
        token_label=order.token_label,
        side=order.side,
        price=order.price,
        shares=order.shares_normalized,
        notional_usd=order.notional_usd,
        confidence=confidence,
        reasons=reasons,
        order_keys=[order.order_key],
        source=order.source,
        exchange_ts=order.timestamp,
        received_at=order.received_at,
        detected_at=detected_at,
    )


def _who(order: OrderFill, wallet: TrackedWallet | None) -> str:
    short = f"{order.user[:6]}...{order.user[-4:]}"
    return f"{wallet.label} ({short})" if wallet and wallet.label else short


def _fill_text(order: OrderFill) -> str:
    verb = "bought" if order.side is Side.BUY else "sold"
    outcome = f" {order.token_label!r}" if order.token_label else ""
    return (
        f"{verb} {order.shares_normalized:,.2f} shares of{outcome or ' token'} "
        f"at {order.price:.3f} ({_usd(order.notional_usd)})"
    )


def _score_text(wallet: TrackedWallet | None) -> str:
    if wallet is None:
        return f"untracked wallet: score {DEFAULT_SCORE} assumed"
    if wallet.score is None:
        return f"tracked wallet without a score: {DEFAULT_SCORE} assumed"
    return f"wallet score {wallet.score:.2f}"


def _usd(amount: float) -> str:
    return f"${amount:,.0f}" if amount >= 100 else f"${amount:,.2f}"
