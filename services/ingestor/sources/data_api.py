"""Polymarket's public Data API as a wallet history: a live source with no key, or Dome's backfill.

`GET {DATA_API_URL}/v2/trades?user=<wallet>&start=<since>&end=<t>&limit=<n>&taker_only=false`:
v2 filters by user, bounds the block time (`start`/`end`, epoch seconds, inclusive) and pages with
a keyset cursor, newest first, in `{data, pagination: {next_cursor, has_more}}`. v1 `/trades`
serves the same rows but pages by offset, which stops at 10,000 rows (a 400 past it), and has no
time filter, so a wallet with more new fills than that could not be read whole: v1 is not used.
`taker_only` defaults to true, which hides a wallet's maker fills: we always send false.

**The CDN.** Cloudflare answers an identical URL from its cache for up to 300 s
(`cf-cache-status: HIT`, the same body, an `age` header): a poller that asks the same URL every
few seconds sees the same answer, "nothing new", for minutes. So no URL is asked twice within
DATA_API_CDN_CACHE_S (`UrlLedger`): a walk's first page ends at a moving time, now plus
`END_SLACK_S` (later than any URL of that wallet still remembered, should two walks fall in one
second), and a page bounded by an earlier second reaches one second further back than its twin
did (rows older than `since` end the walk, so that costs at most a few re-read rows). Both are
real time-window parameters of the API, not a cache-busting key it might strip. Every answer's
`cf-cache-status` is counted (`betterbot_ingestor_data_api_cache_total{status}`), and a cached one
(HIT, STALE, UPDATING, or `age` > 0: another client, or this one before a restart, asked the same
URL) is never used: the page is asked again with a URL not asked before, up to `MAX_CACHED`
times, after which the walk fails and its watermark stays where it was (`backfill.CatchUp`).

**Pages** are cut by second (`listing`) and the next page is asked by time, as Dome REST's are:
`end` = the second the last page ended in, whose fills are held back and read whole from the next
answer, so identical fills of one transaction are counted in one answer (their occurrences), and
fills arriving between two pages change nothing. The cursor is followed only when one second holds
more fills than the largest page (1,000), which a time bound cannot step over.

Items become orders through `shared.data_api.order_from_data_api` (both spellings, v1 camelCase
and v2 snake_case). Not handled: v2's `filter_amount` hides fills under 0.01 shares (0 means the
same), so such dust fills are not read from this source.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from services.ingestor import metrics
from services.ingestor.http_api import ApiError, JsonApi
from services.ingestor.ratelimit import RateLimiter
from services.ingestor.settings import IngestorSettings
from services.ingestor.sources.listing import (
    DEFAULT_BOUNDS,
    Listing,
    to_order,
)
from shared.data_api import order_from_data_api
from shared.models import DomeOrder, ExchangeTimeBounds, Source

log = logging.getLogger(__name__)

TRADES_PATH = "/v2/trades"
LIMIT_MAX = 1000
# A walk's open end lies this far past our clock: a fill stamped by a server clock ahead of ours
# is still inside it.
END_SLACK_S = 60
# Cached answers in a row for one page before the walk gives up (and is retried with backoff).
MAX_CACHED = 5
CDN_CACHE_S_DEFAULT = 300.0
CACHED_STATUSES = frozenset({"hit", "stale", "updating"})
# cf-cache-status values Cloudflare documents; anything else is counted as "other".
KNOWN_STATUSES = CACHED_STATUSES | {"miss", "expired", "bypass", "revalidated", "dynamic", "none"}


@dataclass(frozen=True, slots=True)
class Answer:
    """A decoded body with what the CDN said about it."""

    body: Any
    cache_status: str = "none"  # cf-cache-status, lower case; "none": no such header
    age_s: float = 0.0

    @property
    def cached(self) -> bool:
        return self.cache_status in CACHED_STATUSES or self.age_s > 0

    @classmethod
    def of(cls, result: Any) -> Answer:
        """An answer of `DataApi`, or the bare body of another `JsonApi` (no headers known)."""
        return result if isinstance(result, Answer) else cls(result)


class DataApi(JsonApi):
    """The Data API's `JsonApi`: each answer is an `Answer` carrying the CDN's headers."""

    def __init__(self, *args: Any, cdn_cache_s: float = CDN_CACHE_S_DEFAULT, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cdn_cache_s = cdn_cache_s

    def _decoded(self, response: httpx.Response) -> Answer:
        body = super()._decoded(response)
        status = response.headers.get("cf-cache-status", "none").strip().lower() or "none"
        return Answer(body, status, _seconds(response.headers.get("age")))


def _seconds(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0


def data_api(settings: IngestorSettings) -> DataApi:
    limiter = RateLimiter(settings.data_api_rate_per_s, settings.data_api_rate_per_10s)
    return DataApi(
        Source.DATA_API.value,
        settings.data_api_url,
        limiter,
        timeout_s=settings.http_timeout_s,
        cdn_cache_s=settings.data_api_cdn_cache_s,
    )


class UrlLedger:
    """The queries asked in the last `ttl_s` seconds (the CDN's cache lifetime), oldest first."""

    def __init__(
        self, ttl_s: float, *, clock: Callable[[], float] = time.monotonic, max_size: int = 100_000
    ) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._max = max_size
        self._asked: OrderedDict[tuple[tuple[str, str], ...], float] = OrderedDict()

    @staticmethod
    def key(params: dict[str, str | int]) -> tuple[tuple[str, str], ...]:
        return tuple(sorted((name, str(value)) for name, value in params.items()))

    def seen(self, params: dict[str, str | int]) -> bool:
        self._forget_old()
        return self.key(params) in self._asked

    def add(self, params: dict[str, str | int]) -> None:
        if self._ttl_s <= 0:
            return
        self._asked[self.key(params)] = self._clock()
        self._asked.move_to_end(self.key(params))
        while len(self._asked) > self._max:
            self._asked.popitem(last=False)

    def _forget_old(self) -> None:
        horizon = self._clock() - self._ttl_s
        while self._asked and next(iter(self._asked.values())) <= horizon:
            self._asked.popitem(last=False)


class DataApiHistory:
    source = Source.DATA_API

    def __init__(
        self,
        api: JsonApi,
        page_limit: int,
        bounds: ExchangeTimeBounds = DEFAULT_BOUNDS,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.api = api
        self._limit = min(page_limit, LIMIT_MAX)
        self.listing = Listing(order_from_data_api, bounds)
        self.asked = UrlLedger(getattr(api, "cdn_cache_s", CDN_CACHE_S_DEFAULT))
        self._clock = clock

    async def read_since(self, wallet: str, since: int) -> AsyncIterator[list[Any]]:
        open_end = int(self._clock()) + END_SLACK_S

        async def fetch(
            end: int | None, limit: int, cursor: str | None
        ) -> tuple[list[Any], dict[str, Any]]:
            return await self._page(wallet, since, (end, open_end), limit, cursor)

        pages = self.listing.walk(
            wallet,
            since,
            fetch,
            limit=self._limit,
            limit_max=LIMIT_MAX,
            path=TRADES_PATH,
            cursor_field="next_cursor",
            source=self.source.value,
        )
        async for page in pages:
            yield page

    async def _page(
        self,
        wallet: str,
        since: int,
        ends: tuple[int | None, int],
        limit: int,
        cursor: str | None,
    ) -> tuple[list[Any], dict[str, Any]]:
        """One page, fresh: asked again with a URL never asked before while the CDN answers it
        from its cache. `ends` is (the bound held back, else None; the walk's open end)."""
        end, open_end = ends
        params: dict[str, str | int] = {
            "user": wallet,
            "start": max(1, since),  # 0 would mean "three years back", 1 "all history"
            "end": open_end if end is None else end,
            "limit": limit,
            "taker_only": "false",
        }
        if cursor is not None:
            params["cursor"] = cursor
        # The URLs of this page answered from cache, even with the ledger off or forgotten.
        tried: set[tuple[tuple[str, str], ...]] = set()
        for _ in range(MAX_CACHED):
            self._unasked(params, tried, open_ended=end is None)
            self.asked.add(params)
            tried.add(self.asked.key(params))
            answer = Answer.of(await self.api.get(TRADES_PATH, params))
            status = answer.cache_status if answer.cache_status in KNOWN_STATUSES else "other"
            metrics.DATA_API_CACHE.labels(status).inc()
            if not answer.cached:
                return _page(answer.body)
            log.info(
                "data_api_cached_answer",
                extra={**_where(wallet, params), "cache": status, "age_s": answer.age_s},
            )
        raise ApiError(f"{TRADES_PATH}: {MAX_CACHED} cached answers in a row (CDN)")

    def _unasked(self, params: dict[str, str | int], tried: set[Any], *, open_ended: bool) -> None:
        """Move the window until this query was not asked within the CDN's cache lifetime (nor
        answered from cache just now): an open end one second later; a bounded page's start one
        second earlier."""
        while self.asked.seen(params) or self.asked.key(params) in tried:
            if open_ended:
                params["end"] = int(params["end"]) + 1
            elif int(params["start"]) > 1:
                params["start"] = int(params["start"]) - 1
            else:
                return  # all history already: nothing earlier to ask; a HIT is still caught

    def to_order(self, item: Any) -> DomeOrder:
        return to_order(item, order_from_data_api)


def _where(wallet: str, params: dict[str, str | int]) -> dict[str, Any]:
    start, end = params["start"], params["end"]
    return {"source": Source.DATA_API.value, "wallet": wallet, "start": start, "end": end}


def _page(body: Any) -> tuple[list[Any], dict[str, Any]]:
    if not isinstance(body, dict):
        raise ApiError(f"{TRADES_PATH}: expected an object, got {type(body).__name__}")
    rows, pagination = body.get("data"), body.get("pagination") or {}
    if rows is None:  # v2's documented miss
        rows = []
    if not isinstance(rows, list) or not isinstance(pagination, dict):
        raise ApiError(f"{TRADES_PATH}: expected 'data' (a list) and 'pagination' (an object)")
    return rows, pagination
