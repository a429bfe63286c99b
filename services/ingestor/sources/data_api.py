"""Polymarket's public Data API as a wallet history: a live source with no key, or Dome's backfill.

`GET {DATA_API_URL}/trades?user=<wallet>&limit=<n>&offset=<k>&takerOnly=false`, newest first.
`takerOnly` defaults to true at Polymarket, which hides a wallet's maker fills: we always send
false. There is no time filter, so pages are read until an item older than `since` shows up, a
short page ends the list, or the API's offset cap (10,000) is reached (logged: older fills of so
busy a wallet cannot be reached this way).

Pages are cut by second (`listing`): the next offset is the first row of the second the last page
ended in, so fills of one second listed in a different order by each request are neither skipped
nor doubled, and trades arriving between two pages (which shift offsets down) only make a page
start earlier. A page that one second fills is checked with a one-row request just after it: a
row of another second there means the page held the whole second; else the second is read again
with a larger page (up to the API's 10,000). The API gives no log index or order hash: identical
fills of one transaction are told apart by their order in the one answer that lists the
transaction whole.

Items become orders through `shared.data_api.order_from_data_api` (the mapping is documented
there).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from services.ingestor.http_api import ApiError, JsonApi
from services.ingestor.ratelimit import RateLimiter
from services.ingestor.settings import IngestorSettings
from services.ingestor.sources.listing import DEFAULT_BOUNDS, Listing, cut_page, to_order
from shared.data_api import order_from_data_api
from shared.models import DomeOrder, ExchangeTimeBounds, Source

log = logging.getLogger(__name__)

TRADES_PATH = "/trades"
OFFSET_MAX = 10_000
LIMIT_MAX = 10_000


def data_api(settings: IngestorSettings) -> JsonApi:
    limiter = RateLimiter(settings.data_api_rate_per_s, settings.data_api_rate_per_10s)
    return JsonApi(
        Source.DATA_API.value, settings.data_api_url, limiter, timeout_s=settings.http_timeout_s
    )


class DataApiHistory:
    source = Source.DATA_API

    def __init__(
        self, api: JsonApi, page_limit: int, bounds: ExchangeTimeBounds = DEFAULT_BOUNDS
    ) -> None:
        self.api = api
        self._limit = page_limit
        self.listing = Listing(order_from_data_api, bounds)

    async def read_since(self, wallet: str, since: int) -> AsyncIterator[list[Any]]:
        offset, limit, above = 0, self._limit, None
        while True:
            items = await self._page(wallet, offset, limit)
            short = len(items) < limit
            rows = self.listing.rows(items, wallet)
            cut = cut_page(rows, since=since, above=above, hold=not short)
            if cut.stuck:
                if not await self._whole_second(wallet, offset + len(items), cut.edge, limit):
                    limit = min(LIMIT_MAX, limit * 2)  # read the second again, in one answer
                    continue
                above = cut.edge
                cut = cut_page(rows, since=since, above=above, hold=False)
            yield self.listing.hand_on(cut)
            if cut.reached or short:
                return
            offset += cut.edge_at
            above = cut.edge if cut.edge is not None else above
            if offset > OFFSET_MAX:
                log.warning(
                    "data_api_offset_cap",
                    extra={"wallet": wallet, "since": since, "offset_max": OFFSET_MAX},
                )
                return

    async def _whole_second(self, wallet: str, after: int, second: int | None, limit: int) -> bool:
        """Whether a page that one second fills holds all of it: the row after the page is of
        another second (asked alone), or the page is as large as the API allows (logged)."""
        probe = self.listing.rows(await self._page(wallet, after, 1), wallet)
        if not probe or probe[0].stamp != second:
            return True
        if limit < LIMIT_MAX:
            return False
        log.warning(
            "tie_group_exceeds_page",
            extra={"source": self.source.value, "wallet": wallet, "second": second},
        )
        return True

    async def _page(self, wallet: str, offset: int, limit: int) -> list[Any]:
        params: dict[str, str | int] = {
            "user": wallet,
            "limit": limit,
            "offset": offset,
            "takerOnly": "false",
        }
        items = await self.api.get(TRADES_PATH, params)
        if not isinstance(items, list):
            raise ApiError(f"{TRADES_PATH}: expected a list, got {type(items).__name__}")
        return items

    def to_order(self, item: Any) -> DomeOrder:
        return to_order(item, order_from_data_api)
