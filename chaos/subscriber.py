"""A WebSocket subscriber of the notifier that resumes with `?last_id=` after every disconnect.

It starts from the beginning of `signals` (`last_id=0-0`), so it needs no race with the first
signal, and it hangs up on purpose every `reconnect_every_s` (and stays away `away_s`) so resuming
is exercised while signals flow, beside the disconnects the faults cause. `received` keeps every
(stream id, signal_id) in arrival order, repeats included: a repeat is a finding.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from urllib.parse import urlencode

import orjson
import websockets
from websockets.asyncio.client import connect

RETRY_S = 0.3


class ResumingSubscriber:
    def __init__(self, base_url: str, reconnect_every_s: float, away_s: float = 0.5) -> None:
        self.base_url = base_url
        self.reconnect_every_s = reconnect_every_s
        self.away_s = away_s
        self.last_id = "0-0"
        self.received: list[tuple[str, str]] = []
        self.connections = 0
        self.closes: list[str] = []
        self.gaps = 0
        self.out_of_order = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                await self._session()
            except websockets.ConnectionClosed as closed:
                close = closed.rcvd
                self.closes.append(f"{close.code} {close.reason}" if close else "no close frame")
            except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
                # Refused, timed out, or cut mid-handshake (the notifier killed while answering:
                # "did not receive a valid HTTP response"): connect again, as a client would.
                self.closes.append(f"connect failed: {type(exc).__name__}")
            await asyncio.sleep(RETRY_S)

    async def _session(self) -> None:
        url = f"{self.base_url}?{urlencode({'last_id': self.last_id})}"
        async with connect(url, open_timeout=5, max_size=None) as ws:
            self.connections += 1
            hang_up_at = time.monotonic() + self.reconnect_every_s
            while (left := hang_up_at - time.monotonic()) > 0:
                try:
                    raw = await asyncio.wait_for(ws.recv(), left)
                except TimeoutError:
                    break
                self._take(orjson.loads(raw))
        self.closes.append("hung up on purpose")
        await asyncio.sleep(self.away_s)

    def _take(self, message: dict[str, object]) -> None:
        kind = message.get("type")
        if kind == "gap":
            self.gaps += 1
        if kind != "signal":
            return
        stream_id = str(message["id"])
        signal = message.get("signal")
        if not isinstance(signal, dict):
            return
        if _id_key(stream_id) <= _id_key(self.last_id):
            self.out_of_order += 1
        self.received.append((stream_id, str(signal["signal_id"])))
        self.last_id = stream_id


def _id_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)
