"""The validator: a task of the store process that records, for every signal, its markouts at
5 min, 1 h and 24 h and, once its market has resolved, its settlement (table `signal_validation`;
the definitions are `markouts.py` and docs/signals.md, "Does it pay? Validation").

Each cycle (every `VALIDATION_EVERY_S`):
- markouts: the signals detected within `VALIDATION_LOOKBACK_S`, not retracted, with a horizon
  that ended at least `VALIDATION_DELAY_S` ago (the price history needs a moment to hold it) and
  no row for it yet, oldest first, at most `VALIDATION_BATCH`. The price at `t + h` is the last
  point at or before it of `GET <VALIDATION_PRICES_URL>/prices-history?market=<token>&startTs=
  &endTs=&fidelity=` (Polymarket's CLOB; the simulator serves the same from its trades): first
  over the 10 minutes before `t + h` at 1-minute fidelity, else from the fill to `t + h` at a
  coarser one. The answer must reach the target (a point within one fidelity step of it): a price
  history that trails the exchange answers a span that ends early, and its last point would be a
  stale price. Such a horizon, or one with no point at all (the history has not got the token's
  fill yet), is tried again each cycle; once its target is `VALIDATION_GIVE_UP_S` old it is
  recorded without a price, and not tried again.
- settlements, at most every `VALIDATION_RESOLUTION_EVERY_S`: the markets of the signals that have
  none yet, asked from Gamma (`GET <GAMMA_API_URL>/markets?condition_ids=..&closed=true`; Gamma
  leaves closed markets out unless asked), 20 at a time; a market that is closed with payout
  prices resolves each of its signals.

Rows are inserted once per (signal_id, horizon) (`ON CONFLICT DO NOTHING`): a cycle repeated after
a crash, or a replica racing, adds nothing twice. Replicas take turns anyway: a cycle runs under a
Postgres advisory lock, and a replica that does not get it skips the cycle.

Outages: Postgres unavailable ends the cycle (the next one tries again; one warning per outage);
a price host or Gamma that cannot be reached, or answers 429, ends that part of the cycle (after a
429 nothing is asked of that host before its Retry-After has passed), and an answer that is
an HTTP error or not the expected JSON skips that one item until the next cycle. Nothing is
recorded from a failed request. The clock is a parameter (`now`), so tests move it past horizons
instead of waiting for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
from prometheus_client import Counter, Gauge

from services.store.database import Database, Unavailable
from services.store.markouts import (
    HORIZONS,
    SETTLEMENT,
    Horizon,
    Payouts,
    fee_cents,
    gamma_payouts,
    last_at_or_before,
    markout_cents,
)
from services.store.settings import StoreSettings

log = logging.getLogger(__name__)

LOCK = int.from_bytes(
    hashlib.sha256(b"betterbot.store.validation").digest()[:8], "big", signed=True
)
NEAR_WINDOW_S = 600
GAMMA_BATCH = 20
HTTP_TIMEOUT_S = 10.0
_BY_LABEL = {h.label: h for h in HORIZONS}

RECORDED = Counter(
    "betterbot_store_validation_recorded",
    "Validation rows recorded, by horizon and result (measured, or no_price: none was found)",
    ["horizon", "result"],
)
ERRORS = Counter(
    "betterbot_store_validation_errors",
    "Validator failures by what failed: prices (the price history), gamma, postgres, internal",
    ["what"],
)
DUE = Gauge(
    "betterbot_store_validation_due",
    "Markouts due and not recorded at the start of the last cycle (at most VALIDATION_BATCH)",
)
LAST_CYCLE = Gauge(
    "betterbot_store_validation_last_cycle_timestamp_seconds",
    "When the validator last completed a cycle (Unix time)",
)

_DUE_SQL = """
SELECT s.signal_id, s.token_id, s.side, s.price, s.exchange_ts, h.label
FROM signals s
CROSS JOIN unnest($1::text[], $2::int[]) AS h(label, seconds)
WHERE s.detected_at >= $3
  AND s.status <> 'retracted'
  AND s.exchange_ts <= $4::timestamptz - make_interval(secs => h.seconds)
  AND NOT EXISTS (
      SELECT 1 FROM signal_validation v WHERE v.signal_id = s.signal_id AND v.horizon = h.label
  )
ORDER BY s.exchange_ts, s.signal_id, h.seconds
LIMIT $5
"""
_UNSETTLED_SQL = """
SELECT DISTINCT s.condition_id
FROM signals s
WHERE s.status <> 'retracted' AND s.condition_id <> ''
  AND NOT EXISTS (
      SELECT 1 FROM signal_validation v
      WHERE v.signal_id = s.signal_id AND v.horizon = 'settlement'
  )
ORDER BY s.condition_id
"""
_TO_SETTLE_SQL = """
SELECT s.signal_id, s.condition_id, s.token_id, s.token_label, s.side, s.price
FROM signals s
WHERE s.condition_id = ANY($1::text[]) AND s.status <> 'retracted'
  AND NOT EXISTS (
      SELECT 1 FROM signal_validation v
      WHERE v.signal_id = s.signal_id AND v.horizon = 'settlement'
  )
"""
_INSERT_SQL = """
INSERT INTO signal_validation
    (signal_id, horizon, target_at, price, price_at, markout_cents, fee_cents, source)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (signal_id, horizon) DO NOTHING
"""


@dataclass(frozen=True)
class ValidationConfig:
    prices_url: str
    gamma_url: str
    fee_bps: float = 0.0
    every_s: float = 30.0
    delay_s: float = 60.0
    give_up_s: float = 21_600.0
    resolution_every_s: float = 600.0
    batch: int = 200
    lookback_s: int = 7 * 86_400

    @classmethod
    def of(cls, s: StoreSettings) -> ValidationConfig:
        return cls(
            prices_url=s.validation_prices_url.rstrip("/"),
            gamma_url=s.gamma_api_url.rstrip("/"),
            fee_bps=s.validation_fee_bps,
            every_s=s.validation_every_s,
            delay_s=s.validation_delay_s,
            give_up_s=s.validation_give_up_s,
            resolution_every_s=s.validation_resolution_every_s,
            batch=s.validation_batch,
            lookback_s=s.validation_lookback_s,
        )


@dataclass(frozen=True)
class Due:
    """One signal at one horizon whose markout is due."""

    signal_id: str
    token_id: str
    side: str
    price: float
    exchange_ts: float
    horizon: Horizon

    @property
    def target(self) -> float:
        return self.exchange_ts + self.horizon.seconds


Row = tuple[str, str, datetime | None, float | None, datetime | None, float | None, float, str]


@dataclass
class CycleReport:
    skipped: bool = False  # another replica held the lock
    markouts: int = 0
    no_price: int = 0
    settlements: int = 0
    # Horizons whose price history does not reach them yet: tried again next cycle.
    waiting: int = 0


class Unreachable(Exception):
    """The price host or Gamma could not be reached: the rest of that part of the cycle waits."""


class NotYet(Exception):
    """The price history does not reach the horizon yet: the item is tried again next cycle."""


DEFAULT_RETRY_AFTER_S = 30.0


class Validator:
    def __init__(
        self,
        db: Database,
        config: ValidationConfig,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.config = config
        self.http = http or httpx.AsyncClient(
            timeout=HTTP_TIMEOUT_S, headers={"User-Agent": "betterbot-store-validator"}
        )
        self.clock = clock
        self._settled_at = float("-inf")
        self._failing: set[str] = set()  # what is failing now, so an outage is logged once
        # what -> monotonic time before which a host that answered 429 is not asked again.
        self._quiet_until: dict[str, float] = {}

    async def run(self, stop: asyncio.Event) -> None:
        """Cycle every `every_s` until `stop`; never raises for an outage."""
        while not stop.is_set():
            try:
                await self.cycle()
            except (Unavailable, asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                ERRORS.labels("postgres").inc()
                self._failed("postgres", exc)
            except Exception:
                # A bug must not end the task unnoticed: say so loudly, try again next cycle.
                ERRORS.labels("internal").inc()
                log.exception("validation_cycle_failed")
            else:
                self._recovered("postgres")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.every_s)

    async def close(self) -> None:
        await self.http.aclose()
        await self.db.close()

    async def cycle(self, now: float | None = None) -> CycleReport:
        """One pass: markouts due at `now` (default: the clock), then settlements if it is time."""
        now = self.clock() if now is None else now
        report = CycleReport()
        async with self.db.connection() as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK):
                report.skipped = True
                return report
            try:
                await self._markouts(conn, now, report)
                due = now - self._settled_at >= self.config.resolution_every_s
                # Gamma away: asked again next cycle, not a whole period later.
                if due and await self._settlements(conn, report):
                    self._settled_at = now
            finally:
                # A broken connection dropped the lock with the session already.
                with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                    await conn.execute("SELECT pg_advisory_unlock($1)", LOCK)
        LAST_CYCLE.set(time.time())
        if report.markouts or report.no_price or report.settlements or report.waiting:
            log.info("validation_recorded", extra=vars(report))
        return report

    # --- markouts --------------------------------------------------------------------------------

    async def _markouts(self, conn: asyncpg.Connection, now: float, report: CycleReport) -> None:
        due = await self._due(conn, now)
        DUE.set(len(due))
        rows: list[Row] = []
        cache: dict[tuple[str, int, int, int], list[tuple[int, float]]] = {}
        refused: list[str] = []
        for item in due:
            try:
                point = await self._price(item, cache, now)
            except Unreachable:
                break
            except NotYet:
                report.waiting += 1
                continue
            except (httpx.HTTPStatusError, ValueError) as exc:
                ERRORS.labels("prices").inc()
                refused.append(_describe(exc))
                continue
            rows.append(self._markout_row(item, point))
            report.markouts += point is not None
            report.no_price += point is None
        if refused:  # one line a cycle, however many items were refused
            log.warning(
                "validation_prices_refused", extra={"count": len(refused), "first": refused[0]}
            )
        await conn.executemany(_INSERT_SQL, rows)
        for row in rows:
            RECORDED.labels(row[1], "measured" if row[3] is not None else "no_price").inc()

    async def _due(self, conn: asyncpg.Connection, now: float) -> list[Due]:
        ready = datetime.fromtimestamp(now - self.config.delay_s, UTC)
        since = datetime.fromtimestamp(now - self.config.lookback_s, UTC)
        records = await conn.fetch(
            _DUE_SQL,
            [h.label for h in HORIZONS],
            [h.seconds for h in HORIZONS],
            since,
            ready,
            self.config.batch,
        )
        return [
            Due(
                r["signal_id"],
                r["token_id"],
                r["side"],
                r["price"],
                r["exchange_ts"].timestamp(),
                _BY_LABEL[r["label"]],
            )
            for r in records
        ]

    async def _price(
        self,
        item: Due,
        cache: dict[tuple[str, int, int, int], list[tuple[int, float]]],
        now: float,
    ) -> tuple[int, float] | None:
        """The token's last price point at or before `t + h`: near the target first, then back
        to the fill (an illiquid token may not have traded for a while). While the target is
        younger than `give_up_s`, an answer that does not reach it (no point within one fidelity
        step: the history trails the exchange, or holds nothing for the token yet) raises NotYet;
        after that the last point there is, if any, is the price (a history without regular
        points for a token that stopped trading), else None."""
        target = int(item.target)
        patient = now - item.target < self.config.give_up_s
        near = max(int(item.exchange_ts), target - NEAR_WINDOW_S)
        windows = [(near, 1), (int(item.exchange_ts) - 60, max(1, item.horizon.seconds // 1440))]
        for start, fidelity in windows:
            key = (item.token_id, start, target, fidelity)
            if key not in cache:
                cache[key] = await self._history(*key)
            points = cache[key]
            if patient and not (points and points[-1][0] >= target - fidelity * 60):
                raise NotYet(item.signal_id)
            point = last_at_or_before(points, target)
            if point is not None:
                return point
        return None

    async def _history(
        self, token_id: str, start: int, end: int, fidelity: int
    ) -> list[tuple[int, float]]:
        params = {"market": token_id, "startTs": start, "endTs": end, "fidelity": fidelity}
        body = await self._get("prices", f"{self.config.prices_url}/prices-history", params)
        history = body.get("history") if isinstance(body, dict) else None
        if not isinstance(history, list):
            raise ValueError("prices-history answered without a 'history' list")
        try:
            points = [(int(p["t"]), float(p["p"])) for p in history]
        except (TypeError, KeyError) as exc:
            raise ValueError(f"prices-history answered a point without t and p: {exc}") from None
        if any(not 0 <= price <= 1 for _, price in points):
            raise ValueError("prices-history answered a price outside 0..1")
        return sorted(points, key=lambda point: point[0])

    def _markout_row(self, item: Due, point: tuple[int, float] | None) -> Row:
        fee = fee_cents(item.price, self.config.fee_bps)
        target_at = datetime.fromtimestamp(item.target, UTC)
        source = f"{self.config.prices_url}/prices-history"
        if point is None:
            return (item.signal_id, item.horizon.label, target_at, None, None, None, fee, source)
        at, price = point
        markout = markout_cents(item.side, item.price, price, self.config.fee_bps)
        when = datetime.fromtimestamp(at, UTC)
        return (item.signal_id, item.horizon.label, target_at, price, when, markout, fee, source)

    # --- settlements -----------------------------------------------------------------------------

    async def _settlements(self, conn: asyncpg.Connection, report: CycleReport) -> bool:
        """Settle what Gamma reports resolved; False when Gamma could not be reached."""
        conditions = [r["condition_id"] for r in await conn.fetch(_UNSETTLED_SQL)]
        for start in range(0, len(conditions), GAMMA_BATCH):
            batch = conditions[start : start + GAMMA_BATCH]
            try:
                resolved = await self._resolved(batch)
            except Unreachable:
                return False
            except (httpx.HTTPStatusError, ValueError) as exc:
                ERRORS.labels("gamma").inc()
                log.warning("validation_gamma_refused", extra={"error": _describe(exc)})
                continue
            if resolved:
                report.settlements += await self._settle(conn, resolved)
        return True

    async def _resolved(self, conditions: Sequence[str]) -> dict[str, Payouts]:
        params: list[tuple[str, str | int]] = [("condition_ids", c) for c in conditions]
        params += [("closed", "true"), ("limit", len(conditions))]
        body = await self._get("gamma", f"{self.config.gamma_url}/markets", params)
        if not isinstance(body, list):
            raise ValueError("Gamma /markets answered something other than a list")
        resolved: dict[str, Payouts] = {}
        for market in body:
            condition = market.get("conditionId") if isinstance(market, dict) else None
            payouts = gamma_payouts(market) if isinstance(condition, str) else None
            if isinstance(condition, str) and payouts is not None:
                resolved[condition.lower()] = payouts
        return resolved

    async def _settle(self, conn: asyncpg.Connection, resolved: dict[str, Payouts]) -> int:
        signals = await conn.fetch(_TO_SETTLE_SQL, list(resolved))
        source = f"{self.config.gamma_url}/markets"
        rows: list[Row] = []
        for s in signals:
            payout = resolved[s["condition_id"]].of(s["token_id"], s["token_label"])
            if payout is None:  # an outcome Gamma does not list: nothing to say about it
                continue
            markout = markout_cents(s["side"], s["price"], payout, self.config.fee_bps)
            fee = fee_cents(s["price"], self.config.fee_bps)
            rows.append((s["signal_id"], SETTLEMENT, None, payout, None, markout, fee, source))
        await conn.executemany(_INSERT_SQL, rows)
        RECORDED.labels(SETTLEMENT, "measured").inc(len(rows))
        return len(rows)

    # --- plumbing --------------------------------------------------------------------------------

    async def _get(self, what: str, url: str, params: Any) -> Any:
        """The JSON answer of one GET. A host that cannot be reached, or that answered 429 (then
        left alone until its Retry-After has passed), raises `Unreachable` (logged once per
        outage); an HTTP error status or a body that is not JSON raises for the item."""
        if time.monotonic() < self._quiet_until.get(what, 0.0):
            raise Unreachable(what)
        try:
            response = await self.http.get(url, params=params)
        except httpx.TransportError as exc:
            ERRORS.labels(what).inc()
            self._failed(what, exc)
            raise Unreachable(what) from exc
        except httpx.RequestError as exc:  # an answer that cannot be read (redirects, encoding)
            raise ValueError(_describe(exc)) from exc
        if response.status_code == 429:
            ERRORS.labels(what).inc()
            wait = _retry_after(response.headers.get("retry-after"))
            self._quiet_until[what] = time.monotonic() + wait
            self._failed(what, RuntimeError(f"429 Too Many Requests, retry after {wait:g} s"))
            raise Unreachable(what)
        self._recovered(what)
        response.raise_for_status()
        return response.json()

    def _failed(self, what: str, exc: BaseException) -> None:
        if what not in self._failing:
            self._failing.add(what)
            log.warning("validation_unavailable", extra={"what": what, "error": _describe(exc)})

    def _recovered(self, what: str) -> None:
        if what in self._failing:
            self._failing.discard(what)
            log.warning("validation_available_again", extra={"what": what})


def _retry_after(value: str | None) -> float:
    """Seconds to wait from a Retry-After header (a number; a date or nonsense: the default)."""
    try:
        seconds = float(value) if value is not None else DEFAULT_RETRY_AFTER_S
    except ValueError:
        return DEFAULT_RETRY_AFTER_S
    return min(max(seconds, 0.0), 3600.0) if seconds == seconds else DEFAULT_RETRY_AFTER_S


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
