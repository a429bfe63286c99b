"""`GET /wallets`, `PUT /wallets/{address}`, `DELETE /wallets/{address}`: the tracked wallets.

Persisted in Postgres and published to the live registry (`wallets.py`). `reads` and `writes` are
two routers so that `create_app` can put the write token on `writes` alone. Until the wallets are
synced at startup, every one of these answers 503 with Retry-After.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import Path
from fastapi.exceptions import HTTPException
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.responses import JSONResponse, Response

from services.store.api_context import ApiContext, Ctx, problems, read_router, write_router
from services.store.api_inputs import ADDRESS_PATTERN, Label, Wallet
from services.store.wallet_quality_refresh import qualities
from services.store.wallets import StoredWallet
from shared.models import TrackedWallet


class WalletIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: Label = ""
    score: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)

    @field_validator("score", mode="before")
    @classmethod
    def _number_not_bool(cls, value: Any) -> Any:
        if isinstance(value, bool | str):
            raise ValueError(f"must be a number or null, got {type(value).__name__}")
        return value


class WalletQualityOut(BaseModel):
    """The wallet's quality from its history (docs/store.md, "Wallet quality")."""

    score: float | None = Field(description="0..1 from the figures below; null: too few decided")
    realised_pnl: float = Field(description="USDC: closed positions and decided open ones")
    unrealised_pnl: float = Field(description="USDC: open positions of unresolved markets")
    win_rate: float | None = Field(description="wins / (wins + losses), unredeemed losers in")
    wins: int
    losses: int
    markets_traded: int
    trades: int
    volume_usd: float
    market_maker: bool
    bot: bool
    refreshed_at: datetime | None = Field(description="the last refresh that worked")
    error: str = Field(description="why the last refresh failed; empty when it worked")


class WalletOut(BaseModel):
    address: str
    label: str
    score: float | None
    added_at: datetime
    updated_at: datetime
    # Null until the store's refresher has read the wallet's history once.
    quality: WalletQualityOut | None = None

    @classmethod
    def of(cls, wallet: StoredWallet, quality: dict[str, Any] | None = None) -> WalletOut:
        return cls(
            address=wallet.address,
            label=wallet.label,
            score=wallet.score,
            added_at=wallet.added_at,
            updated_at=wallet.updated_at,
            quality=None if quality is None else WalletQualityOut(**quality),
        )


reads = read_router()
writes = write_router()


@reads.get("/wallets", response_model=list[WalletOut], summary="The tracked wallets")
async def get_wallets(ctx: Ctx) -> list[WalletOut]:
    await _synced(ctx)
    wallets = await ctx.wallets.tracked()
    quality = await qualities(ctx.db, [w.address for w in wallets])
    return [WalletOut.of(w, quality.get(w.address)) for w in wallets]


AddressPath = Annotated[
    Wallet,
    Path(description="0x address (any case)", json_schema_extra={"pattern": ADDRESS_PATTERN}),
]


@writes.put(
    "/wallets/{address}",
    response_model=WalletOut,
    summary="Track a wallet, or set its label and score",
    responses={201: {"model": WalletOut, "description": "now tracked"}},
)
async def put_wallet(ctx: Ctx, address: AddressPath, body: WalletIn) -> JSONResponse:
    await _synced(ctx)
    wallet = TrackedWallet(address=address, label=body.label, score=body.score)
    saved, created = await ctx.wallets.put(wallet)
    return JSONResponse(
        WalletOut.of(saved).model_dump(mode="json"), status_code=201 if created else 200
    )


@writes.delete(
    "/wallets/{address}",
    status_code=204,
    summary="Stop tracking a wallet",
    responses=problems(404),
)
async def delete_wallet(ctx: Ctx, address: AddressPath) -> Response:
    await _synced(ctx)
    if not await ctx.wallets.delete(address):
        raise HTTPException(404, f"wallet {address} is not tracked")
    return Response(status_code=204)


async def _synced(ctx: ApiContext) -> None:
    if not ctx.wallets.synced.is_set():
        raise HTTPException(
            503,
            "starting: tracked wallets are not synced yet, retry shortly",
            headers={"Retry-After": "1"},
        )
