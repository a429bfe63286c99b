"""The store's HTTP API (FastAPI; OpenAPI at /openapi.json, browsable at /docs), on the ops port.

- `GET /signals`, `GET /orders`: history, filtered, newest first, keyset-paged, JSON or CSV
  (`api_history.py`); a CSV of every matching row is streamed, a bounded number at once, each for
  a bounded time (`api_export.py`).
- `GET /signals/validation`: markouts and settlement results summarised per kind, wallet or
  source (`api_validation.py`).
- `GET /wallets`, `PUT /wallets/{address}`, `DELETE /wallets/{address}`: the tracked wallets,
  persisted in Postgres and published to the live registry (`api_wallets.py`, `wallets.py`).
- Auth (here, next to the wiring that decides which routes need it): write endpoints need
  `Authorization: Bearer <STORE_API_TOKEN>` (compared on SHA-256 digests, in constant time);
  without a configured token they are refused (403), never open. Reads need the token too when
  `STORE_API_READ_AUTH` is true. /health, /metrics and the docs stay open.
- Host: a request whose `Host` is not in `STORE_API_ALLOWED_HOSTS` gets 400 (DNS rebinding),
  except /health and /metrics (`api_middleware.py`).
- Bad input is a 4xx naming the problem: 422 for a malformed parameter or body (FastAPI's
  validation list; the input types are `api_inputs.py`), 400 for a bad cursor or an empty time
  range, 413 for a body over `STORE_API_MAX_BODY_BYTES`; 503 while Postgres or Redis cannot
  answer.

What endpoints share (`ApiContext`, the declared errors) is `api_context.py`.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, FastAPI, Request, Security
from fastapi.exceptions import HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis.exceptions import RedisError
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match

from services.store import api_history, api_validation, api_wallets
from services.store.api_context import ApiContext, Ctx
from services.store.api_export import Exports
from services.store.api_history import wants_csv
from services.store.api_middleware import BodyLimit, HostCheck, RequestMetrics
from services.store.database import Unavailable
from shared.ops import HealthCheck, ops_routes

# What `main.py` and the tests import from here, wherever it is defined.
__all__ = ["ApiContext", "Exports", "create_app", "digest", "wants_csv"]

bearer = HTTPBearer(auto_error=False, description="STORE_API_TOKEN")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]


def create_app(ctx: ApiContext, health: HealthCheck, max_body_bytes: int) -> FastAPI:
    app = FastAPI(
        title="BetterBot store",
        version="1",
        description=(
            "History of the order fills and signals the store kept, and the tracked wallets. "
            "Write endpoints need `Authorization: Bearer <STORE_API_TOKEN>`."
        ),
        # A redirect would answer an unauthenticated write with a 3xx pointing elsewhere
        # (`PUT /wallets/%2F` -> 307 to `/wallets`): an unknown path is a plain 404.
        redirect_slashes=False,
    )
    app.state.api = ctx
    read_guard = [Depends(require_read_token)] if ctx.read_auth else []
    app.include_router(api_history.router, dependencies=read_guard)
    app.include_router(api_validation.router, dependencies=read_guard)
    app.include_router(api_wallets.reads, dependencies=read_guard)
    app.include_router(api_wallets.writes, dependencies=[Depends(require_write_token)])
    app.add_exception_handler(Unavailable, unavailable)
    app.add_exception_handler(RedisError, unavailable)
    app.add_exception_handler(405, method_not_allowed)
    app.router.routes.extend(ops_routes(health))
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(HostCheck, allowed=ctx.allowed_hosts)
    app.add_middleware(RequestMetrics)
    return app


def check_token(ctx: ApiContext, credentials: HTTPAuthorizationCredentials | None) -> None:
    if ctx.token_digest is None:
        raise HTTPException(403, "this store has no STORE_API_TOKEN set: the endpoint is disabled")
    if credentials is None:
        raise HTTPException(
            401,
            "missing 'Authorization: Bearer <token>' header",
            headers={"WWW-Authenticate": "Bearer"},
        )
    # Digests, so the comparison takes the same time whatever the length of the token presented.
    if not hmac.compare_digest(digest(credentials.credentials), ctx.token_digest):
        raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "replace")).digest()


async def require_write_token(ctx: Ctx, credentials: Credentials) -> None:
    check_token(ctx, credentials)


async def require_read_token(ctx: Ctx, credentials: Credentials) -> None:
    if ctx.read_auth:
        check_token(ctx, credentials)


async def unavailable(_: Request, exc: Exception) -> Response:
    what = "Redis (wallet registry)" if isinstance(exc, RedisError) else "Postgres"
    return JSONResponse(
        {"detail": f"{what} unavailable, retry later"},
        status_code=503,
        headers={"Retry-After": "1"},
    )


async def method_not_allowed(request: Request, exc: Exception) -> Response:
    """405 with an `Allow` naming every method of the path: Starlette's names only the first
    route's (PUT and DELETE /wallets/{address} are two routes)."""
    allowed: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, BaseRoute) and route.matches(request.scope)[0] != Match.NONE:
            allowed |= set(getattr(route, "methods", None) or ())
    return JSONResponse(
        {"detail": "Method Not Allowed"},
        status_code=405,
        headers={"Allow": ", ".join(sorted(allowed))},
    )
