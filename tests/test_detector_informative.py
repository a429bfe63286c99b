"""Is this fill informative? The default filters on the cases of issue 17, exits measured against
what the wallet is known to hold, and entries that mean a new position once positions are seeded
(`SerialDetector.seed`, as `/positions` seeds the live detector). Default settings throughout
unless a test says otherwise: these are the defaults' tests."""

from __future__ import annotations

import time
import uuid

import pytest

from services.detector import rules
from services.detector.rules import RuleSettings, WalletMarketState
from services.detector.serial import SerialDetector
from shared.models import DomeOrder, OrderFill, Side, Signal, SignalKind, Source, TrackedWallet

MARKET = "0x" + "22" * 32
TS = 1_760_090_000  # after the 2025 Nobel Peace Prize was announced (09:00 UTC)
DEFAULTS = RuleSettings()
W = [TrackedWallet(address="0x" + f"{n:02x}" * 20, label=f"w{n}", score=0.6) for n in range(1, 5)]
UNTRACKED = "0x" + "ee" * 20


def fill(
    user: str,
    side: str,
    shares: float,
    price: float,
    ts: int = TS,
    token: str = "tok-yes",
) -> OrderFill:
    order = DomeOrder(
        token_id=token,
        token_label="Yes",
        side=Side(side),
        market_slug="nominee-wins",
        condition_id=MARKET,
        shares=round(shares * 1e6),
        shares_normalized=shares,
        price=price,
        tx_hash="0x" + uuid.uuid4().hex,
        title="Will the nominee win?",
        timestamp=ts,
        user=user,
    )
    return OrderFill.from_dome(order, Source.DATA_API, float(ts))


def kinds(signals: list[Signal]) -> list[str]:
    return [s.kind.value for s in signals]


def run(detector: SerialDetector, *orders: OrderFill) -> list[Signal]:
    return [signal for order in orders for signal in detector.process(order)]


# --- filters ------------------------------------------------------------------------------------


def test_one_dollar_long_shots_after_the_result_give_nothing_by_default() -> None:
    # Issue 17: four tracked wallets buy $1-$5 of a loser at 0.001 after the announcement.
    detector = SerialDetector(W, DEFAULTS)
    buys = [
        fill(w.address, "BUY", shares, 0.001, TS + i)
        for i, (w, shares) in enumerate(zip(W, [1000, 2000, 5000, 1000], strict=True))
    ]
    assert run(detector, *buys) == []
    # They still hold what they bought: a real trade moves the position.
    unit = detector.states[rules.wallet_unit(W[0].address, MARKET)]
    assert isinstance(unit, WalletMarketState) and unit.positions == {"tok-yes": 1000 * 10**6}


def test_a_whale_size_long_shot_buy_is_dropped_too() -> None:
    assert SerialDetector([], DEFAULTS).process(fill(UNTRACKED, "BUY", 2_000_000, 0.001)) == []


def test_a_full_exit_at_0999_is_an_exit() -> None:
    # Issue 17: 253 shares bought at 0.80, all sold at 0.999 42 s later.
    detector = SerialDetector(W, DEFAULTS)
    bought = detector.process(fill(W[0].address, "BUY", 253, 0.80))
    assert kinds(bought) == ["trader_entry"]
    sold = detector.process(fill(W[0].address, "SELL", 253, 0.999, TS + 42))
    assert kinds(sold) == ["trader_exit"]
    assert sold[0].opens_position is False
    assert sold[0].reasons[0].startswith("w1 (0x0101...0101) sold 100% of its position")


@pytest.mark.parametrize("price", [0.99, 0.999])
def test_whale_size_sells_near_1_are_not_dropped_by_the_buy_price_filter(price: float) -> None:
    detector = SerialDetector([], DEFAULTS)
    assert kinds(detector.process(fill(UNTRACKED, "SELL", 50_000, price))) == ["whale_order"]
    # The mirror image, a BUY of the near-certain outcome, tells nothing.
    assert detector.process(fill(UNTRACKED, "BUY", 50_000, price, TS + 1)) == []


def test_a_sell_near_0_is_an_exit() -> None:
    # Cutting a loss: the wallet sells the loser it bought at 0.30 for 0.01.
    detector = SerialDetector(W, DEFAULTS)
    assert kinds(detector.process(fill(W[1].address, "BUY", 2000, 0.30))) == ["trader_entry"]
    assert kinds(detector.process(fill(W[1].address, "SELL", 2000, 0.01, TS + 60))) == [
        "trader_exit"
    ]


@pytest.mark.parametrize(
    ("price", "emits"), [(0.05, False), (0.051, True), (0.949, True), (0.95, False)]
)
def test_buy_price_band_edges(price: float, emits: bool) -> None:
    detector = SerialDetector(W, DEFAULTS)
    assert bool(detector.process(fill(W[0].address, "BUY", 1000, price))) is emits


def test_default_minimum_notional_for_entries() -> None:
    detector = SerialDetector(W, DEFAULTS)
    assert detector.process(fill(W[0].address, "BUY", 19, 0.5)) == []  # $9.50
    assert detector.process(fill(W[0].address, "BUY", 20, 0.5, token="tok-no")) != []  # $10


def test_small_buys_do_not_make_a_consensus() -> None:
    detector = SerialDetector(W, DEFAULTS)
    small = [fill(w.address, "BUY", 10, 0.5, TS + i) for i, w in enumerate(W)]  # $5 each
    assert run(detector, *small) == []


# --- exits against what the wallet is known to hold ---------------------------------------------


def test_an_exit_never_claims_100_percent_of_more_than_we_tracked() -> None:
    detector = SerialDetector(W, DEFAULTS)
    detector.process(fill(W[0].address, "BUY", 100, 0.5))
    sold = detector.process(fill(W[0].address, "SELL", 150, 0.6, TS + 10))
    assert kinds(sold) == ["trader_exit"]
    first = sold[0].reasons[0]
    assert "100%" not in first
    assert "sold 150.00 shares, more than the 100.00 we knew it held" in first
    assert "counted from its fills since tracking started" in first


# --- seeded positions: a new position, or not -----------------------------------------------------


def seeded(positions: dict[str, int], as_of: int = TS - 3600) -> SerialDetector:
    detector = SerialDetector(W, DEFAULTS)
    for wallet in W:
        held = positions if wallet is W[0] else {}
        detector.seed(wallet.address, {MARKET: held} if held else {}, as_of)
    return detector


def test_a_pre_held_position_gives_no_entry() -> None:
    # Issue 17: it had bought 300 shares of the token in the previous hour.
    detector = seeded({"tok-yes": 300 * 10**6})
    assert detector.process(fill(W[0].address, "BUY", 100, 0.5)) == []
    # Unseeded, the same buy looked like an entry.
    plain = SerialDetector(W, DEFAULTS).process(fill(W[0].address, "BUY", 100, 0.5))
    assert kinds(plain) == ["trader_entry"] and plain[0].opens_position is None


def test_an_entry_of_a_seeded_wallet_is_a_new_position() -> None:
    detector = seeded({"tok-yes": 300 * 10**6})
    other = detector.process(fill(W[1].address, "BUY", 100, 0.5))
    assert kinds(other) == ["trader_entry"] and other[0].opens_position is True
    assert (
        "opened a new position: it held none of this token (per its /positions at"
        in (other[0].reasons[0])
    )
    new_token = detector.process(fill(W[0].address, "BUY", 100, 0.5, token="tok-no"))
    assert kinds(new_token) == ["trader_entry"] and new_token[0].opens_position is True


def test_selling_a_pre_held_position_is_an_exit_measured_against_it() -> None:
    detector = seeded({"tok-yes": 300 * 10**6})
    sold = detector.process(fill(W[0].address, "SELL", 250, 0.7))
    assert kinds(sold) == ["trader_exit"]
    assert (
        "sold 83% of its position (300.00 shares held, per its /positions at"
        in (sold[0].reasons[0])
    )
    # 50 left: selling 40 is 80% of it (after the exit cooldown).
    later = fill(W[0].address, "SELL", 40, 0.7, TS + 300)
    assert kinds(detector.process(later)) == ["trader_exit"]


def test_fills_the_snapshot_holds_already_move_nothing() -> None:
    as_of = TS
    detector = seeded({"tok-yes": 300 * 10**6}, as_of)
    # A fill at the snapshot's second (a backfill, say) is in the snapshot: no entry, no move.
    assert detector.process(fill(W[1].address, "BUY", 100, 0.5, as_of)) == []
    unit = rules.wallet_unit(W[1].address, MARKET)
    assert unit not in detector.states
    whale = detector.process(fill(W[1].address, "BUY", 4000, 0.5, as_of - 5))
    assert kinds(whale) == ["whale_order"] and whale[0].opens_position is None
    # One second later it counts (another wallet: no whale cooldown in the way).
    after = detector.process(fill(W[2].address, "BUY", 4000, 0.5, as_of + 1))
    assert kinds(after) == ["whale_order", "trader_entry"]
    assert [s.opens_position for s in after] == [True, True]
    again = detector.process(fill(W[2].address, "BUY", 4000, 0.5, as_of + 400))
    assert kinds(again) == ["whale_order"] and again[0].opens_position is False


def test_seeding_replaces_what_fills_made_and_keeps_cooldowns() -> None:
    detector = SerialDetector(W, DEFAULTS)
    detector.process(fill(W[0].address, "BUY", 100, 0.5, TS - 100, token="tok-no"))
    detector.seed(W[0].address, {MARKET: {"tok-yes": 7 * 10**6}}, TS - 50)
    unit = detector.states[rules.wallet_unit(W[0].address, MARKET)]
    assert isinstance(unit, WalletMarketState)
    assert unit.positions == {"tok-yes": 7 * 10**6}
    assert unit.last_signal == {"trader_entry": TS - 100}
    # Another market the wallet traded but no longer holds: emptied (and gone when empty).
    detector.process(fill(W[0].address, "BUY", 100, 0.5, TS - 40, token="tok-x"))
    detector.states[rules.wallet_unit(W[0].address, "m2")] = WalletMarketState({"t2": 5}, {})
    detector.seed(W[0].address, {}, TS - 30)
    assert rules.wallet_unit(W[0].address, "m2") not in detector.states


def test_unseeded_whales_and_consensus_leave_opens_position_unknown() -> None:
    detector = SerialDetector(W, RuleSettings(consensus_min_wallets=2))
    found = run(
        detector,
        fill(W[0].address, "BUY", 4000, 0.5),
        fill(W[1].address, "BUY", 4000, 0.5, TS + 1),
    )
    assert {s.kind for s in found} == {
        SignalKind.WHALE_ORDER,
        SignalKind.TRADER_ENTRY,
        SignalKind.CONSENSUS,
    }
    assert all(s.opens_position is None for s in found)
    # A sell never opens a position, seeded or not.
    sold = detector.process(fill(W[0].address, "SELL", 4000, 0.5, TS + 400))
    assert kinds(sold) == ["whale_order", "trader_exit"]
    assert [s.opens_position for s in sold] == [False, False]


def test_settings_default_to_the_documented_values() -> None:
    assert (DEFAULTS.signal_max_price, DEFAULTS.signal_min_price) == (0.95, 0.05)
    assert DEFAULTS.signal_min_notional_usd == 10
    assert time.time() > TS
