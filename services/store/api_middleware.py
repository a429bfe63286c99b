"""ASGI layers around the store's API: `BodyLimit` (413), `HostCheck` (400), `RequestMetrics`.

They see every request before FastAPI routes it, so a body too large or a foreign `Host` is
refused before any endpoint, dependency or token check runs.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.responses import JSONResponse

from services.store import metrics

ASGIApp = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]


class BodyLimit:
    """Refuses request bodies over `max_bytes` with 413, declared (Content-Length) or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(scope, receive, send)
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
        await self.app(scope, _replay(bytes(body), receive), send)

    async def _refuse(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        response = JSONResponse(
            {"detail": f"request body too large: the limit is {self.max_bytes} bytes"},
            status_code=413,
        )
        await response(scope, receive, send)


def _replay(body: bytes, receive: Any) -> Callable[[], Awaitable[dict[str, Any]]]:
    replayed = False

    async def replay() -> dict[str, Any]:
        nonlocal replayed
        if replayed:
            message: dict[str, Any] = await receive()  # e.g. http.disconnect
            return message
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class HostCheck:
    """Refuses (400) a request whose `Host` header is not one of the API's own names.

    DNS rebinding: a web page on the attacker's name, re-pointed at 127.0.0.1, reaches this port
    from the victim's browser as "same origin", but its requests still carry the attacker's name
    in `Host`. /health and /metrics answer any name: Prometheus scrapes by IP address, and they
    hold no history.
    """

    OPEN_PATHS = frozenset({"/health", "/metrics"})

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...]) -> None:
        self.app = app
        self.allowed = frozenset(allowed)
        self.any = "*" in self.allowed

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or self.any or self._own(scope):
            await self.app(scope, receive, send)
            return
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        response = JSONResponse(
            {
                "detail": f"unknown Host {host[:100]!r}: this API answers to "
                f"{', '.join(sorted(self.allowed))} (STORE_API_ALLOWED_HOSTS)"
            },
            status_code=400,
        )
        await response(scope, receive, send)

    def _own(self, scope: MutableMapping[str, Any]) -> bool:
        if scope["path"] in self.OPEN_PATHS:
            return True
        host = dict(scope["headers"]).get(b"host")
        return host is not None and host_name(host.decode("latin-1")) in self.allowed


_HOST_HEADER = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[^:\[\]/@\s]+)(?::[0-9]{1,5})?$")


def host_name(header: str) -> str | None:
    """The name in a Host header, without its port, lower-cased; None if it is not one."""
    match = _HOST_HEADER.match(header)
    return match[1].lower().rstrip(".") if match else None


class RequestMetrics:
    """`betterbot_store_api_requests_total` and `_api_seconds`, by route template."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                route = _route(scope)
                metrics.API_SECONDS.labels(route).observe(time.perf_counter() - started)
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            metrics.API_REQUESTS.labels(scope["method"], _route(scope), str(status)).inc()


def _route(scope: MutableMapping[str, Any]) -> str:
    route = scope.get("route")
    return str(getattr(route, "path", "unmatched"))
