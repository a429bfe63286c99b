"""The WebSocket protocol of `/ws`: what the server sends, what a client may send, and close codes.

The full description, with an example client, is in docs/notifier.md. In short:

Connecting: `/ws?token=…&last_id=…&wallets=…&markets=…&kinds=…&min_confidence=…`, all optional
(see `auth` for where a token may come from, `filters` for the filter fields). The server answers
`hello`; the feed then starts at once, unless the server requires a token and the request carried
none: then the client's first message must be a `subscribe` carrying `token` (and, if it likes,
`filters` and `last_id`), and the feed starts after it.

Server -> client, one JSON text message each:
- `{"type":"hello","server":"betterbot-notifier","v":1}` first, once.
- `{"type":"subscribed","filters":{...}}` in answer to each `subscribe`: the filters now in force,
  normalized. Every signal sent after it matches them; every one before it matched the old ones.
- `{"type":"signal","id":"<stream id>","signal":{...}}` for every matching signal, in stream order.
  `signal` is the entry's JSON exactly as the producer wrote it on `signals` (validated as a
  `Signal` first), so fields added by a newer producer reach clients without a notifier release;
  ignore unknown fields. Keep `id`: reconnecting with `last_id=<id>` resumes right after it.
- `{"type":"gap","last_id":"<yours>","first_id":"<oldest kept>"}` on a resume whose `last_id` is
  older than the oldest entry the stream still keeps: entries in between may have been trimmed.
- `{"type":"replay_cut","last_id":"<id>"}` when a resume has read `NOTIFIER_MAX_REPLAY_ENTRIES`
  entries and more are older than the live feed: every match up to `<id>` was sent; the server
  then closes (1013), and reconnecting with `last_id=<id>` goes on from there.
- `{"type":"pong"}` in reply to `{"type":"ping"}`.

Client -> server (at most `NOTIFIER_MAX_MESSAGE_BYTES`):
- `{"type":"ping"}`.
- `{"type":"subscribe","filters":{...}}`: replace the filters (`filters` left out: keep them;
  `{}` or `null`: everything). `token` and `last_id` are read only in the first message, before
  the feed starts.

Close codes (the reason always says what happened):
1001 server shutting down (reconnect, resume) · 1003 message not understood (fix the client) ·
1008 policy: slow consumer (reconnect, resume), bad filter, bad last_id, too many connections for
the token or from the address, first message missing · 1009 message too big · 1011 internal error
(reconnect, resume) · 1013 not ready, server full, replay cut (retry later / resume) ·
4401 unauthorized (bad or missing token: do not retry as is).

Before any of this, a handshake whose `Host` or `Origin` is not allowed is refused with HTTP 403
(see `auth.Site`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import orjson

from services.notifier.filters import FilterError, Filters, parse_filters

SERVER_NAME = "betterbot-notifier"
PROTOCOL_VERSION = 1
# RFC 6455 limits a close frame's payload to 125 bytes, two of which carry the code.
_MAX_REASON_BYTES = 123
_SUBSCRIBE_FIELDS = ("type", "filters", "token", "last_id")

HELLO = orjson.dumps({"type": "hello", "server": SERVER_NAME, "v": PROTOCOL_VERSION}).decode()
PONG = orjson.dumps({"type": "pong"}).decode()


class CloseCode(IntEnum):
    GOING_AWAY = 1001
    UNSUPPORTED_DATA = 1003
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    # Private range (4000-4999): HTTP's 401, so clients can tell "fix the token" from "retry".
    UNAUTHORIZED = 4401


@dataclass(frozen=True, slots=True)
class Close:
    """Why the server ends a connection: the WebSocket close code and reason, and a metric label."""

    code: CloseCode
    reason: str
    label: str

    def __post_init__(self) -> None:
        if len(self.reason.encode()) > _MAX_REASON_BYTES:
            raise ValueError(f"close reason longer than {_MAX_REASON_BYTES} bytes: {self.reason!r}")

    @classmethod
    def fitted(cls, code: CloseCode, reason: str, label: str) -> Close:
        """A Close whose reason is cut (at a character boundary) to fit a close frame."""
        cut = reason.encode()[:_MAX_REASON_BYTES].decode(errors="ignore")
        return cls(code, cut, label)


SHUTDOWN = Close(CloseCode.GOING_AWAY, "server shutting down; reconnect and resume", "shutdown")
MISSING_TOKEN = Close(
    CloseCode.UNAUTHORIZED,
    "unauthorized: token required (Authorization header, ?token= or the first message)",
    "unauthorized",
)
UNKNOWN_TOKEN = Close(CloseCode.UNAUTHORIZED, "unauthorized: unknown token", "unauthorized")


def slow_consumer(queue_size: int) -> Close:
    return Close(
        CloseCode.POLICY_VIOLATION,
        f"slow consumer: queue overflow at {queue_size} messages; reconnect and resume",
        "slow_consumer",
    )


def bad_filter(problem: str) -> Close:
    return Close.fitted(CloseCode.POLICY_VIOLATION, f"bad filter: {problem}", "bad_filter")


def bad_request(problem: str) -> Close:
    return Close.fitted(CloseCode.POLICY_VIOLATION, problem, "bad_request")


def too_many_connections(limit: int) -> Close:
    return Close(
        CloseCode.POLICY_VIOLATION,
        f"too many connections for this token (limit {limit} per server)",
        "token_limit",
    )


def too_many_from_address(limit: int) -> Close:
    return Close(
        CloseCode.POLICY_VIOLATION,
        f"too many connections from your address (limit {limit} per server)",
        "address_limit",
    )


def server_full(limit: int) -> Close:
    return Close(
        CloseCode.TRY_AGAIN_LATER,
        f"server full ({limit} connections); try again later",
        "server_full",
    )


def replay_cut(limit: int, last_id: str) -> Close:
    # At most 20 + 1 + 20 digits in an id: the reason always fits a close frame.
    return Close(
        CloseCode.TRY_AGAIN_LATER,
        f"replay limit ({limit} entries) reached; reconnect with last_id={last_id}",
        "replay_cut",
    )


def setup_timeout(seconds: float) -> Close:
    return Close(
        CloseCode.UNAUTHORIZED,
        f'unauthorized: no {{"type":"subscribe","token":...}} within {seconds:g} s',
        "unauthorized",
    )


class ProtocolError(Exception):
    """A client message that ends the connection."""

    def __init__(self, close: Close) -> None:
        super().__init__(close.reason)
        self.close = close


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Subscribe:
    """A subscribe message; None for each field the client left out."""

    filters: Filters | None = None
    token: str | None = None
    last_id: str | None = None


def signal_message(stream_id: str, data: bytes) -> str:
    """The outgoing message for one entry, built once and sent to every client as is.

    `data` is the entry's JSON, already parsed and validated by the caller, so it is spliced in
    rather than parsed and dumped again.
    """
    return f'{{"type":"signal","id":"{stream_id}","signal":{data.decode()}}}'


def gap_message(last_id: str, first_id: str) -> str:
    return orjson.dumps({"type": "gap", "last_id": last_id, "first_id": first_id}).decode()


def replay_cut_message(last_id: str) -> str:
    return orjson.dumps({"type": "replay_cut", "last_id": last_id}).decode()


def subscribed_message(filters: Filters) -> str:
    return orjson.dumps({"type": "subscribed", "filters": filters.describe()}).decode()


def read_client_message(
    message: Mapping[str, Any], *, max_bytes: int, max_filter_values: int
) -> Ping | Subscribe:
    """One ASGI `websocket.receive` message, understood; ProtocolError when the client must go."""
    text: str | None = message.get("text")
    data: bytes | None = message.get("bytes")
    size = len(data) if data is not None else len((text or "").encode())
    if size > max_bytes:
        raise ProtocolError(
            Close(
                CloseCode.MESSAGE_TOO_BIG,
                f"message too big: {size} bytes, limit {max_bytes}",
                "message_too_big",
            )
        )
    if text is None:
        raise ProtocolError(_not_understood("binary message"))
    try:
        payload = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise ProtocolError(_not_understood("not JSON")) from None
    kind = payload.get("type") if isinstance(payload, dict) else None
    if kind == "ping":
        return Ping()
    if kind == "subscribe":
        return _subscribe(payload, max_filter_values)
    raise ProtocolError(_not_understood("unknown message"))


def _subscribe(payload: dict[str, Any], max_filter_values: int) -> Subscribe:
    unknown = sorted(set(payload) - set(_SUBSCRIBE_FIELDS))
    if unknown:
        known = ", ".join(_SUBSCRIBE_FIELDS)
        raise ProtocolError(
            bad_request(f"bad subscribe: unknown field {unknown[0][:30]!r} (known: {known})")
        )
    for name in ("token", "last_id"):
        if name in payload and not isinstance(payload[name], str):
            raise ProtocolError(bad_request(f"bad subscribe: {name} must be a string"))
    filters = None
    if "filters" in payload:
        try:
            filters = parse_filters(payload["filters"], max_values=max_filter_values)
        except FilterError as exc:
            raise ProtocolError(bad_filter(str(exc))) from None
    return Subscribe(filters, payload.get("token"), payload.get("last_id"))


def _not_understood(what: str) -> Close:
    return Close(
        CloseCode.UNSUPPORTED_DATA,
        f'{what}: send {{"type":"ping"}} or {{"type":"subscribe","filters":{{...}}}}',
        "unsupported_message",
    )
