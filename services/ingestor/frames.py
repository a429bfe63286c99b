"""One frame from a Dome-protocol WebSocket -> what it means for us. No I/O, no clock.

A frame is an `Ack` (a subscribe was accepted: Dome's and Predexon's `ack`, polynode's
`subscribed` with its `warnings`), a `Fill` (a valid order event of a tracked wallet), a
`Snapshot` (polynode's recent events, each classified like an event), a `ServerError` (the
server's `error` frame; a `Refusal` when its code says the plan or the filters were refused), an
`Ignored` event (a wallet removed a moment ago, whose unsubscribe the server may not have applied
yet), a `NotAFill` (Predexon's `fee_refund`), a `Greeting` (Predexon's `connected`), a
`Heartbeat` (polynode's; liveness only), an `Unsubscribed`, or a `Rejected` with a reason class
(a fixed set, safe as a metric label) and a reason people can read. Rejected frames are
dead-lettered by the caller; nothing here raises on bad input. Each dialect accepts the frame
types its provider sends (`FRAME_TYPES`); another type is unknown, as from Dome a heartbeat is.

Events are typed `event` (Dome, polynode, Predexon) or `trade` (another Predexon doc version).
Their `status` (Predexon: `pending` | `confirmed`) becomes the fill's `FillStatus`; polynode marks
a pending (pre-chain) event by a null `block_number`. polynode's `compress=zlib` sends event
frames as binary raw deflate: `inflate` opens them within the frame size bound, so a
decompression bomb is an oversized frame like any other.

An event whose exchange time is implausible for the moment it was received (milliseconds, a
broken clock: `ExchangeTimeBounds`) is rejected. Identical fills of one transaction (a maker's two
equal resting orders hit by one taker) arrive as separate events; with a `Twins` memory each
gets its own occurrence, so both keep their own order_key, and a pending event and its
confirmation get the same one.
"""

from __future__ import annotations

import re
import zlib
from collections import OrderedDict
from collections.abc import Container
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from services.ingestor.dialects import SOURCES, DialectName
from shared.errors import validation_reason
from shared.models import (
    DomeOrder,
    ExchangeTimeBounds,
    FeedOrder,
    FillStatus,
    OrderFill,
    base_key,
)

_MAX_ID_CHARS = 100
_MAX_DETAIL_CHARS = 500
_MAX_WARNINGS = 10
TWINS_MEMORY = 20_000
DEFAULT_BOUNDS = ExchangeTimeBounds()
EVENT_TYPES = ("event", "trade")
_CONTROL = frozenset({"ack", "error"})
# polynode keeps Dome's `ack` as well: older servers (and our simulator once) answered with it.
FRAME_TYPES: dict[str, frozenset[str]] = {
    "dome": _CONTROL | {"event"},
    "predexon": _CONTROL | {"event", "trade", "connected"},
    "polynode": _CONTROL | {"event", "subscribed", "heartbeat", "snapshot", "unsubscribed"},
}


class RejectKind(StrEnum):
    OVERSIZED = "oversized"
    BAD_JSON = "bad_json"
    BAD_COMPRESSION = "bad_compression"
    NOT_AN_OBJECT = "not_an_object"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_ACK = "invalid_ack"
    INVALID_EVENT = "invalid_event"
    UNTRACKED_WALLET = "untracked_wallet"
    IMPLAUSIBLE_TIMESTAMP = "implausible_timestamp"


class Refusal(StrEnum):
    """An error that retrying soon cannot fix: the filters, or the plan's limits."""

    INVALID_FILTERS = "INVALID_FILTERS"
    ITEMS_LIMIT = "ITEMS_LIMIT"
    CONNECTION_LIMIT = "CONNECTION_LIMIT"
    SESSION_LIMIT = "SESSION_LIMIT"

    @property
    def hint(self) -> str:
        return _HINTS[self]


_HINTS = {
    Refusal.INVALID_FILTERS: (
        "the provider refused the subscription's filters: check that DOME_DIALECT names this "
        "provider (and its *_STATUS_ALL / POLYNODE_SINCE_S suit its plan)"
    ),
    Refusal.ITEMS_LIMIT: (
        "more subscriptions or wallets than the plan allows: set DOME_TIER to the plan "
        "(predexon_dev, predexon_pro) or lower DOME_WALLETS_PER_SUBSCRIPTION / "
        "DOME_MAX_SUBSCRIPTIONS, or upgrade the plan"
    ),
    Refusal.CONNECTION_LIMIT: (
        "more connections than the plan allows: lower DOME_MAX_CONNECTIONS (raise "
        "DOME_SUBSCRIPTIONS_PER_CONNECTION), stop other clients using this key, or upgrade the plan"
    ),
    Refusal.SESSION_LIMIT: (
        "the plan's session time is used up (polynode free: one connection, one hour a day): "
        "retrying at most every DOME_PLAN_LIMIT_WAIT_S; upgrade the plan to stream all day"
    ),
}
_SESSION_WORDS = ("limit", "quota", "exceed", "used up", "daily", "per day")


def refusal_of(code: Any, message: Any) -> Refusal | None:
    """The refusal an error code or message (or a close reason) names, if any."""
    if isinstance(code, str):
        named = re.sub(r"[^A-Z]+", "_", code.upper()).strip("_")
        if named in Refusal.__members__:
            return Refusal(named)
    text = " ".join(part for part in (code, message) if isinstance(part, str)).lower()
    if "session" in text and any(word in text for word in _SESSION_WORDS):
        return Refusal.SESSION_LIMIT
    if "connection limit" in text or "too many connections" in text:
        return Refusal.CONNECTION_LIMIT
    return None


@dataclass(frozen=True, slots=True)
class Ack:
    subscription_id: str
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Fill:
    fill: OrderFill
    subscription_id: str | None


@dataclass(frozen=True, slots=True)
class ServerError:
    detail: str
    code: str | None = None
    refusal: Refusal | None = None


@dataclass(frozen=True, slots=True)
class Ignored:
    user: str


@dataclass(frozen=True, slots=True)
class NotAFill:
    event_type: str
    subscription_id: str | None


@dataclass(frozen=True, slots=True)
class Greeting:
    message: str


@dataclass(frozen=True, slots=True)
class Heartbeat:
    ts: Any = None


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    subscription_id: str | None


@dataclass(frozen=True, slots=True)
class Rejected:
    kind: RejectKind
    reason: str
    subscription_id: str | None = None
    # Within a snapshot: the one item to dead-letter, rather than the whole frame.
    item: bytes | None = None


EventFrame = Fill | Ignored | NotAFill | Rejected


@dataclass(frozen=True, slots=True)
class Snapshot:
    items: tuple[EventFrame, ...]


Frame = (
    Ack
    | Fill
    | ServerError
    | Ignored
    | NotAFill
    | Greeting
    | Heartbeat
    | Unsubscribed
    | Snapshot
    | Rejected
)


class EventExtras(BaseModel):
    """Predexon's fields beyond Dome's. Only `event_type` and `status` change what we do; the
    rest are checked for their type and otherwise not carried (orders.raw has no field for them)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    event_type: Literal["order_filled", "fee_refund"] | None = None
    status: Literal["pending", "confirmed"] | None = None
    role: str | None = None
    fee: float | str | None = None
    version: int | None = None
    builder: str | None = None
    metadata: str | None = None
    outcome_index: int | None = None
    is_neg_risk: bool | None = None


class Twins:
    """The occurrence of each fill among the identical ones of its transaction, on a feed that
    sends them one event at a time.

    An event is known by its log index and its order hash. Two sightings are the same event when
    both have a log index and it is equal, or otherwise when their order hashes are equal: so a
    pending event (no log index yet) and its confirmation get the same occurrence, and so does
    a resend or a second connection's copy. A new event gets the next occurrence. Identical fills
    are interchangeable, so counting in arrival order gives the keys the chain and the REST
    listings give. An event with neither cannot be told from a resend and keeps occurrence 0.
    Bounded: the oldest transactions are forgotten first, long after their events stopped coming.
    """

    def __init__(self, max_fills: int = TWINS_MEMORY) -> None:
        self._max = max_fills
        # base key -> the events seen, each [order hash, log index] as far as known yet.
        self._seen: OrderedDict[str, list[list[Any]]] = OrderedDict()

    def occurrence(self, order: DomeOrder) -> int:
        if order.log_index is None and order.order_hash is None:
            return 0
        key = base_key(order)
        events = self._seen.setdefault(key, [])
        self._seen.move_to_end(key)
        index = next((i for i, seen in enumerate(events) if _same_event(seen, order)), None)
        if index is None:
            events.append([order.order_hash, order.log_index])
            index = len(events) - 1
        else:
            # A confirmation tells its log index; later sightings may be matched by it.
            seen = events[index]
            seen[0] = seen[0] if seen[0] is not None else order.order_hash
            seen[1] = seen[1] if seen[1] is not None else order.log_index
        while len(self._seen) > self._max:
            self._seen.popitem(last=False)
        return index


def _same_event(seen: list[Any], order: DomeOrder) -> bool:
    order_hash, log_index = seen
    if log_index is not None and order.log_index is not None:
        return bool(log_index == order.log_index)
    return order_hash is not None and order_hash == order.order_hash


def frame_size(raw: bytes | str) -> int:
    """Size in bytes as it came over the wire (UTF-8)."""
    if isinstance(raw, bytes):
        return len(raw)
    return len(raw) if raw.isascii() else len(raw.encode())


def inflate(raw: bytes, max_bytes: int) -> bytes | Rejected:
    """A binary frame of raw deflate (zlib wbits -15) opened, never past `max_bytes`."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        text = inflater.decompress(raw, max_bytes + 1)
    except zlib.error as exc:
        return Rejected(RejectKind.BAD_COMPRESSION, f"not a raw deflate stream: {exc}")
    if len(text) > max_bytes:
        return Rejected(
            RejectKind.OVERSIZED,
            f"compressed frame of {len(raw)} bytes inflates past the limit of {max_bytes}",
        )
    return text


def oversized(raw: bytes | str, max_bytes: int) -> Rejected | None:
    """The rejection of a frame larger than `max_bytes` (UTF-8), else None."""
    size = frame_size(raw)
    if size <= max_bytes:
        return None
    return Rejected(RejectKind.OVERSIZED, f"frame of {size} bytes exceeds the limit of {max_bytes}")


def json_object(raw: bytes | str) -> dict[str, Any] | Rejected:
    """The frame's JSON object, or why it is none."""
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return Rejected(RejectKind.BAD_JSON, f"not JSON: {exc}")
    if not isinstance(message, dict):
        return Rejected(RejectKind.NOT_AN_OBJECT, f"a JSON {type(message).__name__}, not an object")
    return message


def parse_frame(
    raw: bytes | str,
    *,
    tracked: Container[str],
    received_at: float,
    max_bytes: int,
    ignored: Container[str] = (),
    bounds: ExchangeTimeBounds = DEFAULT_BOUNDS,
    twins: Twins | None = None,
    dialect: DialectName = "dome",
) -> Frame:
    """Classify one frame. `tracked` and `ignored` hold lower-case wallet addresses; `twins`
    (one per process, so every connection counts alike) tells identical fills apart; `dialect`
    names the provider, whose `Source` the fills carry."""
    if (too_big := oversized(raw, max_bytes)) is not None:
        return too_big
    message = json_object(raw)
    if isinstance(message, Rejected):
        return message
    reader = _EventReader(tracked, ignored, received_at, bounds, twins, dialect)
    return _classify(message, reader)


def _classify(message: dict[str, Any], reader: _EventReader) -> Frame:
    subscription_id = _subscription_id(message)
    kind = message.get("type")
    if not isinstance(kind, str) or kind not in FRAME_TYPES[reader.dialect]:
        reason = f"unknown frame type {_detail(kind)}"
        return Rejected(RejectKind.UNKNOWN_TYPE, reason, subscription_id)
    if kind in EVENT_TYPES:
        return reader.event(message.get("data"), subscription_id)
    if kind in ("ack", "subscribed"):
        if subscription_id is None:
            return Rejected(RejectKind.INVALID_ACK, f"{kind} without a string subscription_id")
        return Ack(subscription_id, _warnings(message.get("warnings")))
    if kind == "error":
        code = message.get("code", message.get("error"))
        return ServerError(
            _detail(message),
            code[:_MAX_ID_CHARS] if isinstance(code, str) else None,
            refusal_of(code, message.get("message")),
        )
    if kind == "snapshot":
        return reader.snapshot(message, subscription_id)
    if kind == "heartbeat":
        return Heartbeat(message.get("ts"))
    if kind == "connected":
        return Greeting(_text(message.get("message", "")))
    return Unsubscribed(subscription_id or _string(message.get("subscriber_id")))


@dataclass(frozen=True, slots=True)
class _EventReader:
    tracked: Container[str]
    ignored: Container[str]
    received_at: float
    bounds: ExchangeTimeBounds
    twins: Twins | None
    dialect: DialectName

    def snapshot(self, message: dict[str, Any], subscription_id: str | None) -> Snapshot | Rejected:
        """polynode's recent events on subscribe: `data` (or `events`) lists them, each an
        order or an event envelope; each is a fill like any other (the dedupe drops repeats)."""
        items = message.get("data", message.get("events"))
        if isinstance(items, dict):
            items = items.get("events")
        if not isinstance(items, list):
            reason = "snapshot without a list of events in 'data'"
            return Rejected(RejectKind.INVALID_EVENT, reason, subscription_id)
        return Snapshot(tuple(self._snapshot_item(item, subscription_id) for item in items))

    def _snapshot_item(self, item: Any, subscription_id: str | None) -> EventFrame:
        data, own_id = item, None
        if isinstance(item, dict) and isinstance(item.get("data"), dict):
            data, own_id = item["data"], _subscription_id(item)
        frame = self.event(data, own_id or subscription_id)
        if isinstance(frame, Rejected):
            return Rejected(frame.kind, frame.reason, frame.subscription_id, orjson.dumps(item))
        return frame

    def event(self, data: Any, subscription_id: str | None) -> EventFrame:
        if not isinstance(data, dict):
            return Rejected(
                RejectKind.INVALID_EVENT, "event without an object 'data'", subscription_id
            )
        try:
            extras = EventExtras.model_validate(data)
            order = FeedOrder.model_validate(data)
        except ValidationError as exc:
            return Rejected(
                RejectKind.INVALID_EVENT,
                "invalid order: " + validation_reason(exc, whole="data"),
                subscription_id,
            )
        if extras.event_type == "fee_refund":
            return NotAFill(extras.event_type, subscription_id)
        if order.user not in self.tracked:
            if order.user in self.ignored:
                return Ignored(order.user)
            reason = f"user {order.user} is not a tracked wallet"
            return Rejected(RejectKind.UNTRACKED_WALLET, reason, subscription_id)
        return self._fill(order, self._status(extras, data), subscription_id)

    def _status(self, extras: EventExtras, data: dict[str, Any]) -> FillStatus:
        if extras.status is not None:
            return FillStatus(extras.status)
        # polynode's pending events are the pre-chain ones: a block number that is there, and
        # null. An event without the field at all is Dome's shorter shape, a confirmed fill.
        if self.dialect == "polynode" and "block_number" in data and data["block_number"] is None:
            return FillStatus.PENDING
        return FillStatus.CONFIRMED

    def _fill(
        self, order: FeedOrder, status: FillStatus, subscription_id: str | None
    ) -> Fill | Rejected:
        problem = self.bounds.problem(order.timestamp, self.received_at)
        if problem is not None:
            return Rejected(RejectKind.IMPLAUSIBLE_TIMESTAMP, problem, subscription_id)
        occurrence = self.twins.occurrence(order) if self.twins is not None else 0
        fill = OrderFill.from_dome(order, SOURCES[self.dialect], self.received_at, occurrence)
        if status is not FillStatus.CONFIRMED:
            fill = fill.model_copy(update={"status": status})
        return Fill(fill, subscription_id)


def _subscription_id(message: dict[str, Any]) -> str | None:
    return _string(message.get("subscription_id"))


def _string(value: Any) -> str | None:
    return value[:_MAX_ID_CHARS] if isinstance(value, str) and value else None


def _warnings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(_text(warning) for warning in value[:_MAX_WARNINGS])


def _text(value: Any) -> str:
    """A string as it is, anything else as JSON; cut to a loggable length."""
    text = value if isinstance(value, str) else orjson.dumps(value, default=str).decode()
    return text if len(text) <= _MAX_DETAIL_CHARS else text[:_MAX_DETAIL_CHARS] + "..."


def _detail(value: Any) -> str:
    return _text(orjson.dumps(value, default=str).decode())
