"""Polymarket's CLOB price history, `GET /prices-history`, over the trades the simulator emitted.

Parameters (docs.polymarket.com, "Get price history for a traded token"): `market` (the CLOB token
id; required), `startTs` and `endTs` (Unix seconds), or instead `interval` (`1h`, `6h`, `1d`,
`1w`, `1m`, `max`: a span ending now; both at once is a 400), and `fidelity` (minutes between
points, default 1). The answer: `{"history": [{"t": <Unix seconds>, "p": <price>}, ...]}`.

Here the price at a point is the token's last trade at or before it, among every trade emitted so
far: the whole tape, whoever traded, not only the tracked wallets. Points run from the start every
`fidelity` minutes, plus the end itself, so the last point is the price at the end; points before
the token's first trade are left out. Without `startTs` the span starts at that first trade, and
without `endTs` it ends now. Trades stamped wrongly on purpose (the timestamp quirks) are left
out, and a span of more than `MAX_POINTS` points is a 400.

Lag (a fault, `SIM_PRICES_LAG_S` or `POST /_sim/prices_lag`): the history holds only trades
emitted more than that long ago, and no point past that moment, as a price service that trails the
exchange answers; asked for a span ending later, it ends early rather than failing. A validator
that took the last point it got as the price at its horizon would read a stale price.

This is the simulator's own reading of its trades, independent of the store's validator, so a test
comparing the two can catch a mistake on either side.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from services.simulator.history import QueryError
from services.simulator.trades import Trade

INTERVALS = {"1h": 3600, "6h": 6 * 3600, "1d": 86_400, "1w": 7 * 86_400, "1m": 30 * 86_400}
MAX_POINTS = 10_000


@dataclass(frozen=True)
class PricesQuery:
    market: str
    start: int | None  # None: from the token's first trade
    end: int
    fidelity: int


def _seconds(params: Mapping[str, str], name: str) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(float(raw))
    except ValueError:
        raise QueryError(f"{name} must be Unix seconds, got {raw[:40]!r}") from None


def parse_prices_query(params: Mapping[str, str], now: float | None = None) -> PricesQuery:
    now_s = int(time.time() if now is None else now)
    market = params.get("market", "")
    if not market:
        raise QueryError("market (the CLOB token id) is required")
    start, end = _seconds(params, "startTs"), _seconds(params, "endTs")
    interval = params.get("interval")
    if interval is not None and (start is not None or end is not None):
        raise QueryError("interval and startTs/endTs are mutually exclusive")
    if interval is not None and interval != "max":
        if interval not in INTERVALS:
            raise QueryError(f"interval must be one of {[*INTERVALS, 'max']}, got {interval!r}")
        start = now_s - INTERVALS[interval]
    try:
        fidelity = int(params.get("fidelity") or 1)
    except ValueError:
        raise QueryError("fidelity must be a whole number of minutes") from None
    if fidelity < 1:
        raise QueryError("fidelity must be at least 1 (minute)")
    end = now_s if end is None else end
    if start is not None and start > end:
        raise QueryError("startTs must not be after endTs")
    return PricesQuery(market, start, end, fidelity)


def price_history(
    trades: Iterable[Trade], query: PricesQuery, known_before: float | None = None
) -> dict[str, Any]:
    """The answer body for the query over the emitted trades (oldest emitted first); with
    `known_before` (the lag fault), over those emitted before it, and no point after it."""
    own = sorted(
        (
            t
            for t in trades
            if t.token_id == query.market
            and not t.quirk
            and (known_before is None or t.emitted_at <= known_before)
        ),
        key=lambda t: (t.timestamp, t.seq),
    )
    if not own:
        return {"history": []}
    start = own[0].timestamp if query.start is None else query.start
    end = query.end if known_before is None else min(query.end, int(known_before))
    step = query.fidelity * 60
    if (end - start) // step + 2 > MAX_POINTS:
        raise QueryError(f"more than {MAX_POINTS} points: raise fidelity or narrow the span")
    if end < start:
        return {"history": []}
    times = list(range(start, end + 1, step))
    if not times or times[-1] != end:
        times.append(end)
    return {"history": _points(own, times)}


def _points(trades: list[Trade], times: list[int]) -> list[dict[str, Any]]:
    """Each time's last trade price at or before it, for times from the first trade on."""
    points: list[dict[str, Any]] = []
    index, last = 0, None
    for t in times:
        while index < len(trades) and trades[index].timestamp <= t:
            last = trades[index].price
            index += 1
        if last is not None:
            points.append({"t": t, "p": last})
    return points
