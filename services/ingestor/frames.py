"""One frame from the Dome WebSocket -> what it means for us. Pure: no I/O, no clock.

A frame is an `Ack` (a subscribe was accepted), a `Fill` (a valid order event of a tracked wallet),
a `ServerError` (the server's `error` frame, to be logged), an `Ignored` event (a wallet removed a
moment ago, whose unsubscribe the server may not have applied yet), or a `Rejected` with a reason
class (a fixed set, safe as a metric label) and a reason people can read. Rejected frames are
dead-lettered by the caller; nothing here raises on bad input. Both dialects (dome, polynode) send
the same frames.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson
from pydantic import ValidationError

from shared.errors import validation_reason
from shared.models import FeedOrder, OrderFill, Source

_MAX_ID_CHARS = 100
_MAX_DETAIL_CHARS = 500


class RejectKind(StrEnum):
    OVERSIZED = "oversized"
    BAD_JSON = "bad_json"
    NOT_AN_OBJECT = "not_an_object"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_ACK = "invalid_ack"
    INVALID_EVENT = "invalid_event"
    UNTRACKED_WALLET = "untracked_wallet"


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
) -> Frame:
    """Classify one frame. `tracked` and `ignored` hold lower-case wallet addresses."""
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
        return _event(message, subscription_id, tracked, ignored, received_at)
    if kind == "ack":
        if subscription_id is None:
            return Rejected(RejectKind.INVALID_ACK, "ack without a string subscription_id")
        return Ack(subscription_id)
    if kind == "error":
        return ServerError(_detail(message))
    return Rejected(RejectKind.UNKNOWN_TYPE, f"unknown frame type {_detail(kind)}", subscription_id)


def _event(
    message: dict[str, Any],
    subscription_id: str | None,
    tracked: Container[str],
    ignored: Container[str],
    received_at: float,
) -> Fill | Ignored | Rejected:
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
    return Fill(OrderFill.from_dome(order, Source.DOME_WS, received_at), subscription_id)


def _subscription_id(message: dict[str, Any]) -> str | None:
    value = message.get("subscription_id")
    return value[:_MAX_ID_CHARS] if isinstance(value, str) and value else None


def _detail(value: Any) -> str:
    text = orjson.dumps(value, default=str).decode()
    return text if len(text) <= _MAX_DETAIL_CHARS else text[:_MAX_DETAIL_CHARS] + "..."
