"""Dome's WebSocket order-feed protocol: client messages in, ack/event/error frames out.

Client -> server (text or binary frames holding JSON):
- subscribe: `{"action":"subscribe","platform":"polymarket","version":1,"type":"orders",
  "filters":{"users":[...]}}` -> `{"type":"ack","subscription_id":"sub_<11 lowercase alnum>"}`.
  Acks echo no request id; they come back in the order of the subscribes.
- update: the subscribe message plus `"action":"update","subscription_id":..`: replaces the
  filters, keeps the id. No reply (Dome documents none).
- unsubscribe: `{"action":"unsubscribe","version":1,"subscription_id":..}`. No reply.

Filters: `users` (compared lower-case; `["*"]` means every trade), `condition_ids` (compared
lower-case), `market_slugs`. Dome leaves combining them undocumented; here a trade must match
every criterion given (any value within a list).

Server -> client events: `{"type":"event","subscription_id":..,"data":{Dome order}}`, one per
matching subscription.

Errors: Dome does not document its error frame. This simulator answers a message it cannot apply
with `{"type":"error","message":"..."}` and keeps the connection open; clients should treat any
unknown `type` as informational.

The polynode dialect (feeds.md; served on `/ws?key=<KEY>`) differs only in the client messages:
`{"action":"subscribe","type":"dome","filters":{"wallets":[...]}}` (no `platform` or `version`;
filters `wallets`, `condition_ids`, `slugs`), `update` is that plus `subscription_id`, and
`{"action":"unsubscribe","subscription_id":..}`. polynode does not document its ack, update or
unsubscribe replies: this simulator answers them as Dome does (the assumption our client makes).
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Container
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

ID_ALPHABET = string.ascii_lowercase + string.digits
ID_LENGTH = 11
FILTER_KEYS = ("users", "condition_ids", "market_slugs")


class Dialect(StrEnum):
    DOME = "dome"
    POLYNODE = "polynode"


# Per dialect: the filter names on the wire -> ours, and the `type` a subscribe carries.
_WIRE_FILTERS = {
    Dialect.DOME: {
        "users": "users",
        "condition_ids": "condition_ids",
        "market_slugs": "market_slugs",
    },
    Dialect.POLYNODE: {
        "wallets": "users",
        "condition_ids": "condition_ids",
        "slugs": "market_slugs",
    },
}
_CHANNEL_TYPE = {Dialect.DOME: "orders", Dialect.POLYNODE: "dome"}


class ProtocolError(ValueError):
    """A client message that cannot be applied; its text goes back in an error frame."""


@dataclass(frozen=True, slots=True)
class Filters:
    users: frozenset[str] | None = None
    condition_ids: frozenset[str] | None = None
    market_slugs: frozenset[str] | None = None
    all_users: bool = False

    def matches(self, user: str, condition_id: str, market_slug: str) -> bool:
        """Arguments are lower-cased user and condition id, and the slug as is."""
        if self.users is not None and not self.all_users and user not in self.users:
            return False
        if self.condition_ids is not None and condition_id not in self.condition_ids:
            return False
        return self.market_slugs is None or market_slug in self.market_slugs

    def to_json(self) -> dict[str, list[str]]:
        shown: dict[str, list[str]] = {}
        if self.users is not None:
            shown["users"] = ["*"] if self.all_users else sorted(self.users)
        if self.condition_ids is not None:
            shown["condition_ids"] = sorted(self.condition_ids)
        if self.market_slugs is not None:
            shown["market_slugs"] = sorted(self.market_slugs)
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


def _string_list(filters: dict[str, Any], key: str, max_values: int) -> frozenset[str] | None:
    if key not in filters:
        return None
    values = filters[key]
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise ProtocolError(f"filters.{key} must be a non-empty list of strings")
    if len(values) > max_values:
        raise ProtocolError(f"filters.{key} has {len(values)} values; the limit is {max_values}")
    return frozenset(values)


def parse_filters(raw: Any, max_values: int, dialect: Dialect = Dialect.DOME) -> Filters:
    if not isinstance(raw, dict):
        raise ProtocolError("filters must be an object")
    wire = _WIRE_FILTERS[dialect]
    unknown = sorted(set(raw) - set(wire))
    if unknown:
        raise ProtocolError(f"unknown filter(s) {unknown}; supported: {list(wire)}")
    named = {ours: _string_list(raw, name, max_values) for name, ours in wire.items()}
    users, condition_ids, market_slugs = (named[key] for key in FILTER_KEYS)
    if users is None and condition_ids is None and market_slugs is None:
        raise ProtocolError(f"filters need one of {list(wire)}")
    return Filters(
        users=frozenset(u.lower() for u in users) if users is not None else None,
        condition_ids=(
            frozenset(c.lower() for c in condition_ids) if condition_ids is not None else None
        ),
        market_slugs=market_slugs,
        all_users=users is not None and "*" in users,
    )


def _subscription_id(message: dict[str, Any]) -> str:
    value = message.get("subscription_id")
    if not isinstance(value, str) or not value:
        raise ProtocolError("subscription_id must be a non-empty string")
    return value


def _check_channel(message: dict[str, Any], dialect: Dialect) -> None:
    if dialect is Dialect.DOME and message.get("platform") != "polymarket":
        raise ProtocolError('platform must be "polymarket"')
    expected = _CHANNEL_TYPE[dialect]
    if message.get("type") != expected:
        raise ProtocolError(f'type must be "{expected}"')


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


def ack_frame(subscription_id: str) -> str:
    return orjson.dumps({"type": "ack", "subscription_id": subscription_id}).decode()


def error_frame(message: str) -> str:
    return orjson.dumps({"type": "error", "message": message}).decode()


def event_prefix(subscription_id: str) -> str:
    """The start of this subscription's event frames: the data's JSON and a `}` complete one."""
    return f'{{"type":"event","subscription_id":"{subscription_id}","data":'
