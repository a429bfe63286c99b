"""The notifier's HTTP side: `/ws` (the signal feed), `/` (the live page), `/api/status`,
`/health`, `/metrics`, and the page's pictures' data under `/api/...` (`dashboard_api`).

Before any route runs, a request naming a `Host` this server does not answer to is refused, and so
is a WebSocket handshake from another web site's page (`Origin`): see `auth.Site`. A connection
then needs a place within the replica's limits (`auth.ClientLimits`).

A connection first goes through its setup (see `protocol`): the URL's `last_id`, filters and
token are checked before anything is sent; when the server needs a token the request did not
carry, `hello` goes out and the client's first message (a `subscribe` with `token`) is read. Any
problem closes the connection with a code and a reason saying what was wrong.

Then it runs two tasks: a sender, the only writer on the socket (`hello` or the answer to the
first message, the backlog of a resume, then the client's queue), and a receiver (pings, filter
changes, protocol violations, the disconnect). Whatever ends first ends the connection; when
the server ends it, the client gets a close code and a reason saying why.

Resume without gap or repeat: the client is registered with the fan-out *before* the backlog is
read, so every entry is either in the backlog or arrives in its queue (or both); queued entries at
or below the last backlog id are then skipped. The backlog is filtered with the filters in force
when it starts: a filter change meanwhile takes effect, like any change, from its `subscribed`
answer on, which the sender sends after the backlog.

A backlog reads at most `FeedPolicy.max_replay_entries` entries. When it stops short of the live
feed, the client gets `replay_cut` with the last id read and is closed (1013): its reconnection
from that id reads the next part. A `last_id` beyond the stream's newest entry (a browser clock
ahead) is taken as that entry: the client cannot have seen anything added after its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from services.notifier.auth import ClientLimits, ConnectionSlots, Site, Tokens, presented_token
from services.notifier.clients import Client, Delivery, SignalFilter, StreamId
from services.notifier.dashboard_api import DashboardData, page_policy
from services.notifier.fanout import Backlog, Fanout
from services.notifier.filters import (
    FILTER_FIELDS,
    FilterError,
    Filters,
    TaggedMatch,
    filters_from_query,
    signal_filter,
)
from services.notifier.market_tags import MarketTags
from services.notifier.metrics import CLIENTS, CLIENTS_DROPPED, LATENCY, SENT_BACKLOG, SENT_LIVE
from services.notifier.protocol import (
    HELLO,
    MISSING_TOKEN,
    PONG,
    UNKNOWN_TOKEN,
    Close,
    CloseCode,
    Ping,
    ProtocolError,
    bad_filter,
    bad_request,
    gap_message,
    read_client_message,
    replay_cut,
    replay_cut_message,
    setup_timeout,
    subscribed_message,
    too_many_connections,
)
from shared.ops import HealthCheck, ops_routes

log = logging.getLogger(__name__)

# How long a close may wait for a client's socket to take the close frame, and how long a new
# client waits for the stream reader to be positioned.
CLOSE_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 10.0

DASHBOARD_HTML = (Path(__file__).parent / "dashboard.html").read_text(encoding="utf-8")
DASHBOARD_HEADERS = {"Content-Security-Policy": page_policy(DASHBOARD_HTML)}

NOT_READY = Close(
    CloseCode.TRY_AGAIN_LATER, "signal reader not connected to Redis yet; retry later", "not_ready"
)
BACKLOG_FAILED = Close(
    CloseCode.TRY_AGAIN_LATER,
    "backlog read failed (Redis error); reconnect and resume",
    "backlog_failed",
)
INTERNAL = Close(CloseCode.INTERNAL_ERROR, "internal error; reconnect and resume", "internal_error")
LATE_LAST_ID = bad_request("last_id is read only on the URL or in the first message")
# Probes and scrapers address a replica by its IP, and no signal is served on these.
UNCHECKED_HOST_PATHS = frozenset({"/health", "/metrics"})

StatusSource = Callable[[], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class FeedPolicy:
    """Who may connect and what a connection may do."""

    tokens: Tokens
    slots: ConnectionSlots
    queue_size: int
    max_message_bytes: int
    max_filter_values: int
    setup_timeout_s: float
    site: Site
    limits: ClientLimits
    max_replay_entries: int
    # Where `tags` filters find a market's tags (Gamma); None: unknown, so they match nothing.
    market_tags: MarketTags | None = None


@dataclass(frozen=True)
class Setup:
    """What a connection asked for, once its setup is done."""

    token_id: str | None
    filters: Filters
    resume_after: StreamId | None
    # The `subscribed` answer owed to a first message, sent before anything else; when there is
    # one, `hello` went out before the first message.
    first_reply: str | None = None


def create_app(
    fanout: Fanout,
    backlog: Backlog,
    health: HealthCheck,
    status: StatusSource,
    policy: FeedPolicy,
    dashboard: DashboardData | None = None,
) -> Starlette:
    async def page(_: Request) -> HTMLResponse:
        return HTMLResponse(DASHBOARD_HTML, headers=DASHBOARD_HEADERS)

    async def api_status(_: Request) -> JSONResponse:
        return JSONResponse(await status(), headers={"Cache-Control": "no-store"})

    async def feed(websocket: WebSocket) -> None:
        await websocket.accept()
        address = websocket.client.host if websocket.client else ""
        peer = f"{address}:{websocket.client.port}" if websocket.client else ""
        refusal = policy.limits.admit(address)
        if refusal is not None:
            await _close(websocket, peer, refusal)
            return
        try:
            await _serve(websocket, fanout, backlog, policy, peer)
        finally:
            policy.limits.leave(address)

    routes: list[BaseRoute] = [
        Route("/", page),
        Route("/api/status", api_status),
        *(dashboard.routes() if dashboard is not None else ()),
        WebSocketRoute("/ws", feed),
        *ops_routes(health),
    ]
    return Starlette(routes=routes, middleware=[Middleware(SiteGuard, site=policy.site)])


class SiteGuard:
    """Refuses what another web site could send through the operator's browser, before any route
    runs: a `Host` this server does not answer to (HTTP 400; 403 on `/ws`) and a WebSocket
    handshake from a foreign `Origin` (403). The body says which setting lets it in."""

    def __init__(self, app: ASGIApp, site: Site) -> None:
        self._app = app
        self._site = site

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        problem = self._problem(scope)
        if problem is None:
            await self._app(scope, receive, send)
            return
        log.info("request_refused", extra={"path": str(scope["path"])[:100], "reason": problem})
        if scope["type"] == "http":
            await PlainTextResponse(problem, status_code=400)(scope, receive, send)
            return
        CLIENTS_DROPPED.labels("forbidden").inc()
        await _deny(WebSocket(scope, receive, send), problem)

    def _problem(self, scope: Scope) -> str | None:
        kind = scope["type"]
        if kind not in ("http", "websocket") or scope["path"] in UNCHECKED_HOST_PATHS:
            return None
        headers = Headers(scope=scope)
        host = headers.get("host")
        problem = self._site.host_problem(host)
        if problem is None and kind == "websocket":
            problem = self._site.origin_problem(headers.get("origin"), host)
        return problem


async def _deny(websocket: WebSocket, problem: str) -> None:
    """Refuse a handshake with HTTP 403, saying why when the server can send a body."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(PlainTextResponse(problem, status_code=403))
    else:
        # A close before the accept: the server answers 403 without a body.
        await websocket.close(CloseCode.POLICY_VIOLATION)


async def _serve(
    websocket: WebSocket, fanout: Fanout, backlog: Backlog, policy: FeedPolicy, peer: str
) -> None:
    try:
        setup = await _set_up(websocket, policy)
    except ProtocolError as exc:
        await _close(websocket, peer, exc.close)
        return
    except (WebSocketDisconnect, WebSocketDisconnected):
        return
    token_id = setup.token_id
    if token_id is not None and not policy.slots.acquire(token_id):
        await _close(websocket, peer, too_many_connections(policy.slots.limit))
        return
    try:
        await _stream(websocket, fanout, backlog, policy, setup, peer)
    finally:
        if token_id is not None:
            policy.slots.release(token_id)


async def _stream(
    websocket: WebSocket,
    fanout: Fanout,
    backlog: Backlog,
    policy: FeedPolicy,
    setup: Setup,
    peer: str,
) -> None:
    try:
        await asyncio.wait_for(fanout.ready.wait(), READY_TIMEOUT_S)
    except TimeoutError:
        await _close(websocket, peer, NOT_READY)
        return
    try:
        resume_after = await _resume_point(setup.resume_after, backlog)
    except RedisError as exc:
        log.warning("backlog_read_failed", extra={"peer": peer, "error": repr(exc)})
        await _close(websocket, peer, BACKLOG_FAILED)
        return
    client = Client(
        policy.queue_size,
        peer=peer,
        accepts=_accepts(setup.filters, policy),
        resume_after=resume_after,
    )
    # No await between the resume point and this: see `_resume_point`.
    fanout.add(client)
    CLIENTS.inc()
    try:
        await _run_connection(websocket, client, backlog, policy, setup)
    finally:
        fanout.remove(client)
        CLIENTS.dec()


async def _set_up(websocket: WebSocket, policy: FeedPolicy) -> Setup:
    """Check the request; when the token is owed, send `hello` and read the first message.

    Otherwise `hello` is left to the sender, so that it goes out after the client is registered
    with the fan-out: a client may rely on getting every signal published after its `hello`
    (or after its `subscribed`, when it sent a first message).
    """
    query = websocket.query_params
    resume_after = _stream_id(query.get("last_id"))
    try:
        filters = filters_from_query(
            {name: query.getlist(name) for name in FILTER_FIELDS if name in query},
            max_values=policy.max_filter_values,
        )
    except FilterError as exc:
        raise ProtocolError(bad_filter(str(exc))) from None
    token = presented_token(websocket.headers, query)
    token_id = _identify(policy.tokens, token) if token is not None else None
    if policy.tokens.open or token_id is not None:
        return Setup(token_id, filters, resume_after)

    await websocket.send_text(HELLO)
    try:
        message = await asyncio.wait_for(_receive_one(websocket), policy.setup_timeout_s)
    except TimeoutError:
        raise ProtocolError(setup_timeout(policy.setup_timeout_s)) from None
    first = read_client_message(
        message, max_bytes=policy.max_message_bytes, max_filter_values=policy.max_filter_values
    )
    if isinstance(first, Ping) or first.token is None:
        raise ProtocolError(MISSING_TOKEN)
    token_id = _identify(policy.tokens, first.token)
    if first.last_id is not None:
        if resume_after is not None:
            raise ProtocolError(bad_request("last_id both on the URL and in the first message"))
        resume_after = _stream_id(first.last_id)
    if first.filters is not None:
        filters = first.filters
    return Setup(token_id, filters, resume_after, subscribed_message(filters))


async def _resume_point(asked: StreamId | None, backlog: Backlog) -> StreamId | None:
    """`asked`, or the stream's newest id when `asked` is beyond it.

    Read before the client is added to the fan-out: whatever is added after this read reaches the
    client (in the backlog or its queue), and the client cannot have seen it when it asked.
    Without this, a `last_id` in the future would make the client skip every live signal up to it.
    """
    if asked is None:
        return None
    return min(asked, await backlog.tail())


def _identify(tokens: Tokens, token: str) -> str | None:
    if tokens.open:
        return None
    token_id = tokens.identify(token)
    if token_id is None:
        raise ProtocolError(UNKNOWN_TOKEN)
    return token_id


def _stream_id(text: str | None) -> StreamId | None:
    if text is None:
        return None
    try:
        return StreamId.parse(text)
    except ValueError as exc:
        raise ProtocolError(bad_request(f"bad last_id: {exc}")) from None


async def _receive_one(websocket: WebSocket) -> Mapping[str, Any]:
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    return message


def _accepts(filters: Filters, policy: FeedPolicy) -> SignalFilter | None:
    return signal_filter(filters, policy.market_tags)


async def _run_connection(
    websocket: WebSocket, client: Client, backlog: Backlog, policy: FeedPolicy, setup: Setup
) -> None:
    sender = asyncio.ensure_future(
        _send(websocket, client, backlog, setup.first_reply, policy.max_replay_entries)
    )
    receiver = asyncio.ensure_future(_receive(websocket, client, policy, setup.filters))
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


async def _send(
    websocket: WebSocket,
    client: Client,
    backlog: Backlog,
    first_reply: str | None,
    replay_limit: int,
) -> None:
    await websocket.send_text(HELLO if first_reply is None else first_reply)
    after = client.resume_after
    if after is not None and not await _replay(websocket, client, after, backlog, replay_limit):
        return
    while True:
        delivery = await client.next_delivery()
        await websocket.send_text(delivery.text)
        if delivery.signal is not None:
            SENT_LIVE.inc()
            LATENCY.observe(time.time() - delivery.signal.received_at)


async def _replay(
    websocket: WebSocket, client: Client, after: StreamId, backlog: Backlog, limit: int
) -> bool:
    """Send the backlog; False when the client is to be closed (a Redis error, a cut replay)."""
    try:
        last, read = await _send_backlog(websocket, after, backlog, client.accepts, limit)
    except RedisError as exc:
        log.warning("backlog_read_failed", extra={"peer": client.peer, "error": repr(exc)})
        client.kick(BACKLOG_FAILED)
        return False
    live = client.live_after
    if read >= limit and (live is None or last < live):
        # Entries between `last` and the live feed were not read: the client comes back for them.
        await websocket.send_text(replay_cut_message(str(last)))
        client.kick(replay_cut(limit, str(last)))
        return False
    client.sent_through(last)
    return True


async def _send_backlog(
    websocket: WebSocket,
    after: StreamId,
    backlog: Backlog,
    accepts: SignalFilter | None,
    limit: int,
) -> tuple[StreamId, int]:
    """Send every matching entry of the first `limit` after `after`; the id of the last entry
    read, and how many were read."""
    first_kept = await backlog.trimmed_after(after)
    if first_kept is not None:
        await websocket.send_text(gap_message(str(after), str(first_kept)))
    last, read = after, 0
    async for stream_id, delivery in backlog.entries_after(after, limit):
        last, read = stream_id, read + 1
        if delivery is None or delivery.signal is None:
            continue
        if isinstance(accepts, TaggedMatch):
            await accepts.prepare((delivery.signal,))
        if accepts is None or accepts(delivery.signal):
            await websocket.send_text(delivery.text)
            SENT_BACKLOG.inc()
    return last, read


async def _receive(
    websocket: WebSocket, client: Client, policy: FeedPolicy, filters: Filters
) -> None:
    """Answer pings and filter changes until the client disconnects or breaks the protocol."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        try:
            request = read_client_message(
                message,
                max_bytes=policy.max_message_bytes,
                max_filter_values=policy.max_filter_values,
            )
        except ProtocolError as exc:
            client.kick(exc.close)
            return
        # Replies go through the queue, so the sender stays the socket's only writer.
        if isinstance(request, Ping):
            client.offer(Delivery(PONG))
            continue
        if request.last_id is not None:
            client.kick(LATE_LAST_ID)
            return
        if request.filters is not None:
            filters = request.filters
        client.change_filter(_accepts(filters, policy), Delivery(subscribed_message(filters)))


async def _close(websocket: WebSocket, peer: str, close: Close) -> None:
    CLIENTS_DROPPED.labels(close.label).inc()
    level = logging.WARNING if close.label == "slow_consumer" else logging.INFO
    log.log(
        level,
        "client_closed",
        extra={"peer": peer, "code": int(close.code), "reason": close.reason},
    )
    # A client that stopped reading may never take the close frame; don't wait for it forever.
    with contextlib.suppress(WebSocketDisconnect, WebSocketDisconnected, TimeoutError):
        await asyncio.wait_for(websocket.close(close.code, close.reason), CLOSE_TIMEOUT_S)
