"""The HTTP/WebSocket surface: Dome's WebSocket and REST, ops routes, and the `/_sim` control API.

Dome-compatible:
- `WS /<API_KEY>`: the order feed (see `protocol`). A wrong or missing key is refused during the
  handshake with HTTP 401 and `{"error":"unauthorized","message":..}`.
- `WS /ws?key=<API_KEY>[&compress=zlib]`: the same feed in the polynode dialect (see `protocol`);
  so a Dome key spelled `ws` cannot be used on the Dome path.
- `WS /v1/<API_KEY>`: the same feed in the Predexon dialect (see `protocol`). Both successors'
  timers, plans and the mempool's pending events, with their `/_sim/pending`, `/_sim/mempool`,
  `/_sim/predexon` and `/_sim/polynode` switches, are in `successors`;
  `POST /_sim/emit?pending=1[&drop=1]` puts exact trades through the mempool.
- `GET /v1/polymarket/orders` with `Authorization: Bearer <key>` (see `history`); 401 without it.
  With SIM_API_KEY empty any non-empty key is accepted.
- `GET /trades`, `GET /v2/trades`, `GET /v2/activity`: Polymarket's Data API trades (v1 offset
  pages, v2 cursor feeds) behind its CDN's cache (SIM_CDN_CACHE_S, `/_sim/cdn`); no key, as at
  Polymarket (see `data_api_routes`).
- `GET /markets`: Gamma's markets by `clob_token_ids` / `condition_ids`, `closed` filtering; the
  markets SIM_RESOLUTION resolves are closed with their payouts (see `resolution`); with
  `include_tag=true` each has its `tags` (SIM_TAGS, see `gamma`).
- `GET /closed-positions`, `GET /v1/leaderboard`: the Data API's, from the emitted trades and
  SIM_RESOLUTION (see `wallet_history`); no key.
- `GET /prices-history`: Polymarket CLOB's price history of a token, from every emitted trade
  (see `prices`); no key.
- `GET /positions?user=`: Polymarket Data API's holdings per token, from SIM_POSITIONS_TAPE and
  the trades emitted since (see `positions`); no key.
- `WS /rtds`: Polymarket's unofficial RTDS `activity` firehose, with its quirks and failures as
  switches (`GET`/`POST /_sim/rtds`; see `rtds`).

Control API, not part of Dome, unauthenticated (bind to loopback; meant for tests and benchmarks):
- `GET /_sim/status` -> `{"emitted", "clients", "subscriptions", "started", "tape_done", "loops",
  "mode"}`; `tape_done` can only become true with SIM_LOOP=false; `loops` counts completed passes.
- `GET /_sim/trades[?user=0x..]` -> the ground truth: emitted trades oldest first, Dome order shape
  plus `emitted_at` (float Unix time of emission).
- `GET /_sim/subscriptions` -> `[{"subscription_id","filters"}]`, so a test can craft events.
- `POST /_sim/inject` (raw body) -> sent verbatim as one frame to every connected client (text if
  the body is UTF-8, else binary) -> `{"sent": n}`.
- `POST /_sim/drop` -> closes every WebSocket with 1012 (service restart) -> `{"dropped": n}`.
- `POST /_sim/emit` (a JSON list of Dome-shaped trades, missing fields filled) -> emitted now
  through the normal path -> `{"emitted": n, "trades": [ground truth]}`.

Fault injection (see `faults`; trades keep being emitted on the clock whatever the faults, so a
client that was away can only recover them by backfill):
- `POST /_sim/stall` -> every open socket freezes: nothing more is sent, pings go unanswered, the
  TCP connection stays open -> `{"stalled": n}`. New connections are healthy.
- `POST /_sim/auth` `{"reject": bool, "drop": bool}` -> while `reject`, handshakes and REST
  requests get 401 even with the right key; `drop` also closes the open sockets with 4001
  ("unauthorized: ...") -> `{"reject": bool, "dropped": n}`.
- `POST /_sim/rate_limit` `{"requests": n, "retry_after": s}` -> the next n REST requests (orders
  and trades) get 429 with `Retry-After: s` -> the fault state.
- `POST /_sim/rest_fail` `{"user": "0x..", "status": 500}` | `{"user", "hang_s": s}` |
  `{"user", "no_pagination_key": true}` | `{"user", "clear": true}` -> until cleared, the orders
  endpoint fails for that wallet (`*`: every wallet): that HTTP status, an answer held `hang_s`
  (a client times out on it), or `has_more` with a null `pagination_key`; other wallets are
  answered normally -> the fault state.
- `POST /_sim/prices_lag` `{"seconds": s}` -> `/prices-history` holds only trades emitted more
  than `s` ago and no point past then (`prices`); 0 turns it off.
- `POST /_sim/rest_lag` `{"seconds": s}` -> a trade shows up in the orders endpoint only `s` after
  its live event (REST indexing lag; 0 turns it off; SIM_REST_INDEX_LAG_S at start) -> the state.
- `POST /_sim/update_delay` `{"seconds": s}` -> subscription `update`s are applied `s` after they
  arrive (no reply either way, as at Dome; 0: at once; SIM_UPDATE_DELAY_S at start) -> the state.
- `GET /_sim/faults` -> the fault state; `GET /_sim/requests` -> the REST request log (oldest
  first: `at`, `path`, `params`, `status`).
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import Response
from prometheus_client import Counter
from pydantic import SecretStr

from services.simulator.cdn import Cdn
from services.simulator.data_api_routes import add_data_api_routes
from services.simulator.faults import (
    AUTH_CLOSE_CODE,
    AUTH_CLOSE_REASON,
    Faults,
    RestFailure,
    parse_rest_failure,
)
from services.simulator.feed import Connection, Hub, Transport
from services.simulator.gamma import load_tags, with_tags
from services.simulator.history import History, QueryError, parse_orders_query
from services.simulator.positions import (
    Fill,
    Holdings,
    last_prices,
    parse_positions_query,
    positions_page,
    wallet_fills,
)
from services.simulator.prices import parse_prices_query, price_history
from services.simulator.protocol import Dialect
from services.simulator.replay import Emitter
from services.simulator.resolution import gamma_answer, load_resolution
from services.simulator.rtds import RtdsFeed, RtdsSwitches, add_rtds_routes
from services.simulator.settings import SimulatorSettings, resolve_path
from services.simulator.successors import (
    Successors,
    add_successor_routes,
    chores,
    protocol_pinger,
)
from services.simulator.tape import load_tape
from services.simulator.trades import Injected, TradeInputError, injected_trade
from services.simulator.wallet_history import closed_positions, leaderboard
from shared.ops import ops_routes

log = logging.getLogger(__name__)

REST_REQUESTS = Counter(
    "betterbot_sim_rest_requests_total",
    "REST requests by endpoint and status",
    ["endpoint", "status"],
)
DROP_CODE, DROP_REASON = 1012, "service restart"


class ApiKey:
    """The key check of both the WebSocket path and the REST bearer header."""

    def __init__(self, key: SecretStr) -> None:
        self._key = key.get_secret_value().encode()

    def accepts(self, presented: str) -> bool:
        if not presented:
            return False
        return not self._key or hmac.compare_digest(presented.encode(), self._key)

    def accepts_header(self, header: str | None) -> bool:
        scheme, _, token = (header or "").partition(" ")
        return scheme.lower() == "bearer" and self.accepts(token.strip())


def error_response(status: int, error: str, message: str) -> Response:
    return Response(
        orjson.dumps({"error": error, "message": message}),
        status_code=status,
        media_type="application/json",
    )


def json_response(body: Any) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


UNAUTHORIZED = ("unauthorized", "missing or invalid API key")
SIMULATED_FAILURE = ("simulated_failure", "this wallet's orders fail on purpose (/_sim/rest_fail)")
RATE_LIMITED = ("rate_limited", "too many requests")


async def _read_loop(websocket: WebSocket, conn: Connection, hub: Hub) -> None:
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        if conn.stalled:
            # Receiving may have let the server resume reading: a frozen peer reads nothing.
            conn.hold_reading()
            continue
        text = message.get("text")
        hub.handle(conn, text if text is not None else message.get("bytes") or b"")


def _transport(websocket: WebSocket) -> Transport | None:
    """The socket's transport, for the stall fault.

    Starlette hands the app the server's own bound `receive`; with uvicorn that is a method of the
    protocol object, which holds the transport. Another server: None, and a stall then only stops
    sending (pings are still answered)."""
    owner = getattr(getattr(websocket, "_receive", None), "__self__", None)
    transport = getattr(owner, "transport", None)
    has_api = hasattr(transport, "pause_reading") and hasattr(transport, "abort")
    return transport if has_api else None


async def _json_body(request: Request) -> dict[str, Any]:
    body = await request.body()
    try:
        parsed = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError as exc:
        raise QueryError(f"body is not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise QueryError("body must be a JSON object")
    return parsed


def _seconds(body: dict[str, Any]) -> float:
    seconds = body.get("seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
        raise ValueError("seconds must be a number, at least 0")
    return float(seconds)


def _broken(body: dict[str, Any], failure: RestFailure | None) -> dict[str, Any]:
    """The orders page as the no_pagination_key fault breaks it: more, but no way to get it."""
    if failure is not None and failure.no_pagination_key:
        body["pagination"].update(has_more=True, pagination_key=None)
    return body


async def _refuse(websocket: WebSocket) -> None:
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(error_response(401, *UNAUTHORIZED))
    else:  # a server without the denial extension can only refuse with 403
        await websocket.close(code=1008)


def create_app(
    settings: SimulatorSettings,
    hub: Hub,
    history: History,
    emitter: Emitter,
    markets: dict[str, dict[str, Any]] | None = None,
) -> FastAPI:
    app = FastAPI(title="BetterBot Dome simulator", docs_url=None, redoc_url=None, openapi_url=None)
    api_key = ApiKey(settings.sim_api_key)
    faults = Faults(
        rest_lag_s=settings.sim_rest_index_lag_s, prices_lag_s=settings.sim_prices_lag_s
    )
    app.state.faults = faults
    hub.update_delay_s = settings.sim_update_delay_s
    # Dome's successors: plans, pings, heartbeats, the mempool (services/simulator/successors.py).
    successors = Successors.of(settings)
    successors.start(hub)
    hub.history = history
    emitter.mempool = successors.mempool
    add_successor_routes(app, hub, emitter, successors)
    pending_batches = itertools.count()
    inject_salt = secrets.token_hex(8)

    def refused(path: str, params: Any) -> Response | None:
        """The 429 of the rate-limit fault, or None to answer normally."""
        retry_after = faults.take_throttle()
        if retry_after is None:
            return None
        faults.record(path, params, 429)
        REST_REQUESTS.labels(path, "429").inc()
        response = error_response(429, *RATE_LIMITED)
        response.headers["Retry-After"] = retry_after
        return response

    def answered(
        path: str, params: Any, status: int, response: Response, *, cache: str = ""
    ) -> Response:
        faults.record(path, params, status, cache)
        REST_REQUESTS.labels(path, str(status)).inc()
        return response

    async def health() -> tuple[bool, dict[str, Any]]:
        return True, {
            "mode": settings.sim_mode,
            "emitted": emitter.emitted,
            "clients": len(hub.connections),
            "started": emitter.started,
        }

    app.router.routes.extend(ops_routes(health))

    async def feed(
        websocket: WebSocket, presented: str = "", dialect: Dialect = Dialect.DOME
    ) -> None:
        if faults.reject_auth or not api_key.accepts(presented):
            await _refuse(websocket)
            return
        await websocket.accept()
        # polynode's `&compress=zlib`: event frames as binary raw deflate.
        compress = websocket.query_params.get("compress") == "zlib"
        compress = compress and dialect is Dialect.POLYNODE
        conn = hub.connect(websocket, dialect, _transport(websocket), compress)
        log.info("client_connected", extra={"connection": conn.id, "dialect": dialect.value})
        writer = asyncio.create_task(conn.write_loop())
        reader = asyncio.create_task(_read_loop(websocket, conn, hub))
        # The dialect's timers: Predexon's pings and idle close, polynode's heartbeats and session.
        timers = asyncio.create_task(chores(conn, hub, successors, protocol_pinger(websocket)))
        try:
            await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hub.disconnect(conn)
            for task in (reader, writer, timers):
                task.cancel()
            await asyncio.gather(reader, writer, timers, return_exceptions=True)
            log.info("client_disconnected", extra={"connection": conn.id})

    @app.websocket("/")
    async def feed_without_key(websocket: WebSocket) -> None:
        await feed(websocket)

    # Declared before `/{api_key_path}`, which would otherwise take `ws` for a Dome key.
    @app.websocket("/ws")
    async def polynode_feed(websocket: WebSocket) -> None:
        await feed(websocket, websocket.query_params.get("key", ""), Dialect.POLYNODE)

    @app.websocket("/{api_key_path}")
    async def feed_with_key(websocket: WebSocket, api_key_path: str) -> None:
        await feed(websocket, api_key_path)

    @app.websocket("/v1/{api_key_path}")
    async def predexon_feed(websocket: WebSocket, api_key_path: str) -> None:
        await feed(websocket, api_key_path, Dialect.PREDEXON)

    @app.get("/v1/polymarket/orders")
    async def orders(request: Request) -> Response:
        path, params = "/v1/polymarket/orders", request.query_params
        if (limited := refused(path, params)) is not None:
            return limited
        authorized = api_key.accepts_header(request.headers.get("authorization"))
        if faults.reject_auth or not authorized:
            return answered(path, params, 401, error_response(401, *UNAUTHORIZED))
        try:
            query = parse_orders_query(params)
        except QueryError as exc:
            return answered(path, params, 400, error_response(400, "bad_request", str(exc)))
        failure = faults.rest_failure(query.user)
        if failure is not None and failure.hang_s:
            await asyncio.sleep(failure.hang_s)
        if failure is not None and failure.status is not None:
            error = error_response(failure.status, *SIMULATED_FAILURE)
            return answered(path, params, failure.status, error)
        body = history.page(query, faults.indexed_before(time.time()))
        return answered(path, params, 200, json_response(_broken(body, failure)))

    app.state.cdn = Cdn(settings.sim_cdn_cache_s)
    add_data_api_routes(app, history, app.state.cdn, refused, answered)

    positions_tape = settings.sim_positions_tape
    earlier = load_tape(resolve_path(Path(positions_tape))) if positions_tape else []

    @app.get("/positions")
    async def data_api_positions(request: Request) -> Response:
        """The Data API's holdings of a wallet: SIM_POSITIONS_TAPE, then the emitted trades."""
        path, params = "/positions", request.query_params
        if (limited := refused(path, params)) is not None:
            return limited
        try:
            query = parse_positions_query(params)
        except QueryError as exc:
            return answered(path, params, 400, error_response(400, "bad_request", str(exc)))
        fills: list[Fill] = [*earlier, *history.trades()]
        holdings = Holdings().add(wallet_fills(query.user, fills))
        # `curPrice` is the token's last trade, whoever made it, not the wallet's own.
        holdings.last_price = last_prices(fills)
        return answered(path, params, 200, json_response(positions_page(holdings, query)))

    resolution = (
        load_resolution(resolve_path(Path(settings.sim_resolution)))
        if settings.sim_resolution
        else {}
    )

    tags = load_tags(resolve_path(Path(settings.sim_tags))) if settings.sim_tags else {}

    @app.get("/markets")
    async def gamma(request: Request) -> Response:
        """Gamma's market lookup by token id or condition id (`clob_token_ids`, `condition_ids`:
        repeated or comma-separated), `closed` filtering; resolved markets per SIM_RESOLUTION."""
        path, params = "/markets", request.query_params
        if (limited := refused(path, params)) is not None:
            return limited
        ids = [part for value in params.getlist("clob_token_ids") for part in value.split(",")]
        conditions = [p for value in params.getlist("condition_ids") for p in value.split(",")]
        closed = {"true": True, "false": False}.get(params.get("closed", "").lower())
        body = gamma_answer(markets or {}, resolution, ids, conditions, closed)
        if params.get("include_tag", "").lower() == "true":
            body = [with_tags(market, tags) for market in body]
        return answered(path, params, 200, json_response(body))

    @app.get("/closed-positions")
    async def data_api_closed_positions(request: Request) -> Response:
        """The Data API's closed positions of a wallet, from the emitted trades (see
        `wallet_history`)."""
        return _wallet_history(request, lambda p: closed_positions(history.trades(), resolution, p))

    @app.get("/v1/leaderboard")
    async def data_api_leaderboard(request: Request) -> Response:
        """The Data API's trader leaderboard, from the emitted trades (see `wallet_history`)."""
        return _wallet_history(
            request, lambda p: leaderboard(history.trades(), resolution, tags, p)
        )

    def _wallet_history(request: Request, answer: Callable[[Any], list[Any]]) -> Response:
        path, params = request.url.path, request.query_params
        if (limited := refused(path, params)) is not None:
            return limited
        try:
            body = answer(params)
        except QueryError as exc:
            return answered(path, params, 400, error_response(400, "bad_request", str(exc)))
        return answered(path, params, 200, json_response(body))

    @app.get("/_sim/status")
    async def status() -> Response:
        return json_response(
            {
                "emitted": emitter.emitted,
                "clients": len(hub.connections),
                "subscriptions": hub.subscription_count,
                "started": emitter.started,
                "tape_done": emitter.done,
                "loops": emitter.loops,
                "mode": settings.sim_mode,
            }
        )

    @app.get("/_sim/trades")
    async def trades(user: str | None = None) -> Response:
        return json_response([trade.truth() for trade in history.trades(user)])

    @app.get("/_sim/subscriptions")
    async def subscriptions() -> Response:
        return json_response(
            [
                {"subscription_id": sub.id, "filters": sub.filters.to_json()}
                for sub in hub.subscriptions()
            ]
        )

    @app.post("/_sim/inject")
    async def inject(request: Request) -> Response:
        body = await request.body()
        try:
            frame: str | bytes = body.decode()
        except UnicodeDecodeError:
            frame = body
        return json_response({"sent": hub.broadcast(frame)})

    @app.post("/_sim/drop")
    async def drop() -> Response:
        return json_response({"dropped": await hub.close_all(DROP_CODE, DROP_REASON)})

    @app.post("/_sim/stall")
    async def stall() -> Response:
        return json_response({"stalled": hub.stall_all()})

    @app.post("/_sim/auth")
    async def auth(request: Request) -> Response:
        try:
            body = await _json_body(request)
        except QueryError as exc:
            return error_response(400, "bad_request", str(exc))
        reject, close = body.get("reject", True), body.get("drop", False)
        if not isinstance(reject, bool) or not isinstance(close, bool):
            return error_response(400, "bad_request", "reject and drop must be booleans")
        faults.reject_auth = reject
        dropped = await hub.close_all(AUTH_CLOSE_CODE, AUTH_CLOSE_REASON) if close else 0
        return json_response({"reject": reject, "dropped": dropped})

    @app.post("/_sim/rate_limit")
    async def rate_limit(request: Request) -> Response:
        try:
            body = await _json_body(request)
            requests, retry_after = body.get("requests", 1), body.get("retry_after", 1)
            if not isinstance(requests, int) or not isinstance(retry_after, int | float):
                raise QueryError("requests must be an integer and retry_after a number")
            faults.throttle(requests, float(retry_after))
        except (QueryError, ValueError) as exc:
            return error_response(400, "bad_request", str(exc))
        return json_response(faults.state())

    @app.post("/_sim/rest_fail")
    async def rest_fail(request: Request) -> Response:
        try:
            user, failure = parse_rest_failure(await _json_body(request))
        except (QueryError, ValueError) as exc:
            return error_response(400, "bad_request", str(exc))
        faults.fail_rest(user, failure)
        return json_response(fault_state_now())

    @app.post("/_sim/prices_lag")
    async def prices_lag(request: Request) -> Response:
        try:
            faults.prices_lag_s = _seconds(await _json_body(request))
        except (QueryError, ValueError) as exc:
            return error_response(400, "bad_request", str(exc))
        return json_response(fault_state_now())

    @app.post("/_sim/rest_lag")
    async def rest_lag(request: Request) -> Response:
        try:
            faults.rest_lag_s = _seconds(await _json_body(request))
        except (QueryError, ValueError) as exc:
            return error_response(400, "bad_request", str(exc))
        return json_response(fault_state_now())

    @app.post("/_sim/update_delay")
    async def update_delay(request: Request) -> Response:
        try:
            hub.update_delay_s = _seconds(await _json_body(request))
        except (QueryError, ValueError) as exc:
            return error_response(400, "bad_request", str(exc))
        return json_response(fault_state_now())

    def fault_state_now() -> dict[str, Any]:
        return {**faults.state(), "update_delay_s": hub.update_delay_s}

    @app.get("/_sim/faults")
    async def fault_state() -> Response:
        return json_response(fault_state_now())

    @app.get("/_sim/requests")
    async def requests_log() -> Response:
        return json_response([record.to_json() for record in faults.requests])

    @app.post("/_sim/emit")
    async def emit(request: Request) -> Response:
        try:
            items = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            return error_response(400, "bad_request", f"body is not JSON: {exc}")
        if not isinstance(items, list):
            return error_response(400, "bad_request", "body must be a JSON list of trades")
        # `?pending=1[&drop=1]`: through the mempool (successors.py), announced now.
        pending, drop = (request.query_params.get(name) == "1" for name in ("pending", "drop"))
        batch = f"p{next(pending_batches)}" if pending else ""
        parsed: list[Injected] = []
        for index, item in enumerate(items):
            try:
                unique = f"{inject_salt}|{emitter.emitted}|{batch}|{index}"
                parsed.append(injected_trade(item, unique))
            except TradeInputError as exc:
                return error_response(400, "bad_request", f"trade {index}: {exc}")
        if pending:
            announced = [emitter.submit(p.template, pending=True, drop=drop) for p in parsed]
            return json_response({"pending": len(announced), "trades": announced})
        emitted = [
            emitter.emit(p.template, p.timestamp, p.block_number, p.log_index) for p in parsed
        ]
        return json_response({"emitted": len(emitted), "trades": [t.truth() for t in emitted]})

    @app.get("/prices-history")
    async def prices_history(request: Request) -> Response:
        """Polymarket's CLOB price history of a token, from every emitted trade (see `prices`)."""
        path, params = "/prices-history", request.query_params
        if (limited := refused(path, params)) is not None:
            return limited
        try:
            query = parse_prices_query(params)
            body = price_history(history.trades(), query, faults.prices_known_before(time.time()))
        except QueryError as exc:
            return answered(path, params, 400, error_response(400, "bad_request", str(exc)))
        return answered(path, params, 200, json_response(body))

    # Polymarket's unofficial RTDS firehose over the same trades (`rtds`); it opens the gate too.
    rtds = RtdsFeed(
        history, RtdsSwitches.of(settings), settings.sim_send_queue_max, hub.first_subscription
    )
    app.state.rtds = rtds
    add_rtds_routes(app, rtds)
    return app
