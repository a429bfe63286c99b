"""`python -m services.detector.replay TAPE --validate [--resolution FILE] [--history EARLIER]`
on the bundled Nobel tape: every figure recomputed here from the tape's JSON and the resolution
file alone, invariants that a wrong sign or a wrong payout would break, the printed report, and
an earlier tape seeding positions."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from services.detector.replay import DEFAULT_TAPE, main, measure, replay, tape_orders
from services.detector.rules import RuleSettings
from services.detector.settings import DetectorSettings
from services.store.markouts import load_resolution
from shared.models import Signal, SignalKind
from shared.wallets import load_wallets

ROOT = Path(__file__).resolve().parent.parent
TAPE = ROOT / DEFAULT_TAPE
RESOLUTION = ROOT / "data" / "nobel2025_resolution.json"
MACHADO = "0x14a3dfeba8b22a32feb0f10763db68bc4d2abeb5bff90e9ae20de53793b35a1d"
XHINRA = "0x9db778f46b7c9b458045764a67ff4afcae917e1f"
WALLETS = load_wallets(ROOT / "config" / "wallets.example.json")
HORIZON_S = {"5m": 300, "1h": 3600, "24h": 86_400}


# The filters before issue 17's defaults: no long-shot or notional filter, so that the tape's
# losing "Yes" buys (most of them small and cheap) are signalled and their settlement checked.
UNFILTERED = RuleSettings(signal_min_price=0, signal_min_notional_usd=0)


def tape_signals(rules: RuleSettings | None = None) -> list[Signal]:
    signals, _ = replay(tape_orders(TAPE), WALLETS, rules or DetectorSettings().rules())
    return signals


def raw_price(trades: list[dict[str, Any]], token: str, at: int) -> float | None:
    """The last trade of the token at or before `at`, read straight off the newest-first dump:
    the first one met going from the oldest (the end of the list) that is not later than `at`."""
    price = None
    for trade in reversed(trades):
        if trade["asset"] == token and trade["timestamp"] <= at:
            price = trade["price"]
    return price


def test_every_figure_follows_from_the_tape_and_the_resolution_file() -> None:
    trades = json.loads(TAPE.read_text())
    payouts = {
        m["conditionId"]: m["payouts"] for m in json.loads(RESOLUTION.read_text())["markets"]
    }
    end = max(t["timestamp"] for t in trades)
    signals = tape_signals()
    measured = measure(signals, tape_orders(TAPE), load_resolution(RESOLUTION), fee_bps=0)
    got = Counter((m.kind, m.wallet, m.horizon, round(m.markout_cents, 9)) for m in measured)
    expected: Counter[tuple[str, str, str, float]] = Counter()
    for s in signals:
        sign = 1 if s.side.value == "BUY" else -1
        for horizon, seconds in HORIZON_S.items():
            later = raw_price(trades, s.token_id, s.exchange_ts + seconds)
            if s.exchange_ts + seconds <= end and later is not None:
                move = round(100 * sign * (later - s.price), 9)
                expected[s.kind.value, s.wallet, horizon, move] += 1
        payout = payouts[s.condition_id][s.token_label]
        expected[
            s.kind.value, s.wallet, "settlement", round(100 * sign * (payout - s.price), 9)
        ] += 1
    assert got == expected
    # Horizons past the tape's end (37 minutes) are not measured, and every signal settles.
    assert {m.horizon for m in measured} == {"5m", "settlement"}
    assert sum(m.horizon == "settlement" for m in measured) == len(signals) == 42


def test_losing_yes_buys_settle_negative_and_the_winner_positive() -> None:
    signals = {s.signal_id: s for s in tape_signals(UNFILTERED)}
    measured = measure(signals.values(), tape_orders(TAPE), load_resolution(RESOLUTION), 0)
    settled = [m for m in measured if m.horizon == "settlement"]
    by_id = list(zip(signals.values(), settled, strict=True))
    losing_yes_buys = [
        (s, m)
        for s, m in by_id
        if s.token_label == "Yes" and s.side.value == "BUY" and s.condition_id != MACHADO
    ]
    consensus_on_losers = [pair for pair in losing_yes_buys if pair[0].kind is SignalKind.CONSENSUS]
    assert losing_yes_buys and consensus_on_losers
    # A share of a losing "Yes" pays 0: whatever was paid for it is lost, every time.
    for s, m in losing_yes_buys:
        assert m.markout_cents < 0 and m.markout_cents == pytest.approx(-100 * s.price)
    winners = [(s, m) for s, m in by_id if s.condition_id == MACHADO and s.token_label == "Yes"]
    assert winners and all(
        (m.markout_cents > 0) == (s.side.value == "BUY") for s, m in winners if s.price < 1
    )
    # A fee is a cost: Polymarket's rate x p x (1 - p) per share, off every figure.
    with_fee = measure(signals.values(), tape_orders(TAPE), load_resolution(RESOLUTION), 400)
    for plain, charged in zip(measured, with_fee, strict=True):
        assert charged.fee_cents >= 0 and plain.fee_cents == 0
        assert charged.markout_cents == pytest.approx(plain.markout_cents - charged.fee_cents)
    for s, m in zip(
        signals.values(), [m for m in with_fee if m.horizon == "settlement"], strict=True
    ):
        assert m.fee_cents == pytest.approx(100 * 0.04 * s.price * (1 - s.price))


def test_the_printed_report(capsys: pytest.CaptureFixture[str]) -> None:
    # Another tape than the bundled one has no resolution unless given one.
    main([str(TAPE), "--validate"])
    assert "no resolution file" in capsys.readouterr().out.split("Does it pay?")[1]
    main(["--validate"])
    report = capsys.readouterr().out.split("Does it pay?")[1]
    assert "settlements from `data/nobel2025_resolution.json`" in report
    assert "is not measured" in report and "Rule: hit = net markout > 0" in report
    # The figures of the bundled tape (the invariants above keep them honest).
    for line in (
        "| `trader_entry` | 5m | 16 | +0.94 | 0.00 | 11 | 1 | 68.8% | 44.4-85.8% |",
        "|  | settlement | 17 | +4.44 | 0.00 | 12 | 0 | 70.6% | 46.9-86.7% | not significant",
        "| `whale_order` | 5m | 10 | +0.02 | 0.00 | 5 | 0 | 50.0% | 23.7-76.3% |",
        "|  | settlement | 13 | +15.83 | 0.00 | 8 | 0 | 61.5% | 35.5-82.3% |",
        "| `consensus` | 5m | 6 | +0.56 | 0.00 | 4 | 0 | 66.7% | 30.0-90.3% |",
        "|  | settlement | 8 | +6.00 | 0.00 | 6 | 0 | 75.0% | 40.9-92.9% |",
        "|  | 1h | 0 |  |  |  |  |  |  | not measured |",
    ):
        assert line in report, line
    main(["--validate", "--by", "wallet", "--fee-bps", "400"])
    by_wallet = capsys.readouterr().out.split("Does it pay?")[1]
    assert "`VALIDATION_FEE_BPS=400`" in by_wallet and "| xhinra37 (0x9db7...7e1f) |" in by_wallet


def test_an_earlier_tape_seeds_positions(tmp_path: Path) -> None:
    trades = json.loads(TAPE.read_text())
    # xhinra37's first Machado "Yes" buy on the tape is an entry: give it that position earlier.
    first = next(
        t
        for t in reversed(trades)
        if t["proxyWallet"] == XHINRA and t["conditionId"] == MACHADO and t["outcome"] == "Yes"
    )
    earlier = {**first, "timestamp": first["timestamp"] - 7200, "transactionHash": "0x" + "e" * 64}
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps([earlier]))
    rules = DetectorSettings().rules()
    plain, _ = replay(tape_orders(TAPE), WALLETS, rules)
    seeded, _ = replay(tape_orders(TAPE), WALLETS, rules, tape_orders(path))

    def entries(signals: list[Signal]) -> set[tuple[str, str]]:
        return {(s.wallet, s.token_id) for s in signals if s.kind is SignalKind.TRADER_ENTRY}

    assert (XHINRA, first["asset"]) in entries(plain)
    assert entries(plain) - entries(seeded) == {(XHINRA, first["asset"])}
    assert len(seeded) < len(plain)
    # Seeded, an entry is known to be a new position; without a history, it is not known.
    assert {s.opens_position for s in seeded if s.kind is SignalKind.TRADER_ENTRY} == {True}
    assert {s.opens_position for s in plain if s.kind is SignalKind.TRADER_ENTRY} == {None}
    assert {s.opens_position for s in seeded if s.kind is SignalKind.TRADER_EXIT} <= {False}
