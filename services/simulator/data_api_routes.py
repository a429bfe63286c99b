"""The Data API's trade routes behind its CDN, and the CDN's switch.

- `GET /trades` (v1, `data_api`), `GET /v2/trades` and `GET /v2/activity` (`data_api_v2`): no key,
  as at Polymarket. The rate-limit fault (`/_sim/rate_limit`) answers before the cache, as
  Cloudflare's rate limiting does; then the CDN (`cdn`) answers a URL it holds, else the origin.
  Every answer says `cf-cache-status`; a cached one also `age`. The request log
  (`GET /_sim/requests`) records each answer's cache status (`cache`).
- `GET /_sim/cdn` -> `{"cdn_cache_s", "entries", "hits", "misses"}`; `POST /_sim/cdn
  {"seconds": s}` sets how long an identical URL is answered from cache (0: off) and empties it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from services.simulator import data_api, data_api_v2
from services.simulator.cdn import HIT, Cdn
from services.simulator.history import History, QueryError

JSON = "application/json"


class Refused(Protocol):
    def __call__(self, path: str, params: Any) -> Response | None: ...


class Answered(Protocol):
    def __call__(
        self, path: str, params: Any, status: int, response: Response, *, cache: str = ""
    ) -> Response: ...


def _bad_request(message: str) -> Response:
    body = orjson.dumps({"error": "bad_request", "message": message})
    return Response(body, status_code=400, media_type=JSON)


def _v1_trades(history: History, params: Mapping[str, str]) -> Any:
    return data_api.trades_page(history, data_api.parse_trades_query(params))


def _v2_trades(history: History, params: Mapping[str, str]) -> Any:
    return data_api_v2.feed_page(history, data_api_v2.parse_trades_query(params))


def _v2_activity(history: History, params: Mapping[str, str]) -> Any:
    return data_api_v2.feed_page(history, data_api_v2.parse_activity_query(params))


ROUTES: dict[str, Callable[[History, Mapping[str, str]], Any]] = {
    "/trades": _v1_trades,
    "/v2/trades": _v2_trades,
    "/v2/activity": _v2_activity,
}


def add_data_api_routes(
    app: FastAPI, history: History, cdn: Cdn, refused: Refused, answered: Answered
) -> None:
    async def serve(request: Request) -> Response:
        path, params = request.url.path, request.query_params
        if (limited := refused(path, params)) is not None:
            return limited
        url = f"{path}?{request.url.query}"
        cached = cdn.lookup(url)
        if cached is not None:
            response = Response(cached.body, media_type=JSON)
            response.headers.update({"cf-cache-status": HIT, "age": str(cached.age_s)})
            return answered(path, params, 200, response, cache=HIT)
        try:
            body = orjson.dumps(ROUTES[path](history, params))
        except QueryError as exc:
            return answered(path, params, 400, _bad_request(str(exc)), cache=cdn.status())
        cdn.store(url, body)
        response = Response(body, media_type=JSON)
        response.headers["cf-cache-status"] = cdn.status()
        return answered(path, params, 200, response, cache=cdn.status())

    for path in ROUTES:
        app.add_api_route(path, serve, methods=["GET"], include_in_schema=False)

    @app.get("/_sim/cdn")
    async def cdn_state() -> Response:
        return Response(orjson.dumps(cdn.state()), media_type=JSON)

    @app.post("/_sim/cdn")
    async def cdn_switch(request: Request) -> Response:
        try:
            body = orjson.loads(await request.body() or b"{}")
        except orjson.JSONDecodeError as exc:
            return _bad_request(f"body is not JSON: {exc}")
        seconds = body.get("seconds") if isinstance(body, dict) else None
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
            return _bad_request("seconds must be a number, at least 0 (0: the cache is off)")
        cdn.ttl_s = float(seconds)
        return Response(orjson.dumps(cdn.state()), media_type=JSON)
