"""The WebSocket protocol of `/ws`: what the server sends, what a client may send, and close codes.

Server -> client, one JSON text message each:
- `{"type":"hello","server":"betterbot-notifier","v":1}` first, once.
- `{"type":"signal","id":"<stream id>","signal":{...}}` for every signal, in stream order.
  `signal` is the entry's JSON exactly as the producer wrote it on `signals` (validated as a
  `Signal` first), so fields added by a newer producer reach clients without a notifier release;
  ignore unknown fields.
  Keep `id`: reconnecting with `/ws?last_id=<id>` resumes right after it.
- `{"type":"gap","last_id":"<yours>","first_id":"<oldest kept>"}` on a resume whose `last_id` is
  older than the oldest entry the stream still keeps: entries in between may have been trimmed.
- `{"type":"pong"}` in reply to `{"type":"ping"}`.

Client -> server: only `{"type":"ping"}`, at most 64 KiB. Anything else closes the connection:
1009 when too big, 1003 when not understood. The server also closes with 1008 when the client reads
too slowly (its queue overflowed: reconnect with `last_id`), 1013 when it cannot serve it right now,
and 1001 when it shuts down.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import orjson

SERVER_NAME = "betterbot-notifier"
PROTOCOL_VERSION = 1
MAX_CLIENT_MESSAGE_BYTES = 64 * 1024
# RFC 6455 limits a close frame's payload to 125 bytes, two of which carry the code.
_MAX_REASON_BYTES = 123

HELLO = orjson.dumps({"type": "hello", "server": SERVER_NAME, "v": PROTOCOL_VERSION}).decode()
PONG = orjson.dumps({"type": "pong"}).decode()


class CloseCode(IntEnum):
    GOING_AWAY = 1001
    UNSUPPORTED_DATA = 1003
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013


@dataclass(frozen=True, slots=True)
class Close:
    """Why the server ends a connection: the WebSocket close code and reason, and a metric label."""

    code: CloseCode
    reason: str
    label: str

    def __post_init__(self) -> None:
        if len(self.reason.encode()) > _MAX_REASON_BYTES:
            raise ValueError(f"close reason longer than {_MAX_REASON_BYTES} bytes: {self.reason!r}")


SHUTDOWN = Close(CloseCode.GOING_AWAY, "server shutting down; reconnect and resume", "shutdown")


def slow_consumer(queue_size: int) -> Close:
    return Close(
        CloseCode.POLICY_VIOLATION,
        f"slow consumer: queue overflow at {queue_size} messages; reconnect and resume",
        "slow_consumer",
    )


class ProtocolError(Exception):
    """A client message that ends the connection."""

    def __init__(self, close: Close) -> None:
        super().__init__(close.reason)
        self.close = close


def signal_message(stream_id: str, data: bytes) -> str:
    """The outgoing message for one entry, built once and sent to every client as is.

    `data` is the entry's JSON, already parsed and validated by the caller, so it is spliced in
    rather than parsed and dumped again.
    """
    return f'{{"type":"signal","id":"{stream_id}","signal":{data.decode()}}}'


def gap_message(last_id: str, first_id: str) -> str:
    return orjson.dumps({"type": "gap", "last_id": last_id, "first_id": first_id}).decode()


def reply_to(message: Mapping[str, Any]) -> str:
    """The reply to one ASGI `websocket.receive` message; ProtocolError when the client must go."""
    text: str | None = message.get("text")
    data: bytes | None = message.get("bytes")
    size = len(data) if data is not None else len((text or "").encode())
    if size > MAX_CLIENT_MESSAGE_BYTES:
        raise ProtocolError(Close(
            CloseCode.MESSAGE_TOO_BIG,
            f"message too big: {size} bytes, limit {MAX_CLIENT_MESSAGE_BYTES}",
            "message_too_big",
        ))
    if text is None:
        raise ProtocolError(_not_understood("binary message"))
    try:
        payload = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise ProtocolError(_not_understood("not JSON")) from None
    if isinstance(payload, dict) and payload.get("type") == "ping":
        return PONG
    raise ProtocolError(_not_understood("unknown message"))


def _not_understood(what: str) -> Close:
    return Close(
        CloseCode.UNSUPPORTED_DATA,
        f'{what}: the server understands only {{"type":"ping"}}',
        "unsupported_message",
    )
