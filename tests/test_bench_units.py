"""The benchmark's pure parts: statistics, the latency join, the sustain verdict, the subscriber's
message parsing, the profile summary and the goals. The benchmark itself runs with `make bench`."""

from __future__ import annotations

import math

import orjson

from bench.latency import join, trade_key
from bench.profiling import package_of, summarise
from bench.report import add_ratios, goals
from bench.stats import percentile, slope, summary_ms
from bench.subscriber import parse_tail, signal_tail
from bench.throughput import verdict
from services.notifier.protocol import signal_message
from tests.helpers.notifier import make_signal


def test_percentile_is_nearest_rank() -> None:
    values = [float(n) for n in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 99.9) == 100
    assert percentile(values, 0) == 1
    assert math.isnan(percentile([], 50))


def test_summary_in_milliseconds() -> None:
    assert summary_ms([0.002, 0.001, 0.003]) == {
        "p50_ms": 2.0,
        "p99_ms": 3.0,
        "p999_ms": 3.0,
        "max_ms": 3.0,
    }
    assert summary_ms([])["p99_ms"] is None


def test_slope_of_a_line() -> None:
    assert slope([(t, 3 * t + 1) for t in range(10)]) == 3
    assert slope([(1.0, 5.0)]) == 0


def test_verdict_names_the_reason() -> None:
    even = {"ingestor": 10, "detector": 20, "store": 0, "notifier": 5}
    flat = dict.fromkeys(even, 0.0)
    rates = {"emitted": 5000.0}
    assert verdict(5000, rates, flat, even) == (True, "sustained")
    ok, why = verdict(5000, {"emitted": 4000.0}, flat, even)
    assert not ok and "feed emitted only 4,000/s" in why and "lag" not in why
    ok, why = verdict(5000, rates, {**flat, "detector": 900.0}, {**even, "detector": 9000})
    assert not ok and why == "lag growing: detector +900/s (at 9,000)"
    # A backlog that grew a little but ended small is noise, not lag.
    assert verdict(5000, rates, {**flat, "store": 900.0}, even)[0]


def _trade(n: int, emitted_at: float) -> dict[str, object]:
    return {
        "tx_hash": f"0x{n:064x}",
        "user": "0x" + "a" * 40,
        "token_id": "7",
        "side": "BUY",
        "shares_normalized": 10.0,
        "price": 0.5,
        "emitted_at": emitted_at,
    }


def test_latency_join_by_order_key() -> None:
    from bench.subscriber import Receipt

    trades = [_trade(n, 100.0 + n) for n in range(4)]
    keys = [trade_key(t) for t in trades]
    receipts = [
        Receipt(101.010, keys[1], 101.001, 101.005),
        Receipt(101.500, keys[1], 101.001, 101.005),  # a second signal for the same order
        Receipt(102.020, keys[2], 102.002, 102.010),
        Receipt(100.300, keys[0], 100.1, 100.2),  # outside the window
    ]
    result = join(trades, receipts, (101.0, 103.0))
    assert (result["expected"], result["received"], result["missing"]) == (3, 2, 1)
    assert result["signals_in_window"] == 3
    assert result["p50_ms"] == 10.0 and result["max_ms"] == 20.0
    assert result["breakdown"]["feed"]["max_ms"] == 2.0


def test_subscriber_reads_the_notifier_message() -> None:
    signal = make_signal(3)
    message = signal_message("1-0", orjson.dumps(signal.model_dump(mode="json"))).encode()
    receipt = parse_tail(123.0, signal_tail(message))
    assert receipt is not None
    assert receipt.order_key == signal.order_keys[0]
    assert receipt.detected_at == signal.detected_at
    assert receipt.received_at == signal.received_at
    assert parse_tail(1.0, b"not json") is None


def test_profile_summary() -> None:
    collapsed = "\n".join(
        [
            "main (services/store/main.py:10);store (services/store/batches.py:5);"
            "write (/usr/lib/python3.11/asyncio/selector_events.py:1) 30",
            "main (services/store/main.py:10);prepare (services/store/rows.py:9) 10",
        ]
    )
    text = summarise(collapsed)
    assert text.startswith("40 samples")
    assert "75.0%  write (/usr/lib/python3.11/asyncio/selector_events.py)" in text
    assert "75.0%  store (services/store/batches.py)" in text
    assert "main (services/store/main.py)" not in text.split("inclusive")[1]
    assert package_of("x (/v/lib/python3.11/site-packages/redis/connection.py)") == "redis"
    assert package_of("x (services/detector/rules.py)") == "services/detector"
    assert summarise("").startswith("no samples")


def test_goals_and_ratios() -> None:
    results = {
        "ceilings": {"xadd_per_s": 100_000, "readgroup_ack_per_s": 80_000, "copy_rows_per_s": 40},
        "latency": [
            {"rate": 1000, "p99_ms": 8.0, "missing": 0, "received": 10, "expected": 10},
            {"rate": 5000, "p99_ms": 40.0, "missing": 1, "received": 9, "expected": 10},
        ],
        "pipeline": {"max_sustained_rate": 20_000, "steps": []},
        "stages": [
            {"stage": "detector", "replicas": 1, "per_s": 40_000, "ceiling": "readgroup_ack"},
            {"stage": "detector", "replicas": 2, "per_s": 30_000, "ceiling": "readgroup_ack"},
        ],
        "memory": {"steady": {"store": {"rss_mb": 160.0}, "simulator": {"rss_mb": 500.0}}},
    }
    add_ratios(results)
    assert results["stages"][0]["ratio"] == 0.5
    assert results["pipeline"]["ratio"] == 0.25
    met = [g["met"] for g in goals(results)]
    # 1k latency met; 5k missed an order; 20k sustained; 0.5 ratio; no rise; store too big.
    assert met == [True, False, True, True, False, False]
