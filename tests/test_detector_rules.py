"""Unit tests of the detector's rules, confidence formulas and entry parsing (no Redis)."""

from __future__ import annotations

import math
import time
import uuid

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.detector import rules
from services.detector.pipeline import RawEntry, parse_entry, plan
from services.detector.rules import Condition, RuleSettings
from services.detector.state import Rejection
from shared.models import DomeOrder, OrderFill, Side, SignalKind, Source, TrackedWallet, signal_id

WALLET = "0x" + "ab" * 20
OTHER = "0x" + "cd" * 20
TRACKED = TrackedWallet(address=WALLET, label="sharp", score=0.8)
SETTINGS = RuleSettings(whale_min_notional_usd=1000, signal_max_price=0.95)


def make_order(
    *,
    user: str = WALLET,
    token_id: str = "tok-1",
    side: str = "BUY",
    shares: float = 100.0,
    price: float = 0.5,
    tx_hash: str | None = None,
    received_at: float | None = None,
) -> OrderFill:
    """An order fill as the ingestor writes it; a fresh tx hash makes a fresh order_key."""
    order = DomeOrder(
        token_id=token_id, token_label="Yes", side=Side(side), market_slug="nobel-2025",
        condition_id="0x" + "11" * 32, shares=round(shares * 1e6), shares_normalized=shares,
        price=price, tx_hash=tx_hash or "0x" + uuid.uuid4().hex,
        title="Who wins the Nobel?", timestamp=1_760_086_772, user=user,
    )
    return OrderFill.from_dome(order, Source.DOME_WS, received_at or time.time())


def entry(fields: dict[bytes, bytes], entry_id: str = "1-0") -> RawEntry:
    return RawEntry(entry_id, fields)


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


notionals = st.floats(min_value=1e-6, max_value=1e12, allow_nan=False, allow_infinity=False)
thresholds = st.floats(min_value=1e-3, max_value=1e9, allow_nan=False, allow_infinity=False)
scores = st.floats(min_value=0, max_value=1)


@given(notionals, thresholds, scores)
def test_confidence_always_in_unit_interval(
    notional: float, threshold: float, score: float
) -> None:
    assert 0.0 <= rules.entry_confidence(notional, threshold, score) <= 1.0
    assert 0.0 <= rules.whale_confidence(notional, threshold, score) <= 1.0


@given(notionals, notionals, thresholds, scores)
def test_confidence_grows_with_size(a: float, b: float, threshold: float, score: float) -> None:
    small, big = sorted((a, b))
    assert rules.entry_confidence(small, threshold, score) <= rules.entry_confidence(
        big, threshold, score
    )
    assert rules.whale_confidence(small, threshold, score) <= rules.whale_confidence(
        big, threshold, score
    )


# --- rules --------------------------------------------------------------------------------------

shares_st = st.floats(min_value=0.01, max_value=1e7, allow_nan=False, allow_infinity=False)
prices_st = st.floats(min_value=0, max_value=1)
settings_st = st.builds(
    RuleSettings,
    whale_min_notional_usd=st.floats(min_value=1, max_value=1e6),
    signal_max_price=st.floats(min_value=0.01, max_value=1),
    signal_min_notional_usd=st.floats(min_value=0, max_value=1e4),
)


@given(shares_st, prices_st, settings_st, st.sampled_from(["BUY", "SELL"]), st.booleans())
def test_whale_iff_threshold_and_filters(
    shares: float, price: float, settings: RuleSettings, side: str, tracked: bool
) -> None:
    order = make_order(shares=shares, price=price, side=side, tx_hash="0xfeed")
    candidate = rules.whale_order(order, TRACKED if tracked else None, settings, time.time())
    notional = shares * price
    expected = (
        notional >= settings.whale_min_notional_usd
        and price < settings.signal_max_price
        and notional >= settings.signal_min_notional_usd
    )
    assert (candidate is not None) == expected
    if candidate is not None:
        assert candidate.condition is Condition.ALWAYS
        assert 0 <= candidate.signal.confidence <= 1


@given(shares_st, prices_st, settings_st, st.sampled_from(["BUY", "SELL"]), st.booleans())
def test_entry_candidate_iff_tracked_buy_passing_filters(
    shares: float, price: float, settings: RuleSettings, side: str, tracked: bool
) -> None:
    order = make_order(shares=shares, price=price, side=side, tx_hash="0xfeed")
    candidate = rules.trader_entry(order, TRACKED if tracked else None, settings, time.time())
    expected = tracked and side == "BUY" and rules.passes_filters(order, settings)
    assert (candidate is not None) == expected
    if candidate is not None:
        assert candidate.condition is Condition.OPENS_POSITION


def test_signal_is_filled_from_the_order() -> None:
    order = make_order(shares=4000, price=0.5)
    detected_at = time.time()
    found = rules.candidates(order, TRACKED, SETTINGS, detected_at)
    assert [c.kind for c in found] == [SignalKind.WHALE_ORDER, SignalKind.TRADER_ENTRY]
    for candidate in found:
        sig = candidate.signal
        assert sig.signal_id == signal_id(sig.kind, order.order_key)
        assert (sig.wallet, sig.wallet_label) == (WALLET, "sharp")
        assert (sig.market_slug, sig.title, sig.condition_id) == (
            order.market_slug, order.title, order.condition_id,
        )
        assert (sig.token_id, sig.token_label, sig.side) == ("tok-1", "Yes", Side.BUY)
        assert (sig.price, sig.shares, sig.notional_usd) == (0.5, 4000, 2000)
        assert sig.order_keys == [order.order_key]
        assert sig.source is Source.DOME_WS
        assert sig.exchange_ts == order.timestamp
        assert (sig.received_at, sig.detected_at) == (order.received_at, detected_at)
        assert sig.reasons and all(isinstance(r, str) and r for r in sig.reasons)
    whale, entry_ = (c.signal for c in found)
    assert whale.confidence == pytest.approx(rules.whale_confidence(2000, 1000, 0.8))
    assert entry_.confidence == pytest.approx(rules.entry_confidence(2000, 1000, 0.8))
    assert any("2.0x" in r for r in whale.reasons)


def test_untracked_wallet_gets_whale_only_with_default_score() -> None:
    order = make_order(user=OTHER, shares=4000, price=0.5)
    found = rules.candidates(order, None, SETTINGS, time.time())
    assert [c.kind for c in found] == [SignalKind.WHALE_ORDER]
    assert found[0].signal.wallet_label == ""
    assert found[0].signal.confidence == pytest.approx(rules.whale_confidence(2000, 1000, 0.5))


def test_wallet_without_score_uses_default() -> None:
    unscored = TrackedWallet(address=WALLET, label="")
    candidate = rules.trader_entry(make_order(shares=10, price=0.5), unscored, SETTINGS, 1.0)
    assert candidate is not None
    assert candidate.signal.confidence == pytest.approx(rules.entry_confidence(5, 1000, 0.5))


@pytest.mark.parametrize("price", [0.95, 0.99, 1.0])
def test_near_certain_prices_emit_nothing(price: float) -> None:
    assert rules.candidates(make_order(shares=1e6, price=price), TRACKED, SETTINGS, 1.0) == []


def test_min_notional_filter() -> None:
    settings = RuleSettings(signal_min_notional_usd=100)
    assert rules.candidates(make_order(shares=100, price=0.5), TRACKED, settings, 1.0) == []
    assert rules.candidates(make_order(shares=200, price=0.5), TRACKED, settings, 1.0)


# --- positions (what the Lua step implements) ---------------------------------------------------

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
    huge = make_order(shares=1e15).model_copy(update={"shares": None})
    parsed = parse_entry(entry({b"data": huge.model_dump_json().encode()}))
    assert isinstance(parsed, Rejection) and "implausible size" in parsed.reason


def test_plan_skips_untracked_orders_that_cannot_signal() -> None:
    assert plan(make_order(user=OTHER, shares=10), None, SETTINGS, 1.0) is None
    step = plan(make_order(shares=10), TRACKED, SETTINGS, 1.0)
    assert step is not None and step.tracked and step.micro_shares == 10_000_000
    assert [e.condition for e in step.candidates] == [Condition.OPENS_POSITION]
    filtered = plan(make_order(shares=10, price=0.97), TRACKED, SETTINGS, 1.0)
    assert filtered is not None and filtered.candidates == ()


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.detector.settings import DetectorSettings

    assert DetectorSettings().ops_port == 8083
    monkeypatch.setenv("WHALE_MIN_NOTIONAL_USD", "2500")
    monkeypatch.setenv("SIGNAL_MAX_PRICE", "0.9")
    monkeypatch.setenv("SIGNAL_MIN_NOTIONAL_USD", "5")
    monkeypatch.setenv("DETECTOR_BATCH_SIZE", "100")
    settings = DetectorSettings()
    assert settings.rules() == RuleSettings(2500, 0.9, 5)
    assert settings.detector_batch_size == 100
    monkeypatch.setenv("WHALE_MIN_NOTIONAL_USD", "0")
    with pytest.raises(ValueError, match="whale_min_notional_usd"):
        DetectorSettings()
