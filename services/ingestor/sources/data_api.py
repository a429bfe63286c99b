"""Polymarket's public Data API as a wallet history: a live source with no key, or Dome's backfill.

`GET {DATA_API_URL}/trades?user=<wallet>&limit=<n>&offset=<k>&takerOnly=false`, newest first.
`takerOnly` defaults to true at Polymarket, which hides a wallet's maker fills: we always send
false. There is no time filter, so pages are read until an item older than `since` shows up, a
short page ends the list, or the API's offset cap (10,000) is reached (logged: older fills of so
busy a wallet cannot be reached this way). Trades arriving between two pages shift offsets down,
so a page can repeat items (the dedupe absorbs them) but never skip one.

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
from shared.data_api import order_from_data_api
from shared.models import DomeOrder, Source

log = logging.getLogger(__name__)

TRADES_PATH = "/trades"
OFFSET_MAX = 10_000


def data_api(settings: IngestorSettings) -> JsonApi:
    limiter = RateLimiter(settings.data_api_rate_per_s, settings.data_api_rate_per_10s)
    return JsonApi(
        Source.DATA_API.value, settings.data_api_url, limiter, timeout_s=settings.http_timeout_s
    )


class DataApiHistory:
    source = Source.DATA_API

    def __init__(self, api: JsonApi, page_limit: int) -> None:
        self.api = api
        self._limit = page_limit

    async def read_since(self, wallet: str, since: int) -> AsyncIterator[list[Any]]:
        offset = 0
        while True:
            params: dict[str, str | int] = {
                "user": wallet,
                "limit": self._limit,
                "offset": offset,
                "takerOnly": "false",
            }
            items = await self.api.get(TRADES_PATH, params)
            if not isinstance(items, list):
                raise ApiError(f"{TRADES_PATH}: expected a list, got {type(items).__name__}")
            recent = [item for item in items if _timestamp(item) >= since]
            yield recent
            if len(recent) < len(items) or len(items) < self._limit:
                return
            offset += self._limit
            if offset > OFFSET_MAX:
                log.warning(
                    "data_api_offset_cap",
                    extra={"wallet": wallet, "since": since, "offset_max": OFFSET_MAX},
                )
                return

    def to_order(self, item: Any) -> DomeOrder:
        return order_from_data_api(item)


def _timestamp(item: Any) -> int:
    # An item without a usable timestamp is kept (and dead-lettered by validation), not dropped.
    value = item.get("timestamp") if isinstance(item, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else 2**62
