"""What Dome's successors add on top of its protocol, and their switches: the mempool (pending
events before the block), Predexon's pings and idle close, polynode's heartbeats and free-plan
session budget, and the `/_sim` routes that switch them at run time.

Pending then confirmed (`Mempool`; SIM_PENDING_*, `POST /_sim/pending`): while on, a trade the
clock emits is first announced as pending (status `pending`, `block_number`/`log_index` null) to
the subscriptions that asked for pending events, and emitted for real (its block, the chain,
REST, the Data API, the confirmed event) `lead_s` later. Every `drop_every`-th pending fill is
dropped from the mempool instead: it never confirms and never reaches the chain or REST.
`GET /_sim/mempool` lists what was announced and what was dropped (the ground truth of fills
that never happened); `POST /_sim/emit?pending=1[&drop=1]` puts exact trades through the mempool.

Predexon (`/v1/<key>`): a WebSocket ping every SIM_PREDEXON_PING_S, and a connection that has had
no subscription for SIM_PREDEXON_IDLE_CLOSE_S (since it opened, or since its last unsubscribe) is
closed (1008, with the reason).
`POST /_sim/predexon {"event_type", "fee_refund_every", "plan"}` switches its event `type`
(`event`, `trade`, `alternate`), the fee-refund events and the plan (`dev`: 10 subscriptions x 10
items, `pro`: 100 x 500) live.

polynode (`/ws?key=`): `{"type":"heartbeat"}` every SIM_POLYNODE_HEARTBEAT_S; on the free plan
(`SIM_POLYNODE_PLAN=free`) the connections share SIM_POLYNODE_SESSION_S seconds of session: when
they are used up, each open connection gets an error frame (`SESSION_LIMIT`) and is closed with
4008 and a reason saying so, and every new one likewise, until `POST /_sim/polynode
{"reset_session": true}`. `since` replays at most 30 s on the free plan, 300 s on a paid one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import Response

from services.simulator.feed import Connection, Hub, Plan
from services.simulator.protocol import SESSION_LIMIT, Dialect, error_frame, heartbeat_frame

if TYPE_CHECKING:
    from services.simulator.replay import Emitter
    from services.simulator.settings import SimulatorSettings
    from services.simulator.trades import Trade

log = logging.getLogger(__name__)

MEMPOOL_KEPT = 10_000
IDLE_CODE = 1008
IDLE_LOOK_S = 1.0
SESSION_CODE = 4008
PREDEXON_PLANS = {"dev": Plan(10, 10), "pro": Plan(100, 500)}
POLYNODE_SINCE_WINDOW_S = {"free": 30.0, "paid": 300.0}
EVENT_TYPES = ("event", "trade", "alternate")


@dataclass
class Mempool:
    """The pending stage in front of the clock (see the module docstring)."""

    enabled: bool = False
    lead_s: float = 3.0
    drop_every: int = 0
    seen: int = 0
    announced: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=MEMPOOL_KEPT))
    dropped: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=MEMPOOL_KEPT))

    def dropping(self) -> bool:
        """Whether the next pending fill is the one in `drop_every` that never confirms."""
        self.seen += 1
        return self.drop_every > 0 and self.seen % self.drop_every == 0

    def record(self, trade: Trade, dropped: bool) -> dict[str, Any]:
        truth = {**trade.truth(), "block_number": None, "log_index": None, "dropped": dropped}
        self.announced.append(truth)
        if dropped:
            self.dropped.append(truth)
        return truth

    def state(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "lead_s": self.lead_s, "drop_every": self.drop_every}


@dataclass
class SessionBudget:
    """polynode's free plan: seconds of session shared by every connection until a reset."""

    limited: bool = False
    budget_s: float = 3600.0
    used_s: float = 0.0

    def remaining(self) -> float:
        return self.budget_s - self.used_s if self.limited else float("inf")

    def reason(self) -> str:
        return f"session limit: the free plan's {self.budget_s:g} s of session are used up"


@dataclass
class Successors:
    """The successors' live settings, one object per simulator."""

    mempool: Mempool = field(default_factory=Mempool)
    session: SessionBudget = field(default_factory=SessionBudget)
    predexon_ping_s: float = 30.0
    predexon_idle_close_s: float = 120.0
    predexon_plan: str = "pro"
    polynode_heartbeat_s: float = 15.0
    polynode_plan: str = "paid"
    polynode_limits: Plan = field(default_factory=lambda: Plan(500, 10_000))
    predexon_event_type: str = "event"
    predexon_fee_refund_every: int = 0

    @classmethod
    def of(cls, settings: SimulatorSettings) -> Successors:
        s = settings
        return cls(
            Mempool(s.sim_pending_events, s.sim_pending_lead_s, s.sim_pending_drop_every),
            SessionBudget(s.sim_polynode_plan == "free", s.sim_polynode_session_s),
            s.sim_predexon_ping_s,
            s.sim_predexon_idle_close_s,
            s.sim_predexon_plan,
            s.sim_polynode_heartbeat_s,
            s.sim_polynode_plan,
            Plan(s.sim_max_subscriptions, s.sim_polynode_max_items),
            s.sim_predexon_event_type,
            s.sim_predexon_fee_refund_every,
        )

    def start(self, hub: Hub) -> None:
        """The settings' switches into the hub, once at start (the routes change them later)."""
        hub.set_plan(Dialect.POLYNODE, self.polynode_limits)
        hub.predexon.kind = self.predexon_event_type
        hub.predexon.fee_refund_every = self.predexon_fee_refund_every
        self.apply(hub)

    def apply(self, hub: Hub) -> None:
        """Push the plans into the hub's limits."""
        hub.set_plan(Dialect.PREDEXON, PREDEXON_PLANS[self.predexon_plan])
        hub.since_window_s = POLYNODE_SINCE_WINDOW_S[self.polynode_plan]
        self.session.limited = self.polynode_plan == "free"

    def state(self, hub: Hub) -> dict[str, Any]:
        return {
            "pending": self.mempool.state(),
            "predexon": {
                "event_type": hub.predexon.kind,
                "fee_refund_every": hub.predexon.fee_refund_every,
                "plan": self.predexon_plan,
            },
            "polynode": {
                "plan": self.polynode_plan,
                "session_s": self.session.budget_s,
                "session_used_s": round(self.session.used_s, 3),
                "since_window_s": hub.since_window_s,
            },
        }


# --- per connection ---------------------------------------------------------------------------


def protocol_pinger(websocket: WebSocket) -> Callable[[], None] | None:
    """A function that sends a WebSocket ping on this socket, or None if the server's protocol
    object cannot be reached (as `app._transport`: uvicorn's receive is a bound method of it).
    uvicorn's sans-I/O protocol holds a `websockets` connection (`conn`) and its transport."""
    owner = getattr(getattr(websocket, "_receive", None), "__self__", None)
    conn: Any = getattr(owner, "conn", None)
    transport: Any = getattr(owner, "transport", None)
    if not hasattr(conn, "send_ping") or not hasattr(transport, "write"):
        return None

    def ping() -> None:
        conn.send_ping(b"sim")
        transport.write(b"".join(conn.data_to_send()))

    return ping


async def chores(
    conn: Connection, hub: Hub, successors: Successors, ping: Callable[[], None] | None
) -> None:
    """The dialect's own timers on one connection, until it closes (cancelled by the caller)."""
    if conn.dialect is Dialect.PREDEXON:
        await _predexon(conn, hub, successors, ping)
    elif conn.dialect is Dialect.POLYNODE:
        await _polynode(conn, hub, successors)


async def _predexon(
    conn: Connection, hub: Hub, successors: Successors, ping: Callable[[], None] | None
) -> None:
    next_ping = time.monotonic() + successors.predexon_ping_s
    # Since when the connection has had no subscription (None: it has one now).
    idle_since: float | None = conn.opened_at
    while not conn.closing:
        now = time.monotonic()
        if conn.subscriptions:
            idle_since = None
        elif idle_since is None:
            idle_since = now
        idle_at = (
            float("inf") if idle_since is None else idle_since + successors.predexon_idle_close_s
        )
        if now >= idle_at:
            reason = f"no subscription for {successors.predexon_idle_close_s:g} s"
            log.info("predexon_idle_close", extra={"connection": conn.id})
            hub.close(conn, IDLE_CODE, reason)
            return
        if now >= next_ping:
            next_ping = now + successors.predexon_ping_s
            if ping is not None and not conn.stalled:
                with contextlib.suppress(Exception):  # the socket went away: the reader notices
                    ping()
        # Woken at least every IDLE_LOOK_S: a subscription may end at any time.
        wake = min(next_ping, idle_at, now + IDLE_LOOK_S)
        await asyncio.sleep(max(0.01, wake - time.monotonic()))


async def _polynode(conn: Connection, hub: Hub, successors: Successors) -> None:
    session = successors.session
    start = time.monotonic()
    next_beat = start + successors.polynode_heartbeat_s
    try:
        while not conn.closing:
            now = time.monotonic()
            if session.remaining() - (now - start) <= 0:
                end_session(conn, hub, session)
                return
            if now >= next_beat:
                next_beat = now + successors.polynode_heartbeat_s
                conn.push(heartbeat_frame(time.time()))
            left = session.remaining() - (time.monotonic() - start)
            await asyncio.sleep(max(0.01, min(next_beat - time.monotonic(), left)))
    finally:
        if session.limited:
            session.used_s += time.monotonic() - start


def end_session(conn: Connection, hub: Hub, session: SessionBudget) -> None:
    """The free plan's session is over: say so in an error frame and in the close reason."""
    reason = session.reason()
    conn.push(error_frame(reason, Dialect.POLYNODE, SESSION_LIMIT))
    # The reason of a close frame holds at most 123 bytes.
    hub.close(conn, SESSION_CODE, reason[:123], drain=True)


# --- control routes ---------------------------------------------------------------------------


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _bad(message: str) -> Response:
    return _json({"error": "bad_request", "message": message}, 400)


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    parsed = orjson.loads(raw) if raw else {}
    if not isinstance(parsed, dict):
        raise ValueError("body must be a JSON object")
    return parsed


def _count(body: dict[str, Any], name: str, current: int) -> int:
    value = body.get(name, current)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer, at least 0")
    return value


def _seconds(body: dict[str, Any], name: str, current: float) -> float:
    value = body.get(name, current)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{name} must be a number of seconds, at least 0")
    return float(value)


def _choice(body: dict[str, Any], name: str, current: str, allowed: tuple[str, ...]) -> str:
    value = body.get(name, current)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}")
    return str(value)


def add_successor_routes(app: FastAPI, hub: Hub, emitter: Emitter, successors: Successors) -> None:
    """`/_sim/pending`, `/_sim/mempool`, `/_sim/predexon`, `/_sim/polynode` (see the docstring)."""
    mempool = successors.mempool

    async def pending(request: Request) -> Response:
        try:
            body = await _body(request)
            enabled = body.get("enabled", mempool.enabled)
            if not isinstance(enabled, bool):
                raise ValueError("enabled must be a boolean")
            lead_s = _seconds(body, "lead_s", mempool.lead_s)
            mempool.drop_every = _count(body, "drop_every", mempool.drop_every)
            mempool.enabled, mempool.lead_s = enabled, lead_s
        except (ValueError, orjson.JSONDecodeError) as exc:
            return _bad(str(exc))
        return _json(successors.state(hub))

    async def mempool_truth() -> Response:
        return _json({"announced": list(mempool.announced), "dropped": list(mempool.dropped)})

    async def predexon(request: Request) -> Response:
        try:
            body = await _body(request)
            kind = _choice(body, "event_type", hub.predexon.kind, EVENT_TYPES)
            plan = _choice(body, "plan", successors.predexon_plan, tuple(PREDEXON_PLANS))
            every = _count(body, "fee_refund_every", hub.predexon.fee_refund_every)
        except (ValueError, orjson.JSONDecodeError) as exc:
            return _bad(str(exc))
        hub.predexon.kind, hub.predexon.fee_refund_every = kind, every
        successors.predexon_plan = plan
        successors.apply(hub)
        return _json(successors.state(hub))

    async def polynode(request: Request) -> Response:
        try:
            body = await _body(request)
            plan = _choice(body, "plan", successors.polynode_plan, tuple(POLYNODE_SINCE_WINDOW_S))
            session_s = _seconds(body, "session_s", successors.session.budget_s)
        except (ValueError, orjson.JSONDecodeError) as exc:
            return _bad(str(exc))
        successors.polynode_plan, successors.session.budget_s = plan, session_s
        if body.get("reset_session") is True:
            successors.session.used_s = 0.0
        successors.apply(hub)
        return _json(successors.state(hub))

    async def state() -> Response:
        return _json(successors.state(hub))

    app.add_api_route("/_sim/pending", pending, methods=["POST"])
    app.add_api_route("/_sim/pending", state, methods=["GET"])
    app.add_api_route("/_sim/mempool", mempool_truth, methods=["GET"])
    app.add_api_route("/_sim/predexon", predexon, methods=["POST"])
    app.add_api_route("/_sim/polynode", polynode, methods=["POST"])
    app.state.successors = successors
