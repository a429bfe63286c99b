"""Latency: from the simulator's send to the subscriber's receipt, per order, at a fixed rate.

The simulator emits R orders/s of tracked wallets; every one makes at least one signal (the
benchmark's rule settings). After `warmup + seconds + tail` the simulator's ground truth
(`/_sim/trades`: each trade with its `emitted_at`) is fetched, and the orders emitted inside the
window [start + warmup, start + warmup + seconds] are the expected ones. Each is joined, by
order_key (`shared.models.order_key` of the trade), with the first signal the subscriber got for
it: latency = receipt time - emitted_at, one clock, one machine.

The tail keeps the window clear of the moment the ground truth is fetched (serializing it stalls
the simulator for a moment); orders still missing after the pipeline drains are reported as such.

Besides the end-to-end figure, each signal's own stamps split it in three:
`feed` = received_at - emitted_at (simulator send queue, WebSocket, ingestor parse),
`detect` = detected_at - received_at (dedupe + XADD, XREADGROUP, rules, Lua state step),
`deliver` = receipt - detected_at (signal XADD, notifier XREAD, fan-out, WebSocket).
"""

from __future__ import annotations

import asyncio
from typing import Any

from bench.pipeline import Pipeline
from bench.stats import summary_ms
from bench.subscriber import Receipt
from shared.models import order_key

DRAIN_TIMEOUT_S = 20.0


def trade_key(trade: dict[str, Any]) -> str:
    return order_key(
        trade["tx_hash"],
        trade["user"],
        trade["token_id"],
        trade["side"],
        trade["shares_normalized"],
        trade["price"],
    )


def first_receipts(receipts: list[Receipt]) -> dict[str, Receipt]:
    firsts: dict[str, Receipt] = {}
    for receipt in receipts:
        known = firsts.get(receipt.order_key)
        if known is None or receipt.at < known.at:
            firsts[receipt.order_key] = receipt
    return firsts


def join(
    trades: list[dict[str, Any]], receipts: list[Receipt], window: tuple[float, float]
) -> dict[str, Any]:
    """Expected orders in the window, joined with their first signal; the figures."""
    low, high = window
    expected = {
        trade_key(t): float(t["emitted_at"]) for t in trades if low <= t["emitted_at"] <= high
    }
    firsts = first_receipts(receipts)
    total, feed, detect, deliver = [], [], [], []
    for key, emitted_at in expected.items():
        receipt = firsts.get(key)
        if receipt is None:
            continue
        total.append(receipt.at - emitted_at)
        feed.append(receipt.received_at - emitted_at)
        detect.append(receipt.detected_at - receipt.received_at)
        deliver.append(receipt.at - receipt.detected_at)
    return {
        "expected": len(expected),
        "received": len(total),
        "missing": len(expected) - len(total),
        "signals_in_window": sum(1 for r in receipts if r.order_key in expected),
        **summary_ms(total),
        "breakdown": {
            "feed": summary_ms(feed),
            "detect": summary_ms(detect),
            "deliver": summary_ms(deliver),
        },
    }


async def measure(
    pipe: Pipeline, rate: float, seconds: float, *, warmup_s: float = 1.0, tail_s: float = 2.0
) -> dict[str, Any]:
    pipe.subscriber.record()
    await pipe.start_feed(rate, keep_history=True)
    await asyncio.sleep(warmup_s + seconds + tail_s)
    memory = pipe.memory()
    trades = await pipe.sim_trades()
    await pipe.stop_feed()
    drained = await pipe.drained(DRAIN_TIMEOUT_S)
    receipts = pipe.subscriber.take_recording()
    start = min((t["emitted_at"] for t in trades), default=0.0)
    window = (start + warmup_s, start + warmup_s + seconds)
    result = join(trades, receipts, window)
    achieved = result["expected"] / seconds
    return {
        "rate": rate,
        "seconds": seconds,
        "emitted_per_s": round(achieved),
        **result,
        "drained": drained,
        "subscriber_closed": pipe.subscriber.closed,
        "memory": {name: vars(m) for name, m in memory.items()},
    }
