"""Unit tests of the simulator's trade sources: tape mapping, passes, schedules, synthetic."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from services.simulator.settings import resolve_path
from services.simulator.synthetic import SyntheticTrades, rate_schedule
from services.simulator.tape import TapeError, for_pass, from_data_api, load_tape, tape_schedule
from services.simulator.trades import (
    EXCHANGE_ADDRESS,
    ORDER_FIELDS,
    BlockClock,
    Trade,
    TradeInputError,
    injected_trade,
)
from shared.models import DomeOrder
from shared.wallets import load_wallets

TAPE = resolve_path(Path("data/polymarket_trades_nobel2025.json"))
HEX32 = re.compile(r"^0x[0-9a-f]{64}$")
ORDER_TYPES: dict[str, type | tuple[type, ...]] = {
    "token_id": str,
    "token_label": str,
    "side": str,
    "market_slug": str,
    "condition_id": str,
    "shares": int,
    "shares_normalized": float,
    "price": float,
    "block_number": int,
    "log_index": int,
    "tx_hash": str,
    "title": str,
    "timestamp": int,
    "order_hash": str,
    "user": str,
    "taker": str,
}


@pytest.fixture(scope="module")
def raw_tape() -> list[dict[str, Any]]:
    items = orjson.loads(TAPE.read_bytes())
    assert isinstance(items, list)
    return items


def stamped(item: dict[str, Any]) -> dict[str, Any]:
    template = from_data_api(item)
    return Trade.stamp(
        template,
        seq=0,
        timestamp=1_760_000_000,
        block_number=77_000_001,
        log_index=3,
        emitted_at=1_760_000_000.5,
    ).order()


def test_tape_item_maps_to_all_16_dome_fields_with_types(raw_tape: list[dict[str, Any]]) -> None:
    for item in raw_tape[:50]:
        order = stamped(item)
        assert tuple(order) == ORDER_FIELDS and len(order) == 16
        for name, kind in ORDER_TYPES.items():
            assert isinstance(order[name], kind), name
        assert order["shares"] == round(item["size"] * 1_000_000)
        assert order["shares_normalized"] == pytest.approx(item["size"], abs=1e-9)
        assert order["user"] == item["proxyWallet"].lower()
        assert order["token_id"] == item["asset"]
        assert order["condition_id"] == item["conditionId"]
        assert order["market_slug"] == item["slug"]
        assert order["token_label"] == item["outcome"]
        assert order["tx_hash"] == item["transactionHash"]
        assert order["title"] == item["title"]
        assert order["price"] == item["price"] and order["side"] == item["side"]
        assert order["taker"] == EXCHANGE_ADDRESS
        assert HEX32.match(order["order_hash"])
        DomeOrder.model_validate(order)


def test_order_hash_is_deterministic_and_distinct(raw_tape: list[dict[str, Any]]) -> None:
    first = [from_data_api(item).order_hash for item in raw_tape]
    again = [from_data_api(item).order_hash for item in raw_tape]
    assert first == again
    assert len(set(first)) == len(first)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"price": "0.5"}, "price must be a number"),
        ({"size": 0}, "size must be > 0"),
        ({"side": "HOLD"}, "side must be BUY or SELL"),
        ({"timestamp": 1.5}, "timestamp must be an integer"),
        ({"proxyWallet": None}, "proxyWallet must be a string"),
    ],
)
def test_unusable_tape_items_are_rejected_with_the_reason(
    raw_tape: list[dict[str, Any]], change: dict[str, Any], message: str
) -> None:
    with pytest.raises(TapeError, match=message):
        from_data_api({**raw_tape[0], **change})


def test_missing_fields_are_named(raw_tape: list[dict[str, Any]]) -> None:
    item = {k: v for k, v in raw_tape[0].items() if k != "asset"}
    with pytest.raises(TapeError, match="asset"):
        from_data_api(item)


def test_load_tape_orders_oldest_first(raw_tape: list[dict[str, Any]]) -> None:
    tape = load_tape(TAPE)
    assert len(tape) == len(raw_tape) == 1000
    stamps = [t.tape_ts for t in tape]
    assert stamps == sorted(stamps)
    # The file lists newest first; trades of the same second keep their real (reversed) order.
    assert tape[0].tx_hash == raw_tape[-1]["transactionHash"]
    assert tape[-1].tx_hash == raw_tape[0]["transactionHash"]


def test_load_tape_reports_bad_files(tmp_path: Path) -> None:
    with pytest.raises(TapeError, match="not found"):
        load_tape(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TapeError, match="not JSON"):
        load_tape(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(TapeError, match="non-empty"):
        load_tape(tmp_path / "empty.json")
    (tmp_path / "item.json").write_text('[{"side": "BUY"}]')
    with pytest.raises(TapeError, match="item 0"):
        load_tape(tmp_path / "item.json")


def test_each_pass_gets_fresh_deterministic_hashes() -> None:
    tape = load_tape(TAPE)
    original = tape[0]
    assert for_pass(original, 0) is original
    one, two = for_pass(original, 1), for_pass(original, 2)
    assert len({original.tx_hash, one.tx_hash, two.tx_hash}) == 3
    assert len({original.order_hash, one.order_hash, two.order_hash}) == 3
    assert HEX32.match(one.tx_hash) and HEX32.match(one.order_hash)
    assert for_pass(original, 1) == one
    assert (one.user, one.token_id, one.shares, one.price) == (
        original.user,
        original.token_id,
        original.shares,
        original.price,
    )
    every_pass = {for_pass(t, n).tx_hash for t in tape for n in range(3)}
    assert len(every_pass) == 3 * len(tape)


def test_tape_schedule_compresses_time_and_loops() -> None:
    tape = load_tape(TAPE)
    span = tape[-1].tape_ts - tape[0].tape_ts
    once = list(tape_schedule(tape, speed=100, loop=False))
    assert len(once) == len(tape)
    assert once[0][0] == 0 and once[-1][0] == pytest.approx(span / 100)
    assert all(n == 0 for _, _, n in once)
    looped = list(itertools.islice(tape_schedule(tape, speed=100, loop=True), 2 * len(tape) + 1))
    second = looped[len(tape)]
    assert second[2] == 1 and second[0] == pytest.approx((span + 1) / 100)
    assert second[1].tx_hash == for_pass(tape[0], 1).tx_hash
    assert looped[-1][2] == 2
    offsets = [offset for offset, _, _ in looped]
    assert offsets == sorted(offsets)


def wallets() -> list[str]:
    return [w.address for w in load_wallets(resolve_path(Path("config/wallets.example.json")))]


def test_synthetic_trades_are_deterministic_by_seed() -> None:
    first = list(itertools.islice(SyntheticTrades(wallets(), seed=7), 300))
    again = list(itertools.islice(SyntheticTrades(wallets(), seed=7), 300))
    other = list(itertools.islice(SyntheticTrades(wallets(), seed=8), 300))
    assert first == again
    assert [t.tx_hash for t in first] != [t.tx_hash for t in other]
    assert [(t.user, t.price) for t in first] != [(t.user, t.price) for t in other]


def test_synthetic_trades_look_real() -> None:
    tracked = set(wallets())
    trades = list(itertools.islice(SyntheticTrades(sorted(tracked), seed=42), 2000))
    assert {t.user for t in trades} <= tracked
    assert all(0.01 <= t.price <= 0.99 for t in trades)
    assert all(t.shares > 0 and t.shares == round(t.shares_normalized * 1e6) for t in trades)
    assert {t.side for t in trades} == {"BUY", "SELL"}
    assert len({t.tx_hash for t in trades}) == len(trades)
    assert len({t.market_slug for t in trades}) > 1
    assert max(t.shares_normalized * t.price for t in trades) > 1000  # some whale orders
    for t in trades[:20]:
        order = Trade.stamp(
            t, seq=0, timestamp=1_760_000_000, block_number=1, log_index=0, emitted_at=0.0
        ).order()
        DomeOrder.model_validate(order)


def test_rate_schedule_spaces_trades_evenly() -> None:
    schedule = list(itertools.islice(rate_schedule(SyntheticTrades(wallets(), 1), 200.0), 5))
    assert [offset for offset, _, _ in schedule] == [0.0, 0.005, 0.01, 0.015, 0.02]


def test_block_clock_counts_log_indexes_within_a_block() -> None:
    clock = BlockClock()
    a, b, c = clock.next(1_760_000_000), clock.next(1_760_000_001), clock.next(1_760_000_002)
    assert a[0] == b[0] and (a[1], b[1]) == (0, 1)
    assert c == (a[0] + 1, 0)


def test_injected_trade_fills_missing_fields_and_keeps_given_ones() -> None:
    filled = injected_trade({}, "u1")
    assert filled.timestamp is None and filled.block_number is None
    assert filled.template.shares == 10_000_000 and filled.template.shares_normalized == 10.0
    given = injected_trade(
        {"user": "0xAbC" + "0" * 37, "price": 1.5, "shares_normalized": 2.5, "timestamp": 1000},
        "u2",
    )
    assert given.template.user == "0xAbC" + "0" * 37
    assert given.template.price == 1.5 and given.template.shares == 2_500_000
    assert given.timestamp == 1000
    assert injected_trade({}, "u3").template.tx_hash != filled.template.tx_hash


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ([1], "JSON object"),
        ({"price": "0.5"}, "price must be a number"),
        ({"timestamp": True}, "timestamp must be an integer"),
        ({"user": 5}, "user must be a string"),
        ({"wallet": "0x"}, "unknown field"),
    ],
)
def test_injected_trade_type_errors(item: Any, message: str) -> None:
    with pytest.raises(TradeInputError, match=message):
        injected_trade(item, "x")
