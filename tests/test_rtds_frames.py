"""RTDS frames -> fills, skips and rejections (`services/ingestor/sources/rtds_frames.py`), and
the source's dead-letter path for what is rejected. No network."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest
from eth_utils import to_checksum_address

from services.ingestor.frames import Rejected, RejectKind
from services.ingestor.settings import IngestorSettings
from services.ingestor.sources.rtds import RtdsSource
from services.ingestor.sources.rtds_frames import (
    RtdsFill,
    SkipKind,
    Skipped,
    TypeOccurrences,
    parse_rtds_frame,
)
from shared.data_api import order_from_data_api
from shared.models import OrderFill, Source

WALLET = "0x" + "ab" * 20
OTHER = "0x" + "cd" * 20
NOW = 1_790_000_000.0


def payload(**changes: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "asset": "123456789",
        "conditionId": "0x" + "1" * 64,
        "eventSlug": "nobel-peace-prize",
        "slug": "will-x-win",
        "title": "Will X win?",
        "outcome": "Yes",
        "outcomeIndex": 0,
        "price": 0.42,
        "side": "BUY",
        "size": 12.5,
        "proxyWallet": to_checksum_address(WALLET),
        "name": "",
        "pseudonym": "Quiet-Fox",
        "timestamp": int(NOW) - 1,
        "transactionHash": "0x" + "f" * 64,
    }
    item.update(changes)
    return item


def frame(kind: str = "trades", **changes: Any) -> bytes:
    envelope = {
        "connection_id": "abc=",
        "topic": "activity",
        "type": kind,
        "timestamp": int(NOW * 1000),
        "payload": payload(**changes),
    }
    return orjson.dumps(envelope)


def parse(raw: bytes | str, occurrences: TypeOccurrences | None = None) -> Any:
    return parse_rtds_frame(
        raw,
        tracked={WALLET},
        received_at=NOW,
        max_bytes=1 << 20,
        occurrences=occurrences or TypeOccurrences(),
    )


def test_a_trade_on_both_types_is_one_fill_with_the_data_api_rows_key() -> None:
    occurrences = TypeOccurrences()
    on_trades = parse(frame("trades", outcomeIndex=999, fee=0.01), occurrences)
    on_matched = parse(frame("orders_matched"), occurrences)
    assert isinstance(on_trades, RtdsFill) and isinstance(on_matched, RtdsFill)
    assert on_trades.fill.order_key == on_matched.fill.order_key
    assert on_trades.fill.user == WALLET  # checksum-cased on the wire
    assert on_trades.fill.source is Source.RTDS
    assert on_trades.fill.token_label == "Yes"  # from `outcome`; the 999 index is not read
    # Seconds from the payload, not the envelope's milliseconds.
    assert on_trades.fill.timestamp == int(NOW) - 1
    row = payload(proxyWallet=WALLET)
    data_api = OrderFill.from_dome(order_from_data_api(row), Source.DATA_API, NOW)
    assert data_api.order_key == on_trades.fill.order_key


def test_identical_fills_of_one_transaction_are_counted_per_type() -> None:
    occurrences = TypeOccurrences()
    keys = [
        parse(frame(kind), occurrences).fill.order_key
        for kind in ("trades", "trades", "orders_matched", "orders_matched")
    ]
    assert keys[0] == keys[2] and keys[1] == keys[3] and keys[0] != keys[1]


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        ("", SkipKind.EMPTY),
        ("pong", SkipKind.PONG),
        (b'{"type":"connected"}', SkipKind.NO_PAYLOAD),
        (b'{"topic":"comments","type":"comment_created","payload":{}}', SkipKind.OTHER_TOPIC),
    ],
)
def test_frames_without_a_fill_are_skipped(raw: str | bytes, kind: SkipKind) -> None:
    assert parse(raw) == Skipped(kind)


def test_untracked_wallets_are_skipped_before_anything_is_checked() -> None:
    assert parse(frame(proxyWallet=OTHER, price="not a number")) == Skipped(SkipKind.UNTRACKED)


@pytest.mark.parametrize(
    ("raw", "kind", "words"),
    [
        (b"{not json", RejectKind.BAD_JSON, "not JSON"),
        (b"[1, 2]", RejectKind.NOT_AN_OBJECT, "list"),
        (frame(price="0.4"), RejectKind.INVALID_EVENT, "price"),
        (frame(proxyWallet=None), RejectKind.INVALID_EVENT, "proxyWallet"),
        (frame(timestamp=int(NOW) * 1000), RejectKind.IMPLAUSIBLE_TIMESTAMP, "milliseconds"),
    ],
)
def test_bad_frames_are_rejected_with_a_reason(raw: bytes, kind: RejectKind, words: str) -> None:
    rejected = parse(raw)
    assert isinstance(rejected, Rejected) and rejected.kind is kind
    assert words in rejected.reason


class Sink:
    def __init__(self) -> None:
        self.fills: list[tuple[OrderFill, str | None]] = []
        self.dead: list[tuple[bytes, str, str]] = []

    async def submit(self, fill: OrderFill, watermark: str | None = None) -> None:
        self.fills.append((fill, watermark))

    async def submit_dead(self, raw: bytes, reason: str, source: str) -> None:
        self.dead.append((raw, reason, source))


async def test_the_source_dead_letters_what_it_rejects_and_publishes_the_rest() -> None:
    sink = Sink()
    source = RtdsSource(IngestorSettings(_env_file=None), [WALLET], sink, None)  # type: ignore[call-arg]
    now = time.time()
    good = frame(timestamp=int(now))
    assert await source._handle(good.decode(), now)
    assert await source._handle(frame(timestamp=int(now), price=2.5), now)  # a bad payload
    assert not await source._handle("", now)  # the empty first frame: no payload
    assert not await source._handle("{oops", now)
    assert [fill.source for fill, _ in sink.fills] == [Source.RTDS]
    # Not caught up since the socket opened: a live fill does not move the watermark.
    assert sink.fills[0][1] is None
    assert [(reason.split(":")[0], src) for _, reason, src in sink.dead] == [
        ("invalid_event", "rtds"),
        ("bad_json", "rtds"),
    ]
    assert sink.dead[1][0] == b"{oops"
