"""The notifier's HTTP side: `/ws` (the signal feed), `/` (the live page), `/health`, `/metrics`.

One connection runs two tasks: a sender, the only writer on the socket (hello, then the backlog of a
resume, then the client's queue), and a receiver (pings, protocol violations, the disconnect).
Whatever ends first ends the connection; when the server ends it, the client gets a close code and
a reason saying why (see `protocol`).

Resume without gap or repeat: the client is registered with the fan-out *before* the backlog is
read, so every entry is either in the backlog or arrives in its queue (or both); queued entries at
or below the last backlog id are then skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from services.notifier.clients import Client, Delivery, StreamId
from services.notifier.fanout import Backlog, Fanout
from services.notifier.metrics import CLIENTS, CLIENTS_DROPPED, LATENCY, SENT_BACKLOG, SENT_LIVE
from services.notifier.protocol import (
    HELLO,
    Close,
    CloseCode,
    ProtocolError,
    gap_message,
    reply_to,
)
from shared.ops import HealthCheck, ops_routes

log = logging.getLogger(__name__)

# How long a close may wait for a client's socket to take the close frame, and how long a new
# client waits for the stream reader to be positioned.
CLOSE_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 10.0

DASHBOARD_HTML = (Path(__file__).parent / "dashboard.html").read_text(encoding="utf-8")

NOT_READY = Close(
    CloseCode.TRY_AGAIN_LATER, "signal reader not connected to Redis yet; retry later", "not_ready"
)
BACKLOG_FAILED = Close(
    CloseCode.TRY_AGAIN_LATER, "backlog read failed (Redis error); reconnect and resume",
    "backlog_failed",
)
INTERNAL = Close(CloseCode.INTERNAL_ERROR, "internal error; reconnect and resume", "internal_error")


def create_app(
    fanout: Fanout, backlog: Backlog, health: HealthCheck, *, queue_size: int
) -> Starlette:
    async def page(_: Request) -> HTMLResponse:
        return HTMLResponse(DASHBOARD_HTML)

    async def feed(websocket: WebSocket) -> None:
        await websocket.accept()
        await _serve(websocket, fanout, backlog, queue_size)

    routes: list[BaseRoute] = [
        Route("/", page), WebSocketRoute("/ws", feed), *ops_routes(health)
    ]
    return Starlette(routes=routes)


async def _serve(websocket: WebSocket, fanout: Fanout, backlog: Backlog, queue_size: int) -> None:
    peer = f"{websocket.client.host}:{websocket.client.port}" if websocket.client else ""
    try:
        resume_after = _resume_point(websocket)
    except ValueError as exc:
        close = Close(CloseCode.POLICY_VIOLATION, f"bad last_id: {exc}"[:120], "bad_request")
        await _close(websocket, peer, close)
        return
    client = Client(queue_size, peer=peer, resume_after=resume_after)
    try:
        await asyncio.wait_for(fanout.ready.wait(), READY_TIMEOUT_S)
    except TimeoutError:
        await _close(websocket, peer, NOT_READY)
        return
    fanout.add(client)
    CLIENTS.inc()
    try:
        await _run_connection(websocket, client, backlog)
    finally:
        fanout.remove(client)
        CLIENTS.dec()


def _resume_point(websocket: WebSocket) -> StreamId | None:
    last_id = websocket.query_params.get("last_id")
    return None if last_id is None else StreamId.parse(last_id)


async def _run_connection(websocket: WebSocket, client: Client, backlog: Backlog) -> None:
    sender = asyncio.ensure_future(_send(websocket, client, backlog))
    receiver = asyncio.ensure_future(_receive(websocket, client))
    kicked = asyncio.ensure_future(client.kicked.wait())
    tasks = (sender, receiver, kicked)
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if client.close is None and sender.done() and not sender.cancelled():
        error = sender.exception()
        if error is not None and not isinstance(error, WebSocketDisconnect):
            log.error("client_send_failed", exc_info=error, extra={"peer": client.peer})
            client.kick(INTERNAL)
    if client.close is not None:
        await _close(websocket, client.peer, client.close)


async def _send(websocket: WebSocket, client: Client, backlog: Backlog) -> None:
    await websocket.send_text(HELLO)
    if client.resume_after is not None:
        try:
            last = await _send_backlog(websocket, client.resume_after, backlog)
        except RedisError as exc:
            log.warning("backlog_read_failed", extra={"peer": client.peer, "error": repr(exc)})
            client.kick(BACKLOG_FAILED)
            return
        client.sent_through(last)
    while True:
        delivery = await client.next_delivery()
        await websocket.send_text(delivery.text)
        if delivery.signal is not None:
            SENT_LIVE.inc()
            LATENCY.observe(time.time() - delivery.signal.received_at)


async def _send_backlog(websocket: WebSocket, after: StreamId, backlog: Backlog) -> StreamId:
    """Send every entry after `after`; return the id of the last entry read."""
    first_kept = await backlog.trimmed_after(after)
    if first_kept is not None:
        await websocket.send_text(gap_message(str(after), str(first_kept)))
    last = after
    async for stream_id, delivery in backlog.entries_after(after):
        last = stream_id
        if delivery is not None:
            await websocket.send_text(delivery.text)
            SENT_BACKLOG.inc()
    return last


async def _receive(websocket: WebSocket, client: Client) -> None:
    """Answer pings until the client disconnects or breaks the protocol (then kick it)."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        try:
            reply = reply_to(message)
        except ProtocolError as exc:
            client.kick(exc.close)
            return
        # Through the queue, so the sender stays the socket's only writer.
        client.offer(Delivery(reply))


async def _close(websocket: WebSocket, peer: str, close: Close) -> None:
    CLIENTS_DROPPED.labels(close.label).inc()
    level = logging.WARNING if close.label == "slow_consumer" else logging.INFO
    log.log(level, "client_closed", extra={
        "peer": peer, "code": int(close.code), "reason": close.reason})
    # A client that stopped reading may never take the close frame; don't wait for it forever.
    with contextlib.suppress(WebSocketDisconnect, WebSocketDisconnected, TimeoutError):
        await asyncio.wait_for(websocket.close(close.code, close.reason), CLOSE_TIMEOUT_S)
