"""Unit tests of the store's pure parts: entries -> rows, reasons, error classes, migration files.

The factories here (`make_fill`, `make_signal`) are shared by the other `test_store_*` files.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from services.store.database import is_data_error, is_retryable, rounds, statements
from services.store.rows import ORDERS, SIGNALS, prepare
from services.store.schema import MigrationError, load
from shared.models import DomeOrder, OrderFill, Signal, SignalKind, Source, signal_id
from shared.redis_streams import encode
from shared.redis_streams import entry_payload as raw_payload

WALLET = "0x" + "ab" * 20
EXCHANGE_TS = 1_762_480_391


def make_fill(i: int, **overrides: Any) -> OrderFill:
    """A valid fill, distinct per `i`; overrides go into the Dome order (before keying)."""
    fields: dict[str, Any] = {
        "token_id": f"{8031 + i}0659",
        "token_label": "No",
        "side": "BUY",
        "market_slug": f"market-{i % 3}",
        "condition_id": f"0x{i % 3:064x}",
        "shares": 9_000_000 + i,
        "shares_normalized": 9 + i / 1e6,
        "price": 0.56,
        "tx_hash": f"0x{i:064x}",
        "title": f"Market {i % 3}?",
        "timestamp": EXCHANGE_TS + i,
        "order_hash": f"0x{i + 1:064x}",
        "user": WALLET,
        "taker": "0x" + "cd" * 20,
        "block_number": 78_000_000 + i,
        "log_index": i % 100,
    }
    fields.update(overrides)
    return OrderFill.from_dome(DomeOrder(**fields), Source.DOME_WS, time.time())


def make_signal(i: int, **overrides: Any) -> Signal:
    fill = make_fill(i)
    fields: dict[str, Any] = {
        "signal_id": signal_id(SignalKind.WHALE_ORDER, fill.order_key),
        "kind": SignalKind.WHALE_ORDER,
        "wallet": fill.user,
        "wallet_label": "whale one",
        "market_slug": fill.market_slug,
        "title": fill.title,
        "condition_id": fill.condition_id,
        "token_id": fill.token_id,
        "token_label": fill.token_label,
        "side": fill.side,
        "price": fill.price,
        "shares": fill.shares_normalized,
        "notional_usd": fill.notional_usd,
        "confidence": 0.75,
        "reasons": ["notional above 5 USD", "tracked wallet"],
        "order_keys": [fill.order_key],
        "source": fill.source,
        "exchange_ts": fill.timestamp,
        "received_at": fill.received_at,
        "detected_at": fill.received_at + 0.002,
    }
    fields.update(overrides)
    return Signal(**fields)


def entry(payload: Any, entry_id: str = "1-0") -> tuple[str, dict[bytes, bytes]]:
    return entry_id, encode(payload)


def test_order_row_holds_every_field_typed() -> None:
    fill = make_fill(7)
    prepared = prepare(ORDERS, [entry(fill)])
    assert prepared.rejected == [] and prepared.valid == 1
    row = prepared.rows[0]
    values = dict(zip(ORDERS.columns, row.values, strict=True))
    assert row.key == fill.order_key == values["order_key"]
    assert values["wallet"] == WALLET
    assert values["shares"] == Decimal(9_000_007)
    assert values["notional_usd"] == pytest.approx(fill.shares_normalized * 0.56)
    assert values["exchange_ts"] == datetime.fromtimestamp(EXCHANGE_TS + 7, UTC)
    assert values["received_at"] == datetime.fromtimestamp(fill.received_at, UTC)
    assert values["side"] == "BUY" and values["source"] == "dome_ws" and values["v"] == 1
    assert orjson.loads(values["payload"]) == fill.model_dump(mode="json")


def test_signal_row_carries_its_stream_id() -> None:
    signal = make_signal(3)
    prepared = prepare(SIGNALS, [entry(signal, "1700000000000-4")])
    values = dict(zip(SIGNALS.columns, prepared.rows[0].values, strict=True))
    assert values["stream_id"] == "1700000000000-4"
    assert values["kind"] == "whale_order"
    assert values["reasons"] == ["notional above 5 USD", "tracked wallet"]
    assert values["order_keys"] == [make_fill(3).order_key]
    assert values["detected_at"] == datetime.fromtimestamp(signal.detected_at, UTC)


def test_unknown_fields_are_kept_in_the_payload() -> None:
    payload = {**make_fill(1).model_dump(mode="json"), "venue_extra": {"a": 1}}
    prepared = prepare(ORDERS, [entry(payload)])
    values = dict(zip(ORDERS.columns, prepared.rows[0].values, strict=True))
    assert orjson.loads(values["payload"])["venue_extra"] == {"a": 1}


def test_repeats_within_a_batch_are_written_in_rounds() -> None:
    fill = make_fill(1)
    entries = [
        entry(fill, "1-0"),
        entry(fill, "1-1"),
        entry(make_fill(2), "1-2"),
        entry(fill, "2-0"),
    ]
    prepared = prepare(ORDERS, entries)
    assert prepared.valid == 4
    # One statement cannot write a row twice: a key's second entry goes in a second round.
    assert [[row.stream_id for row in batch] for batch in rounds(prepared.rows)] == [
        ["1-0", "1-2"],
        ["1-1"],
        ["2-0"],
    ]


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({b"other": b"x"}, "no 'data' field"),
        ({b"data": b"{not json"}, "not JSON"),
        ({b"data": b"\xff\xfe"}, "not JSON"),
        ({b"data": b"[1, 2]"}, "valid dictionary"),
        (
            {b"data": orjson.dumps({**make_fill(1).model_dump(mode="json"), "price": "0.5"})},
            "price: Value error, must be a number",
        ),
        (
            {b"data": orjson.dumps({**make_fill(1).model_dump(mode="json"), "user": "bob"})},
            "user: String should match pattern",
        ),
        (
            {
                b"data": orjson.dumps(
                    {
                        k: v
                        for k, v in make_fill(1).model_dump(mode="json").items()
                        if k != "order_key"
                    }
                )
            },
            "order_key: Field required",
        ),
        (
            {b"data": orjson.dumps({**make_fill(1).model_dump(mode="json"), "timestamp": 10**12})},
            "timestamp is not a usable Unix time",
        ),
    ],
)
def test_bad_entries_are_rejected_with_a_reason(fields: dict[bytes, bytes], reason: str) -> None:
    prepared = prepare(ORDERS, [("5-0", fields), entry(make_fill(2), "5-1")])
    assert [row.stream_id for row in prepared.rows] == ["5-1"]
    [rejected] = prepared.rejected
    assert rejected.stream_id == "5-0"
    assert reason in rejected.reason
    assert "\n" not in rejected.reason and len(rejected.reason) <= 500
    assert rejected.raw == raw_payload(fields)


def test_raw_payload_keeps_odd_fields_readable() -> None:
    assert raw_payload({b"data": b"\xff"}) == b"\xff"
    assert orjson.loads(raw_payload({b"k\xff": b"v"})) == {"k\\xff": "v"}


def test_signal_contract_is_enforced() -> None:
    bad = {**make_signal(1).model_dump(mode="json"), "confidence": 1.5}
    prepared = prepare(SIGNALS, [entry(bad)])
    assert prepared.rows == [] and "confidence" in prepared.rejected[0].reason


def test_error_classes() -> None:
    assert is_data_error(asyncpg.exceptions.NumericValueOutOfRangeError("x"))
    assert is_data_error(asyncpg.exceptions.NotNullViolationError("x"))
    assert is_data_error(asyncpg.exceptions.ProgramLimitExceededError("x"))
    assert not is_retryable(asyncpg.exceptions.CharacterNotInRepertoireError("x"))
    for transient in (
        ConnectionRefusedError(),
        TimeoutError(),
        asyncpg.exceptions.AdminShutdownError("x"),
        asyncpg.exceptions.ConnectionDoesNotExistError("x"),
        asyncpg.InterfaceError("x"),
        asyncpg.exceptions.ReadOnlySQLTransactionError("x"),
        asyncpg.exceptions.UndefinedTableError("x"),
        asyncpg.exceptions.DeadlockDetectedError("x"),
    ):
        assert is_retryable(transient) and not is_data_error(transient), transient
    assert not is_retryable(KeyError("bug"))


def test_statements() -> None:
    sql = statements(ORDERS)
    assert "ON CONFLICT (order_key) DO UPDATE" in sql.upsert_from_staging
    assert "ORDER BY order_key" in sql.upsert_from_staging
    assert "(t.newest_ms, t.newest_seq) < (EXCLUDED.newest_ms" in sql.upsert_one
    assert sql.upsert_one.count("$") == len(ORDERS.columns)


def test_shipped_migrations_load_in_order() -> None:
    migrations = load()
    assert migrations[0].version == "001"
    assert [int(m.version) for m in migrations] == sorted(int(m.version) for m in migrations)


def test_misnamed_duplicate_or_missing_migrations_are_refused(tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match="no migrations found"):
        load(tmp_path)
    (tmp_path / "001_init.sql").write_text("SELECT 1;")
    (tmp_path / "1_bad.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"1_bad\.sql"):
        load(tmp_path)
    (tmp_path / "1_bad.sql").unlink()
    (tmp_path / "001_again.sql").write_text("SELECT 2;")
    with pytest.raises(MigrationError, match="two migrations with version 001"):
        load(tmp_path)
