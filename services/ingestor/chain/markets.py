"""Token id -> market (condition id, slug, title, outcome label, neg-risk) from Polymarket's Gamma
API, cached in memory and in Redis, never holding a fill back longer than a bound.

A chain log carries only the token id. `describe` answers from memory, then Redis
(`{ns}market:token:<id>`, kept `CACHE_TTL_S`), then Gamma's
`GET <GAMMA_API_URL>/markets?clob_token_ids=<id>`.
When the answer takes longer than the bound, the fill goes out with empty market fields and the
lookup goes on in the background, so the next fill of that token is complete (docs/ingestion.md).
A token Gamma does not know is remembered as unknown for a while, to spare the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.ingestor.http_api import ApiError, JsonApi
from shared.models import LABEL_MAX, SLUG_MAX

log = logging.getLogger(__name__)

CACHE_TTL_S = 24 * 3600
UNKNOWN_TTL_S = 300
TEXT_LIMIT = 500
# Gamma describes the market; the fill itself is real whatever it says. So a condition id of
# another shape is dropped and text is cut to the contract's bounds, rather than the fill lost.
CONDITION_ID = re.compile(r"^0x[0-9a-fA-F]{64}$")


@dataclass(frozen=True, slots=True)
class TokenMarket:
    condition_id: str = ""
    market_slug: str = ""
    title: str = ""
    token_label: str = ""
    neg_risk: bool = False


UNKNOWN = TokenMarket()


def _json_list(value: Any) -> list[Any]:
    """Gamma sends `outcomes` and `clobTokenIds` as JSON text inside the JSON."""
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        with contextlib.suppress(orjson.JSONDecodeError):
            parsed = orjson.loads(value)
            if isinstance(parsed, list):
                return parsed
    return []


def market_from_gamma(body: Any, token_id: str) -> TokenMarket:
    """The market of `token_id` in a Gamma `/markets` answer (a list), or UNKNOWN."""
    markets = body if isinstance(body, list) else []
    for market in markets:
        if not isinstance(market, dict):
            continue
        tokens = [str(token) for token in _json_list(market.get("clobTokenIds"))]
        if token_id not in tokens:
            continue
        outcomes = _json_list(market.get("outcomes"))
        index = tokens.index(token_id)
        label = outcomes[index] if index < len(outcomes) else ""
        condition_id = str(market.get("conditionId") or "")
        return TokenMarket(
            condition_id=condition_id if CONDITION_ID.match(condition_id) else "",
            market_slug=str(market.get("slug") or "")[:SLUG_MAX],
            title=str(market.get("question") or "")[:TEXT_LIMIT],
            token_label=str(label)[:LABEL_MAX],
            neg_risk=bool(market.get("negRisk")),
        )
    return UNKNOWN


class MarketDirectory:
    def __init__(
        self, redis: aioredis.Redis, api: JsonApi, *, key_prefix: str, timeout_s: float
    ) -> None:
        self._redis = redis
        self._api = api
        self._prefix = key_prefix
        self._timeout_s = timeout_s
        # Token -> (market, until when it holds: monotonic seconds; unknown tokens expire).
        self._known: dict[str, tuple[TokenMarket, float]] = {}
        self._inflight: dict[str, asyncio.Task[TokenMarket]] = {}
        self.late = 0

    async def describe(self, token_id: str) -> TokenMarket:
        """The token's market, or UNKNOWN when no answer came within the bound."""
        known = self._known.get(token_id)
        if known is not None and known[1] > time.monotonic():
            return known[0]
        task = self._inflight.get(token_id)
        if task is None:
            task = asyncio.create_task(self._lookup(token_id), name=f"gamma-{token_id[:12]}")
            self._inflight[token_id] = task
            task.add_done_callback(functools.partial(self._forget, token_id))
        try:
            return await asyncio.wait_for(asyncio.shield(task), self._timeout_s)
        except TimeoutError:
            self.late += 1
            log.info("market_lookup_late", extra={"token_id": token_id[:80]})
            return UNKNOWN

    def _forget(self, token_id: str, _task: asyncio.Task[TokenMarket]) -> None:
        self._inflight.pop(token_id, None)

    async def aclose(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await self._api.aclose()

    async def _lookup(self, token_id: str) -> TokenMarket:
        key = self._prefix + token_id
        with contextlib.suppress(RedisError, OSError):
            cached = await self._redis.get(key)
            if cached is not None:
                return self._remember(token_id, TokenMarket(**orjson.loads(cached)))
        try:
            body = await self._api.get("/markets", {"clob_token_ids": token_id})
        except ApiError as exc:
            log.warning(
                "market_lookup_failed", extra={"token_id": token_id[:80], "error": str(exc)}
            )
            return UNKNOWN
        market = market_from_gamma(body, token_id)
        ttl = CACHE_TTL_S if market is not UNKNOWN else UNKNOWN_TTL_S
        with contextlib.suppress(RedisError, OSError):
            await self._redis.set(key, orjson.dumps(asdict(market)), ex=ttl)
        return self._remember(token_id, market)

    def _remember(self, token_id: str, market: TokenMarket) -> TokenMarket:
        """Known markets for the process' life; an unknown token is asked again later (a market
        can be listed after its first trade)."""
        ttl = math.inf if market != UNKNOWN else UNKNOWN_TTL_S
        self._known[token_id] = (market, time.monotonic() + ttl)
        return market
