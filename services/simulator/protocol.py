"""The order-feed protocols the simulator serves: Dome's, and its two successors' dialects.

Dome (`/<API_KEY>`):
- subscribe: `{"action":"subscribe","platform":"polymarket","version":1,"type":"orders",
  "filters":{"users":[...]}}` -> `{"type":"ack","subscription_id":"sub_<11 lowercase alnum>"}`.
  Acks echo no request id; they come back in the order of the subscribes.
- update: the subscribe message plus `"action":"update","subscription_id":..`: replaces the
  filters, keeps the id. No reply (Dome documents none).
- unsubscribe: `{"action":"unsubscribe","version":1,"subscription_id":..}`. No reply.
- filters: `users` (compared lower-case; `["*"]` means every trade), `condition_ids` (compared
  lower-case), `market_slugs`. Dome leaves combining them undocumented; here a trade must match
  every criterion given (any value within a list).
- events: `{"type":"event","subscription_id":..,"data":{Dome order}}`, one per matching
  subscription. Dome does not document its error frame: this simulator answers a message it
  cannot apply with `{"type":"error","message":"..."}` and keeps the connection open.

Predexon (`/v1/<API_KEY>`, feeds.md "Predexon"): Dome's client messages byte for byte, plus the
filter `status` (`"all"`: pending events too; `"confirmed"`, the default: only fills in a block).
The server greets with `{"type":"connected","message":..}`, acks with `{"type":"ack",
"subscription_id":..,"channel":"trades"}`, and sends events whose `type` is `"event"` or
`"trade"` (both appear in its docs; `PredexonEvents.kind`) and whose `data` is the Dome order
plus `event_type` (`order_filled`, or `fee_refund`: not a fill), `status`, `role`, `fee`,
`version`, `builder`, `metadata`, `outcome_index`, `is_neg_risk`, with `log_index` a hex string.
Errors are `{"type":"error","code":..,"message":..}` with `INVALID_FILTERS`, `ITEMS_LIMIT` (more
filter values in one subscription than the plan's items) and `CONNECTION_LIMIT` (more
subscriptions on one connection than the plan allows); which limit each code names is not
documented, this split is our reading.

polynode (`/ws?key=<API_KEY>`, feeds.md "polynode"): subscribe
`{"action":"subscribe","type":"dome","filters":{"wallets":[...]}}` (no `platform`, no
`version`); filters `wallets`, `tokens`, `slugs`, `condition_ids` (lists), `side` (BUY|SELL),
`status` (`confirmed`, the default here, `pending` or `all`), `min_size`/`max_size` (shares),
`snapshot_count` (the last n matching fills, in one `snapshot` frame after the ack) and `since`
(replay the fills of the last n seconds as events, capped by the plan's window: a `warnings`
entry says so). Ack `{"type":"subscribed","subscription_id":..,"subscription_type":"dome",
"warnings":[..]}`; unsubscribe is answered `{"type":"unsubscribed","subscription_id":..}`; update
gets no reply; errors carry a `code`; events are Dome's (`block_number` and `log_index` null on a
pending event). The server sends `{"type":"heartbeat","ts":<ms>}` now and then.
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

ID_ALPHABET = string.ascii_lowercase + string.digits
ID_LENGTH = 11
FILTER_KEYS = ("users", "condition_ids", "market_slugs")

# Error codes (Predexon's names; polynode's are not documented, so it gets the same ones).
INVALID_MESSAGE = "INVALID_MESSAGE"
INVALID_FILTERS = "INVALID_FILTERS"
ITEMS_LIMIT = "ITEMS_LIMIT"
CONNECTION_LIMIT = "CONNECTION_LIMIT"
UNKNOWN_SUBSCRIPTION = "UNKNOWN_SUBSCRIPTION"
SESSION_LIMIT = "SESSION_LIMIT"


class Dialect(StrEnum):
    DOME = "dome"
    POLYNODE = "polynode"
    PREDEXON = "predexon"


_DOME_LISTS = {"users": "users", "condition_ids": "condition_ids", "market_slugs": "market_slugs"}


@dataclass(frozen=True, slots=True)
class _Wire:
    """One dialect's subscribe message: list filters (wire name -> ours), scalar filters, `type`."""

    lists: Mapping[str, str]
    scalars: tuple[str, ...]
    channel_type: str
    platform: bool


_WIRE = {
    Dialect.DOME: _Wire(_DOME_LISTS, (), "orders", True),
    Dialect.PREDEXON: _Wire(_DOME_LISTS, ("status",), "orders", True),
    Dialect.POLYNODE: _Wire(
        {
            "wallets": "users",
            "tokens": "tokens",
            "condition_ids": "condition_ids",
            "slugs": "market_slugs",
        },
        ("side", "status", "min_size", "max_size", "snapshot_count", "since"),
        "dome",
        False,
    ),
}
_STATUS = {
    Dialect.PREDEXON: {"confirmed": (False, True), "all": (True, True)},
    Dialect.POLYNODE: {
        "confirmed": (False, True),
        "pending": (True, False),
        "all": (True, True),
    },
}


class ProtocolError(ValueError):
    """A client message that cannot be applied; its text goes back in an error frame."""

    def __init__(self, message: str, code: str = INVALID_MESSAGE) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Filters:
    users: frozenset[str] | None = None
    condition_ids: frozenset[str] | None = None
    market_slugs: frozenset[str] | None = None
    all_users: bool = False
    # The successors' extra criteria (None / 0: not given).
    tokens: frozenset[str] | None = None
    side: str | None = None
    min_size: float | None = None
    max_size: float | None = None
    # Which events the subscription wants: pending (mempool) ones, confirmed ones.
    pending: bool = False
    confirmed: bool = True
    snapshot_count: int = 0
    since_s: float = 0.0

    def matches(self, user: str, condition_id: str, market_slug: str) -> bool:
        """Arguments are lower-cased user and condition id, and the slug as is."""
        if self.users is not None and not self.all_users and user not in self.users:
            return False
        if self.condition_ids is not None and condition_id not in self.condition_ids:
            return False
        return self.market_slugs is None or market_slug in self.market_slugs

    def admits(self, token_id: str, side: str, size: float) -> bool:
        """The successors' criteria on the fill itself (token, side, size in shares)."""
        if self.tokens is not None and token_id not in self.tokens:
            return False
        if self.side is not None and side != self.side:
            return False
        if self.min_size is not None and size < self.min_size:
            return False
        return self.max_size is None or size <= self.max_size

    def to_json(self) -> dict[str, Any]:
        shown: dict[str, Any] = {}
        if self.users is not None:
            shown["users"] = ["*"] if self.all_users else sorted(self.users)
        if self.condition_ids is not None:
            shown["condition_ids"] = sorted(self.condition_ids)
        if self.market_slugs is not None:
            shown["market_slugs"] = sorted(self.market_slugs)
        if self.tokens is not None:
            shown["tokens"] = sorted(self.tokens)
        for name in ("side", "min_size", "max_size"):
            if getattr(self, name) is not None:
                shown[name] = getattr(self, name)
        if self.pending:
            shown["status"] = "all" if self.confirmed else "pending"
        return shown


@dataclass(frozen=True, slots=True)
class Subscribe:
    filters: Filters


@dataclass(frozen=True, slots=True)
class Update:
    subscription_id: str
    filters: Filters


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    subscription_id: str


ClientMessage = Subscribe | Update | Unsubscribe


def _string_list(filters: Mapping[str, Any], key: str) -> list[str] | None:
    if key not in filters:
        return None
    values = filters[key]
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise ProtocolError(f"filters.{key} must be a non-empty list of strings", INVALID_FILTERS)
    return values


def _check_items(dialect: Dialect, lists: Mapping[str, list[str] | None], limit: int) -> None:
    """Dome caps each list (wallets per subscription); its successors cap the items of one
    subscription, all lists together."""
    if dialect is Dialect.DOME:
        for name, values in lists.items():
            if values is not None and len(values) > limit:
                message = f"filters.{name} has {len(values)} values; the limit is {limit}"
                raise ProtocolError(message)
        return
    total = sum(len(values) for values in lists.values() if values is not None)
    if total > limit:
        raise ProtocolError(
            f"subscription has {total} filter items; the plan allows {limit}", ITEMS_LIMIT
        )


def _number(raw: Mapping[str, Any], key: str, *, integer: bool = False) -> float | None:
    if key not in raw:
        return None
    value = raw[key]
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or value < 0:
        kind = "integer" if integer else "number"
        raise ProtocolError(f"filters.{key} must be a non-negative {kind}", INVALID_FILTERS)
    return float(value)


def _scalars(dialect: Dialect, raw: Mapping[str, Any]) -> dict[str, Any]:
    """The dialect's scalar filters as `Filters` fields."""
    fields: dict[str, Any] = {}
    if "status" in raw:
        status = _STATUS[dialect].get(raw["status"]) if isinstance(raw["status"], str) else None
        if status is None:
            allowed = sorted(_STATUS[dialect])
            raise ProtocolError(f"filters.status must be one of {allowed}", INVALID_FILTERS)
        fields["pending"], fields["confirmed"] = status
    if "side" in raw:
        side = raw["side"].upper() if isinstance(raw["side"], str) else None
        if side not in ("BUY", "SELL"):
            raise ProtocolError('filters.side must be "BUY" or "SELL"', INVALID_FILTERS)
        fields["side"] = side
    fields["min_size"] = _number(raw, "min_size")
    fields["max_size"] = _number(raw, "max_size")
    fields["snapshot_count"] = int(_number(raw, "snapshot_count", integer=True) or 0)
    fields["since_s"] = _number(raw, "since") or 0.0
    return fields


def parse_filters(raw: Any, max_values: int, dialect: Dialect = Dialect.DOME) -> Filters:
    if not isinstance(raw, dict):
        raise ProtocolError("filters must be an object", INVALID_FILTERS)
    wire = _WIRE[dialect]
    unknown = sorted(set(raw) - set(wire.lists) - set(wire.scalars))
    if unknown:
        known = [*wire.lists, *wire.scalars]
        raise ProtocolError(f"unknown filter(s) {unknown}; supported: {known}", INVALID_FILTERS)
    given = {name: _string_list(raw, name) for name in wire.lists}
    _check_items(dialect, given, max_values)
    named = {
        wire.lists[name]: None if values is None else frozenset(values)
        for name, values in given.items()
    }
    users = named.get("users")
    if all(values is None for values in named.values()):
        raise ProtocolError(f"filters need one of {list(wire.lists)}", INVALID_FILTERS)
    condition_ids = named.get("condition_ids")
    return Filters(
        users=frozenset(u.lower() for u in users) if users is not None else None,
        condition_ids=(
            frozenset(c.lower() for c in condition_ids) if condition_ids is not None else None
        ),
        market_slugs=named.get("market_slugs"),
        all_users=users is not None and "*" in users,
        tokens=named.get("tokens"),
        **_scalars(dialect, raw),
    )


def _subscription_id(message: dict[str, Any]) -> str:
    value = message.get("subscription_id")
    if not isinstance(value, str) or not value:
        raise ProtocolError("subscription_id must be a non-empty string")
    return value


def _check_channel(message: dict[str, Any], dialect: Dialect) -> None:
    wire = _WIRE[dialect]
    if wire.platform and message.get("platform") != "polymarket":
        raise ProtocolError('platform must be "polymarket"')
    if message.get("type") != wire.channel_type:
        raise ProtocolError(f'type must be "{wire.channel_type}"')


def parse_client_message(
    raw: str | bytes, max_filter_values: int, dialect: Dialect = Dialect.DOME
) -> ClientMessage:
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"message is not valid JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("message must be a JSON object")
    if "version" in message and message["version"] != 1:
        raise ProtocolError("version must be 1")
    action = message.get("action")
    if action in ("subscribe", "update"):
        _check_channel(message, dialect)
        filters = parse_filters(message.get("filters"), max_filter_values, dialect)
        if action == "subscribe":
            return Subscribe(filters)
        return Update(_subscription_id(message), filters)
    if action == "unsubscribe":
        return Unsubscribe(_subscription_id(message))
    raise ProtocolError('action must be "subscribe", "update" or "unsubscribe"')


def new_subscription_id(taken: Container[str]) -> str:
    while True:
        candidate = "sub_" + "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LENGTH))
        if candidate not in taken:
            return candidate


# --- server frames ----------------------------------------------------------------------------


def _dumps(frame: dict[str, Any]) -> str:
    return orjson.dumps(frame).decode()


def ack_frame(
    subscription_id: str, dialect: Dialect = Dialect.DOME, warnings: Sequence[str] = ()
) -> str:
    if dialect is Dialect.POLYNODE:
        return _dumps(
            {
                "type": "subscribed",
                "subscription_id": subscription_id,
                "subscription_type": _WIRE[dialect].channel_type,
                "warnings": list(warnings),
            }
        )
    if dialect is Dialect.PREDEXON:
        return _dumps({"type": "ack", "subscription_id": subscription_id, "channel": "trades"})
    return _dumps({"type": "ack", "subscription_id": subscription_id})


def error_frame(message: str, dialect: Dialect = Dialect.DOME, code: str = INVALID_MESSAGE) -> str:
    if dialect is Dialect.DOME:  # Dome's frame, as the simulator always sent it: no code
        return _dumps({"type": "error", "message": message})
    return _dumps({"type": "error", "code": code, "message": message})


def unsubscribed_frame(subscription_id: str) -> str:
    return _dumps({"type": "unsubscribed", "subscription_id": subscription_id})


def connected_frame() -> str:
    return _dumps({"type": "connected", "message": "connected to the trades stream"})


def heartbeat_frame(now: float) -> str:
    return _dumps({"type": "heartbeat", "ts": int(now * 1000)})


def snapshot_frame(subscription_id: str, events: Sequence[dict[str, Any]]) -> str:
    return _dumps(
        {
            "type": "snapshot",
            "subscription_id": subscription_id,
            "snapshot_count": len(events),
            "events": list(events),
        }
    )


def event_prefix(subscription_id: str, event_type: str = "event") -> str:
    """The start of this subscription's event frames: the data's JSON and a `}` complete one."""
    return f'{{"type":"{event_type}","subscription_id":"{subscription_id}","data":'


@dataclass
class PredexonEvents:
    """How Predexon's events look, switchable live (`/_sim/predexon`, SIM_PREDEXON_*):
    `kind` `event`, `trade` or `alternate` (one then the other, per event frame), and a
    `fee_refund` event after every `fee_refund_every`-th fill (0: none)."""

    kind: str = "event"
    fee_refund_every: int = 0
    _frames: int = field(default=0, repr=False)

    def next_type(self) -> str:
        self._frames += 1
        if self.kind == "alternate":
            return "event" if self._frames % 2 else "trade"
        return self.kind


ZERO32 = "0x" + "00" * 32
# Outcome labels listed second in Polymarket's markets (index 1); anything else is index 0.
_SECOND_OUTCOMES = frozenset({"no", "down"})
# What a fee refund gives back, as a share of the fill's collateral (the simulator's choice).
FEE_REFUND_SHARE = 0.01


def pending_order(order: Mapping[str, Any]) -> dict[str, Any]:
    """The Dome order as a mempool event shows it: not in a block yet."""
    return {**order, "block_number": None, "log_index": None}


def predexon_order(order: Mapping[str, Any], *, pending: bool, exchange: str) -> dict[str, Any]:
    """A Predexon event's `data`: the Dome order plus Predexon's fields (log index in hex)."""
    log_index = order.get("log_index")
    role = "taker" if str(order.get("taker", "")).lower() == exchange else "maker"
    label = str(order.get("token_label", "")).lower()
    return {
        **order,
        "block_number": None if pending else order.get("block_number"),
        "log_index": None if pending or log_index is None else hex(log_index),
        "event_type": "order_filled",
        "status": "pending" if pending else "confirmed",
        "role": role,
        "fee": 0,
        "version": 2,
        "builder": ZERO32,
        "metadata": ZERO32,
        "outcome_index": 1 if label in _SECOND_OUTCOMES else 0,
        "is_neg_risk": False,
    }


def fee_refund_order(fill: Mapping[str, Any]) -> dict[str, Any]:
    """A `fee_refund` event of a Predexon fill: same transaction and wallet, not a fill. Its
    `shares` are the refund, so a client that took it for a fill would publish a fill that
    never happened (another order_key), which a test can see."""
    refund = max(1, round(fill["shares"] * fill["price"] * FEE_REFUND_SHARE))
    log_index = fill.get("log_index")
    return {
        **fill,
        "event_type": "fee_refund",
        "shares": refund,
        "shares_normalized": refund / 1_000_000,
        "fee": refund / 1_000_000,
        "log_index": None if log_index is None else hex(int(log_index, 16) + 1),
    }
