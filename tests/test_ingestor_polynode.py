"""The polynode dialect, frame by frame, as its SDK's message types have it (feeds.md): the
`subscribed` ack with warnings, `heartbeat`, `error` with a code, `snapshot` of recent events,
`unsubscribed`; pending (pre-chain) events with a null block; `since` on every subscribe;
`compress=zlib` binary frames of raw deflate, opened within the frame bound (a bomb is an
oversized frame); and the free plan's session limit read from an error or a close reason."""

from __future__ import annotations

import zlib
from typing import Any

import orjson
import pytest

from services.ingestor.dialects import Dialect, DialectName, message
from services.ingestor.frames import (
    Ack,
    Fill,
    Heartbeat,
    Refusal,
    Rejected,
    RejectKind,
    ServerError,
    Snapshot,
    Twins,
    Unsubscribed,
    inflate,
    parse_frame,
    refusal_of,
)
from services.ingestor.settings import IngestorSettings
from services.ingestor.subscriptions import Subscribe, Update
from shared.logs import redact_url
from shared.models import FillStatus, Source
from tests.test_ingestor_predexon import NOW, OTHER, TRACKED, WALLET

KEY = "pn-live-key/+9e0d4c1a7b"


def order(**changes: Any) -> dict[str, Any]:
    """One fill as polynode's Dome dialect sends it: Dome's 16 fields, nothing more."""
    data: dict[str, Any] = {
        "token_id": "80311845198420617467056376519440384952587327936553290283547416181426565580659",
        "token_label": "No",
        "side": "SELL",
        "market_slug": "btc-updown-15m-1762479900",
        "condition_id": "0x5853e1c3b3e0b8ad2d6b9bbd0c7a7cde6a6a5ec6e7a2e2e5b0c1d4a3f2e161bd",
        "shares": 2500000,
        "shares_normalized": 2.5,
        "price": 0.41,
        "block_number": 78123460,
        "log_index": 17,
        "tx_hash": "0x" + "5e" * 32,
        "title": "Bitcoin Up or Down - November 6, 8:45PM-9:00PM ET",
        "timestamp": 1762480390,
        "order_hash": "0x" + "9d" * 32,
        "user": WALLET,
        "taker": "0x4bfb41d5b3570defd03c39a9a4d8de6bd8b8982e",
    }
    data.update(changes)
    return data


def event(data: Any, subscription_id: str = "sub_pn_1") -> bytes:
    return orjson.dumps({"type": "event", "subscription_id": subscription_id, "data": data})


def deflate(raw: bytes) -> bytes:
    """Raw deflate (no zlib header), as `compress=zlib` frames carry."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(raw) + packer.flush()


def parse(raw: bytes | str, twins: Twins | None = None, max_bytes: int = 1 << 20) -> Any:
    return parse_frame(
        raw,
        tracked=TRACKED,
        received_at=NOW,
        max_bytes=max_bytes,
        twins=twins,
        dialect="polynode",
    )


def test_subscribed_is_the_ack_and_carries_its_warnings() -> None:
    raw = orjson.dumps(
        {
            "type": "subscribed",
            "subscription_id": "sub_pn_1",
            "subscription_type": "dome",
            "warnings": ["wallet 0xabc has no recent activity"],
        }
    )
    assert parse(raw) == Ack("sub_pn_1", ("wallet 0xabc has no recent activity",))


def test_heartbeat_and_unsubscribed_are_accepted_not_dead_lettered() -> None:
    assert parse(b'{"type":"heartbeat","ts":1762480391000}') == Heartbeat(1762480391000)
    assert parse(b'{"type":"unsubscribed","subscription_id":"sub_pn_1"}') == Unsubscribed(
        "sub_pn_1"
    )
    assert parse(b'{"type":"unsubscribed","subscriber_id":"sub_pn_2"}') == Unsubscribed("sub_pn_2")


def test_an_error_carries_its_code_and_message() -> None:
    error = parse(b'{"type":"error","code":"BAD_REQUEST","message":"unknown filter"}')
    assert isinstance(error, ServerError)
    assert error.code == "BAD_REQUEST" and error.refusal is None
    assert "unknown filter" in error.detail


@pytest.mark.parametrize(
    ("code", "text"),
    [
        ("SESSION_LIMIT", "session limit reached"),
        ("RATE_LIMITED", "Daily session quota exhausted on the free plan"),
        (None, "free plan session limit: 1 hour per day used"),
    ],
)
def test_the_session_limit_is_a_refusal(code: str | None, text: str) -> None:
    raw = orjson.dumps({"type": "error", "code": code, "message": text})
    error = parse(raw)
    assert isinstance(error, ServerError) and error.refusal is Refusal.SESSION_LIMIT
    assert "DOME_PLAN_LIMIT_WAIT_S" in Refusal.SESSION_LIMIT.hint
    assert refusal_of(text, text) is Refusal.SESSION_LIMIT


def test_fills_are_polynodes_and_a_null_block_is_pending() -> None:
    twins = Twins()
    early = parse(event(order(block_number=None, log_index=None)), twins)
    confirmed = parse(event(order()), twins)
    assert isinstance(early, Fill) and isinstance(confirmed, Fill)
    assert early.fill.source is confirmed.fill.source is Source.POLYNODE
    assert early.fill.status is FillStatus.PENDING
    assert confirmed.fill.status is FillStatus.CONFIRMED
    assert early.fill.order_key == confirmed.fill.order_key


def test_an_event_without_a_block_number_field_is_confirmed() -> None:
    """Dome's shorter event shape (feeds.md) has no block_number at all: that is not a pending
    event, which has the field and null."""
    data = order()
    del data["block_number"]
    data.pop("log_index", None)
    frame = parse(event(data))
    assert isinstance(frame, Fill) and frame.fill.status is FillStatus.CONFIRMED


def test_a_snapshot_carries_fills_like_any_other_and_rejects_items_alone() -> None:
    items = [
        order(),
        {"type": "event", "subscription_id": "sub_pn_1", "data": order(user=OTHER)},
        order(user="0x" + "12" * 20),
    ]
    snapshot = parse(orjson.dumps({"type": "snapshot", "data": items}))
    assert isinstance(snapshot, Snapshot) and len(snapshot.items) == 3
    first, second, third = snapshot.items
    assert isinstance(first, Fill) and first.fill.user == WALLET
    assert isinstance(second, Fill) and second.fill.user == OTHER
    assert second.subscription_id == "sub_pn_1"
    assert isinstance(third, Rejected) and third.kind is RejectKind.UNTRACKED_WALLET
    # The dead letter is the item, not the whole snapshot.
    assert third.item is not None and orjson.loads(third.item) == items[2]


def test_a_snapshot_without_events_is_rejected() -> None:
    rejected = parse(b'{"type":"snapshot","data":"nothing"}')
    assert isinstance(rejected, Rejected) and rejected.kind is RejectKind.INVALID_EVENT
    assert parse(b'{"type":"snapshot","data":[]}') == Snapshot(())


def test_compressed_event_frames_inflate_to_the_event() -> None:
    raw = event(order())
    opened = inflate(deflate(raw), 1 << 20)
    assert opened == raw
    assert isinstance(parse(opened), Fill)


def test_a_decompression_bomb_is_an_oversized_frame() -> None:
    bomb = deflate(b'{"type":"event","data":"' + b"A" * (8 << 20) + b'"}')
    assert len(bomb) < 64 * 1024
    rejected = inflate(bomb, 1 << 20)
    assert isinstance(rejected, Rejected) and rejected.kind is RejectKind.OVERSIZED
    assert str(1 << 20) in rejected.reason


def test_a_frame_that_is_not_deflate_is_rejected() -> None:
    rejected = inflate(b"\xff\xfe not deflate at all", 1 << 20)
    assert isinstance(rejected, Rejected) and rejected.kind is RejectKind.BAD_COMPRESSION


def test_every_subscribe_asks_for_the_replay_window_and_updates_do_not() -> None:
    dialect = Dialect("polynode", since_s=30)
    subscribe = message(Subscribe(1, (WALLET,)), dialect)
    assert subscribe == {
        "action": "subscribe",
        "type": "dome",
        "filters": {"wallets": [WALLET], "since": 30},
    }
    update = message(Update(1, "sub_pn_1", (WALLET, OTHER)), dialect)
    assert "since" not in update["filters"]
    off = message(Subscribe(1, (WALLET,)), Dialect("polynode", since_s=0))
    assert "since" not in off["filters"]


def test_the_replay_window_is_bounded_by_the_paid_plans() -> None:
    with pytest.raises(ValueError, match="polynode_since_s"):
        IngestorSettings(_env_file=None, polynode_since_s=301)


def test_compression_is_asked_in_the_query_beside_the_key() -> None:
    settings = IngestorSettings(
        _env_file=None,
        dome_dialect="polynode",
        dome_ws_url="wss://ws.polynode.dev/ws",
        polynode_api_key=KEY,
        polynode_compress=True,
    )
    endpoint = settings.dome_ws_endpoint()
    assert endpoint == "wss://ws.polynode.dev/ws?key=pn-live-key%2F%2B9e0d4c1a7b&compress=zlib"
    assert "pn-live" not in redact_url(endpoint)
    assert KEY not in repr(settings)


@pytest.mark.parametrize(
    ("dialect", "kind"),
    [
        ("dome", "heartbeat"),
        ("dome", "subscribed"),
        ("predexon", "snapshot"),
        ("polynode", "trade"),
    ],
)
def test_each_dialect_accepts_only_its_providers_frame_types(
    dialect: DialectName, kind: str
) -> None:
    raw = orjson.dumps({"type": kind, "subscription_id": "sub_1", "data": order()})
    rejected = parse_frame(
        raw, tracked=TRACKED, received_at=NOW, max_bytes=1 << 20, dialect=dialect
    )
    assert isinstance(rejected, Rejected) and rejected.kind is RejectKind.UNKNOWN_TYPE


def test_status_all_asks_polynode_for_pending_events_and_only_its_own_setting_does() -> None:
    subscribe = message(Subscribe(1, (WALLET,)), Dialect("polynode", status_all=True, since_s=30))
    assert subscribe["filters"] == {"wallets": [WALLET], "status": "all", "since": 30}
    base: dict[str, Any] = {"_env_file": None, "dome_dialect": "polynode"}
    assert IngestorSettings(**base, polynode_status_all=True).pending_events()
    assert not IngestorSettings(**base, predexon_status_all=True).pending_events()
    predexon = {**base, "dome_dialect": "predexon"}
    assert IngestorSettings(**predexon, predexon_status_all=True).pending_events()
    assert not IngestorSettings(**predexon, polynode_status_all=True).pending_events()
