"""One frame from the Dome WebSocket -> what it means for us. No I/O, no clock.

A frame is an `Ack` (a subscribe was accepted), a `Fill` (a valid order event of a tracked wallet),
a `ServerError` (the server's `error` frame, to be logged), an `Ignored` event (a wallet removed a
moment ago, whose unsubscribe the server may not have applied yet), or a `Rejected` with a reason
class (a fixed set, safe as a metric label) and a reason people can read. Rejected frames are
dead-lettered by the caller; nothing here raises on bad input. Both dialects (dome, polynode) send
the same frames.

An event whose exchange time is implausible for the moment it was received (milliseconds, a
broken clock: `ExchangeTimeBounds`) is rejected. Identical fills of one transaction (a maker's two
equal resting orders hit by one taker) arrive as separate events; with a `Twins` memory each
gets its own occurrence, so both keep their own order_key.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson
from pydantic import ValidationError

from shared.errors import validation_reason
from shared.models import DomeOrder, ExchangeTimeBounds, FeedOrder, OrderFill, Source, base_key

_MAX_ID_CHARS = 100
_MAX_DETAIL_CHARS = 500
TWINS_MEMORY = 20_000
DEFAULT_BOUNDS = ExchangeTimeBounds()


class RejectKind(StrEnum):
    OVERSIZED = "oversized"
    BAD_JSON = "bad_json"
    NOT_AN_OBJECT = "not_an_object"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_ACK = "invalid_ack"
    INVALID_EVENT = "invalid_event"
    UNTRACKED_WALLET = "untracked_wallet"
    IMPLAUSIBLE_TIMESTAMP = "implausible_timestamp"


@dataclass(frozen=True, slots=True)
class Ack:
    subscription_id: str


@dataclass(frozen=True, slots=True)
class Fill:
    fill: OrderFill
    subscription_id: str | None


@dataclass(frozen=True, slots=True)
class ServerError:
    detail: str


@dataclass(frozen=True, slots=True)
class Ignored:
    user: str


@dataclass(frozen=True, slots=True)
class Rejected:
    kind: RejectKind
    reason: str
    subscription_id: str | None = None


Frame = Ack | Fill | ServerError | Ignored | Rejected


class Twins:
    """The occurrence of each fill among the identical ones of its transaction, on a feed that
    sends them one event at a time.

    An event is known by its log index (else its order hash): the same event again (a resend, a
    second connection) gets the same occurrence, a new one the next. Identical fills are
    interchangeable, so counting in arrival order gives the keys the chain and the REST listings
    give. An event with neither cannot be told from a resend and keeps occurrence 0. Bounded:
    the oldest transactions are forgotten first, long after their events stopped coming.
    """

    def __init__(self, max_fills: int = TWINS_MEMORY) -> None:
        self._max = max_fills
        self._seen: OrderedDict[str, list[int | str]] = OrderedDict()

    def occurrence(self, order: DomeOrder) -> int:
        event = order.log_index if order.log_index is not None else order.order_hash
        if event is None:
            return 0
        key = base_key(order)
        events = self._seen.setdefault(key, [])
        self._seen.move_to_end(key)
        if event not in events:
            events.append(event)
        while len(self._seen) > self._max:
            self._seen.popitem(last=False)
        return events.index(event)


def frame_size(raw: bytes | str) -> int:
    """Size in bytes as it came over the wire (UTF-8)."""
    if isinstance(raw, bytes):
        return len(raw)
    return len(raw) if raw.isascii() else len(raw.encode())


def parse_frame(
    raw: bytes | str,
    *,
    tracked: Container[str],
    received_at: float,
    max_bytes: int,
    ignored: Container[str] = (),
    bounds: ExchangeTimeBounds = DEFAULT_BOUNDS,
    twins: Twins | None = None,
) -> Frame:
    """Classify one frame. `tracked` and `ignored` hold lower-case wallet addresses; `twins`
    (one per process, so every connection counts alike) tells identical fills apart."""
    size = frame_size(raw)
    if size > max_bytes:
        return Rejected(
            RejectKind.OVERSIZED, f"frame of {size} bytes exceeds the limit of {max_bytes}"
        )
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return Rejected(RejectKind.BAD_JSON, f"not JSON: {exc}")
    if not isinstance(message, dict):
        return Rejected(RejectKind.NOT_AN_OBJECT, f"a JSON {type(message).__name__}, not an object")
    subscription_id = _subscription_id(message)
    kind = message.get("type")
    if kind == "event":
        order = _order(message, subscription_id, tracked, ignored)
        if not isinstance(order, FeedOrder):
            return order
        return _fill(order, subscription_id, received_at, bounds, twins)
    if kind == "ack":
        if subscription_id is None:
            return Rejected(RejectKind.INVALID_ACK, "ack without a string subscription_id")
        return Ack(subscription_id)
    if kind == "error":
        return ServerError(_detail(message))
    return Rejected(RejectKind.UNKNOWN_TYPE, f"unknown frame type {_detail(kind)}", subscription_id)


def _order(
    message: dict[str, Any],
    subscription_id: str | None,
    tracked: Container[str],
    ignored: Container[str],
) -> FeedOrder | Ignored | Rejected:
    data = message.get("data")
    if not isinstance(data, dict):
        return Rejected(RejectKind.INVALID_EVENT, "event without an object 'data'", subscription_id)
    try:
        order = FeedOrder.model_validate(data)
    except ValidationError as exc:
        return Rejected(
            RejectKind.INVALID_EVENT,
            "invalid order: " + validation_reason(exc, whole="data"),
            subscription_id,
        )
    if order.user not in tracked:
        if order.user in ignored:
            return Ignored(order.user)
        reason = f"user {order.user} is not a tracked wallet"
        return Rejected(RejectKind.UNTRACKED_WALLET, reason, subscription_id)
    return order


def _fill(
    order: FeedOrder,
    subscription_id: str | None,
    received_at: float,
    bounds: ExchangeTimeBounds,
    twins: Twins | None,
) -> Fill | Rejected:
    problem = bounds.problem(order.timestamp, received_at)
    if problem is not None:
        return Rejected(RejectKind.IMPLAUSIBLE_TIMESTAMP, problem, subscription_id)
    occurrence = twins.occurrence(order) if twins is not None else 0
    fill = OrderFill.from_dome(order, Source.DOME_WS, received_at, occurrence)
    return Fill(fill, subscription_id)


def _subscription_id(message: dict[str, Any]) -> str | None:
    value = message.get("subscription_id")
    return value[:_MAX_ID_CHARS] if isinstance(value, str) and value else None


def _detail(value: Any) -> str:
    text = orjson.dumps(value, default=str).decode()
    return text if len(text) <= _MAX_DETAIL_CHARS else text[:_MAX_DETAIL_CHARS] + "..."
