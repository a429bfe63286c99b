"""Pre-built inputs for the stage and ceiling measurements, made before any clock starts.

Every order is a fill of a tracked wallet (from `config/wallets.example.json`) with a unique tx
hash derived from `salt`, so each scenario's orders are new to the dedupe and detector state.
Prices stay within 0.05..0.90 and sizes vary, as the synthetic feed's do; with the benchmark's
rule settings every one of them makes at least one signal.
"""

from __future__ import annotations

import hashlib
import random
import time
from typing import Any

import orjson

from bench.environment import WALLETS_FILE
from shared.models import DomeOrder, OrderFill, Signal, SignalKind, Source, signal_id
from shared.wallets import load_wallets

TOKENS = [str((1 << 255) | (n * 7919)) for n in range(1, 11)]
HOT_MARKET = "0x" + "b" * 64
# The detector's realistic workload: the tracked wallets spread over many markets, as elite
# traders are; its contention case is every order in one market (`markets=1`).
SPREAD_MARKETS = 1000


def _market(rng: random.Random, markets: int) -> tuple[str, str]:
    """(condition_id, token_id): the hot market's 10 tokens, or one of 2 tokens of `markets`."""
    if markets == 1:
        return HOT_MARKET, rng.choice(TOKENS)
    n = rng.randrange(markets)
    condition = "0x" + hashlib.sha256(f"market|{n}".encode()).hexdigest()
    return condition, str((1 << 255) | (2 * n + rng.randrange(2)))


def tracked_addresses() -> list[str]:
    return [wallet.address for wallet in load_wallets(WALLETS_FILE)]


def dome_orders(count: int, salt: str, markets: int = 1) -> list[dict[str, Any]]:
    """Dome-shaped order dicts (the `data` of a WebSocket event), over `markets` markets."""
    rng = random.Random(salt)
    wallets = tracked_addresses()
    now = int(time.time())
    orders = []
    for n in range(count):
        shares = round(rng.lognormvariate(3.9, 1.0), 2) + 1
        tx_hash = "0x" + hashlib.sha256(f"{salt}|{n}".encode()).hexdigest()
        condition, token = _market(rng, markets)
        orders.append(
            {
                "token_id": token,
                "token_label": "Yes",
                "side": "BUY" if rng.random() < 0.55 else "SELL",
                "market_slug": "bench-market",
                "condition_id": condition,
                "shares": round(shares * 1_000_000),
                "shares_normalized": shares,
                "price": round(rng.uniform(0.05, 0.9), 3),
                "block_number": 77_000_000 + n // 50,
                "log_index": n % 50,
                "tx_hash": tx_hash,
                "title": "Benchmark market",
                "timestamp": now,
                "order_hash": "0x" + hashlib.sha256(f"order|{salt}|{n}".encode()).hexdigest(),
                "user": wallets[n % len(wallets)],
                "taker": "0x4bfb41d5b3570defd03c39a9a4d8de6bd8b8982e",
            }
        )
    return orders


def event_frames(orders: list[dict[str, Any]]) -> list[bytes]:
    """The WebSocket frames Dome (and the simulator) would send for these orders."""
    return [
        orjson.dumps({"type": "event", "subscription_id": "sub_bench", "data": order})
        for order in orders
    ]


def order_fills(orders: list[dict[str, Any]]) -> list[OrderFill]:
    received_at = time.time()
    return [
        OrderFill.from_dome(DomeOrder.model_validate(order), Source.DOME_WS, received_at)
        for order in orders
    ]


def fill_payloads(fills: list[OrderFill]) -> list[bytes]:
    """`orders.raw` entry payloads (the `data` field), as the ingestor writes them."""
    return [orjson.dumps(fill.model_dump(mode="json")) for fill in fills]


def signal_payloads(fills: list[OrderFill]) -> list[bytes]:
    """`signals` entry payloads: one whale_order per fill, as the detector would write it."""
    now = time.time()
    payloads = []
    for fill in fills:
        signal = Signal(
            signal_id=signal_id(SignalKind.WHALE_ORDER, fill.order_key),
            kind=SignalKind.WHALE_ORDER,
            wallet=fill.user,
            market_slug=fill.market_slug,
            title=fill.title,
            condition_id=fill.condition_id,
            token_id=fill.token_id,
            token_label=fill.token_label,
            side=fill.side,
            price=fill.price,
            shares=fill.shares_normalized,
            notional_usd=fill.notional_usd,
            confidence=0.8,
            reasons=["benchmark fill"],
            order_keys=[fill.order_key],
            source=fill.source,
            exchange_ts=fill.timestamp,
            received_at=fill.received_at,
            detected_at=now,
        )
        payloads.append(orjson.dumps(signal.model_dump(mode="json")))
    return payloads
