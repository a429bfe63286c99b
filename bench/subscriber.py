"""The measuring end: a WebSocket client of the notifier that counts signals and, when asked,
records when each one arrived.

Per signal it keeps the receipt time (`time.time()`, the same clock the simulator stamps
`emitted_at` with) and the short tail of the message that holds the order_keys and the pipeline's
own stamps; JSON is parsed only after the measurement, so the client stays cheap at tens of
thousands of messages per second. If the notifier closes the connection (e.g. as a slow consumer)
the close is recorded and counting stops: the shortfall then shows as received < expected, never
hidden by a reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import orjson
import websockets
from websockets.asyncio.client import connect

_SIGNAL = b'{"type":"signal"'
_KEYS = b'"order_keys":'


@dataclass(frozen=True, slots=True)
class Receipt:
    """One signal as the subscriber got it: when, for which order, and the pipeline's own stamps."""

    at: float
    order_key: str
    received_at: float
    detected_at: float
    # The source that delivered the signal's fill first.
    source: str = ""


def signal_tail(message: bytes) -> bytes:
    """The end of a signal message from `"order_keys"` on: the fields the latency join needs.

    The Signal's JSON ends with order_keys, source, exchange_ts, received_at, detected_at, so this
    slice is small; the full message is the fallback if the layout ever changes.
    """
    start = message.find(_KEYS)
    return message[start:] if start >= 0 else message


def parse_tail(at: float, tail: bytes) -> Receipt | None:
    try:
        if tail.startswith(_KEYS):
            fields = orjson.loads(b"{" + tail[: tail.rfind(b"}")])
        else:
            fields = orjson.loads(tail).get("signal", {})
        keys = fields.get("order_keys") or []
        return Receipt(
            at,
            str(keys[0]),
            float(fields["received_at"]),
            float(fields["detected_at"]),
            str(fields.get("source", "")),
        )
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError):
        return None


class Subscriber:
    def __init__(self, url: str) -> None:
        self.url = url
        self.received = 0
        self.recording: list[tuple[float, bytes]] | None = None
        self.closed: str | None = None
        self.connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, within_s: float = 10.0) -> None:
        self._task = asyncio.ensure_future(self._run())
        await asyncio.wait_for(self.connected.wait(), within_s)

    def record(self) -> None:
        """Start keeping every signal's receipt time and tail from now on."""
        self.recording = []

    def take_recording(self) -> list[Receipt]:
        """Stop recording; every signal recorded (unreadable ones left out)."""
        recorded, self.recording = self.recording or [], None
        return [r for at, tail in recorded if (r := parse_tail(at, tail)) is not None]

    async def _run(self) -> None:
        try:
            async with connect(self.url, max_size=None, compression=None) as ws:
                self.connected.set()
                while True:
                    message = await ws.recv(decode=False)
                    at = time.time()
                    if message.startswith(_SIGNAL):
                        self.received += 1
                        if self.recording is not None:
                            self.recording.append((at, signal_tail(message)))
        except websockets.ConnectionClosed as exc:
            self.closed = f"closed {exc.rcvd.code if exc.rcvd else '?'}: " + (
                exc.rcvd.reason if exc.rcvd else ""
            )
        except OSError as exc:
            self.closed = f"connection failed: {exc}"

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
