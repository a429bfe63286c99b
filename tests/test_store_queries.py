"""Unit tests of the API's pure parts: cursors, filters -> SQL, CSV cells, content negotiation,
the wallet diff, and the API settings."""

from __future__ import annotations

import base64
import contextlib
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from services.store import queries
from services.store.api import wants_csv
from services.store.queries import ORDERS, SIGNALS, Cursor, CursorError
from services.store.settings import StoreSettings
from services.store.wallets import differences
from shared.models import TrackedWallet
from shared.redis_streams import entry_position

T0 = datetime(2025, 11, 6, 20, 53, 11, 123456, tzinfo=UTC)
A, B, C = ("0x" + c * 40 for c in "abc")


@given(
    st.sampled_from([SIGNALS, ORDERS]),
    st.sampled_from(["asc", "desc"]),
    st.datetimes(
        min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
    ),
    st.text(
        alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]),
        min_size=1,
        max_size=200,
    ),
)
def test_cursors_round_trip_exactly(
    resource: queries.Resource, order: Any, moment: datetime, key: str
) -> None:
    cursor = Cursor(resource.name, order, moment, key)
    assert queries.decode_cursor(queries.encode_cursor(cursor), resource, order) == cursor


def _raw(value: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(value)).decode().rstrip("=")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "pass back the next_cursor"),
        ("not base64 !", "pass back the next_cursor"),
        ("A" * (queries.MAX_CURSOR_CHARS + 1), "too long"),
        (_raw({"a": 1}), "pass back the next_cursor"),
        (_raw(["signals", "desc", 1.5, "k"]), "pass back the next_cursor"),
        (_raw(["signals", "desc", 10**18, "k"]), "pass back the next_cursor"),
        (_raw(["signals", "sideways", 1, "k"]), "pass back the next_cursor"),
        (_raw(["signals", "desc", 1, "nul\x00"]), "pass back the next_cursor"),
        (_raw(["signals", "desc", 1, 7]), "pass back the next_cursor"),
        (_raw(["users", "desc", 1, "k"]), "pass back the next_cursor"),
        (_raw(["orders", "desc", 1, "k"]), "belongs to /orders, not /signals"),
        (_raw(["signals", "asc", 1, "k"]), "made for order=asc"),
    ],
)
def test_bad_cursors_are_refused_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(CursorError, match=message):
        queries.decode_cursor(text, SIGNALS, "desc")


@given(st.text(max_size=400))
def test_any_text_is_a_cursor_or_a_cursor_error(text: str) -> None:
    with contextlib.suppress(CursorError):
        queries.decode_cursor(text, SIGNALS, "desc")


def test_every_filter_becomes_a_numbered_condition() -> None:
    since, until = T0, T0 + timedelta(days=1)
    where = queries.filters(
        SIGNALS,
        wallet=A,
        market="will-x-happen",
        token="123",
        kinds=["whale_order"],
        since=since,
        until=until,
        min_confidence=0.5,
    )
    assert where.conditions == [
        "wallet = $1",
        "market_slug = $2",
        "token_id = $3",
        "kind = ANY($4::text[])",
        "detected_at >= $5",
        "detected_at < $6",
        "confidence >= $7",
    ]
    assert where.params == [A, "will-x-happen", "123", ["whale_order"], since, until, 0.5]
    cursor = Cursor("signals", "desc", T0, "ff")
    sql, params = queries.page_sql(SIGNALS, where, "desc", cursor, 11)
    assert sql.endswith(
        "WHERE wallet = $1 AND market_slug = $2 AND token_id = $3 AND kind = ANY($4::text[]) "
        "AND detected_at >= $5 AND detected_at < $6 AND confidence >= $7 "
        "AND (detected_at, signal_id) < ($8, $9) "
        "ORDER BY detected_at DESC, signal_id DESC LIMIT $10"
    )
    assert params[-3:] == [T0, "ff", 11]


def test_orders_page_ascending_without_filters_or_limit() -> None:
    cursor = Cursor("orders", "asc", T0, "ab")
    sql, params = queries.page_sql(ORDERS, queries.filters(ORDERS), "asc", cursor, None)
    assert sql.endswith(
        "FROM orders WHERE (exchange_ts, order_key) > ($1, $2) "
        "ORDER BY exchange_ts ASC, order_key ASC"
    )
    assert params == [T0, "ab"]


def test_a_market_is_a_condition_id_or_a_slug() -> None:
    condition = "0x" + "AB" * 32
    where = queries.filters(ORDERS, market=condition)
    assert where.conditions == ["condition_id = $1"] and where.params == [condition.lower()]
    assert queries.market_column("0x" + "ab" * 31) == "market_slug"  # too short for an id
    assert queries.market_column("btc-updown-15m-1762479900") == "market_slug"


def test_csv_cells_neutralize_formulas_in_every_text_cell_not_in_numbers() -> None:
    for text in ("=HYPERLINK(1)", "+1", "-1+cmd", "@SUM(A1)", "\t=1", "\r=1"):
        assert queries.csv_cell(text) == "'" + text
    assert queries.csv_cell(["=1+1", "b"]) == "'=1+1; b"
    assert queries.csv_cell(-0.5) == "-0.5"
    assert queries.csv_cell(-3) == "-3"
    assert queries.csv_cell(Decimal(-9_000_000)) == "-9000000"
    assert queries.csv_cell(None) == ""
    assert queries.csv_cell(["a", "b"]) == "a; b"
    assert queries.csv_cell(T0) == "2025-11-06T20:53:11.123456Z"
    assert queries.csv_cell(Decimal(9_000_000)) == "9000000"
    lines = queries.csv_lines(SIGNALS, [], header=True)
    assert lines.startswith("signal_id,kind,wallet,") and lines.endswith("\r\n")


@pytest.mark.parametrize(
    ("fmt", "accept", "csv"),
    [
        (None, "", False),
        (None, "text/csv", True),
        (None, "text/csv;q=0.9, application/json", True),
        (None, "application/json, text/csv", False),
        (None, "*/*", False),
        ("json", "text/csv", False),
        ("csv", "application/json", True),
    ],
)
def test_csv_is_chosen_by_format_then_accept(fmt: Any, accept: str, csv: bool) -> None:
    assert wants_csv(fmt, accept) is csv


def test_differences_make_the_registry_equal_postgres() -> None:
    durable = [TrackedWallet(address=A, label="a"), TrackedWallet(address=B, label="b2")]
    live = [TrackedWallet(address=B, label="b"), TrackedWallet(address=C, label="c")]
    upserts, removals = differences(durable, live)
    assert upserts == durable and removals == [C]
    assert differences(durable, durable) == ([], [])


def test_stream_ids_compare_as_numbers() -> None:
    assert entry_position("1700000000000-12") == (1_700_000_000_000, 12)
    assert entry_position("9-0") < entry_position("10-0")


def test_api_settings_refuse_weak_or_inconsistent_auth() -> None:
    assert StoreSettings(store_api_token="").store_api_token is None
    with pytest.raises(ValidationError, match="at least 16 characters") as short:
        StoreSettings(store_api_token="hunter2-secret")
    assert "hunter2" not in str(short.value)
    with pytest.raises(ValidationError, match="needs STORE_API_TOKEN"):
        StoreSettings(store_api_read_auth=True)
    token = StoreSettings(store_api_token="x" * 16).store_api_token
    assert token is not None and "x" * 16 not in repr(token)
