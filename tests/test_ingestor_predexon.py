"""The Predexon dialect, frame by frame, as feeds.md documents it: the `connected` greeting, the
ack with its `channel`, events typed `event` or `trade` with the extra fields (`log_index` as a
hex string, `status`, `event_type`), fee refunds that are not fills, the refusal codes, the
subscribe message, the plan tiers and the key in the URL path.

Also the identity of a pending fill and its confirmation (issue 15): the pending event has no log
index or block yet, its confirmation has both; both must get the same order_key, so the
publisher's per-status dedupe publishes it once as pending and once as confirmed, never as two
fills. Twin fills of one transaction (equal in every keyed field) keep two keys through it."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from services.ingestor.dialects import Dialect, message, subscribe_message
from services.ingestor.frames import (
    Ack,
    Fill,
    Greeting,
    NotAFill,
    Refusal,
    Rejected,
    RejectKind,
    ServerError,
    Twins,
    parse_frame,
    refusal_of,
)
from services.ingestor.settings import IngestorSettings
from services.ingestor.sources.dome_ws import limits_of
from services.ingestor.subscriptions import (
    Subscribe,
    SubscriptionPlanError,
    Unsubscribe,
    Update,
    plan_subscriptions,
)
from shared.logs import redact_url
from shared.models import FillStatus, Source

WALLET = "0x6031b6eed1c97e853c6e0f03ad3ce3529351f96d"
OTHER = "0x7c3db723f1d4d8cb9c550095203b686cb11e5c6b"
TRACKED = frozenset({WALLET, OTHER})
NOW = 1762480391.5
KEY = "pdx-live-4b1f0e9a7c3d2e65"


def trade(**changes: Any) -> dict[str, Any]:
    """One fill as Predexon sends it: Dome's fields plus its own, `log_index` in hex."""
    data: dict[str, Any] = {
        "token_id": "80311845198420617467056376519440384952587327936553290283547416181426565580659",
        "token_label": "No",
        "side": "BUY",
        "market_slug": "btc-updown-15m-1762479900",
        "condition_id": "0x5853e1c3b3e0b8ad2d6b9bbd0c7a7cde6a6a5ec6e7a2e2e5b0c1d4a3f2e161bd",
        "shares": 9000000,
        "shares_normalized": 9,
        "price": 0.56,
        "tx_hash": "0xaccc2b1e6b7c5e9f3a4d8e0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b4077",
        "title": "Bitcoin Up or Down - November 6, 8:45PM-9:00PM ET",
        "timestamp": 1762480391,
        "order_hash": "0xc2b8e1d4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a00e13",
        "user": WALLET,
        "taker": "0x8d4e7a9c2b1f3e5d6a7b8c9d0e1f2a3b4c5d1d2e",
        "block_number": 78123456,
        "log_index": "0x2a",
        "event_type": "order_filled",
        "status": "confirmed",
        "role": "maker",
        "fee": 0,
        "version": 2,
        "builder": "0x" + "00" * 32,
        "metadata": "0x" + "00" * 32,
        "outcome_index": 1,
        "is_neg_risk": False,
    }
    data.update(changes)
    return data


def pending(**changes: Any) -> dict[str, Any]:
    return trade(status="pending", block_number=None, log_index=None, **changes)


def frame(data: Any, kind: str = "event", subscription_id: str = "sub_gq5c3resmrq") -> bytes:
    return orjson.dumps({"type": kind, "subscription_id": subscription_id, "data": data})


def parse(raw: bytes | str, twins: Twins | None = None) -> Any:
    return parse_frame(
        raw,
        tracked=TRACKED,
        received_at=NOW,
        max_bytes=1 << 20,
        twins=twins,
        dialect="predexon",
    )


def fill_of(raw: bytes, twins: Twins | None = None) -> Any:
    parsed = parse(raw, twins)
    assert isinstance(parsed, Fill), parsed
    return parsed.fill


# --- server messages -----------------------------------------------------------------------------


def test_the_connected_greeting_is_accepted() -> None:
    greeting = parse(b'{"type":"connected","message":"Connected to Predexon WebSocket"}')
    assert greeting == Greeting("Connected to Predexon WebSocket")


def test_the_ack_names_its_channel_and_is_matched_like_domes() -> None:
    raw = b'{"type":"ack","subscription_id":"sub_gq5c3resmrq","channel":"trades"}'
    assert parse(raw) == Ack("sub_gq5c3resmrq")


@pytest.mark.parametrize("kind", ["event", "trade"])
def test_events_typed_event_or_trade_are_fills_of_predexon(kind: str) -> None:
    fill = fill_of(frame(trade(), kind))
    assert fill.source is Source.PREDEXON
    assert fill.status is FillStatus.CONFIRMED
    assert fill.log_index == 42 and fill.block_number == 78123456
    assert (fill.user, fill.shares_normalized, fill.price) == (WALLET, 9, 0.56)


@pytest.mark.parametrize(("log_index", "expected"), [("0x2a", 42), ("0X0", 0), (42, 42), (7, 7)])
def test_log_index_is_read_as_hex_string_or_as_int(log_index: Any, expected: int) -> None:
    assert fill_of(frame(trade(log_index=log_index))).log_index == expected


def test_a_malformed_hex_log_index_is_rejected_with_the_reason() -> None:
    rejected = parse(frame(trade(log_index="0xnothex")))
    assert isinstance(rejected, Rejected) and rejected.kind is RejectKind.INVALID_EVENT
    assert "log_index" in rejected.reason and "hex" in rejected.reason


def test_a_pending_event_is_a_pending_fill() -> None:
    fill = fill_of(frame(pending()))
    assert fill.status is FillStatus.PENDING
    assert fill.log_index is None and fill.block_number is None


def test_an_event_without_status_is_confirmed() -> None:
    data = trade()
    del data["status"]
    assert fill_of(frame(data)).status is FillStatus.CONFIRMED


def test_a_fee_refund_is_not_a_fill_and_not_dead_lettered() -> None:
    parsed = parse(frame(trade(event_type="fee_refund")))
    assert parsed == NotAFill("fee_refund", "sub_gq5c3resmrq")


@pytest.mark.parametrize(
    ("field", "value"),
    [("event_type", "order_cancelled"), ("status", "failed"), ("is_neg_risk", "maybe")],
)
def test_unknown_event_types_statuses_and_wrong_types_are_rejected(field: str, value: Any) -> None:
    rejected = parse(frame(trade(**{field: value})))
    assert isinstance(rejected, Rejected) and rejected.kind is RejectKind.INVALID_EVENT
    assert field in rejected.reason


@pytest.mark.parametrize(
    ("code", "setting"),
    [
        ("INVALID_FILTERS", "DOME_DIALECT"),
        ("ITEMS_LIMIT", "DOME_TIER"),
        ("CONNECTION_LIMIT", "DOME_MAX_CONNECTIONS"),
    ],
)
def test_each_error_code_is_a_refusal_that_names_what_to_change(code: str, setting: str) -> None:
    raw = orjson.dumps({"type": "error", "code": code, "message": "refused by plan"})
    error = parse(raw)
    assert isinstance(error, ServerError)
    assert error.code == code and error.refusal is Refusal(code)
    assert setting in error.refusal.hint
    assert "refused by plan" in error.detail


def test_an_error_without_a_refusal_code_stays_informational() -> None:
    error = parse(b'{"type":"error","code":"INTERNAL","message":"try again"}')
    assert isinstance(error, ServerError) and error.refusal is None


def test_refusals_are_read_from_codes_in_any_case_and_from_close_reasons() -> None:
    assert refusal_of("items-limit", "") is Refusal.ITEMS_LIMIT
    assert refusal_of("CONNECTION_LIMIT", "CONNECTION_LIMIT") is Refusal.CONNECTION_LIMIT
    assert refusal_of(None, "Connection limit reached for this key") is Refusal.CONNECTION_LIMIT
    assert refusal_of(None, "normal closure") is None


# --- pending, then confirmed: one order_key -------------------------------------------------------


def test_a_pending_fill_and_its_confirmation_share_one_order_key() -> None:
    twins = Twins()
    first = fill_of(frame(pending()), twins)
    confirmed = fill_of(frame(trade(log_index="0x2a")), twins)
    again = fill_of(frame(trade(log_index="0x2a")), twins)
    assert first.status is FillStatus.PENDING and confirmed.status is FillStatus.CONFIRMED
    assert first.order_key == confirmed.order_key == again.order_key
    assert first.occurrence == confirmed.occurrence == 0


def test_twin_fills_each_pending_then_confirmed_keep_two_keys_paired() -> None:
    """Two equal fills of one wallet in one transaction (two resting orders hit by one taker):
    both pending, then confirmed in the other order. Each confirmation gets its own pending
    event's key, and the two keys differ."""
    hashes = ["0x" + "a5" * 32, "0x" + "a7" * 32]
    twins = Twins()
    pending_keys = {h: fill_of(frame(pending(order_hash=h)), twins).order_key for h in hashes}
    confirmed_keys = {
        h: fill_of(frame(trade(order_hash=h, log_index=hex(index))), twins).order_key
        for h, index in reversed(list(zip(hashes, (5, 7), strict=True)))
    }
    assert pending_keys == confirmed_keys
    assert len(set(pending_keys.values())) == 2


def test_a_confirmation_seen_first_and_a_late_pending_copy_share_the_key() -> None:
    twins = Twins()
    confirmed = fill_of(frame(trade()), twins)
    late = fill_of(frame(pending()), twins)
    assert late.order_key == confirmed.order_key


def test_distinct_log_indexes_are_distinct_fills_even_with_one_order_hash() -> None:
    twins = Twins()
    first = fill_of(frame(trade(log_index="0x5")), twins)
    second = fill_of(frame(trade(log_index="0x7")), twins)
    assert first.order_key != second.order_key


# --- requests ------------------------------------------------------------------------------------


def test_subscribe_is_domes_message_byte_for_byte() -> None:
    assert subscribe_message([WALLET], "predexon") == subscribe_message([WALLET], "dome")


def test_status_all_asks_for_pending_events_on_subscribe_and_update() -> None:
    dialect = Dialect("predexon", status_all=True)
    subscribe = message(Subscribe(1, (WALLET,)), dialect)
    assert subscribe == {
        "action": "subscribe",
        "platform": "polymarket",
        "version": 1,
        "type": "orders",
        "filters": {"users": [WALLET], "status": "all"},
    }
    update = message(Update(1, "sub_1", (WALLET, OTHER)), dialect)
    assert update["action"] == "update" and update["subscription_id"] == "sub_1"
    assert update["filters"] == {"users": [WALLET, OTHER], "status": "all"}
    assert message(Unsubscribe(1, "sub_1"), dialect) == {
        "action": "unsubscribe",
        "version": 1,
        "subscription_id": "sub_1",
    }


# --- settings: URL, key, plans -------------------------------------------------------------------


def predexon_settings(**overrides: Any) -> IngestorSettings:
    values: dict[str, Any] = {
        "_env_file": None,
        "dome_dialect": "predexon",
        "dome_ws_url": "wss://wss.predexon.com/v1/",
        "predexon_api_key": KEY,
        **overrides,
    }
    return IngestorSettings(**values)


def test_the_key_goes_in_the_path_and_never_in_a_repr_or_redacted_url() -> None:
    settings = predexon_settings()
    endpoint = settings.dome_ws_endpoint()
    assert endpoint == f"wss://wss.predexon.com/v1/{KEY}"
    assert KEY not in redact_url(endpoint)
    assert KEY not in repr(settings) and KEY not in str(settings.model_dump())
    assert KEY in settings.secrets()


def test_without_its_own_key_the_dome_key_is_used() -> None:
    settings = predexon_settings(predexon_api_key="", dome_api_key="shared-key-1234")
    assert settings.dome_ws_endpoint().endswith("/v1/shared-key-1234")


@pytest.mark.parametrize(
    ("tier", "subscriptions", "per_subscription"),
    [("predexon_dev", 10, 10), ("predexon_pro", 100, 500)],
)
def test_the_plans_feed_the_subscription_split(
    tier: str, subscriptions: int, per_subscription: int
) -> None:
    settings = predexon_settings(dome_tier=tier)
    limits = limits_of(settings)
    assert (limits.max_subscriptions, limits.wallets_per_subscription) == (
        subscriptions,
        per_subscription,
    )
    wallets = [f"0x{i:040x}" for i in range(subscriptions * per_subscription)]
    chunks = [chunk for connection in plan_subscriptions(wallets, limits) for chunk in connection]
    assert len(chunks) == subscriptions and all(len(c) == per_subscription for c in chunks)
    with pytest.raises(SubscriptionPlanError, match="DOME_TIER"):
        plan_subscriptions([*wallets, "0x" + "f" * 40], limits)
    # No REST rate is published for these plans: DOME_REST_RATE_* keep their defaults.
    assert (
        settings.dome_rest_rate_per_s
        == IngestorSettings.model_fields["dome_rest_rate_per_s"].default
    )


def test_an_explicit_limit_beats_the_plan() -> None:
    settings = predexon_settings(dome_tier="predexon_dev", dome_wallets_per_subscription=5)
    assert limits_of(settings).wallets_per_subscription == 5
