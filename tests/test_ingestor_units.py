"""Unit tests of the ingestor's pure parts: backoff, frame parsing, subscription planning, the ack
registry, settings, health evaluation. (More pure logic in test_ingestor_logic.py.)"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from services.ingestor.dialects import subscribe_message
from services.ingestor.feed_status import (
    ConnectionState,
    FeedStatus,
    evaluate_health,
    feed_report,
)
from services.ingestor.frames import (
    Ack,
    Fill,
    Ignored,
    Rejected,
    RejectKind,
    ServerError,
    parse_frame,
)
from services.ingestor.settings import IngestorSettings
from services.ingestor.sources.dome_ws import limits_of
from services.ingestor.subscriptions import (
    Slot,
    Subscribe,
    SubscriptionLimits,
    SubscriptionPlanError,
    SubscriptionRegistry,
    plan_subscriptions,
)
from shared.backoff import Backoff, backoff_bound, retrying
from shared.models import Source, order_key
from shared.wallets import load_wallets

WALLET = "0x6031b6eed1c97e853c6e0f03ad3ce3529351f96d"
OTHER_WALLET = "0x8d4e7a9c2b1f3e5d6a7b8c9d0e1f2a3b4c5d6e7f"
TRACKED = frozenset({WALLET})
SETTINGS_ENV = (
    "DOME_API_KEY",
    "DOME_WS_URL",
    "DOME_USE_WEBSOCKET",
    "DOME_MAX_SUBSCRIPTIONS",
    "DOME_WALLETS_PER_SUBSCRIPTION",
    "WALLETS_FILE",
    "OPS_PORT",
    "DOME_TIER",
    "INGEST_SOURCES",
    "DOME_DIALECT",
)


def order_data(**changes: Any) -> dict[str, Any]:
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
        "user": WALLET.upper().replace("0X", "0x"),
        "taker": "0x8d4e7a9c2b1f3e5d6a7b8c9d0e1f2a3b4c5d1d2e",
    }
    data.update(changes)
    return data


def event_frame(data: Any, subscription_id: str = "sub_gq5c3resmrq") -> bytes:
    return orjson.dumps({"type": "event", "subscription_id": subscription_id, "data": data})


def parse(raw: bytes | str, max_bytes: int = 1 << 20) -> Any:
    return parse_frame(raw, tracked=TRACKED, received_at=1762480391.5, max_bytes=max_bytes)


# --- backoff -------------------------------------------------------------------------------------


def test_backoff_doubles_from_min_to_max_without_jitter() -> None:
    backoff = Backoff(1.0, 60.0, jitter=0.0)
    assert [backoff.next_delay() for _ in range(9)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_backoff_jitter_stays_within_a_quarter_below_the_bound() -> None:
    backoff = Backoff(1.0, 60.0, rng=random.Random(7))
    for attempt in range(12):
        bound = backoff_bound(attempt, 1.0, 60.0)
        assert 0.75 * bound <= backoff.next_delay() <= bound


def test_backoff_jitter_varies_between_clients() -> None:
    delays = {Backoff(1.0, 60.0, rng=random.Random(seed)).next_delay() for seed in range(20)}
    assert len(delays) > 1


def test_backoff_reset_and_max_delay() -> None:
    backoff = Backoff(1.0, 60.0, jitter=0.0)
    for _ in range(4):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() == 1.0
    assert backoff.max_delay() == 60.0
    assert backoff.next_delay() == 60.0  # an auth failure leaves the bound at the maximum


def test_backoff_bound_survives_huge_attempt_counts() -> None:
    assert backoff_bound(10_000, 1.0, 60.0) == 60.0


@pytest.mark.parametrize(("minimum", "maximum", "jitter"), [(0, 1, 0.1), (2, 1, 0.1), (1, 2, 1.0)])
def test_backoff_rejects_bad_parameters(minimum: float, maximum: float, jitter: float) -> None:
    with pytest.raises(ValueError):
        Backoff(minimum, maximum, jitter=jitter)


# --- frames --------------------------------------------------------------------------------------


def test_event_becomes_a_fill_with_the_cross_source_order_key() -> None:
    frame = parse(event_frame(order_data()))
    assert isinstance(frame, Fill)
    fill = frame.fill
    assert frame.subscription_id == "sub_gq5c3resmrq"
    assert fill.user == WALLET
    assert fill.source is Source.DOME_WS
    assert fill.received_at == 1762480391.5
    assert fill.order_key == order_key(
        order_data()["tx_hash"], WALLET, order_data()["token_id"], "BUY", 9, 0.56
    )


def test_seed_short_event_shape_is_accepted() -> None:
    data = {
        key: order_data()[key]
        for key in (
            "token_id",
            "side",
            "market_slug",
            "shares_normalized",
            "price",
            "timestamp",
            "user",
            "tx_hash",
        )
    }
    assert isinstance(parse(event_frame(data)), Fill)


def test_text_frames_parse_like_bytes() -> None:
    assert isinstance(parse(event_frame(order_data()).decode()), Fill)


def test_ack_and_error_frames() -> None:
    assert parse(b'{"type":"ack","subscription_id":"sub_1"}') == Ack("sub_1")
    error = parse(b'{"type":"error","message":"rate limited"}')
    assert isinstance(error, ServerError)
    assert "rate limited" in error.detail


@pytest.mark.parametrize(
    ("raw", "kind", "reason_part"),
    [
        (b'{"type":"event",', RejectKind.BAD_JSON, "not JSON"),
        (b"[1, 2]", RejectKind.NOT_AN_OBJECT, "list"),
        (b'{"type":"ack"}', RejectKind.INVALID_ACK, "subscription_id"),
        (b'{"type":"pong","subscription_id":"sub_9"}', RejectKind.UNKNOWN_TYPE, '"pong"'),
        (b'{"subscription_id":"sub_9"}', RejectKind.UNKNOWN_TYPE, "null"),
        (b'{"type":"event","subscription_id":"sub_9"}', RejectKind.INVALID_EVENT, "'data'"),
    ],
)
def test_malformed_frames_are_rejected_with_a_reason(
    raw: bytes, kind: RejectKind, reason_part: str
) -> None:
    frame = parse(raw)
    assert isinstance(frame, Rejected)
    assert frame.kind is kind
    assert reason_part in frame.reason


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({k: v for k, v in order_data().items() if k != "tx_hash"}, "tx_hash"),
        (order_data(price="0.56"), "price"),
        (order_data(shares_normalized="9"), "shares_normalized"),
        (order_data(price=1.5), "price"),
        (order_data(side="HOLD"), "side"),
        (order_data(user="0x1234"), "user"),
        (order_data(timestamp=0), "timestamp"),
    ],
)
def test_invalid_orders_name_the_field(data: dict[str, Any], field: str) -> None:
    frame = parse(event_frame(data))
    assert isinstance(frame, Rejected)
    assert frame.kind is RejectKind.INVALID_EVENT
    assert frame.reason.startswith("invalid order: ")
    assert field in frame.reason
    assert frame.subscription_id == "sub_gq5c3resmrq"


def test_untracked_wallet_is_rejected() -> None:
    frame = parse(event_frame(order_data(user=OTHER_WALLET)))
    assert isinstance(frame, Rejected)
    assert frame.kind is RejectKind.UNTRACKED_WALLET
    assert OTHER_WALLET in frame.reason


def test_a_just_removed_wallet_is_ignored_not_rejected() -> None:
    frame = parse_frame(
        event_frame(order_data(user=OTHER_WALLET)),
        tracked=TRACKED,
        received_at=1.0,
        max_bytes=1 << 20,
        ignored={OTHER_WALLET},
    )
    assert frame == Ignored(OTHER_WALLET)


def test_oversized_frame_is_rejected_before_parsing() -> None:
    raw = event_frame(order_data(title="x" * 5000))
    frame = parse(raw, max_bytes=4096)
    assert isinstance(frame, Rejected)
    assert frame.kind is RejectKind.OVERSIZED
    assert str(len(raw)) in frame.reason and "4096" in frame.reason
    assert isinstance(parse(raw, max_bytes=len(raw)), Fill)


def test_oversized_counts_utf8_bytes_not_characters() -> None:
    raw = event_frame(order_data(title="é" * 3000)).decode()
    assert len(raw) < 4096 < len(raw.encode())
    frame = parse(raw, max_bytes=4096)
    assert isinstance(frame, Rejected) and frame.kind is RejectKind.OVERSIZED


# --- subscriptions -------------------------------------------------------------------------------


def wallets(count: int) -> list[str]:
    return [f"0x{index:040x}" for index in range(count)]


def limits(
    per: int, subs: int, per_connection: int = 500, connections: int = 10
) -> SubscriptionLimits:
    return SubscriptionLimits(per, subs, per_connection, connections)


def test_wallets_are_chunked_in_order() -> None:
    (chunks,) = plan_subscriptions(wallets(20), limits(7, 3))
    assert [len(chunk) for chunk in chunks] == [7, 7, 6]
    assert [w for chunk in chunks for w in chunk] == wallets(20)


def test_exactly_the_capacity_fits() -> None:
    (chunks,) = plan_subscriptions(wallets(10), limits(5, 2))
    assert len(chunks) == 2


def test_subscriptions_spread_over_connections() -> None:
    plan = plan_subscriptions(wallets(1200), limits(500, 500, per_connection=2))
    assert [[len(chunk) for chunk in conn] for conn in plan] == [[500, 500], [200]]


def test_too_many_wallets_names_the_numbers() -> None:
    with pytest.raises(SubscriptionPlanError) as error:
        plan_subscriptions(wallets(11), limits(5, 2))
    message = str(error.value)
    assert "11 tracked wallets" in message
    assert "2 subscriptions x 5 wallets = 10" in message
    assert "DOME_MAX_SUBSCRIPTIONS" in message and "DOME_WALLETS_PER_SUBSCRIPTION" in message
    assert "need 3 subscriptions" in message


def test_too_few_connections_names_the_numbers() -> None:
    with pytest.raises(SubscriptionPlanError) as error:
        plan_subscriptions(wallets(30), limits(5, 10, per_connection=2, connections=2))
    message = str(error.value)
    assert "need 6 subscriptions" in message and "2 connections x 2 subscriptions = 4" in message


def test_no_wallets_plan_no_connection() -> None:
    assert plan_subscriptions([], limits(5, 2)) == []


def test_subscribe_message_is_domes_shape() -> None:
    assert subscribe_message((WALLET,)) == {
        "action": "subscribe",
        "platform": "polymarket",
        "version": 1,
        "type": "orders",
        "filters": {"users": [WALLET]},
    }


def test_acks_match_subscribes_first_in_first_out() -> None:
    registry = SubscriptionRegistry()
    slots = [Slot(1, ["a"]), Slot(2, ["b", "c"]), Slot(3, ["d"])]
    sent = registry.reconcile(slots)
    assert sent == [Subscribe(1, ("a",)), Subscribe(2, ("b", "c")), Subscribe(3, ("d",))]
    assert registry.reconcile(slots) == []  # waiting for acks: nothing sent twice
    assert registry.acked("sub_x") == ("a",)
    assert registry.acked("sub_y") == ("b", "c")
    assert registry.pending == 1
    assert registry.acked("sub_z") == ("d",)
    assert registry.acked("sub_extra") is None
    assert registry.active == {"sub_x": ("a",), "sub_y": ("b", "c"), "sub_z": ("d",)}
    assert registry.wallets == 4 and registry.confirmed() == {"a", "b", "c", "d"}
    registry.clear()
    assert registry.active == {} and registry.pending == 0


# --- settings ------------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in SETTINGS_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_settings_defaults(clean_env: pytest.MonkeyPatch) -> None:
    settings = IngestorSettings(_env_file=None)
    assert settings.ops_port == 8082
    assert settings.dome_ws_endpoint() == "ws://127.0.0.1:8765/demo-key"
    assert (settings.dome_max_subscriptions, settings.dome_wallets_per_subscription) == (500, 500)
    assert settings.dome_max_frame_bytes == 1 << 20
    assert settings.dedupe_ttl_s == 7 * 24 * 3600
    assert settings.dome_use_websocket is True
    assert settings.sources() == ("dome_ws",) and settings.backfill_via == "dome_rest"
    assert settings.backfill_initial_lookback_s == 3600


def test_settings_read_unprefixed_env_and_hide_the_key(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DOME_API_KEY", "s3cret-dome-key")
    clean_env.setenv("DOME_WS_URL", "wss://ws.domeapi.io/")
    clean_env.setenv("DOME_MAX_SUBSCRIPTIONS", "2")
    clean_env.setenv("OPS_PORT", "9999")
    settings = IngestorSettings(_env_file=None)
    assert settings.dome_ws_endpoint() == "wss://ws.domeapi.io/s3cret-dome-key"
    assert settings.dome_max_subscriptions == 2 and settings.ops_port == 9999
    for text in (str(settings), repr(settings), str(settings.model_dump())):
        assert "s3cret-dome-key" not in text


def test_a_tier_fills_in_the_limits_not_set_explicitly(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DOME_TIER", "Free")
    free = IngestorSettings(_env_file=None)
    assert (free.dome_max_subscriptions, free.dome_wallets_per_subscription) == (2, 5)
    assert (free.dome_rest_rate_per_s, free.dome_rest_rate_per_10s) == (10, 100)
    clean_env.setenv("DOME_MAX_SUBSCRIPTIONS", "3")
    assert IngestorSettings(_env_file=None).dome_max_subscriptions == 3
    clean_env.delenv("DOME_MAX_SUBSCRIPTIONS")
    dev = IngestorSettings(_env_file=None, dome_tier="dev", dome_rest_rate_per_s=7)
    assert (dev.dome_max_subscriptions, dev.dome_rest_rate_per_10s) == (500, 500)
    assert dev.dome_rest_rate_per_s == 7


def test_sources_and_the_seeds_polling_switch(clean_env: pytest.MonkeyPatch) -> None:
    assert IngestorSettings(_env_file=None, dome_use_websocket=False).sources() == ("dome_rest",)
    both = IngestorSettings(_env_file=None, ingest_sources=" Dome_WS , data_api,dome_ws")
    assert both.sources() == ("dome_ws", "data_api")
    with pytest.raises(ValidationError, match="INGEST_SOURCES"):
        IngestorSettings(_env_file=None, ingest_sources="dome_ws,kalshi")


def test_polynode_dialect_puts_its_own_key_in_the_query(clean_env: pytest.MonkeyPatch) -> None:
    settings = IngestorSettings(
        _env_file=None,
        dome_dialect="polynode",
        dome_ws_url="wss://ws.polynode.dev/ws",
        polynode_api_key="pn/key+1",
        dome_api_key="dome-key",
    )
    assert settings.dome_ws_endpoint() == "wss://ws.polynode.dev/ws?key=pn%2Fkey%2B1"
    assert {"pn/key+1", "pn%2Fkey%2B1", "dome-key"} <= set(settings.secrets())
    for text in (str(settings), repr(settings)):
        assert "pn/key" not in text and "dome-key" not in text


def test_settings_reject_bad_values(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="ws://"):
        IngestorSettings(_env_file=None, dome_ws_url="http://x")
    with pytest.raises(ValidationError, match="http://"):
        IngestorSettings(_env_file=None, data_api_url="ftp://x")
    with pytest.raises(ValidationError, match="DOME_RECONNECT_MAX_S"):
        IngestorSettings(_env_file=None, dome_reconnect_min_s=5, dome_reconnect_max_s=1)


def test_free_tier_limits_with_the_example_wallets_are_refused(
    clean_env: pytest.MonkeyPatch,
) -> None:
    settings = IngestorSettings(_env_file=None, dome_tier="free")
    with pytest.raises(
        SubscriptionPlanError, match=r"20 tracked wallets exceed .* 2 subscriptions x 5"
    ):
        limits_of(settings).check(len(load_wallets(settings.wallets_path())))


def test_example_wallets_fit_one_dev_tier_subscription(clean_env: pytest.MonkeyPatch) -> None:
    settings = IngestorSettings(_env_file=None)
    addresses = [w.address for w in load_wallets(settings.wallets_path())]
    assert [
        [len(c) for c in conn] for conn in plan_subscriptions(addresses, limits_of(settings))
    ] == [[20]]


# --- health --------------------------------------------------------------------------------------


def test_health_turns_red_when_down_too_long_or_redis_unreachable() -> None:
    status = FeedStatus(source="dome_ws", wallets=3, started_at=1000.0)
    ok, details = evaluate_health(status, redis_ok=True, now=1010.0, max_down_s=60)
    assert ok and details["state"] == "starting"
    ok, details = evaluate_health(status, redis_ok=True, now=1061.0, max_down_s=60)
    assert not ok and "not connected for 61s" in details["problems"][0]
    status.mark_connected()
    assert evaluate_health(status, redis_ok=True, now=5000.0, max_down_s=60)[0]
    ok, details = evaluate_health(status, redis_ok=False, now=5000.0, max_down_s=60)
    assert not ok and details["redis"] == "unreachable"
    status.mark_down(ConnectionState.DISCONNECTED, "gone", now=5000.0)
    assert evaluate_health(status, redis_ok=True, now=5059.0, max_down_s=60)[0]
    assert not evaluate_health(status, redis_ok=True, now=5061.0, max_down_s=60)[0]


def test_status_fields_are_strings_for_the_hash() -> None:
    status = FeedStatus(source="dome_ws", wallets=3, started_at=1000.0)
    status.mark_connected()
    status.subscriptions = 2
    status.mark_event(1002.5, 1762480391)
    poller = FeedStatus(source="data_api", wallets=3, started_at=1000.0)
    report = feed_report([status, poller], 1004.0, published=5, duplicates=1, queued=0)
    fields = report.to_fields()
    assert fields["source"] == "dome_ws,data_api" and fields["published"] == "5"
    assert fields["connected"] == "0" and fields["state"] == "starting"
    assert fields["subscriptions"] == "2" and fields["last_exchange_ts"] == "1762480391"
    assert fields["seconds_since_last_event"] == "1.500"
    assert all(isinstance(value, str) for value in fields.values())
    per_source = orjson.loads(fields["sources"])
    assert (
        per_source["dome_ws"]["connected"] == "1" and per_source["data_api"]["state"] == "starting"
    )


def test_a_source_without_wallets_is_never_stale_and_silence_is_opt_in() -> None:
    idle = FeedStatus(source="dome_ws", wallets=0, started_at=1000.0)
    assert evaluate_health([idle], redis_ok=True, now=9000.0, max_down_s=60)[0]
    quiet = FeedStatus(source="data_api", wallets=5, started_at=1000.0)
    quiet.mark_connected()
    assert evaluate_health([quiet], redis_ok=True, now=9000.0, max_down_s=60)[0]
    ok, details = evaluate_health(
        [quiet], redis_ok=True, now=9000.0, max_down_s=60, max_event_silence_s=600
    )
    assert not ok and "no event for 8000s" in details["problems"][0]


def test_relative_wallets_file_is_found_from_any_directory(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clean_env.chdir(tmp_path)
    settings = IngestorSettings(_env_file=None)
    assert settings.wallets_path().is_file()
    assert len(load_wallets(settings.wallets_path())) == 20


async def test_retrying_retries_transient_errors_and_gives_up_at_its_bound() -> None:
    calls: list[int] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("down")
        return "ok"

    fast = Backoff(0.001, 0.002, jitter=0)
    assert await retrying(flaky, transient=(ConnectionError,), backoff=fast) == "ok"
    assert len(calls) == 3

    tries: list[int] = []

    async def down() -> None:
        tries.append(1)
        raise ConnectionError("still down")

    with pytest.raises(ConnectionError):  # the bound ends it, after some tries
        await retrying(down, transient=(ConnectionError,), within_s=0.05, backoff=fast)
    assert len(tries) > 1

    async def broken() -> None:
        raise KeyError("a bug")

    with pytest.raises(KeyError):  # not transient: raised at once
        await retrying(broken, transient=(ConnectionError,))
