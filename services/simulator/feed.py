"""The subscription registry and fan-out: who gets which trade, without one client slowing another.

Subscriptions are indexed by what they filter on (wallet, else condition id, else market slug, else
"all trades"), so a trade costs a few dict look-ups however many clients are connected. A trade's
JSON is built once and framed per subscription by string concatenation.

Each connection has its own bounded send queue drained by its own writer task. Fan-out never
waits: a client whose queue overflows (it reads slower than trades arrive) is cut off with close
code 1013 (try again later) and a reason, and nothing more is queued for it.

A stalled connection (fault injection, `Hub.stall_all`) imitates a socket that froze without an
error: its subscriptions are dropped so no frame is sent any more, its transport stops reading (so
pings go unanswered, see `Transport`), and the TCP connection stays open until the client gives up
or the simulator stops (then it is aborted, not closed politely).

Updates applied late (fault injection, `Hub.update_delay_s`, route `POST /_sim/update_delay`,
setting SIM_UPDATE_DELAY_S): an `update` is checked when it arrives (an unknown id is an error
frame at once) but applied only that many seconds later; until then the subscription keeps its old
filters. Dome sends no reply to an update, so a client cannot tell when it took effect. Updates of
one subscription are applied in the order they came; one whose subscription is gone by then (an
unsubscribe, a closed connection) is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import orjson
from prometheus_client import Counter, Gauge

from services.simulator.protocol import (
    Dialect,
    Filters,
    ProtocolError,
    Subscribe,
    Unsubscribe,
    Update,
    ack_frame,
    error_frame,
    event_prefix,
    new_subscription_id,
    parse_client_message,
)
from services.simulator.trades import Trade

log = logging.getLogger(__name__)

CLOSE_TIMEOUT = 5.0
OVERFLOW_CODE, OVERFLOW_REASON = 1013, "send queue overflow: client reads too slowly"

EVENTS_SENT = Counter("betterbot_sim_events_sent_total", "Event frames queued to WebSocket clients")
CLIENTS = Gauge("betterbot_sim_clients", "Open WebSocket connections")
SUBSCRIPTIONS = Gauge("betterbot_sim_subscriptions", "Active subscriptions")
SLOW_CLIENTS = Counter(
    "betterbot_sim_slow_clients_total", "Clients cut off because their send queue overflowed"
)
CLIENT_ERRORS = Counter(
    "betterbot_sim_client_errors_total", "Client messages answered with an error frame"
)


class Socket(Protocol):
    """What a connection needs from a WebSocket (Starlette's WebSocket fits)."""

    def send_text(self, data: str) -> Awaitable[None]: ...

    def send_bytes(self, data: bytes) -> Awaitable[None]: ...

    def close(self, code: int = 1000, reason: str | None = None) -> Awaitable[None]: ...


class Transport(Protocol):
    """The byte stream under a WebSocket, for the stall fault (asyncio's Transport fits)."""

    def pause_reading(self) -> None: ...

    def abort(self) -> None: ...


class Connection:
    """One client: its subscriptions and its send queue."""

    _ids = itertools.count(1)

    def __init__(
        self,
        socket: Socket,
        max_queue: int,
        on_overflow: Callable[[Connection], None],
        dialect: Dialect = Dialect.DOME,
        transport: Transport | None = None,
    ) -> None:
        self.id = next(self._ids)
        self.dialect = dialect
        self.stalled = False
        self._transport = transport
        self.subscriptions: dict[str, Subscription] = {}
        self._socket = socket
        self._max_queue = max_queue
        self._on_overflow = on_overflow
        self._queue: deque[str | bytes] = deque()
        self._wakeup = asyncio.Event()
        self._close_with: tuple[int, str] | None = None
        self.finished = asyncio.Event()

    @property
    def closing(self) -> bool:
        return self._close_with is not None

    def push(self, frame: str | bytes) -> bool:
        """Queue a frame; False if the connection is closing, stalled or just overflowed."""
        if self._close_with is not None or self.stalled:
            return False
        if len(self._queue) >= self._max_queue:
            self._on_overflow(self)
            return False
        self._queue.append(frame)
        if not self._wakeup.is_set():
            self._wakeup.set()
        return True

    def stall(self) -> None:
        """Send nothing more and stop reading (no pongs), keeping the TCP connection open."""
        self.stalled = True
        self._queue.clear()
        self.hold_reading()

    def hold_reading(self) -> None:
        """While stalled, keep the transport from reading (the server may resume it on its own)."""
        if self.stalled and self._transport is not None:
            self._transport.pause_reading()

    def close(self, code: int, reason: str) -> None:
        """Drop what is queued and close with this code once the frame being sent is out."""
        if self.stalled:
            # A frozen peer sends no close frame: the socket just goes away.
            if self._transport is not None:
                self._transport.abort()
            self._close_with = (code, reason)
            self._wakeup.set()
            return
        if self._close_with is None:
            self._close_with = (code, reason)
            self._queue.clear()
            self._wakeup.set()

    async def write_loop(self) -> None:
        try:
            await self._drain()
            if self._close_with is not None and not self.stalled:
                code, reason = self._close_with
                # A client that stopped reading may never take the close frame: don't wait forever.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._socket.close(code, reason), CLOSE_TIMEOUT)
        except Exception as exc:  # the client went away mid-send; the reader notices too
            log.debug("send_failed", extra={"connection": self.id, "error": repr(exc)})
        finally:
            self.finished.set()

    async def _drain(self) -> None:
        queue, socket = self._queue, self._socket
        while True:
            while queue:
                frame = queue.popleft()
                if isinstance(frame, str):
                    await socket.send_text(frame)
                else:
                    await socket.send_bytes(frame)
            if self._close_with is not None:
                return
            self._wakeup.clear()
            await self._wakeup.wait()


@dataclass(eq=False, slots=True)
class Subscription:
    id: str
    connection: Connection
    filters: Filters
    prefix: str = field(init=False)

    def __post_init__(self) -> None:
        self.prefix = event_prefix(self.id)


class Hub:
    """All connections and subscriptions; applies client messages and fans trades out."""

    def __init__(self, max_queue: int, max_subscriptions: int, max_filter_values: int) -> None:
        self.connections: set[Connection] = set()
        # Stalled: open at the TCP level, dead for the protocol (not counted as clients).
        self.stalled: set[Connection] = set()
        self.first_subscription = asyncio.Event()
        self._max_queue = max_queue
        self._max_subscriptions = max_subscriptions
        self._max_filter_values = max_filter_values
        self._subscriptions: dict[str, Subscription] = {}
        self._by_user: dict[str, set[Subscription]] = {}
        self._by_condition: dict[str, set[Subscription]] = {}
        self._by_slug: dict[str, set[Subscription]] = {}
        self._all: set[Subscription] = set()
        # Seconds between receiving an `update` and applying it (a fault; 0: at once).
        self.update_delay_s = 0.0
        self._updates = itertools.count(1)
        # subscription id -> the newest update applied to it, so a late one never overwrites it.
        self._applied: dict[str, int] = {}

    @property
    def subscription_count(self) -> int:
        return len(self._subscriptions)

    def subscriptions(self) -> list[Subscription]:
        return list(self._subscriptions.values())

    # Connections

    def connect(
        self,
        socket: Socket,
        dialect: Dialect = Dialect.DOME,
        transport: Transport | None = None,
    ) -> Connection:
        conn = Connection(socket, self._max_queue, self._overflowed, dialect, transport)
        self.connections.add(conn)
        CLIENTS.set(len(self.connections))
        return conn

    def disconnect(self, conn: Connection) -> None:
        self._drop_subscriptions(conn)
        self.connections.discard(conn)
        self.stalled.discard(conn)
        CLIENTS.set(len(self.connections))

    def stall_all(self) -> int:
        """Freeze every open connection (see the module docstring); returns how many."""
        conns = list(self.connections)
        for conn in conns:
            self._drop_subscriptions(conn)
            self.connections.discard(conn)
            self.stalled.add(conn)
            conn.stall()
        CLIENTS.set(len(self.connections))
        return len(conns)

    def close(self, conn: Connection, code: int, reason: str) -> None:
        self.disconnect(conn)
        conn.close(code, reason)

    async def close_all(self, code: int, reason: str, grace: float = CLOSE_TIMEOUT) -> int:
        """Close every connection with this code; wait (at most `grace` s) for the frames to go.

        Stalled connections are aborted instead, and not counted."""
        for stalled in list(self.stalled):
            self.close(stalled, code, reason)
        conns = list(self.connections)
        for conn in conns:
            self.close(conn, code, reason)
        if conns:
            waits = [asyncio.ensure_future(conn.finished.wait()) for conn in conns]
            _, pending = await asyncio.wait(waits, timeout=grace)
            for task in pending:
                task.cancel()
        return len(conns)

    def _overflowed(self, conn: Connection) -> None:
        SLOW_CLIENTS.inc()
        log.warning("slow_client_disconnected", extra={"connection": conn.id})
        self.close(conn, OVERFLOW_CODE, OVERFLOW_REASON)

    # Client messages

    def handle(self, conn: Connection, raw: str | bytes) -> None:
        try:
            message = parse_client_message(raw, self._max_filter_values, conn.dialect)
            if isinstance(message, Subscribe):
                self._subscribe(conn, message.filters)
            elif isinstance(message, Update):
                self._owned(conn, message.subscription_id)
                self._update_later(conn, message)
            elif isinstance(message, Unsubscribe):
                self._remove(self._owned(conn, message.subscription_id))
                self._applied.pop(message.subscription_id, None)
        except ProtocolError as exc:
            CLIENT_ERRORS.inc()
            conn.push(error_frame(str(exc)))

    def _subscribe(self, conn: Connection, filters: Filters) -> None:
        if len(conn.subscriptions) >= self._max_subscriptions:
            raise ProtocolError(
                f"subscription limit reached ({self._max_subscriptions} per connection)"
            )
        sub_id = new_subscription_id(self._subscriptions)
        # Queued before the subscription exists, so the ack precedes its first event.
        conn.push(ack_frame(sub_id))
        self._add(Subscription(sub_id, conn, filters))
        self.first_subscription.set()

    def _update_later(self, conn: Connection, message: Update) -> None:
        seq = next(self._updates)
        if self.update_delay_s <= 0:
            self._apply_update(conn, message, seq)
            return
        loop = asyncio.get_running_loop()
        loop.call_later(self.update_delay_s, self._apply_update, conn, message, seq)

    def _apply_update(self, conn: Connection, message: Update, seq: int) -> None:
        old = conn.subscriptions.get(message.subscription_id)
        if old is None or conn not in self.connections:
            log.info("late_update_dropped", extra={"subscription_id": message.subscription_id})
            return
        if seq < self._applied.get(old.id, 0):
            return
        self._applied[old.id] = seq
        self._remove(old)
        self._add(Subscription(old.id, conn, message.filters))

    def _owned(self, conn: Connection, sub_id: str) -> Subscription:
        sub = conn.subscriptions.get(sub_id)
        if sub is None:
            raise ProtocolError(f"unknown subscription_id {sub_id[:40]!r} on this connection")
        return sub

    def _index_of(self, sub: Subscription) -> tuple[dict[str, set[Subscription]], frozenset[str]]:
        f = sub.filters
        if f.users is not None and not f.all_users:
            return self._by_user, f.users
        if f.condition_ids is not None:
            return self._by_condition, f.condition_ids
        if f.market_slugs is not None:
            return self._by_slug, f.market_slugs
        return {}, frozenset()

    def _add(self, sub: Subscription) -> None:
        index, keys = self._index_of(sub)
        if keys:
            for key in keys:
                index.setdefault(key, set()).add(sub)
        else:
            self._all.add(sub)
        self._subscriptions[sub.id] = sub
        sub.connection.subscriptions[sub.id] = sub
        SUBSCRIPTIONS.set(len(self._subscriptions))

    def _remove(self, sub: Subscription) -> None:
        index, keys = self._index_of(sub)
        for key in keys:
            subs = index.get(key)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del index[key]
        self._all.discard(sub)
        self._subscriptions.pop(sub.id, None)
        sub.connection.subscriptions.pop(sub.id, None)
        SUBSCRIPTIONS.set(len(self._subscriptions))

    def _drop_subscriptions(self, conn: Connection) -> None:
        for sub in list(conn.subscriptions.values()):
            self._remove(sub)
            self._applied.pop(sub.id, None)

    # Fan-out

    def publish(self, trade: Trade) -> int:
        """Queue the trade to every matching subscription; returns the number of frames queued."""
        user, condition_id, slug = trade.user.lower(), trade.condition_id.lower(), trade.market_slug
        targets: list[Subscription] = []
        for index, key in (
            (self._by_user, user),
            (self._by_condition, condition_id),
            (self._by_slug, slug),
        ):
            subs = index.get(key)
            if subs:
                targets.extend(subs)
        targets.extend(self._all)
        if not targets:
            return 0
        data: str | None = None
        sent = 0
        # `targets` is a copy: an overflow below removes subscriptions from the indexes.
        for sub in targets:
            if not sub.filters.matches(user, condition_id, slug):
                continue
            if data is None:
                data = orjson.dumps(trade.order()).decode()
            if sub.connection.push(sub.prefix + data + "}"):
                sent += 1
        if sent:
            EVENTS_SENT.inc(sent)
        return sent

    def broadcast(self, frame: str | bytes) -> int:
        """Queue a raw frame to every open connection (the control API's malformed-frame tests)."""
        return sum(conn.push(frame) for conn in list(self.connections))
