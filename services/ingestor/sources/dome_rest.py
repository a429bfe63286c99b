"""Dome's REST orders endpoint as a wallet history: gap backfill for the WebSocket, and polling.

`GET {DOME_API_URL}/polymarket/orders?user=<wallet>&start_time=<since>&limit=<n>` with
`Authorization: Bearer <DOME_API_KEY>`, newest first. `start_time` and `end_time` are inclusive
(Unix seconds). Items have the WebSocket event's fields (plus `block_number`, `log_index`) and
become fills with source `dome_rest`.

Pages are cut by second (`listing`) and the next page is asked by time, not by `pagination_key`:
`end_time` = the second the last page ended in, whose fills are held back and read whole from
the next answer. A cursor continues after the last row it returned, so when the server orders
the fills of one second differently from one request to the next, a cursor page could skip or
repeat them; a time bound cannot. `pagination_key` is followed only when one second holds more
fills than the largest page (1000), which a time bound cannot step over. Identical fills of one
transaction are counted in log-index order within the answer that holds their second.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from services.ingestor.http_api import ApiError, JsonApi
from services.ingestor.ratelimit import RateLimiter
from services.ingestor.settings import IngestorSettings
from services.ingestor.sources.listing import (
    DEFAULT_BOUNDS,
    Listing,
    to_order,
)
from shared.models import DomeOrder, ExchangeTimeBounds, FeedOrder, Source

ORDERS_PATH = "/polymarket/orders"
LIMIT_MAX = 1000


def dome_rest_api(settings: IngestorSettings) -> JsonApi:
    limiter = RateLimiter(settings.dome_rest_rate_per_s, settings.dome_rest_rate_per_10s)
    return JsonApi(
        Source.DOME_REST.value,
        settings.dome_api_url,
        limiter,
        timeout_s=settings.http_timeout_s,
        headers={"Authorization": f"Bearer {settings.dome_api_key.get_secret_value()}"},
    )


class DomeRestHistory:
    source = Source.DOME_REST

    def __init__(
        self, api: JsonApi, page_limit: int, bounds: ExchangeTimeBounds = DEFAULT_BOUNDS
    ) -> None:
        self.api = api
        self._limit = page_limit
        self.listing = Listing(FeedOrder.model_validate, bounds)

    async def read_since(self, wallet: str, since: int) -> AsyncIterator[list[Any]]:
        async def fetch(
            end: int | None, limit: int, key: str | None
        ) -> tuple[list[Any], dict[str, Any]]:
            return await self._page(wallet, since, end, limit, key)

        pages = self.listing.walk(
            wallet,
            since,
            fetch,
            limit=self._limit,
            limit_max=LIMIT_MAX,
            path=ORDERS_PATH,
            cursor_field="pagination_key",
            source=self.source.value,
        )
        async for page in pages:
            yield page

    async def _page(
        self, wallet: str, since: int, end: int | None, limit: int, key: str | None
    ) -> tuple[list[Any], dict[str, Any]]:
        params: dict[str, str | int] = {"user": wallet, "start_time": since, "limit": limit}
        if end is not None:
            params["end_time"] = end
        if key is not None:
            params["pagination_key"] = key
        return _page(await self.api.get(ORDERS_PATH, params))

    def to_order(self, item: Any) -> DomeOrder:
        return to_order(item, FeedOrder.model_validate)


def _page(body: Any) -> tuple[list[Any], dict[str, Any]]:
    if not isinstance(body, dict):
        raise ApiError(f"{ORDERS_PATH}: expected an object, got {type(body).__name__}")
    orders, pagination = body.get("orders"), body.get("pagination") or {}
    if not isinstance(orders, list) or not isinstance(pagination, dict):
        raise ApiError(f"{ORDERS_PATH}: expected 'orders' (a list) and 'pagination' (an object)")
    return orders, pagination
