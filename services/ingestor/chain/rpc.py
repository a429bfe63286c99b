"""A JSON-RPC 2.0 client over one WebSocket: calls matched to replies by id, subscription
notifications (`eth_subscription`) queued in arrival order.

Failures are typed so the source can choose: `RateLimited` (HTTP 429 at the handshake, or a
JSON-RPC error that says so) fails over to the next endpoint; `RangeTooLarge` (a provider's cap on
`eth_getLogs` blocks or results) splits the range; any other `RpcError` is the node's answer;
`ConnectionLost` is the socket. Messages never carry the URL, which usually holds a provider key.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
from typing import Any

import orjson
import websockets
from websockets.exceptions import InvalidStatus, WebSocketException

# Providers word these differently (Alchemy, Infura, QuickNode, geth, erigon, bor).
_RANGE_WORDS = re.compile(
    r"(block range|range is too (wide|large)|too many (results|logs|blocks)|more than \d+ "
    r"(results|logs)|query returned more|exceed(s|ed)? (maximum|max)? ?(block )?range|"
    r"response size (exceeded|should not)|limit the query)",
    re.IGNORECASE,
)
_RATE_WORDS = re.compile(r"(rate limit|too many requests|request limit|capacity)", re.IGNORECASE)
RATE_LIMIT_CODES = (429, -32029)


class RpcError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"JSON-RPC error {code}: {message[:200]}")
        self.code = code
        self.message = message


class RateLimited(RpcError):
    pass


class RangeTooLarge(RpcError):
    pass


class ConnectionLost(Exception):
    pass


def classify(code: int, message: str) -> RpcError:
    if code in RATE_LIMIT_CODES or _RATE_WORDS.search(message):
        return RateLimited(code, message)
    if _RANGE_WORDS.search(message):
        return RangeTooLarge(code, message)
    return RpcError(code, message)


class RpcSocket:
    """One open connection; `open` it, use it, `close` it. Not reusable after a drop."""

    def __init__(self, url: str, *, open_timeout: float, call_timeout: float, max_bytes: int):
        self._url = url
        self._open_timeout = open_timeout
        self._call_timeout = call_timeout
        self._max_bytes = max_bytes
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self.notifications: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._ws: Any = None
        self._reader: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

    async def open(self) -> None:
        try:
            self._ws = await websockets.connect(
                self._url,
                open_timeout=self._open_timeout,
                max_size=self._max_bytes,
                ping_interval=10,
                ping_timeout=10,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status == 429:
                raise RateLimited(429, "handshake refused with HTTP 429") from None
            raise ConnectionLost(f"handshake refused with HTTP {status}") from None
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise ConnectionLost(f"cannot connect: {type(exc).__name__}") from None
        self._reader = asyncio.create_task(self._read(), name="rpc-reader")

    async def close(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._ws.close(), 2)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        self._fail_pending(ConnectionLost("connection closed"))

    async def call(self, method: str, params: list[Any]) -> Any:
        if self.closed.is_set() or self._ws is None:
            raise ConnectionLost("connection closed")
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        try:
            await self._ws.send(orjson.dumps(message).decode())
            return await asyncio.wait_for(future, self._call_timeout)
        except TimeoutError:
            raise ConnectionLost(f"{method} unanswered for {self._call_timeout}s") from None
        except WebSocketException:
            raise ConnectionLost("connection closed") from None
        finally:
            self._pending.pop(request_id, None)
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: a failure nobody awaited any more is not news

    async def _read(self) -> None:
        try:
            async for frame in self._ws:
                self._dispatch(frame)
        except (WebSocketException, OSError):
            pass
        finally:
            self.closed.set()
            self._fail_pending(ConnectionLost("connection closed"))

    def _dispatch(self, frame: str | bytes) -> None:
        try:
            message = orjson.loads(frame)
        except orjson.JSONDecodeError:
            return  # Not JSON-RPC; nothing can be matched to it.
        if not isinstance(message, dict):
            return
        if message.get("method") == "eth_subscription":
            params = message.get("params")
            if isinstance(params, dict):
                self.notifications.put_nowait(
                    (str(params.get("subscription")), params.get("result"))
                )
            return
        future = self._pending.get(message.get("id"))  # type: ignore[arg-type]
        if future is None or future.done():
            return
        error = message.get("error")
        if isinstance(error, dict):
            code = error.get("code")
            future.set_exception(
                classify(code if isinstance(code, int) else 0, str(error.get("message", "")))
            )
        else:
            future.set_result(message.get("result"))

    def _fail_pending(self, exc: Exception) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(exc)
        self._pending.clear()
