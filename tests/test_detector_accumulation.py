"""Accumulation and distribution: a tracked wallet's small fills of one token and side that add
up to ACCUMULATION_MIN_NOTIONAL_USD within ACCUMULATION_WINDOW_S, in at least
ACCUMULATION_MIN_FILLS fills, give one signal listing them (defaults: $500, 30 min, 3 fills)."""

from __future__ import annotations

import pytest

from services.detector import rules
from services.detector.rules import RuleSettings, WalletMarketState
from services.detector.serial import SerialDetector
from shared.models import FillStatus, OrderFill, SignalKind, signal_id
from tests.test_detector_informative import MARKET, TS, UNTRACKED, W, fill, kinds

WALLET = W[0].address
DEFAULTS = RuleSettings()


def flows(detector: SerialDetector, wallet: str = WALLET) -> int:
    unit = detector.states.get(rules.wallet_unit(wallet, MARKET))
    assert unit is None or isinstance(unit, WalletMarketState)
    return 0 if unit is None else sum(len(run) for run in unit.flows.values())


def buys(n: int, notional: float, price: float = 0.5, gap: int = 60) -> list[OrderFill]:
    return [fill(WALLET, "BUY", notional / price, price, TS + i * gap) for i in range(n)]


def test_small_buys_crossing_the_threshold_give_one_accumulation_listing_them() -> None:
    detector = SerialDetector(W, DEFAULTS)
    orders = buys(5, 120)  # $600 in five fills over 4 minutes
    found = [s for o in orders for s in detector.process(o)]
    accumulations = [s for s in found if s.kind is SignalKind.ACCUMULATION]
    assert [s.kind for s in found] == [SignalKind.TRADER_ENTRY, SignalKind.ACCUMULATION]
    [signal] = accumulations
    assert signal.order_keys == [o.order_key for o in orders]
    assert signal.signal_id == signal_id(SignalKind.ACCUMULATION, *signal.order_keys)
    assert signal.exchange_ts == orders[-1].timestamp and signal.price == 0.5
    assert signal.notional_usd == pytest.approx(600) and signal.shares == pytest.approx(1200)
    assert signal.confidence == pytest.approx(rules.entry_confidence(600, 1000, 0.6))
    assert "in 5 fills over 4 min for $600 (mean price 0.500)" in signal.reasons[0]
    assert signal.opens_position is None  # positions not seeded
    # The run starts afresh: the next fills make a new one.
    assert flows(detector) == 0


def test_four_fills_are_not_enough_below_the_threshold_nor_two_above_it() -> None:
    detector = SerialDetector(W, RuleSettings(signal_cooldown_s=0))
    assert SignalKind.ACCUMULATION not in {
        s.kind for o in buys(4, 120) for s in detector.process(o)
    }
    assert flows(detector) == 4
    other = SerialDetector(W, RuleSettings(signal_cooldown_s=0))
    two, third = buys(2, 300), fill(WALLET, "BUY", 40, 0.5, TS + 200)
    assert SignalKind.ACCUMULATION not in {s.kind for o in two for s in other.process(o)}
    assert kinds(other.process(third)) == ["accumulation"]


def test_fills_outside_the_window_drop_out() -> None:
    detector = SerialDetector(W, DEFAULTS)
    spread = buys(5, 120, gap=600)  # 40 minutes: at most four fills within any 30 minutes
    assert SignalKind.ACCUMULATION not in {s.kind for o in spread for s in detector.process(o)}
    assert flows(detector) == 4


def test_small_sells_give_a_distribution_even_near_1() -> None:
    detector = SerialDetector(W, DEFAULTS)
    detector.seed(WALLET, {MARKET: {"tok-yes": 2000 * 10**6}}, TS - 60)
    sells = [fill(WALLET, "SELL", 150, 0.99, TS + i) for i in range(4)]  # $594
    found = [s for o in sells for s in detector.process(o)]
    [signal] = [s for s in found if s.kind is SignalKind.DISTRIBUTION]
    assert signal.order_keys == [o.order_key for o in sells]
    assert signal.opens_position is False


def test_seeded_accumulation_says_whether_it_opened_the_position() -> None:
    detector = SerialDetector(W, RuleSettings(signal_cooldown_s=0))
    detector.seed(WALLET, {}, TS - 60)
    found = [s for o in buys(5, 120) for s in detector.process(o)]
    [signal] = [s for s in found if s.kind is SignalKind.ACCUMULATION]
    assert signal.opens_position is True
    again = [s for o in buys(5, 120, gap=1)[::1] for s in detector.process(o)]
    assert [s.opens_position for s in again if s.kind is SignalKind.ACCUMULATION] == [False]


def test_near_certain_buys_whales_and_untracked_wallets_do_not_count() -> None:
    detector = SerialDetector(W, DEFAULTS)
    decided = [fill(WALLET, "BUY", 200, 0.999, TS + i) for i in range(5)]
    assert [s for o in decided for s in detector.process(o)] == []
    whales = [fill(WALLET, "BUY", 2400, 0.5, TS + 10 + i * 301) for i in range(3)]
    assert {s.kind for o in whales for s in detector.process(o)} <= {
        SignalKind.WHALE_ORDER,
        SignalKind.TRADER_ENTRY,
    }
    assert flows(detector) == 0
    untracked = [fill(UNTRACKED, "BUY", 240, 0.5, TS + i) for i in range(5)]
    assert [s for o in untracked for s in detector.process(o)] == []


def test_a_retracted_fill_leaves_the_run() -> None:
    detector = SerialDetector(W, RuleSettings(signal_cooldown_s=0))
    first, second, third = buys(3, 150)
    for order in (first, second, third):
        detector.process(order)
    assert flows(detector) == 3
    detector.process(second.model_copy(update={"status": FillStatus.RETRACTED}))
    assert flows(detector) == 2
    # $300 left: $50 more would have made $500 without the retraction; now it takes $200.
    assert kinds(detector.process(fill(WALLET, "BUY", 100, 0.5, TS + 200))) == []
    last = detector.process(fill(WALLET, "BUY", 300, 0.5, TS + 201))
    assert kinds(last) == ["accumulation"]
    assert second.order_key not in last[0].order_keys and len(last[0].order_keys) == 4


def test_off_when_the_threshold_is_0() -> None:
    detector = SerialDetector(W, RuleSettings(accumulation_min_notional_usd=0))
    assert SignalKind.ACCUMULATION not in {
        s.kind for o in buys(10, 200) for s in detector.process(o)
    }
    assert flows(detector) == 0


# --- bounded runs, retracted members, pending members -------------------------------------------


def test_a_run_keeps_at_most_its_latest_fills() -> None:
    """Thousands of tiny fills within the window: the run (its unit, and its signal's order_keys)
    keeps only the latest ACCUMULATION_MAX_FILLS; the signal says how many fills made it."""
    cap = rules.ACCUMULATION_MAX_FILLS
    detector = SerialDetector(W, RuleSettings(signal_cooldown_s=0))
    dust = [fill(WALLET, "BUY", 0.2, 0.5, TS + i // 10) for i in range(3 * cap)]  # $0.10 each
    assert [s for o in dust for s in detector.process(o)][1:] == []  # the first: an entry
    assert flows(detector) == cap
    unit = detector.states[rules.wallet_unit(WALLET, MARKET)]
    assert len(unit.dump()) < 200 * cap
    # Fills of $5 from now on: the run of the latest `cap` reaches $500 only once they are all $5.
    found = [
        s
        for i in range(cap)
        for s in detector.process(fill(WALLET, "BUY", 10, 0.5, TS + 40 + i))
        if s.kind is SignalKind.ACCUMULATION
    ]
    [signal] = found
    assert len(signal.order_keys) == cap and signal.notional_usd == pytest.approx(5 * cap)
    assert f"in {cap} fills" in signal.reasons[0]
    assert flows(detector) == 0


def test_retracting_an_earlier_member_retracts_the_accumulation() -> None:
    """Not only the fill that completed the run: any of its fills retracted takes the signal with
    it (it counted a fill that never happened), once."""
    detector = SerialDetector(W, RuleSettings(signal_cooldown_s=0))
    first, second, third = buys(3, 200)
    [signal] = [
        s
        for o in (first, second, third)
        for s in detector.process(o)
        if s.kind is SignalKind.ACCUMULATION
    ]
    retraction = second.model_copy(
        update={"status": FillStatus.RETRACTED, "status_reason": "reorg"}
    )
    [retracted] = detector.process(retraction)
    assert (retracted.kind, retracted.signal_id) == (SignalKind.ACCUMULATION, signal.signal_id)
    assert retracted.status is FillStatus.RETRACTED and retracted.status_reason == "reorg"
    assert retracted.order_keys == signal.order_keys
    # Retracting the fill that completed it retracts it through its own effect, not twice.
    assert detector.process(third.model_copy(update={"status": FillStatus.RETRACTED})) == []
    # The first fill's retraction takes its entry back; the accumulation is gone already.
    assert kinds(detector.process(first.model_copy(update={"status": FillStatus.RETRACTED}))) == [
        "trader_entry"
    ]


def test_retracting_the_completing_fill_retracts_it_once() -> None:
    detector = SerialDetector(W, RuleSettings(signal_cooldown_s=0))
    orders = buys(3, 200)
    for order in orders:
        detector.process(order)
    undone = detector.process(orders[2].model_copy(update={"status": FillStatus.RETRACTED}))
    assert kinds(undone) == ["accumulation"]
    second = orders[1].model_copy(update={"status": FillStatus.RETRACTED})
    assert detector.process(second) == []


def test_a_pending_member_makes_the_accumulation_pending() -> None:
    detector = SerialDetector(W, RuleSettings(signal_cooldown_s=0))
    first, second, third = buys(3, 200)
    pending = second.model_copy(update={"status": FillStatus.PENDING})
    [signal] = [
        s
        for o in (first, pending, third)
        for s in detector.process(o)
        if s.kind is SignalKind.ACCUMULATION
    ]
    assert signal.status is FillStatus.PENDING
    # All confirmed: confirmed.
    other = SerialDetector(W, RuleSettings(signal_cooldown_s=0))
    [confirmed] = [
        s for o in buys(3, 200) for s in other.process(o) if s.kind is SignalKind.ACCUMULATION
    ]
    assert confirmed.status is FillStatus.CONFIRMED
