"""Polymarket's unofficial RTDS `activity` firehose (`wss://ws-live-data.polymarket.com`), as
feeds.md describes it, with its quirks and failures as switches. Served at `WS /rtds`.

Protocol (client -> server): `{"action":"subscribe","subscriptions":[{"topic":"activity",
"type":"trades"|"orders_matched","filters":""}]}` (`"action":"unsubscribe"` takes them back); the
text `ping` is answered with the text `pong`. `filters` is a JSON *string*: empty takes every
trade, `{"market_slug":..}` / `{"event_slug":..}` one market; there is no wallet filter. A message
without `action`, a topic or type it does not know, or filters it cannot read get no answer and
no events (the real server stays silent too). There is no ack.

Server -> client, per trade and per subscribed type, `SIM_RTDS_DELAY_S` (0.65 s, the measured
latency) after the trade was emitted: `{"connection_id":..,"topic":"activity","type":..,
"timestamp":<ms>,"payload":{..Data API trade fields..,"timestamp":<s>}}`. Trades come from the
same history every other feed of the simulator serves (`History`), so `/_sim/trades` is the ground
truth here too.

Quirks (off by default; env at start, `POST /_sim/rtds` live):
- `empty_first_frame` (SIM_RTDS_EMPTY_FIRST_FRAME): an empty text frame right after the handshake;
- `checksum_wallets` (SIM_RTDS_CHECKSUM_WALLETS): `proxyWallet` EIP-55 checksum-cased;
- `outcome_index_999_every` n (SIM_RTDS_OUTCOME_INDEX_999_EVERY): every n-th trade's
  `outcomeIndex` is the sentinel 999 (its `outcome` text stays right);
- `fee_every` n (SIM_RTDS_FEE_EVERY): only every n-th trade carries `fee`.

Failures (env at start, `POST /_sim/rtds` live):
- `freeze` (`{"freeze": true}`): every socket open now stays open, answers `ping` and protocol
  pings, and sends no payload ever again, re-subscribed or not. Only a new socket gets trades.
- `trades_silent` (SIM_RTDS_TRADES_SILENT): type `trades` sends nothing, `orders_matched` works.
- `reject_connects` n (SIM_RTDS_REJECT_CONNECTS), `retry_after` s: the next n handshakes are
  refused with HTTP 429 (the CDN's rate limit), `Retry-After` set.

`GET /_sim/rtds` gives the switches and the sockets (`clients`, `frozen`, `subscribed`,
`handshakes`, `refused`, `sent`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import orjson
from eth_utils import to_checksum_address
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import Response
from prometheus_client import Counter

from services.simulator.data_api import data_api_trade
from services.simulator.feed import Connection
from services.simulator.history import History
from services.simulator.trades import Trade

if TYPE_CHECKING:
    from services.simulator.settings import SimulatorSettings

log = logging.getLogger(__name__)

RTDS_PATH = "/rtds"
TOPIC = "activity"
TYPES = ("trades", "orders_matched")
OUTCOME_INDEX_UNKNOWN = 999
# The fee the fee quirk puts on a trade, in basis points of its notional (Polymarket's taker fee
# on the markets that have one is of this order; the value matters to no consumer).
FEE_BPS = 10
# How often new trades are looked for in the history: well under the 0.65 s latency.
PUMP_POLL_S = 0.02
CLOSE_GOING_AWAY = 1001

RTDS_FRAMES = Counter(
    "betterbot_sim_rtds_frames_total", "RTDS payload frames queued to clients", ["type"]
)


@dataclass
class RtdsSwitches:
    """The quirks and failures of the simulated RTDS (see the module docstring)."""

    delay_s: float = 0.65
    empty_first_frame: bool = False
    checksum_wallets: bool = False
    outcome_index_999_every: int = 0
    fee_every: int = 0
    trades_silent: bool = False
    reject_connects: int = 0
    retry_after: float = 1.0

    @classmethod
    def of(cls, settings: SimulatorSettings) -> RtdsSwitches:
        return cls(
            delay_s=settings.sim_rtds_delay_s,
            empty_first_frame=settings.sim_rtds_empty_first_frame,
            checksum_wallets=settings.sim_rtds_checksum_wallets,
            outcome_index_999_every=settings.sim_rtds_outcome_index_999_every,
            fee_every=settings.sim_rtds_fee_every,
            trades_silent=settings.sim_rtds_trades_silent,
            reject_connects=settings.sim_rtds_reject_connects,
        )

    def update(self, body: dict[str, Any]) -> None:
        """Apply a `POST /_sim/rtds` body; ValueError names a bad or unknown field."""
        known = {f.name: f for f in fields(self)}
        for name, value in body.items():
            if name == "freeze":
                if not isinstance(value, bool):
                    raise ValueError("freeze must be a boolean")
                continue
            if name not in known:
                raise ValueError(f"unknown switch {name!r}; known: freeze, {', '.join(known)}")
            current = getattr(self, name)
            if isinstance(current, bool) and not isinstance(value, bool):
                raise ValueError(f"{name} must be a boolean")
            if not isinstance(current, bool):
                if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                    raise ValueError(f"{name} must be a number, at least 0")
                value = type(current)(value)
            setattr(self, name, value)


def _every(n: int, seq: int) -> bool:
    return n > 0 and (seq + 1) % n == 0


def rtds_payload(trade: Trade, switches: RtdsSwitches) -> dict[str, Any]:
    """One trade as an RTDS `activity` payload: the Data API's fields, with the quirks due."""
    payload = data_api_trade(trade)
    payload["eventSlug"] = trade.market_slug
    if switches.checksum_wallets:
        payload["proxyWallet"] = to_checksum_address(trade.user)
    if _every(switches.outcome_index_999_every, trade.seq):
        payload["outcomeIndex"] = OUTCOME_INDEX_UNKNOWN
    if _every(switches.fee_every, trade.seq):
        payload["fee"] = round(trade.shares_normalized * trade.price * FEE_BPS / 10_000, 6)
    return payload


@dataclass(frozen=True, slots=True)
class Topic:
    """One subscription: a type of the activity topic, maybe narrowed to one market."""

    type: str
    market_slug: str | None = None
    event_slug: str | None = None

    def matches(self, payload: dict[str, Any]) -> bool:
        if self.market_slug is not None and payload.get("slug") != self.market_slug:
            return False
        return self.event_slug is None or payload.get("eventSlug") == self.event_slug


def parse_subscriptions(raw: str | bytes) -> tuple[str, list[Topic]] | None:
    """(`subscribe` | `unsubscribe`, the topics) of a client message, or None for anything the
    server does not act on (no `action`, another topic, filters it cannot read): ignored."""
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(message, dict) or message.get("action") not in ("subscribe", "unsubscribe"):
        return None
    items = message.get("subscriptions")
    if not isinstance(items, list):
        return None
    topics = [topic for item in items if (topic := _topic(item)) is not None]
    return message["action"], topics


def _topic(item: Any) -> Topic | None:
    if not isinstance(item, dict) or item.get("topic") != TOPIC or item.get("type") not in TYPES:
        return None
    filters = item.get("filters", "")
    if not isinstance(filters, str):
        return None  # an object instead of a JSON string: the real server ignores it too
    if not filters:
        return Topic(item["type"])
    try:
        parsed = orjson.loads(filters)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parsed, dict):
        return None
    return Topic(item["type"], parsed.get("market_slug"), parsed.get("event_slug"))


@dataclass(eq=False)
class RtdsClient:
    connection: Connection
    connection_id: str
    topics: set[Topic] = field(default_factory=set)
    frozen: bool = False


class RtdsFeed:
    """The sockets of `/rtds` and the pump that sends them each trade `delay_s` after its
    emission. The pump runs while a client is connected and starts from the newest trade then:
    RTDS replays nothing to a socket that was not there."""

    _ids = itertools.count(1)

    def __init__(
        self,
        history: History,
        switches: RtdsSwitches,
        send_queue_max: int,
        gate: asyncio.Event | None = None,
    ) -> None:
        self.history = history
        self.switches = switches
        self._queue_max = send_queue_max
        self._gate = gate
        self.clients: set[RtdsClient] = set()
        self.handshakes = self.refused = self.sent = 0
        self._last_seq = -1
        self._waiting: deque[Trade] = deque()
        self._pump: asyncio.Task[None] | None = None

    def state(self) -> dict[str, Any]:
        return {
            **asdict(self.switches),
            "clients": len(self.clients),
            "frozen": sum(client.frozen for client in self.clients),
            "subscribed": sum(bool(client.topics) for client in self.clients),
            "handshakes": self.handshakes,
            "refused": self.refused,
            "sent": self.sent,
        }

    def freeze(self) -> int:
        """Freeze every open socket (see the module docstring); returns how many."""
        for client in self.clients:
            client.frozen = True
        return len(self.clients)

    def take_refusal(self) -> bool:
        """Whether this handshake is to be refused with 429 (and count it)."""
        self.handshakes += 1
        if self.switches.reject_connects <= 0:
            return False
        self.switches.reject_connects -= 1
        self.refused += 1
        return True

    def join(self, websocket: WebSocket) -> RtdsClient:
        connection = Connection(websocket, self._queue_max, self._overflowed)
        client = RtdsClient(connection, f"sim-rtds-{next(self._ids)}")
        if self.switches.empty_first_frame:
            connection.push("")
        self.clients.add(client)
        if self._pump is None or self._pump.done():
            self._last_seq = self._newest_seq()
            self._waiting.clear()
            self._pump = asyncio.create_task(self._run_pump(), name="rtds-pump")
        return client

    def leave(self, client: RtdsClient) -> None:
        self.clients.discard(client)

    def _overflowed(self, connection: Connection) -> None:
        log.warning("rtds_slow_client_disconnected", extra={"connection": connection.id})
        for client in [c for c in self.clients if c.connection is connection]:
            self.clients.discard(client)
        connection.close(1013, "send queue overflow: client reads too slowly")

    def handle(self, client: RtdsClient, raw: str | bytes) -> None:
        if raw == "ping":
            client.connection.push("pong")
            return
        parsed = parse_subscriptions(raw)
        if parsed is None:
            return
        action, topics = parsed
        if action == "subscribe":
            client.topics.update(topics)
            if topics and self._gate is not None:
                self._gate.set()  # an RTDS-only client starts the clock, as a Dome subscribe does
        else:
            client.topics.difference_update(topics)

    def _newest_seq(self) -> int:
        trades = self.history.trades()
        return trades[-1].seq if trades else -1

    def _new_trades(self) -> list[Trade]:
        fresh: list[Trade] = []
        for trade in reversed(self.history.trades()):
            if trade.seq <= self._last_seq:
                break
            fresh.append(trade)
        if fresh:
            self._last_seq = fresh[0].seq
        return fresh[::-1]

    async def _run_pump(self) -> None:
        while self.clients:
            self._waiting.extend(self._new_trades())
            now = time.time()
            while self._waiting and self._waiting[0].emitted_at + self.switches.delay_s <= now:
                self._send(self._waiting.popleft(), now)
            await asyncio.sleep(PUMP_POLL_S)

    def _send(self, trade: Trade, now: float) -> None:
        payload = rtds_payload(trade, self.switches)
        body = orjson.dumps(payload).decode()
        for client in list(self.clients):
            if client.frozen:
                continue
            for kind in TYPES:
                if kind == "trades" and self.switches.trades_silent:
                    continue
                if not any(t.type == kind and t.matches(payload) for t in client.topics):
                    continue
                envelope = (
                    f'{{"connection_id":"{client.connection_id}","topic":"{TOPIC}",'
                    f'"type":"{kind}","timestamp":{int(now * 1000)},"payload":{body}}}'
                )
                if client.connection.push(envelope):
                    self.sent += 1
                    RTDS_FRAMES.labels(kind).inc()

    async def close_all(self) -> None:
        for client in list(self.clients):
            client.connection.close(CLOSE_GOING_AWAY, "server shutting down")
        self.clients.clear()
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump


def _too_many(retry_after: float) -> Response:
    body = orjson.dumps({"error": "rate_limited", "message": "too many requests"})
    response = Response(body, status_code=429, media_type="application/json")
    whole = retry_after == int(retry_after)
    response.headers["Retry-After"] = str(int(retry_after)) if whole else str(retry_after)
    return response


async def _serve(feed: RtdsFeed, websocket: WebSocket) -> None:
    if feed.take_refusal():
        if "websocket.http.response" in websocket.scope.get("extensions", {}):
            await websocket.send_denial_response(_too_many(feed.switches.retry_after))
        else:  # a server without the denial extension can only close
            await websocket.close(code=1013)
        return
    await websocket.accept()
    client = feed.join(websocket)
    writer = asyncio.create_task(client.connection.write_loop())
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            feed.handle(client, text if text is not None else message.get("bytes") or b"")
    finally:
        feed.leave(client)
        client.connection.close(CLOSE_GOING_AWAY, "")
        writer.cancel()
        with contextlib.suppress(BaseException):
            await writer


def add_rtds_routes(app: FastAPI, feed: RtdsFeed) -> None:
    """`WS /rtds` and its control route `/_sim/rtds` (GET: state; POST: switches, `freeze`)."""

    async def socket(websocket: WebSocket) -> None:
        await _serve(feed, websocket)

    already = len(app.router.routes)
    app.add_api_websocket_route(RTDS_PATH, socket)
    # Ahead of the Dome feed's `/{api_key_path}`, which would take `rtds` for a Dome key.
    app.router.routes.insert(0, app.router.routes.pop())
    assert len(app.router.routes) == already + 1

    async def state() -> Response:
        return Response(orjson.dumps(feed.state()), media_type="application/json")

    async def control(request: Request) -> Response:
        try:
            body = orjson.loads(await request.body() or b"{}")
            if not isinstance(body, dict):
                raise ValueError("a JSON object is expected")
            feed.switches.update(body)
            frozen = feed.freeze() if body.get("freeze") is True else 0
        except (ValueError, orjson.JSONDecodeError) as exc:
            message = orjson.dumps({"error": "bad_request", "message": str(exc)[:200]})
            return Response(message, status_code=400, media_type="application/json")
        answer = orjson.dumps({**feed.state(), "froze": frozen})
        return Response(answer, media_type="application/json")

    app.add_api_route("/_sim/rtds", state, methods=["GET"])
    app.add_api_route("/_sim/rtds", control, methods=["POST"])
