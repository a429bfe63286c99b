"""Health and Prometheus metrics over HTTP for every service, and graceful shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

log = logging.getLogger(__name__)

# Returns (healthy, details). Details are shown on /health; keep secrets out of them.
HealthCheck = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]


def ops_routes(health: HealthCheck) -> list[Route]:
    async def health_endpoint(_: Request) -> Response:
        ok, details = await health()
        return JSONResponse({"ok": ok, **details}, status_code=200 if ok else 503)

    async def metrics_endpoint(_: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return [Route("/health", health_endpoint), Route("/metrics", metrics_endpoint)]


def http_server(app: Any, host: str, port: int) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="off",
        ws_max_size=1 << 20,
    )
    server = uvicorn.Server(config)
    # We own SIGTERM/SIGINT (see `stop_event`); uvicorn must not swap in its own handlers.
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    return server


def ops_server(health: HealthCheck, host: str, port: int) -> uvicorn.Server:
    return http_server(Starlette(routes=ops_routes(health)), host, port)


def stop_event() -> asyncio.Event:
    """An event set on SIGTERM or SIGINT, so services finish in-flight work before exiting."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


# The hot paths allocate many short-lived objects per message; refcounting frees them, and the
# cyclic collector only needs to run now and then: every 50,000 net allocations, far less often
# than CPython's default.
GC_GEN0_THRESHOLD = 50_000


def settle_heap() -> None:
    """Call in a service's `main`, once imports and settings are done: freeze what they built
    (modules, pydantic schemas), so the collector's full passes stop re-scanning it, and let the
    young generation grow, so the collector stops interrupting the hot paths (bench/README.md)."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


async def run_until_stopped(
    stop: asyncio.Event, *workers: Awaitable[Any], servers: tuple[uvicorn.Server, ...] = ()
) -> None:
    """Run workers and HTTP servers until `stop` is set or a worker fails, then wind down."""
    tasks = [asyncio.ensure_future(w) for w in workers]
    tasks += [asyncio.ensure_future(s.serve()) for s in servers]
    stopper = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    for server in servers:
        server.should_exit = True
    for task in tasks:
        if not task.done():
            task.cancel()
    stopper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        if task is not stopper and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
