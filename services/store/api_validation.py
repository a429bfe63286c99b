"""`GET /signals/validation`: does following the signals pay? Per signal kind, wallet or source
and per horizon (5m, 1h, 24h, settlement): the count, the mean markout net of fees in cents per
share, the fee counted, the hit rate with its 95% Wilson interval and a verdict
(`validation_report.py`; the definitions: docs/signals.md, "Does it pay? Validation"). Each
signal's own figures are columns of `GET /signals`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import Query
from pydantic import BaseModel, Field

from services.store.api_context import Ctx, read_router
from services.store.api_history import SinceQ, UntilQ, time_range
from services.store.markouts import LABELS
from services.store.validation_report import RULE, Grouping, to_json
from services.store.validation_summary import summary

router = read_router()


class ValidationRow(BaseModel):
    group: str = Field(description="the kind, wallet address or source")
    label: str = Field(description="the wallet's label (by=wallet), else empty")
    horizon: str = Field(description="5m, 1h, 24h or settlement")
    n: int = Field(description="signals measured at this horizon (not retracted, with a price)")
    mean_markout_cents: float | None = Field(description="mean markout net of fees, ¢ per share")
    mean_fee_cents: float | None = Field(description="mean taker fee subtracted, ¢ per share")
    hits: int = Field(description="signals with a net markout above 0")
    flat: int = Field(description="signals with a net markout of exactly 0 (misses)")
    hit_rate: float | None
    ci95_low: float | None = Field(description="95% Wilson score interval of the hit rate")
    ci95_high: float | None
    verdict: str


class ValidationSummary(BaseModel):
    by: Grouping
    since: datetime | None
    until: datetime | None
    horizons: list[str]
    rule: str = Field(description="what a hit is and when a hit rate is called significant")
    rows: list[ValidationRow]


@router.get(
    "/signals/validation",
    response_model=ValidationSummary,
    summary="Markouts and settlement results of the signals, summarised per group",
)
async def get_validation(
    ctx: Ctx,
    by: Annotated[Grouping, Query(description="group by kind, wallet or source")] = "kind",
    since: SinceQ = None,
    until: UntilQ = None,
) -> ValidationSummary:
    time_range(since, until)
    async with ctx.db.connection() as conn:
        tallies = await summary(conn, by, since, until)
    return ValidationSummary(
        by=by,
        since=since,
        until=until,
        horizons=list(LABELS),
        rule=RULE,
        rows=[ValidationRow(**to_json(t)) for t in tallies],
    )
