"""Unit and property tests of the detector's rules, confidence formulas, settings and entry parsing
(no Redis): every rule through `rules.plan` + `rules.decide`, as `serial.py` applies them."""

from __future__ import annotations

import math
import time
import uuid
from fractions import Fraction
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.detector import rules
from services.detector.pipeline import RawEntry, parse_entry
from services.detector.rules import (
    ConsensusState,
    Member,
    RuleSettings,
    WalletMarketState,
)
from services.detector.serial import SerialDetector, run
from services.detector.state import Rejection
from shared.models import DomeOrder, OrderFill, Side, SignalKind, Source, TrackedWallet, signal_id


def bookkeeping(**overrides: object) -> RuleSettings:
    """The rules with the notional filter off: the position, consensus and cooldown tests use
    small fills; the filters have tests of their own."""
    return RuleSettings(**{"signal_min_notional_usd": 0, **overrides})  # type: ignore[arg-type]


WALLET = "0x" + "ab" * 20
OTHER = "0x" + "cd" * 20
TRACKED = TrackedWallet(address=WALLET, label="sharp", score=0.8)
MARKET = "0x" + "11" * 32
TS = 1_760_086_772
SETTINGS = bookkeeping(whale_min_notional_usd=1000, signal_max_price=0.95)
NO_COOLDOWN = bookkeeping(signal_cooldown_s=0)


def make_order(
    *,
    user: str = WALLET,
    token_id: str = "tok-1",
    side: str = "BUY",
    shares: float = 100.0,
    price: float = 0.5,
    tx_hash: str | None = None,
    received_at: float | None = None,
    timestamp: int = TS,
    condition_id: str = MARKET,
) -> OrderFill:
    """An order fill as the ingestor writes it; a fresh tx hash makes a fresh order_key."""
    order = DomeOrder(
        token_id=token_id,
        token_label="Yes",
        side=Side(side),
        market_slug="nobel-2025",
        condition_id=condition_id,
        shares=round(shares * 1e6),
        shares_normalized=shares,
        price=price,
        tx_hash=tx_hash or "0x" + uuid.uuid4().hex,
        title="Who wins the Nobel?",
        timestamp=timestamp,
        user=user,
    )
    return OrderFill.from_dome(order, Source.DOME_WS, received_at or time.time())


def wallet(n: int, score: float | None = 0.7) -> TrackedWallet:
    return TrackedWallet(address="0x" + f"{n:02x}" * 20, label=f"w{n}", score=score)


def entry(fields: dict[bytes, bytes], entry_id: str = "1-0") -> RawEntry:
    return RawEntry(entry_id, fields)


def kinds(detector: SerialDetector, order: OrderFill) -> list[str]:
    return [s.kind.value for s in detector.process(order)]


# --- confidence ---------------------------------------------------------------------------------


def test_entry_confidence_formula() -> None:
    assert rules.entry_confidence(500, 1000, 0.8) == pytest.approx(0.5 * 0.8 + 0.5 * 0.5)
    assert rules.entry_confidence(5000, 1000, 0.8) == pytest.approx(0.9)
    assert rules.entry_confidence(5000, 1000, 1.0) == 1.0


def test_whale_confidence_formula() -> None:
    assert rules.whale_confidence(1000, 1000, 0.5) == pytest.approx(0.7 * 0.6 + 0.3 * 0.5)
    assert rules.whale_confidence(10_000, 1000, 0.5) == pytest.approx(0.7 + 0.15)
    assert rules.whale_confidence(1e9, 1000, 1.0) == 1.0
    mid = 0.7 * (0.6 + 0.4 * math.log10(3)) + 0.3 * 0.2
    assert rules.whale_confidence(3000, 1000, 0.2) == pytest.approx(mid)


def test_consensus_confidence_formula() -> None:
    members = {
        f"w{i}": Member(TS, f"k{i}", f"w{i}", score, notional)
        for i, (score, notional) in enumerate([(0.8, 100), (0.6, 200), (0.4, 300)])
    }
    # 0.4 x min(1, 3/6) + 0.4 x mean(0.8, 0.6, 0.4) + 0.2 x min(1, 600/1000)
    assert rules.consensus_confidence(members, 3, 1000) == pytest.approx(0.2 + 0.24 + 0.12)
    big = {k: Member(TS, k, k, 1.0, 1e6) for k in "abcdef"}
    assert rules.consensus_confidence(big, 3, 1000) == 1.0


notionals = st.floats(min_value=1e-6, max_value=1e12, allow_nan=False, allow_infinity=False)
thresholds = st.floats(min_value=1e-3, max_value=1e9, allow_nan=False, allow_infinity=False)
scores = st.floats(min_value=0, max_value=1)
member_st = st.builds(Member, st.just(TS), st.just("k"), st.just(""), scores, notionals)


@given(
    notionals,
    thresholds,
    scores,
    st.lists(member_st, min_size=1, max_size=12),
    st.integers(min_value=2, max_value=6),
)
def test_confidence_always_in_unit_interval(
    notional: float, threshold: float, score: float, members: list[Member], k: int
) -> None:
    assert 0.0 <= rules.entry_confidence(notional, threshold, score) <= 1.0
    assert 0.0 <= rules.whale_confidence(notional, threshold, score) <= 1.0
    by_wallet = {str(i): m for i, m in enumerate(members)}
    assert 0.0 <= rules.consensus_confidence(by_wallet, k, threshold) <= 1.0


@given(notionals, notionals, thresholds, scores)
def test_confidence_grows_with_size(a: float, b: float, threshold: float, score: float) -> None:
    small, big = sorted((a, b))
    assert rules.entry_confidence(small, threshold, score) <= rules.entry_confidence(
        big, threshold, score
    )
    assert rules.whale_confidence(small, threshold, score) <= rules.whale_confidence(
        big, threshold, score
    )


@given(st.lists(member_st, min_size=2, max_size=12), thresholds)
def test_consensus_confidence_grows_with_a_member_as_good_as_the_mean(
    members: list[Member], threshold: float
) -> None:
    before = {str(i): m for i, m in enumerate(members[:-1])}
    mean = sum(m.score for m in before.values()) / len(before)
    joining = Member(TS, "k", "", mean, members[-1].notional)
    after = {**before, "new": joining}
    assert (
        rules.consensus_confidence(after, 3, threshold)
        >= rules.consensus_confidence(before, 3, threshold) - 1e-9
    )


# --- filters and whale_order --------------------------------------------------------------------

shares_st = st.floats(min_value=0.01, max_value=1e7, allow_nan=False, allow_infinity=False)
prices_st = st.floats(min_value=0, max_value=1)
settings_st = st.builds(
    RuleSettings,
    whale_min_notional_usd=st.floats(min_value=1, max_value=1e6),
    signal_max_price=st.floats(min_value=0.01, max_value=1),
    signal_min_price=st.floats(min_value=0, max_value=0.5),
    signal_min_notional_usd=st.floats(min_value=0, max_value=1e4),
    signal_cooldown_s=st.sampled_from([0, 300]),
)


@given(shares_st, prices_st, settings_st, st.sampled_from(["BUY", "SELL"]), st.booleans())
def test_whale_iff_threshold_and_filters(
    shares: float, price: float, rule_settings: RuleSettings, side: str, tracked: bool
) -> None:
    order = make_order(shares=shares, price=price, side=side, tx_hash="0xfeed")
    detector = SerialDetector([TRACKED] if tracked else [], rule_settings)
    found = detector.process(order)
    notional = shares * price
    # Side-aware: only a BUY is dropped for its price, at either end.
    priced = side == "SELL" or (
        rule_settings.signal_min_price < price < rule_settings.signal_max_price
    )
    expected = (
        notional >= rule_settings.whale_min_notional_usd
        and priced
        and notional >= rule_settings.signal_min_notional_usd
    )
    whales = [s for s in found if s.kind is SignalKind.WHALE_ORDER]
    assert len(whales) == int(expected)
    assert all(0 <= s.confidence <= 1 for s in found)
    if not rules.passes_filters(order, rule_settings):
        assert found == []


def test_signal_is_filled_from_the_order() -> None:
    order = make_order(shares=4000, price=0.5)
    detected_at = time.time()
    found = SerialDetector([TRACKED], SETTINGS).process(order, detected_at)
    assert [s.kind for s in found] == [SignalKind.WHALE_ORDER, SignalKind.TRADER_ENTRY]
    for sig in found:
        assert sig.signal_id == signal_id(sig.kind, order.order_key)
        assert (sig.wallet, sig.wallet_label) == (WALLET, "sharp")
        assert (sig.market_slug, sig.title, sig.condition_id) == (
            order.market_slug,
            order.title,
            order.condition_id,
        )
        assert (sig.token_id, sig.token_label, sig.side) == ("tok-1", "Yes", Side.BUY)
        assert (sig.price, sig.shares, sig.notional_usd) == (0.5, 4000, 2000)
        assert sig.order_keys == [order.order_key]
        assert sig.source is Source.DOME_WS
        assert sig.exchange_ts == order.timestamp
        assert (sig.received_at, sig.detected_at) == (order.received_at, detected_at)
        assert sig.reasons and all(isinstance(r, str) and r for r in sig.reasons)
    whale, entry_ = found
    assert whale.confidence == pytest.approx(rules.whale_confidence(2000, 1000, 0.8))
    assert entry_.confidence == pytest.approx(rules.entry_confidence(2000, 1000, 0.8))
    assert any("2.0x" in r for r in whale.reasons)


def test_untracked_wallet_gets_whale_only_with_default_score() -> None:
    order = make_order(user=OTHER, shares=4000, price=0.5)
    found = SerialDetector([], SETTINGS).process(order)
    assert [s.kind for s in found] == [SignalKind.WHALE_ORDER]
    assert found[0].wallet_label == ""
    assert found[0].confidence == pytest.approx(rules.whale_confidence(2000, 1000, 0.5))


def test_wallet_without_score_uses_default() -> None:
    unscored = TrackedWallet(address=WALLET, label="")
    found = SerialDetector([unscored], SETTINGS).process(make_order(shares=10, price=0.5))
    assert [s.kind for s in found] == [SignalKind.TRADER_ENTRY]
    assert found[0].confidence == pytest.approx(rules.entry_confidence(5, 1000, 0.5))


@pytest.mark.parametrize("price", [0.95, 0.99, 1.0])
def test_near_certain_prices_emit_nothing_but_move_the_position(price: float) -> None:
    detector = SerialDetector([TRACKED], SETTINGS)
    assert detector.process(make_order(shares=1e6, price=price)) == []
    unit = rules.wallet_unit(WALLET, MARKET)
    assert detector.states[unit] == WalletMarketState({"tok-1": 10**12}, {})
    # Held (though filtered), so the next BUY is no entry and a SELL of it is an exit.
    assert kinds(detector, make_order(shares=10, price=0.5, timestamp=TS + 1)) == []
    sell = make_order(shares=1e6, price=0.5, side="SELL", timestamp=TS + 2)
    assert kinds(detector, sell) == ["whale_order", "trader_exit"]


def test_min_notional_filter() -> None:
    rule_settings = RuleSettings(signal_min_notional_usd=100)
    assert SerialDetector([TRACKED], rule_settings).process(make_order(shares=100)) == []
    assert SerialDetector([TRACKED], rule_settings).process(make_order(shares=200))


# --- plans: which state units an order touches --------------------------------------------------


def test_plan_units() -> None:
    w_unit, t_unit = rules.wallet_unit(WALLET, MARKET), rules.token_unit("tok-1")
    planned = rules.plan(make_order(), TRACKED, SETTINGS)
    assert planned is not None and planned.units == (w_unit, t_unit)
    sell = rules.plan(make_order(side="SELL"), TRACKED, SETTINGS)
    assert sell is not None and sell.units == (w_unit,)
    filtered = rules.plan(make_order(price=0.97), TRACKED, SETTINGS)
    assert filtered is not None and filtered.units == (w_unit,)
    assert rules.plan(make_order(user=OTHER, shares=10), None, SETTINGS) is None
    whale = rules.plan(make_order(user=OTHER, shares=4000), None, SETTINGS)
    assert whale is not None and whale.whale
    assert whale.units == (rules.wallet_unit(OTHER, MARKET),)
    # Without a cooldown too: the unit orders the fill before its retraction.
    free = rules.plan(make_order(user=OTHER, shares=4000), None, NO_COOLDOWN)
    assert free is not None and free.units == (rules.wallet_unit(OTHER, MARKET),)
    no_market = make_order(condition_id="")
    assert rules.market_of(no_market) == "nobel-2025"


# --- positions: trader_entry and trader_exit ----------------------------------------------------

fills_st = st.lists(
    st.tuples(st.sampled_from(list(Side)), st.integers(min_value=1, max_value=400)),
    min_size=1,
    max_size=30,
)


@given(fills_st, st.sampled_from([0.5, 0.8, 1.0]))
def test_entry_and_exit_follow_the_position(fills: list[tuple[Side, int]], fraction: float) -> None:
    """Reference bookkeeping, order by order: entry from flat, exit of >= fraction of a holding."""
    rule_settings = bookkeeping(signal_cooldown_s=0, exit_min_fraction=fraction)
    detector = SerialDetector([TRACKED], rule_settings)
    position = 0
    for i, (side, shares) in enumerate(fills):
        order = make_order(side=side.value, shares=shares, price=0.1, timestamp=TS + i)
        expected = []
        if side is Side.BUY and position == 0:
            expected = ["trader_entry"]
        if (
            side is Side.SELL
            and position > 0
            and Fraction(shares) >= Fraction(str(fraction)) * position
        ):
            expected = ["trader_exit"]
        assert kinds(detector, order) == expected, (i, side, shares, position)
        position = max(0, position + (shares if side is Side.BUY else -shares))
    state = detector.states.get(rules.wallet_unit(WALLET, MARKET))
    held = state.positions if isinstance(state, WalletMarketState) else {}
    assert held == ({"tok-1": position * 10**6} if position else {})


def test_exit_fraction_edges() -> None:
    detector = SerialDetector([TRACKED], NO_COOLDOWN)
    assert kinds(detector, make_order(shares=100)) == ["trader_entry"]
    assert kinds(detector, make_order(side="SELL", shares=79.999999)) == []
    # 20.000001 left: selling 16.000001 of it is >= 80%
    assert kinds(detector, make_order(side="SELL", shares=16.000001)) == ["trader_exit"]
    assert kinds(detector, make_order(side="SELL", shares=500)) == ["trader_exit"]
    # Nothing known to be held any more: selling is no exit, buying is an entry again.
    assert kinds(detector, make_order(side="SELL", shares=5)) == []
    assert kinds(detector, make_order(shares=1)) == ["trader_entry"]


def test_exit_needs_a_position_seen_since_tracking_started() -> None:
    detector = SerialDetector([TRACKED], NO_COOLDOWN)
    assert kinds(detector, make_order(side="SELL", shares=100)) == []
    untracked = SerialDetector([], NO_COOLDOWN)
    assert kinds(untracked, make_order(side="SELL", shares=100)) == []


@given(
    st.integers(min_value=1, max_value=10**15),
    st.integers(min_value=1, max_value=10**15),
    st.integers(min_value=1, max_value=rules.PPM),
)
def test_exit_fraction_is_exact(prior: int, size: int, ppm: int) -> None:
    fraction = ppm / rules.PPM
    assert rules.exits_position(Side.SELL, prior, size, fraction) == (
        Fraction(size) >= Fraction(ppm, rules.PPM) * prior
    )
    assert not rules.exits_position(Side.BUY, prior, size, fraction)


sizes_st = st.integers(min_value=0, max_value=10**17)


@given(st.sampled_from(list(Side)), sizes_st, sizes_st)
def test_position_never_negative_and_entry_only_from_flat(
    side: Side, prior: int, size: int
) -> None:
    assert rules.next_position(side, prior, size) >= 0
    assert rules.opens_position(side, prior) == (side is Side.BUY and prior == 0)


@given(sizes_st, sizes_st)
def test_buy_then_sell_of_same_size_restores_position(prior: int, size: int) -> None:
    bought = rules.next_position(Side.BUY, prior, size)
    assert rules.next_position(Side.SELL, bought, size) == prior


def test_micro_shares_are_exact_integers() -> None:
    assert rules.micro_shares(make_order(shares=68.794036)) == 68_794_036
    assert rules.micro_shares(make_order(shares=0.1 + 0.2)) == 300_000


def test_positions_are_per_token_and_markets_are_independent() -> None:
    detector = SerialDetector([TRACKED], NO_COOLDOWN)
    assert kinds(detector, make_order(token_id="yes")) == ["trader_entry"]
    assert kinds(detector, make_order(token_id="no")) == ["trader_entry"]
    assert kinds(detector, make_order(token_id="yes")) == []
    other_market = make_order(token_id="x", condition_id="0x" + "22" * 32)
    assert kinds(detector, other_market) == ["trader_entry"]


def test_processing_order_changes_the_signals() -> None:
    """Why replicas must decide one wallet's orders in stream order (docs/signals.md)."""
    buy, sell, again = (
        make_order(shares=100),
        make_order(side="SELL", shares=100),
        make_order(shares=50),
    )
    in_order = {s.signal_id for s in run([buy, sell, again], [TRACKED], NO_COOLDOWN)}
    swapped = {s.signal_id for s in run([sell, buy, again], [TRACKED], NO_COOLDOWN)}
    assert len(in_order) == 3 and len(swapped) == 1 and in_order != swapped


# --- cooldown -----------------------------------------------------------------------------------


@given(
    st.lists(st.integers(min_value=0, max_value=400), min_size=1, max_size=30),
    st.sampled_from([0, 1, 60, 300]),
)
def test_cooldown_keeps_signals_of_a_kind_apart(gaps: list[int], cooldown: int) -> None:
    """Whales of one wallet x market at non-decreasing times: a signal is emitted exactly when
    the latest emitted one is `cooldown` or more seconds older."""
    rule_settings = bookkeeping(signal_cooldown_s=cooldown)
    detector = SerialDetector([], rule_settings)
    last: int | None = None
    ts, held = TS, 0
    for gap in gaps:
        ts += gap
        order = make_order(user=OTHER, shares=4000, timestamp=ts)
        expected = last is None or cooldown == 0 or ts - last >= cooldown
        assert kinds(detector, order) == (["whale_order"] if expected else [])
        if expected:
            last = ts
        else:
            held += 1
    assert detector.suppressed["whale_order"] == held


def test_cooldown_is_per_wallet_market_and_kind() -> None:
    rule_settings = bookkeeping(signal_cooldown_s=300)
    detector = SerialDetector([TRACKED], rule_settings)
    assert kinds(detector, make_order(shares=4000)) == ["whale_order", "trader_entry"]
    # Same wallet x market, 200 s later: whale held back; a sell-out is a different kind.
    sell = make_order(shares=4000, side="SELL", timestamp=TS + 200)
    assert kinds(detector, sell) == ["trader_exit"]
    assert detector.suppressed == {"whale_order": 1}
    # Re-entry 10 s later: entry held back (cooldown of trader_entry since TS).
    assert kinds(detector, make_order(shares=1, timestamp=TS + 210)) == []
    # Another market is not held back; another wallet neither.
    other_market = make_order(shares=4000, condition_id="0x" + "22" * 32, timestamp=TS + 1)
    assert kinds(detector, other_market) == ["whale_order", "trader_entry"]
    assert kinds(detector, make_order(user=OTHER, shares=4000, timestamp=TS + 1)) == ["whale_order"]
    # Exactly 300 s after the first whale: allowed again.
    assert kinds(detector, make_order(shares=4000, timestamp=TS + 300)) == ["whale_order"]


def test_cooldown_does_not_restart_on_a_held_back_signal() -> None:
    detector = SerialDetector([], bookkeeping(signal_cooldown_s=100))
    times = [TS, TS + 60, TS + 120, TS + 199, TS + 200]
    found = [kinds(detector, make_order(user=OTHER, shares=4000, timestamp=t)) for t in times]
    assert found == [["whale_order"], [], ["whale_order"], [], []]


# --- consensus ----------------------------------------------------------------------------------

K3 = bookkeeping(signal_cooldown_s=0, consensus_min_wallets=3, consensus_window_s=600)


def consensus(detector: SerialDetector, order: OrderFill) -> list[str]:
    return [s.signal_id for s in detector.process(order) if s.kind is SignalKind.CONSENSUS]


def test_consensus_forms_at_k_and_grows() -> None:
    wallets = [wallet(i) for i in range(5)]
    detector = SerialDetector(wallets, K3)
    buys = [
        make_order(user=w.address, shares=10, timestamp=TS + 10 * i) for i, w in enumerate(wallets)
    ]
    assert consensus(detector, buys[0]) == consensus(detector, buys[1]) == []
    formed = detector.process(buys[2])
    signal = next(s for s in formed if s.kind is SignalKind.CONSENSUS)
    assert signal.signal_id == signal_id("consensus", f"tok-1|{TS + 20}|3")
    assert signal.order_keys == [b.order_key for b in buys[:3]]
    assert signal.wallet == wallets[2].address and "formed with 3" in signal.reasons[1]
    assert signal.confidence == pytest.approx(0.4 * 0.5 + 0.4 * 0.7 + 0.2 * 0.015)
    # A member buying again changes no count: nothing. A new wallet: it grows.
    again = make_order(user=wallets[0].address, shares=10, timestamp=TS + 25)
    assert consensus(detector, again) == []
    assert consensus(detector, buys[3]) == [signal_id("consensus", f"tok-1|{TS + 20}|4")]
    assert consensus(detector, buys[4]) == [signal_id("consensus", f"tok-1|{TS + 20}|5")]


@pytest.mark.parametrize(("gap", "fires"), [(599, True), (600, True), (601, False)])
def test_consensus_window_edges(gap: int, fires: bool) -> None:
    wallets = [wallet(i) for i in range(3)]
    detector = SerialDetector(wallets, K3)
    consensus(detector, make_order(user=wallets[0].address, timestamp=TS))
    consensus(detector, make_order(user=wallets[1].address, timestamp=TS + gap // 2))
    last = make_order(user=wallets[2].address, timestamp=TS + gap)
    assert bool(consensus(detector, last)) == fires


def test_consensus_dissolves_and_forms_again_as_a_new_episode() -> None:
    wallets = [wallet(i) for i in range(4)]
    detector = SerialDetector(wallets, K3)
    first = [
        consensus(detector, make_order(user=w.address, timestamp=TS + i))
        for i, w in enumerate(wallets[:3])
    ]
    assert first[2] == [signal_id("consensus", f"tok-1|{TS + 2}|3")]
    # 700 s later the three have left the window; three buys form it again.
    later = [
        consensus(detector, make_order(user=w.address, timestamp=TS + 700 + i))
        for i, w in enumerate(wallets[1:])
    ]
    assert later[:2] == [[], []]
    assert later[2] == [signal_id("consensus", f"tok-1|{TS + 702}|3")]


def test_consensus_ignores_sells_untracked_filtered_and_late_buys() -> None:
    wallets = [wallet(i) for i in range(3)]
    detector = SerialDetector(wallets[:2], K3)
    consensus(detector, make_order(user=wallets[0].address, timestamp=TS + 1000))
    consensus(detector, make_order(user=wallets[1].address, timestamp=TS + 1000))
    assert consensus(detector, make_order(user=wallets[2].address, timestamp=TS + 1000)) == []
    assert consensus(detector, make_order(user=OTHER, shares=5000, timestamp=TS + 1000)) == []
    tracked_all = SerialDetector(wallets, K3)
    for w in wallets[:2]:
        consensus(tracked_all, make_order(user=w.address, timestamp=TS + 1000))
    third = wallets[2].address
    assert consensus(tracked_all, make_order(user=third, side="SELL", timestamp=TS + 1000)) == []
    assert consensus(tracked_all, make_order(user=third, price=0.96, timestamp=TS + 1000)) == []
    # Older than the window behind the token's clock: a late fill joins nothing.
    assert consensus(tracked_all, make_order(user=third, timestamp=TS + 399)) == []
    assert consensus(tracked_all, make_order(user=third, timestamp=TS + 400))


def test_consensus_cooldown_is_per_token() -> None:
    rule_settings = bookkeeping(signal_cooldown_s=300, consensus_min_wallets=2)
    wallets = [wallet(i) for i in range(4)]
    detector = SerialDetector(wallets, rule_settings)
    buy = [
        make_order(user=w.address, token_id=t, timestamp=TS + dt)
        for w, t, dt in zip(wallets, ["a", "a", "a", "a"], [0, 10, 100, 400], strict=True)
    ]
    assert consensus(detector, buy[0]) == []
    assert consensus(detector, buy[1]) == [signal_id("consensus", f"a|{TS + 10}|2")]
    assert consensus(detector, buy[2]) == []  # grew to 3 within 300 s: held back
    assert detector.suppressed["consensus"] == 1
    assert consensus(detector, buy[3]) == [signal_id("consensus", f"a|{TS + 10}|4")]
    # Another token is not held back by token a's cooldown.
    b = [make_order(user=w.address, token_id="b", timestamp=TS + 20) for w in wallets[:2]]
    assert consensus(detector, b[0]) == [] and consensus(detector, b[1])


buys_st = st.lists(
    st.tuples(st.integers(min_value=0, max_value=5), st.integers(min_value=0, max_value=400)),
    min_size=1,
    max_size=40,
)


@settings(max_examples=150)
@given(buys_st, st.integers(min_value=2, max_value=4))
def test_consensus_matches_a_brute_force_count(buys: list[tuple[int, int]], k: int) -> None:
    """Buys at non-decreasing times: each signal's count is the number of distinct wallets whose
    latest buy is within W of now; episodes start at exactly K, grow by one, never repeat."""
    window = 600
    rule_settings = bookkeeping(
        signal_cooldown_s=0, consensus_min_wallets=k, consensus_window_s=window
    )
    wallets = [wallet(i) for i in range(6)]
    detector = SerialDetector(wallets, rule_settings)
    history: list[tuple[int, int]] = []
    ts, fired, formed_at = TS, 0, 0
    ids: set[str] = set()
    for who, gap in buys:
        ts += gap
        history.append((who, ts))
        latest = {w: t for w, t in history}
        count = sum(1 for t in latest.values() if t >= ts - window)
        expected: list[str] = []
        if count < k:
            fired = 0
        elif count > fired:
            formed_at = formed_at if fired else ts
            assert (fired == 0 and count == k) or count == fired + 1
            expected = [signal_id("consensus", f"tok-1|{formed_at}|{count}")]
            fired = count
        found = consensus(detector, make_order(user=wallets[who].address, timestamp=ts))
        assert found == expected
        assert not ids.intersection(found)
        ids.update(found)


# --- state serialisation ------------------------------------------------------------------------

member_st2 = st.builds(
    Member,
    st.integers(0, 2**40),
    st.text(max_size=8),
    st.text(max_size=8),
    scores,
    st.floats(min_value=0, max_value=1e9),
)


@given(
    st.dictionaries(st.text(min_size=1, max_size=10), st.integers(1, 2**62), max_size=4),
    st.dictionaries(st.sampled_from([k.value for k in SignalKind]), st.integers(0, 2**40)),
    st.dictionaries(st.text(min_size=1, max_size=10), member_st2, max_size=4),
    st.integers(0, 2**40),
    st.one_of(st.none(), st.integers(0, 2**40)),
)
def test_state_round_trips_through_json(
    positions: dict[str, int],
    last: dict[str, int],
    members: dict[str, Member],
    clock: int,
    last_signal: int | None,
) -> None:
    wm = WalletMarketState(positions, last)
    assert WalletMarketState.load(wm.dump()) == wm
    cs = ConsensusState(clock, clock, len(members), last_signal, members)
    assert ConsensusState.load(cs.dump()) == cs
    assert rules.load_unit(rules.token_unit("t"), cs.dump()) == cs
    assert rules.load_unit(rules.wallet_unit(WALLET, "m"), None) is None


def test_a_repeated_order_key_changes_nothing() -> None:
    detector = SerialDetector([TRACKED], NO_COOLDOWN)
    order = make_order(shares=100)
    assert kinds(detector, order) == ["trader_entry"]
    before = dict(detector.states)
    assert kinds(detector, order) == []
    assert detector.states == before


# --- settings -----------------------------------------------------------------------------------


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.detector.settings import DetectorSettings

    assert DetectorSettings().ops_port == 8083
    assert DetectorSettings().rules() == RuleSettings()
    monkeypatch.setenv("WHALE_MIN_NOTIONAL_USD", "2500")
    monkeypatch.setenv("SIGNAL_MAX_PRICE", "0.9")
    monkeypatch.setenv("SIGNAL_MIN_NOTIONAL_USD", "5")
    monkeypatch.setenv("SIGNAL_COOLDOWN_S", "0")
    monkeypatch.setenv("CONSENSUS_MIN_WALLETS", "4")
    monkeypatch.setenv("DETECTOR_BATCH_SIZE", "100")
    detector_settings = DetectorSettings()
    assert detector_settings.rules() == RuleSettings(
        2500, 0.9, 5, signal_cooldown_s=0, consensus_min_wallets=4
    )
    assert detector_settings.detector_batch_size == 100
    monkeypatch.setenv("WHALE_MIN_NOTIONAL_USD", "0")
    with pytest.raises(ValueError, match="whale_min_notional_usd"):
        DetectorSettings()


def test_rules_file_with_env_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from services.detector.settings import DetectorSettings

    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(
        "# thresholds\nwhale_min_notional_usd: 5000\nCONSENSUS_WINDOW_S: 3600\n"
        "exit_min_fraction: 0.5\n"
    )
    monkeypatch.setenv("DETECTOR_RULES_FILE", str(rules_file))
    monkeypatch.setenv("EXIT_MIN_FRACTION", "0.9")
    loaded = DetectorSettings().rules()
    assert (loaded.whale_min_notional_usd, loaded.consensus_window_s) == (5000, 3600)
    assert loaded.exit_min_fraction == 0.9  # the environment wins over the file
    assert DetectorSettings(detector_rules_file="").rules().whale_min_notional_usd == 5000
    monkeypatch.delenv("DETECTOR_RULES_FILE")
    passed = DetectorSettings(detector_rules_file=str(rules_file)).rules()
    assert passed.whale_min_notional_usd == 5000


def test_the_example_rules_file_holds_the_defaults() -> None:
    from services.detector.settings import DetectorSettings, load_rules_file

    example = Path(__file__).resolve().parents[1] / "config" / "rules.example.yaml"
    assert set(load_rules_file(example)) == set(RuleSettings.__dataclass_fields__)
    assert DetectorSettings(detector_rules_file=str(example)).rules() == RuleSettings()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("whale_min_notinal_usd: 5\n", "unknown setting"),
        ("- 1\n- 2\n", "must hold a mapping"),
        ("a: [\n", "not YAML"),
        ("signal_max_price: 7\n", "signal_max_price"),
    ],
)
def test_bad_rules_files_are_rejected(tmp_path: Path, content: str, message: str) -> None:
    from services.detector.settings import DetectorSettings

    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(content)
    with pytest.raises(ValueError, match=message):
        DetectorSettings(detector_rules_file=str(rules_file))
    with pytest.raises(ValueError, match="not found"):
        DetectorSettings(detector_rules_file=str(tmp_path / "missing.yaml"))


# --- entries ------------------------------------------------------------------------------------


def test_parse_entry_accepts_an_order_fill() -> None:
    order = make_order()
    parsed = parse_entry(entry({b"data": order.model_dump_json().encode()}))
    assert parsed == order


@pytest.mark.parametrize(
    ("fields", "category", "reason_part"),
    [
        ({b"data": b"{not json"}, "not_json", "not JSON"),
        ({b"other": b"x"}, "no_data", "no 'data' field"),
        ({b"data": b"[1, 2]"}, "invalid", "invalid order"),
        ({b"data": b"{}"}, "invalid", "token_id"),
    ],
)
def test_parse_entry_rejects_with_reason(
    fields: dict[bytes, bytes], category: str, reason_part: str
) -> None:
    parsed = parse_entry(entry(fields, "7-1"))
    assert isinstance(parsed, Rejection)
    assert (parsed.entry_id, parsed.category) == ("7-1", category)
    assert reason_part in parsed.reason


def test_parse_entry_names_the_bad_field_and_keeps_the_raw_payload() -> None:
    payload = orjson.loads(make_order().model_dump_json())
    payload["price"] = "0.5"
    raw = orjson.dumps(payload)
    parsed = parse_entry(entry({b"data": raw}))
    assert isinstance(parsed, Rejection)
    assert parsed.reason.startswith("invalid order: price:")
    assert parsed.raw == raw
    del payload["price"]
    missing = parse_entry(entry({b"data": orjson.dumps(payload)}))
    assert isinstance(missing, Rejection) and "price: Field required" in missing.reason


def test_parse_entry_without_data_keeps_all_fields_as_raw() -> None:
    parsed = parse_entry(entry({b"foo": b"bar", b"n": b"1"}))
    assert isinstance(parsed, Rejection)
    assert orjson.loads(parsed.raw) == {"foo": "bar", "n": "1"}


def test_parse_entry_rejects_implausible_sizes() -> None:
    # Fills too large for 64-bit micro-share positions are refused by the shared model.
    huge = make_order().model_dump(mode="json") | {"shares_normalized": 1e15, "shares": None}
    parsed = parse_entry(entry({b"data": orjson.dumps(huge)}))
    assert isinstance(parsed, Rejection) and "shares_normalized" in parsed.reason
