"""Positions that are true: a wallet the detector starts tracking (at startup, or added live) gets
its positions seeded from Polymarket's Data API, `GET <DATA_API_URL>/positions?user=<wallet>`
(keyless; the holdings per token, docs/signals.md "Positions that are true").

Why: positions counted from the fills seen since tracking started miss everything the wallet held
before, so its first BUY of a token it already holds looked like an entry, and selling such a
holding was no exit. Once seeded, `trader_entry` is a new position (`opens_position` true).

The snapshot's time `as_of` is the detector's clock when the answer arrived, in whole seconds: a
fill that traded at or before it is taken to be in the snapshot already (it neither moves the
position again nor opens or closes one). The Data API indexes trades a few seconds after they
happen, so a fill in those seconds before the request is counted in neither; the position is
then that fill short, until the next one of that token.

Each wallet is seeded once per lane: the seeding is kept in Redis in the lane (and hash-tag slot)
of the wallet's units, one key per wallet (`DetectorState.seed`, `rules.seed_unit`), so the first
replica to seed a wallet decides for all, and a replica that starts later, or learns of a wallet
later, finds that seeding without asking the API. No replica keeps a seeding in memory: every
order of the wallet reads the seed key with its units and the apply step compares it as it
compares them, so an order is decided on the seeding that holds when it is applied, whichever
replica decides it. A wallet whose request fails (any error of that wallet; a malformed item of
the answer is skipped, not a failure), or whose seeding Redis refuses for longer than
`DETECTOR_STATE_RETRY_S`, stays unseeded (its signals carry `opens_position` null, entries as
before) and is asked again every `DETECTOR_SEED_RETRY_S`.

A seeding carries its generation: the wallet registry's control-stream id as of which the replica
knew the wallet tracked (the snapshot's at startup, the change's when added live). A removal
leaves a tombstone with its own id, so a seeding that finishes after the wallet was removed is
refused, and a replica that applies the removal late cannot delete the seeding made after the
wallet was added again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from services.detector import metrics
from services.detector.state import TRANSIENT, DetectorState, SeedConflict
from shared.models import SHARE_DECIMALS

log = logging.getLogger(__name__)


class PositionsError(RuntimeError):
    """The Data API did not answer with a list of positions."""


# What makes one seeding fail (the wallet asked again later): the API, or Redis unreachable for
# longer than `DETECTOR_STATE_RETRY_S` (`DetectorState` retries first), or a unit that kept
# changing (`SeedConflict`). Documentation only: `Seeder.seed` takes any `Exception` as a failure,
# so that nothing the API answers can crash the startup or end a background task.
FAILURES: tuple[type[BaseException], ...] = (
    httpx.HTTPError,
    PositionsError,
    SeedConflict,
    ValueError,
    KeyError,
    *TRANSIENT,
)

PAGE = 500  # the Data API's largest `limit` for /positions
CONCURRENCY = 4


def _holding(item: object) -> tuple[str, str, int] | None:
    """(market, token, micro-shares) of one `/positions` item; None when it is malformed (not an
    object, no token, a size that is not a finite number)."""
    if not isinstance(item, Mapping):
        return None
    asset, size = item.get("asset"), item.get("size")
    if not isinstance(asset, str | int) or isinstance(asset, bool) or asset == "":
        return None
    if isinstance(size, bool) or not isinstance(size, int | float | str):
        return None
    try:
        shares = float(size)
    except ValueError:
        return None
    if not math.isfinite(shares):
        return None
    # Condition ids are lower-cased at the boundary (`shared.models.ConditionId`).
    condition = str(item.get("conditionId") or "").lower()
    market = condition or str(item.get("slug") or asset)
    return market, str(asset), round(shares * 10**SHARE_DECIMALS)


def positions_of(items: Iterable[object], wallet: str = "") -> dict[str, dict[str, int]]:
    """Micro-shares by market and token, from `/positions` items. The market is named as the
    rules name it (`rules.market_of`: condition id, else slug, else token id). A malformed item
    is skipped (one log line per answer, with how many)."""
    markets: dict[str, dict[str, int]] = {}
    skipped = 0
    for item in items:
        holding = _holding(item)
        if holding is None:
            skipped += 1
            continue
        market, token, size = holding
        if size > 0:
            held = markets.setdefault(market, {})
            held[token] = held.get(token, 0) + size
    if skipped:
        log.warning("positions_items_skipped", extra={"wallet": wallet, "skipped": skipped})
    return markets


async def fetch_positions(http: httpx.AsyncClient, base_url: str, wallet: str) -> list[Any]:
    """Every holding of the wallet, page by page; `sizeThreshold=0` so that no holding is left
    out (the API's default leaves out those under one share)."""
    items: list[Any] = []
    while True:
        params: dict[str, str | int] = {
            "user": wallet,
            "sizeThreshold": "0",
            "limit": PAGE,
            "offset": len(items),
        }
        response = await http.get(f"{base_url.rstrip('/')}/positions", params=params)
        response.raise_for_status()
        page = response.json()
        if not isinstance(page, list):
            raise PositionsError(f"/positions answered {type(page).__name__}, not a list")
        items += page
        if len(page) < PAGE:
            return items


@dataclass
class Seeder:
    """Seeds wallets in the lane that holds their positions."""

    http: httpx.AsyncClient
    base_url: str
    # The wallet lane of a wallet: the state that holds its units and its seeding.
    lane_of: Callable[[str], DetectorState]
    clock: Callable[[], float] = time.time
    # Wallets whose seeding failed, with the generation to seed them at (asked again).
    failed: dict[str, str] = field(default_factory=dict)
    # The seedings this replica made or found, for `/health` only: decisions read Redis.
    seeded: dict[str, int] = field(default_factory=dict)

    async def seed_all(self, wallets: Iterable[str], generation: str = "0-0") -> None:
        """Seed every wallet not seeded yet, a few at a time."""
        await self._each([(wallet, generation) for wallet in wallets])

    async def _each(self, wallets: Sequence[tuple[str, str]]) -> None:
        limit = asyncio.Semaphore(CONCURRENCY)

        async def one(wallet: str, since: str) -> None:
            async with limit:
                await self.seed(wallet, since)

        await asyncio.gather(*(one(wallet, since) for wallet, since in wallets))

    async def seed(self, wallet: str, generation: str = "0-0") -> None:
        """Seed the wallet, known tracked as of the registry id `generation`, unless it is seeded
        in Redis already; a failure (the API, or Redis for longer than its retry) is logged and
        the wallet asked again later."""
        state = self.lane_of(wallet)
        try:
            held = await state.seeding(wallet)
            if held is not None:
                self._done(wallet, held, "adopted")
                return
            items = await fetch_positions(self.http, self.base_url, wallet)
            markets = positions_of(items, wallet)
            held = await state.seed(wallet, markets, int(self.clock()), generation)
        except Exception as exc:  # any: one wallet's failure must not crash the others' seeding
            self._failed(wallet, generation)
            metrics.SEEDINGS.labels("failed").inc()
            expected = isinstance(exc, FAILURES)
            log.warning(
                "positions_seed_failed",
                extra={"wallet": wallet, "error": repr(exc)},
                exc_info=not expected,
            )
            return
        if held is None:  # removed from the registry meanwhile: nothing to seed
            # Only this generation's retry: a later one (removed and added again since, its own
            # seeding failed) is still to be asked.
            if self.failed.get(wallet) == generation:
                del self.failed[wallet]
            log.info("positions_seed_dropped", extra={"wallet": wallet})
            return
        self._done(wallet, held, "seeded")
        log.info("positions_seeded", extra={"wallet": wallet, "tokens": len(items), "as_of": held})

    def _failed(self, wallet: str, generation: str) -> None:
        """Ask the wallet again at `generation`, unless a later generation is to be asked (an
        older seeding, of before a removal and re-addition, failing late)."""
        known = self.failed.get(wallet)
        if known is None or not _newer(known, generation):
            self.failed[wallet] = generation

    def forget(self, wallet: str) -> None:
        self.failed.pop(wallet, None)
        self.seeded.pop(wallet, None)

    async def retry(self, every_s: float, tracked: Callable[[], Iterable[str]]) -> None:
        """Ask again for the wallets whose seeding failed, every `every_s`, for as long as they
        are tracked. A round that fails is logged; the next one comes all the same."""
        while True:
            await asyncio.sleep(every_s)
            try:
                still = set(tracked())
                for wallet in [w for w in self.failed if w not in still]:
                    self.failed.pop(wallet, None)
                await self._each(list(self.failed.items()))
            except Exception as exc:
                log.exception("positions_retry_failed", extra={"error": repr(exc)})

    def _done(self, wallet: str, as_of: int, result: str) -> None:
        self.failed.pop(wallet, None)
        self.seeded[wallet] = as_of
        metrics.SEEDINGS.labels(result).inc()


def _newer(a: str, b: str) -> bool:
    """Registry id `a` is later than `b` (stream ids: ms, seq); False when either is malformed."""
    try:
        a_ms, a_seq = (int(part) for part in a.split("-"))
        b_ms, b_seq = (int(part) for part in b.split("-"))
    except ValueError:
        return False
    return (a_ms, a_seq) > (b_ms, b_seq)
