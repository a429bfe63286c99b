"""Dome's REST orders endpoint as a wallet history: gap backfill for the WebSocket, and polling.

`GET {DOME_API_URL}/polymarket/orders?user=<wallet>&start_time=<since>&limit=<n>` with
`Authorization: Bearer <DOME_API_KEY>`, then `pagination_key` from each answer until `has_more`
is false. `start_time` is inclusive (Unix seconds). Items have the WebSocket event's fields (plus
`block_number`, `log_index`) and become fills with source `dome_rest`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from services.ingestor.http_api import ApiError, JsonApi
from services.ingestor.ratelimit import RateLimiter
from services.ingestor.settings import IngestorSettings
from shared.models import DomeOrder, FeedOrder, Source

ORDERS_PATH = "/polymarket/orders"


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

    def __init__(self, api: JsonApi, page_limit: int) -> None:
        self.api = api
        self._limit = page_limit

    async def read_since(self, wallet: str, since: int) -> AsyncIterator[list[Any]]:
        base: dict[str, str | int] = {"user": wallet, "start_time": since, "limit": self._limit}
        params = base
        while True:
            body = await self.api.get(ORDERS_PATH, params)
            orders, pagination = _page(body)
            yield orders
            if not pagination.get("has_more"):
                return
            key = pagination.get("pagination_key")
            if not isinstance(key, str) or not key:
                raise ApiError(f"{ORDERS_PATH}: has_more without a pagination_key")
            params = {**base, "pagination_key": key}

    def to_order(self, item: Any) -> DomeOrder:
        return FeedOrder.model_validate(item)


def _page(body: Any) -> tuple[list[Any], dict[str, Any]]:
    if not isinstance(body, dict):
        raise ApiError(f"{ORDERS_PATH}: expected an object, got {type(body).__name__}")
    orders, pagination = body.get("orders"), body.get("pagination") or {}
    if not isinstance(orders, list) or not isinstance(pagination, dict):
        raise ApiError(f"{ORDERS_PATH}: expected 'orders' (a list) and 'pagination' (an object)")
    return orders, pagination
