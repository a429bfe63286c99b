"""Seeded random trades for load tests and demos: tracked wallets trading a few synthetic markets.

Every field except the emission times is a pure function of the seed and the trade's position, so
two runs with the same seed emit the same trades. Prices follow a random walk per market (the Yes
price; No trades at 1 - Yes), on a 0.001 tick within 0.01..0.99; sizes are log-normal around
50 shares with an occasional whale order 20-100 times larger.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from services.simulator.tape import Scheduled
from services.simulator.trades import TradeTemplate, raw_shares, sha256_hex, synthetic_order_hash

PRICE_MIN, PRICE_MAX = 0.01, 0.99
_TOPICS = (
    ("will-the-fed-cut-rates-in-june", "Will the Fed cut rates in June?"),
    ("btc-above-150k-by-year-end", "Will Bitcoin be above $150,000 on December 31?"),
    ("eth-etf-net-inflows-this-week", "Will ETH ETFs see net inflows this week?"),
    ("who-wins-the-champions-league", "Will Arsenal win the Champions League?"),
    ("recession-declared-this-year", "Will a US recession be declared this year?"),
)
_WHALE_CHANCE = 0.02
_BUY_CHANCE = 0.55


@dataclass
class SyntheticMarket:
    slug: str
    title: str
    condition_id: str
    yes_token: str
    no_token: str
    yes_price: float


def _token_id(rng: random.Random) -> str:
    # Real CLOB token ids are 256-bit integers written in decimal (77-78 digits).
    return str(rng.getrandbits(256) | (1 << 255))


def make_markets(rng: random.Random) -> list[SyntheticMarket]:
    return [
        SyntheticMarket(
            slug=slug,
            title=title,
            condition_id="0x" + f"{rng.getrandbits(256):064x}",
            yes_token=_token_id(rng),
            no_token=_token_id(rng),
            yes_price=round(rng.uniform(0.1, 0.9), 3),
        )
        for slug, title in _TOPICS
    ]


def _clamp_price(price: float) -> float:
    return min(PRICE_MAX, max(PRICE_MIN, round(price, 3)))


class SyntheticTrades:
    """An endless, seeded stream of trade templates by `wallets` (lower-case 0x addresses)."""

    def __init__(self, wallets: Sequence[str], seed: int) -> None:
        if not wallets:
            raise ValueError("synthetic mode needs at least one wallet")
        self._wallets = [w.lower() for w in wallets]
        self._seed = seed
        self._rng = random.Random(seed)
        self.markets = make_markets(self._rng)
        self._count = 0

    def __iter__(self) -> Iterator[TradeTemplate]:
        return self

    def __next__(self) -> TradeTemplate:
        rng = self._rng
        market = rng.choice(self.markets)
        market.yes_price = _clamp_price(market.yes_price + rng.gauss(0, 0.01))
        if rng.random() < 0.5:
            token_id, label, price = market.yes_token, "Yes", market.yes_price
        else:
            token_id, label, price = market.no_token, "No", _clamp_price(1 - market.yes_price)
        size = rng.lognormvariate(math.log(50), 1.0)
        if rng.random() < _WHALE_CHANCE:
            size *= rng.uniform(20, 100)
        shares = raw_shares(max(1.0, round(size, 2)))
        side = "BUY" if rng.random() < _BUY_CHANCE else "SELL"
        user = rng.choice(self._wallets)
        tx_hash = sha256_hex(f"synthetic|{self._seed}|{self._count}")
        self._count += 1
        return TradeTemplate(
            token_id=token_id,
            token_label=label,
            side=side,
            market_slug=market.slug,
            condition_id=market.condition_id,
            shares=shares,
            shares_normalized=shares / 1_000_000,
            price=price,
            tx_hash=tx_hash,
            title=market.title,
            order_hash=synthetic_order_hash(tx_hash, user, token_id, side, shares),
            user=user,
        )


def rate_schedule(trades: Iterator[TradeTemplate], rate: float) -> Iterator[Scheduled]:
    """Trade n is due n / rate seconds after the start: absolute times, so pacing never drifts."""
    for n, template in enumerate(trades):
        yield n / rate, template, 0
