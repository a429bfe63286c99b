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
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from prometheus_client import Counter, Gauge

from services.simulator.protocol import (
    CONNECTION_LIMIT,
    UNKNOWN_SUBSCRIPTION,
    Dialect,
    Filters,
    PredexonEvents,
    ProtocolError,
    Subscribe,
    Unsubscribe,
    Update,
    ack_frame,
    connected_frame,
    error_frame,
    event_prefix,
    fee_refund_order,
    new_subscription_id,
    parse_client_message,
    pending_order,
    predexon_order,
    snapshot_frame,
    unsubscribed_frame,
)
from services.simulator.trades import EXCHANGE_ADDRESS, Trade

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
        compress: bool = False,
    ) -> None:
        self.id = next(self._ids)
        self.dialect = dialect
        # polynode's `compress=zlib`: event frames go out as binary raw deflate.
        self.compress = compress
        self.opened_at = time.monotonic()
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

    def push_event(self, frame: str) -> bool:
        """Queue a frame that carries fills: compressed on a `compress=zlib` connection."""
        return self.push(deflate(frame) if self.compress else frame)

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

    def close(self, code: int, reason: str, *, drain: bool = False) -> None:
        """Drop what is queued (unless `drain`: send it first) and close with this code once the
        frame being sent is out."""
        if self.stalled:
            # A frozen peer sends no close frame: the socket just goes away.
            if self._transport is not None:
                self._transport.abort()
            self._close_with = (code, reason)
            self._wakeup.set()
            return
        if self._close_with is None:
            self._close_with = (code, reason)
            if not drain:
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


def deflate(frame: str) -> bytes:
    """One frame as raw deflate (zlib wbits -15: no header, no checksum), as polynode sends it."""
    packer = zlib.compressobj(wbits=-15)
    return packer.compress(frame.encode()) + packer.flush()


class RecentTrades(Protocol):
    """What snapshots and `since` replays read (the simulator's `History` fits)."""

    def trades(self, user: str | None = None) -> Sequence[Trade]: ...


@dataclass(frozen=True, slots=True)
class Plan:
    """A successor's plan: subscriptions per connection, filter items per subscription."""

    max_subscriptions: int
    max_items: int


@dataclass(eq=False, slots=True)
class Subscription:
    id: str
    connection: Connection
    filters: Filters
    prefix: str = field(init=False)

    def __post_init__(self) -> None:
        self.prefix = event_prefix(self.id)

    def wants(self, trade: Trade, pending: bool) -> bool:
        """Whether this fill (pending or confirmed) is for this subscription."""
        f = self.filters
        if not (f.pending if pending else f.confirmed):
            return False
        if not f.matches(trade.user.lower(), trade.condition_id.lower(), trade.market_slug):
            return False
        return f.admits(trade.token_id, trade.side, trade.shares_normalized)


class Hub:
    """All connections and subscriptions; applies client messages and fans trades out."""

    def __init__(
        self,
        max_queue: int,
        max_subscriptions: int,
        max_filter_values: int,
        plans: Mapping[Dialect, Plan] | None = None,
    ) -> None:
        self.connections: set[Connection] = set()
        # Stalled: open at the TCP level, dead for the protocol (not counted as clients).
        self.stalled: set[Connection] = set()
        self.first_subscription = asyncio.Event()
        self._max_queue = max_queue
        # Dome's limits, and each successor's plan (the same limits when not given).
        self._plans = {Dialect.DOME: Plan(max_subscriptions, max_filter_values), **(plans or {})}
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
        # Where polynode's `snapshot_count` and `since` read recent fills (None: nothing kept).
        self.history: RecentTrades | None = None
        # polynode's `since` window of the plan (free 30 s, paid 300 s).
        self.since_window_s = 300.0
        self.predexon = PredexonEvents()

    def plan(self, dialect: Dialect) -> Plan:
        return self._plans.get(dialect, self._plans[Dialect.DOME])

    def set_plan(self, dialect: Dialect, plan: Plan) -> None:
        """A successor's limits from now on (open subscriptions above them are kept)."""
        self._plans[dialect] = plan

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
        compress: bool = False,
    ) -> Connection:
        conn = Connection(socket, self._max_queue, self._overflowed, dialect, transport, compress)
        self.connections.add(conn)
        CLIENTS.set(len(self.connections))
        if dialect is Dialect.PREDEXON:
            conn.push(connected_frame())
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

    def close(self, conn: Connection, code: int, reason: str, *, drain: bool = False) -> None:
        self.disconnect(conn)
        conn.close(code, reason, drain=drain)

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
            plan = self.plan(conn.dialect)
            message = parse_client_message(raw, plan.max_items, conn.dialect)
            if isinstance(message, Subscribe):
                self._subscribe(conn, message.filters)
            elif isinstance(message, Update):
                self._owned(conn, message.subscription_id)
                self._update_later(conn, message)
            elif isinstance(message, Unsubscribe):
                self._remove(self._owned(conn, message.subscription_id))
                self._applied.pop(message.subscription_id, None)
                if conn.dialect is Dialect.POLYNODE:
                    conn.push(unsubscribed_frame(message.subscription_id))
        except ProtocolError as exc:
            CLIENT_ERRORS.inc()
            conn.push(error_frame(str(exc), conn.dialect, exc.code))

    def _subscribe(self, conn: Connection, filters: Filters) -> None:
        limit = self.plan(conn.dialect).max_subscriptions
        if len(conn.subscriptions) >= limit:
            raise ProtocolError(
                f"subscription limit reached ({limit} per connection)", CONNECTION_LIMIT
            )
        sub_id = new_subscription_id(self._subscriptions)
        since_s = min(filters.since_s, self.since_window_s)
        warnings = []
        if filters.since_s > since_s:
            warnings.append(
                f"since capped to {since_s:g} s: the plan replays at most {since_s:g} s"
            )
        # Queued before the subscription exists, so the ack precedes its first event.
        conn.push(ack_frame(sub_id, conn.dialect, warnings))
        sub = Subscription(sub_id, conn, filters)
        self._replay(sub, since_s)
        self._add(sub)
        self.first_subscription.set()

    def _replay(self, sub: Subscription, since_s: float) -> None:
        """polynode's `snapshot_count` (one `snapshot` frame) and `since` (the last seconds'
        fills as events), both before any live event of the subscription."""
        count = sub.filters.snapshot_count
        if self.history is None or (not count and since_s <= 0):
            return
        recent = self._recent(sub)
        if count:
            orders = [trade.order() for trade in recent[-count:]]
            sub.connection.push_event(snapshot_frame(sub.id, orders))
        if since_s > 0:
            start = time.time() - since_s
            for trade in recent:
                if trade.emitted_at >= start:
                    sub.connection.push_event(self._frame(sub, self._data(trade, sub, False)))

    def _recent(self, sub: Subscription) -> list[Trade]:
        """The kept confirmed fills this subscription matches, oldest first."""
        assert self.history is not None
        users = sub.filters.users
        if users is not None and not sub.filters.all_users:
            found = [t for user in users for t in self.history.trades(user)]
            found.sort(key=lambda trade: trade.seq)
        else:
            found = list(self.history.trades())
        return [trade for trade in found if sub.wants(trade, pending=False)]

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
            raise ProtocolError(
                f"unknown subscription_id {sub_id[:40]!r} on this connection",
                UNKNOWN_SUBSCRIPTION,
            )
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

    def publish(self, trade: Trade, pending: bool = False) -> int:
        """Queue the trade to every matching subscription (a `pending` one: its mempool event,
        to those that asked for pending events); returns the number of frames queued."""
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
        # The data's JSON per dialect, built once (Dome and polynode share it).
        built: dict[bool, str] = {}
        sent = 0
        # `targets` is a copy: an overflow below removes subscriptions from the indexes.
        for sub in targets:
            if not sub.wants(trade, pending):
                continue
            predexon = sub.connection.dialect is Dialect.PREDEXON
            if predexon not in built:
                built[predexon] = self._data(trade, sub, pending)
            if sub.connection.push_event(self._frame(sub, built[predexon])):
                sent += 1
            if predexon and not pending:
                sent += self._fee_refund(sub, trade)
        if sent:
            EVENTS_SENT.inc(sent)
        return sent

    def _data(self, trade: Trade, sub: Subscription, pending: bool) -> str:
        order: dict[str, Any] = trade.order()
        if sub.connection.dialect is Dialect.PREDEXON:
            order = predexon_order(order, pending=pending, exchange=EXCHANGE_ADDRESS)
        elif pending:
            order = pending_order(order)
        return orjson.dumps(order).decode()

    def _frame(self, sub: Subscription, data: str) -> str:
        if sub.connection.dialect is Dialect.PREDEXON:
            return event_prefix(sub.id, self.predexon.next_type()) + data + "}"
        return sub.prefix + data + "}"

    def _fee_refund(self, sub: Subscription, trade: Trade) -> int:
        """Predexon's `fee_refund` event after every n-th fill (the switch), not a fill."""
        every = self.predexon.fee_refund_every
        if every <= 0 or trade.seq % every != every - 1:
            return 0
        fill = predexon_order(trade.order(), pending=False, exchange=EXCHANGE_ADDRESS)
        refund = orjson.dumps(fee_refund_order(fill)).decode()
        return int(sub.connection.push_event(self._frame(sub, refund)))

    def broadcast(self, frame: str | bytes) -> int:
        """Queue a raw frame to every open connection (the control API's malformed-frame tests)."""
        return sum(conn.push(frame) for conn in list(self.connections))
