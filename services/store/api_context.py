"""What every endpoint of the store's API shares: its `ApiContext`, its routers' declared errors.

`main.py` builds one `ApiContext` and `create_app` hangs it on the app; an endpoint takes it as a
`ctx: Ctx` parameter. Reads and writes each get a router declaring, for the OpenAPI document, the
errors any of them can answer (`Problem`: `{"detail": ...}`); the token guards are added where
the routers are included (`api.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from services.store.api_export import Exports
from services.store.database import Database
from services.store.wallets import Wallets


class Problem(BaseModel):
    detail: str


@dataclass
class ApiContext:
    db: Database  # the API's own pool: reads never wait behind batch writes, nor they behind us
    wallets: Wallets
    token_digest: bytes | None  # SHA-256 of STORE_API_TOKEN
    read_auth: bool
    allowed_hosts: tuple[str, ...]  # "*" among them: any
    exports: Exports


def context(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.api
    return ctx


Ctx = Annotated[ApiContext, Depends(context)]


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": Problem} for code in codes}


def read_router() -> APIRouter:
    return APIRouter(responses=problems(400, 401, 403, 503))


def write_router() -> APIRouter:
    # 400: a body that is not even text (FastAPI's "error parsing the body").
    return APIRouter(responses=problems(400, 401, 403, 413, 503))
