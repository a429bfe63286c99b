"""The validation's pure parts: markouts and fees, the price lookups, resolutions (files and
Gamma objects), and the report's tallies, intervals and verdicts."""

from __future__ import annotations

import math
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.store.markouts import (
    PriceSeries,
    ResolutionError,
    fee_cents,
    gamma_payouts,
    last_at_or_before,
    load_resolution,
    markout_cents,
)
from services.store.validation_report import (
    MIN_N,
    Measured,
    complete,
    render,
    tally,
    verdict,
    wilson,
)

ROOT = Path(__file__).resolve().parent.parent
MACHADO = "0x14a3dfeba8b22a32feb0f10763db68bc4d2abeb5bff90e9ae20de53793b35a1d"


def test_markouts_are_signed_by_side_in_cents_net_of_the_taker_fee() -> None:
    assert markout_cents("BUY", 0.40, 0.47, 0) == pytest.approx(7.0)
    assert markout_cents("SELL", 0.40, 0.47, 0) == pytest.approx(-7.0)
    # Polymarket's formula: rate x p x (1 - p) per share; 400 bps at 0.40 is 0.96 cents.
    assert fee_cents(0.40, 400) == pytest.approx(0.96)
    assert markout_cents("BUY", 0.40, 0.47, 400) == pytest.approx(7.0 - 0.96)
    assert markout_cents("SELL", 0.40, 0.47, 400) == pytest.approx(-7.0 - 0.96)
    # Settlement: the payout is the later price.
    assert markout_cents("BUY", 0.678, 1.0, 0) == pytest.approx(32.2)
    assert markout_cents("SELL", 0.07, 0.0, 0) == pytest.approx(7.0)
    # No move and no fee is exactly flat (a miss, not a hit).
    assert markout_cents("BUY", 0.3, 0.3, 0) == 0.0


def test_the_price_at_a_time_is_the_last_at_or_before_it() -> None:
    points = [(100, 0.1), (200, 0.2), (300, 0.3)]
    assert last_at_or_before(points, 99) is None
    assert last_at_or_before(points, 200) == (200, 0.2)
    assert last_at_or_before(points, 299.5) == (200, 0.2)
    assert last_at_or_before(points, 10_000) == (300, 0.3)
    # Trades of one second: the last one of the tape wins, whatever their order by price.
    series = PriceSeries([("a", 10, 0.5), ("a", 20, 0.6), ("a", 20, 0.55), ("b", 5, 0.9)])
    assert series.at("a", 20) == (20, 0.55)
    assert series.at("a", 9) is None
    assert series.at("b", 1e9) == (5, 0.9)
    assert series.at("c", 1e9) is None


def test_the_bundled_resolution_pays_machado_yes_and_every_other_no() -> None:
    resolution = load_resolution(ROOT / "data" / "nobel2025_resolution.json")
    tape = orjson.loads((ROOT / "data" / "polymarket_trades_nobel2025.json").read_bytes())
    assert set(resolution) == {t["conditionId"].lower() for t in tape}
    assert resolution[MACHADO] == {"Yes": 1.0, "No": 0.0}
    others = [payouts for condition, payouts in resolution.items() if condition != MACHADO]
    assert len(others) == 18 and all(p == {"Yes": 0.0, "No": 1.0} for p in others)


def test_a_bad_resolution_file_is_refused_with_the_reason(tmp_path: Path) -> None:
    bad = tmp_path / "r.json"
    bad.write_text('{"markets": [{"conditionId": "0xab", "payouts": {"Yes": 0.7}}]}')
    with pytest.raises(ResolutionError, match=r"market 0: payouts must be 0, 0.5 or 1"):
        load_resolution(bad)
    bad.write_text("[]")
    with pytest.raises(ResolutionError, match="'markets'"):
        load_resolution(bad)
    with pytest.raises(ResolutionError):
        load_resolution(tmp_path / "missing.json")


def gamma(closed: bool, prices: list[str], tokens: list[str] | None = None) -> dict[str, object]:
    return {
        "conditionId": MACHADO,
        "closed": closed,
        "outcomes": '["Yes", "No"]',
        "outcomePrices": orjson.dumps(prices).decode(),
        "clobTokenIds": orjson.dumps(tokens or ["111", "222"]).decode(),
    }


def test_a_gamma_market_is_resolved_only_when_closed_with_payout_prices() -> None:
    payouts = gamma_payouts(gamma(True, ["1", "0"]))
    assert payouts is not None
    assert payouts.of("111", "anything") == 1.0 and payouts.of("222", "Yes") == 0.0
    # An outcome whose token Gamma does not list is found by its label.
    assert payouts.of("333", "No") == 0.0 and payouts.of("333", "Maybe") is None
    assert gamma_payouts(gamma(False, ["1", "0"])) is None  # still trading
    assert gamma_payouts(gamma(True, ["0.9995", "0.0005"])) is None  # closed, not resolved yet
    assert gamma_payouts(gamma(True, ["0.5", "0.5"])) is not None  # a 50-50 resolution
    assert gamma_payouts({**gamma(True, ["1", "0"]), "outcomePrices": "not json"}) is None


def independent_wilson(k: int, n: int) -> tuple[float, float]:
    """The interval from its closed form: (k + z²/2 ± z √(k(n-k)/n + z²/4)) / (n + z²)."""
    z = 1.959963984540054
    root = z * math.sqrt(k * (n - k) / n + z * z / 4)
    return (k + z * z / 2 - root) / (n + z * z), (k + z * z / 2 + root) / (n + z * z)


@given(
    st.integers(min_value=1, max_value=5000).flatmap(
        lambda n: st.tuples(st.integers(0, n), st.just(n))
    )
)
def test_wilson_matches_its_closed_form(case: tuple[int, int]) -> None:
    k, n = case
    low, high = wilson(k, n)
    expected = independent_wilson(k, n)
    assert low == pytest.approx(max(0.0, expected[0]), abs=1e-12)
    assert high == pytest.approx(min(1.0, expected[1]), abs=1e-12)
    assert 0 <= low <= k / n <= high <= 1


def test_the_verdict_says_not_significant_for_small_n_or_an_interval_around_half() -> None:
    assert verdict(0, 0) == "not measured"
    assert verdict(MIN_N - 1, MIN_N - 1) == f"not significant (n < {MIN_N})"
    assert verdict(6, 10) == "not significant (interval includes 50%)"
    assert verdict(10, 10) == "significant: hits more often than not"  # [0.72, 1]
    assert verdict(0, 10) == "significant: misses more often than not"
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)


def m(kind: str, horizon: str, markout: float, wallet: str = "0xa", fee: float = 0.0) -> Measured:
    return Measured(kind, wallet, "alice", "dome_ws", horizon, markout, fee)


def test_tallies_group_count_hits_and_flat_and_say_what_was_not_measured() -> None:
    measured = [
        m("consensus", "5m", 2.0, fee=0.5),
        m("consensus", "5m", 0.0, fee=0.5),
        m("consensus", "5m", -1.0, fee=0.5),
        m("whale_order", "settlement", 30.0),
        m("trader_entry", "5m", 1.0, wallet="0xb"),
    ]
    by_kind = tally(measured, "kind")
    assert [(t.group, t.horizon) for t in by_kind] == [
        ("trader_entry", "5m"),
        ("whale_order", "settlement"),
        ("consensus", "5m"),
    ]
    consensus = by_kind[-1]
    assert (consensus.n, consensus.hits, consensus.flat) == (3, 1, 1)
    assert consensus.mean_cents == pytest.approx(1 / 3) and consensus.mean_fee_cents == 0.5
    full = complete(by_kind, ["trader_exit"])
    assert len(full) == 4 * 4
    assert {t.horizon for t in full if t.group == "trader_exit"} == {
        "5m",
        "1h",
        "24h",
        "settlement",
    }
    lines = render(sorted(full, key=lambda t: (t.group, t.horizon)), "kind")
    assert lines[0].startswith("| kind | horizon | n | mean markout")
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    by_wallet = tally(measured, "wallet")
    assert {t.group for t in by_wallet} == {"0xa", "0xb"}
    assert by_wallet[0].group == "0xa"  # the wallet with more signals first
