"""The HTTP/WebSocket surface: Dome's WebSocket and REST, ops routes, and the `/_sim` control API.

Dome-compatible:
- `WS /<API_KEY>`: the order feed (see `protocol`). A wrong or missing key is refused during the
  handshake with HTTP 401 and `{"error":"unauthorized","message":..}`.
- `GET /v1/polymarket/orders` with `Authorization: Bearer <key>` (see `history`); 401 without it.
  With SIM_API_KEY empty any non-empty key is accepted.

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
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from typing import Any

import orjson
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import Response
from prometheus_client import Counter
from pydantic import SecretStr

from services.simulator.feed import Connection, Hub
from services.simulator.history import History, QueryError, parse_orders_query
from services.simulator.replay import Emitter
from services.simulator.settings import SimulatorSettings
from services.simulator.trades import Injected, TradeInputError, injected_trade
from shared.ops import ops_routes

log = logging.getLogger(__name__)

REST_REQUESTS = Counter(
    "betterbot_sim_rest_requests_total", "REST orders requests by status", ["status"]
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
        orjson.dumps({"error": error, "message": message}), status_code=status,
        media_type="application/json",
    )


def json_response(body: Any) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


UNAUTHORIZED = ("unauthorized", "missing or invalid API key")


async def _read_loop(websocket: WebSocket, conn: Connection, hub: Hub) -> None:
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        hub.handle(conn, text if text is not None else message.get("bytes") or b"")


async def _refuse(websocket: WebSocket) -> None:
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(error_response(401, *UNAUTHORIZED))
    else:  # a server without the denial extension can only refuse with 403
        await websocket.close(code=1008)


def create_app(
    settings: SimulatorSettings, hub: Hub, history: History, emitter: Emitter
) -> FastAPI:
    app = FastAPI(
        title="BetterBot Dome simulator", docs_url=None, redoc_url=None, openapi_url=None
    )
    api_key = ApiKey(settings.sim_api_key)
    inject_salt = secrets.token_hex(8)

    async def health() -> tuple[bool, dict[str, Any]]:
        return True, {
            "mode": settings.sim_mode, "emitted": emitter.emitted,
            "clients": len(hub.connections), "started": emitter.started,
        }

    app.router.routes.extend(ops_routes(health))

    async def feed(websocket: WebSocket, api_key_path: str = "") -> None:
        if not api_key.accepts(api_key_path):
            await _refuse(websocket)
            return
        await websocket.accept()
        conn = hub.connect(websocket)
        log.info("client_connected", extra={"connection": conn.id})
        writer = asyncio.create_task(conn.write_loop())
        reader = asyncio.create_task(_read_loop(websocket, conn, hub))
        try:
            await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hub.disconnect(conn)
            for task in (reader, writer):
                task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)
            log.info("client_disconnected", extra={"connection": conn.id})

    @app.websocket("/")
    async def feed_without_key(websocket: WebSocket) -> None:
        await feed(websocket)

    @app.websocket("/{api_key_path}")
    async def feed_with_key(websocket: WebSocket, api_key_path: str) -> None:
        await feed(websocket, api_key_path)

    @app.get("/v1/polymarket/orders")
    async def orders(request: Request) -> Response:
        if not api_key.accepts_header(request.headers.get("authorization")):
            REST_REQUESTS.labels("401").inc()
            return error_response(401, *UNAUTHORIZED)
        try:
            query = parse_orders_query(request.query_params)
        except QueryError as exc:
            REST_REQUESTS.labels("400").inc()
            return error_response(400, "bad_request", str(exc))
        REST_REQUESTS.labels("200").inc()
        return json_response(history.page(query))

    @app.get("/_sim/status")
    async def status() -> Response:
        return json_response({
            "emitted": emitter.emitted,
            "clients": len(hub.connections),
            "subscriptions": hub.subscription_count,
            "started": emitter.started,
            "tape_done": emitter.done,
            "loops": emitter.loops,
            "mode": settings.sim_mode,
        })

    @app.get("/_sim/trades")
    async def trades(user: str | None = None) -> Response:
        return json_response([trade.truth() for trade in history.trades(user)])

    @app.get("/_sim/subscriptions")
    async def subscriptions() -> Response:
        return json_response([
            {"subscription_id": sub.id, "filters": sub.filters.to_json()}
            for sub in hub.subscriptions()
        ])

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

    @app.post("/_sim/emit")
    async def emit(request: Request) -> Response:
        try:
            items = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            return error_response(400, "bad_request", f"body is not JSON: {exc}")
        if not isinstance(items, list):
            return error_response(400, "bad_request", "body must be a JSON list of trades")
        parsed: list[Injected] = []
        for index, item in enumerate(items):
            try:
                parsed.append(injected_trade(item, f"{inject_salt}|{emitter.emitted}|{index}"))
            except TradeInputError as exc:
                return error_response(400, "bad_request", f"trade {index}: {exc}")
        emitted = [
            emitter.emit(p.template, p.timestamp, p.block_number, p.log_index) for p in parsed
        ]
        return json_response({"emitted": len(emitted), "trades": [t.truth() for t in emitted]})

    return app
