"""The tags of a signal's market (Gamma's market metadata), for the `tags` filter.

A signal names its market by condition id; its tags come from Polymarket's Gamma API:
`GET <NOTIFIER_GAMMA_URL>/markets?condition_ids=..&include_tag=true` answers each market with
`tags: [{"id", "label", "slug"}, ...]` (the simulator serves the same for the tape's markets).
Gamma leaves closed markets out unless asked `closed=true`, so ids still missing are asked once
more that way. A market Gamma does not know has no tags (an empty set).

Looked up only for subscribers that filter on tags, at most `GAMMA_BATCH` ids per request (up to
`GAMMA_CONCURRENCY` requests at once), each answer cached `ttl_s` (tags change rarely) in a
bounded cache (the least recently used market is forgotten first). A failed or slow lookup
(`timeout_s`) leaves the tags unknown: a `tags` filter then does not pass the signal (it is not
known to be about what the subscriber asked), and the market is not asked again for `retry_s`,
so a Gamma outage costs one timeout, not one per signal. Only the subscribers that filter on tags
wait for a lookup: the notifier hands the others their signals first (`fanout`).

Gamma's text is outside input: tags are kept only as short lower-cased strings (label and slug),
at most `MAX_TAGS` per market, and never logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import httpx

log = logging.getLogger(__name__)

GAMMA_BATCH = 20
GAMMA_CONCURRENCY = 8  # batches asked at once
MAX_TAGS = 50
MAX_TAG_CHARS = 100

Tags = frozenset[str]


class MarketTags:
    """Condition id -> its market's tags (labels and slugs, lower case), cached."""

    def __init__(
        self,
        gamma_url: str,
        *,
        timeout_s: float = 2.0,
        max_markets: int = 10_000,
        ttl_s: float = 3600.0,
        retry_s: float = 60.0,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = gamma_url.rstrip("/") + "/markets"
        self._http = http or httpx.AsyncClient(timeout=timeout_s, follow_redirects=False)
        self._max = max_markets
        self._ttl_s = ttl_s
        self._retry_s = retry_s
        self._clock = clock
        # condition id -> (expires at, tags or None for "lookup failed").
        self._cache: OrderedDict[str, tuple[float, Tags | None]] = OrderedDict()

    def known(self, condition_id: str) -> Tags | None:
        """The cached tags of a market; None when they are not known (never asked, or failed)."""
        entry = self._cache.get(condition_id.lower())
        if entry is None or entry[0] <= self._clock():
            return None
        self._cache.move_to_end(condition_id.lower())
        return entry[1]

    async def lookup(self, condition_id: str) -> Tags | None:
        await self.prefetch((condition_id,))
        return self.known(condition_id)

    async def prefetch(self, condition_ids: Iterable[str]) -> None:
        """Ask Gamma for the markets not cached (or expired); never raises for Gamma's sake."""
        now = self._clock()
        wanted = sorted(
            {
                cid.lower()
                for cid in condition_ids
                if cid and (cid.lower() not in self._cache or self._cache[cid.lower()][0] <= now)
            }
        )
        # The batches at once (a few at a time): a lookup costs about one request's time.
        slots = asyncio.Semaphore(GAMMA_CONCURRENCY)

        async def fetch(ids: list[str]) -> None:
            async with slots:
                await self._fetch(ids)

        batches = [
            wanted[start : start + GAMMA_BATCH] for start in range(0, len(wanted), GAMMA_BATCH)
        ]
        await asyncio.gather(*(fetch(ids) for ids in batches))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _fetch(self, ids: list[str]) -> None:
        try:
            found = await self._ask(ids, closed=False)
            missing = [cid for cid in ids if cid not in found]
            if missing:
                found |= await self._ask(missing, closed=True)
        except (httpx.HTTPError, ValueError) as exc:
            log.warning(
                "market_tags_unavailable",
                extra={"markets": len(ids), "error": type(exc).__name__},
            )
            self._store(ids, None, self._retry_s)
            return
        for cid in ids:
            self._store((cid,), found.get(cid, frozenset()), self._ttl_s)

    async def _ask(self, ids: list[str], *, closed: bool) -> dict[str, Tags]:
        params: list[tuple[str, str | int | float | bool | None]] = [
            ("condition_ids", cid) for cid in ids
        ]
        params.append(("include_tag", "true"))
        if closed:
            params.append(("closed", "true"))
        response = await self._http.get(self._url, params=params)
        response.raise_for_status()
        return markets_tags(response.json())

    def _store(self, ids: Iterable[str], tags: Tags | None, ttl_s: float) -> None:
        expires = self._clock() + ttl_s
        for cid in ids:
            self._cache[cid] = (expires, tags)
            self._cache.move_to_end(cid)
        while len(self._cache) > self._max:
            self._cache.popitem(last=False)


def markets_tags(body: Any) -> dict[str, Tags]:
    """Condition id (lower case) -> tags, from Gamma's `/markets` answer; ValueError if the
    answer is not a list of markets."""
    if not isinstance(body, list):
        raise ValueError("Gamma /markets did not answer a list")
    found: dict[str, Tags] = {}
    for market in body:
        if not isinstance(market, dict) or not isinstance(market.get("conditionId"), str):
            continue
        found[market["conditionId"].lower()] = _tags(market.get("tags"))
    return found


def _tags(raw: Any) -> Tags:
    if not isinstance(raw, list):
        return frozenset()
    names: set[str] = set()
    for tag in raw[:MAX_TAGS]:
        if not isinstance(tag, dict):
            continue
        for field in ("label", "slug"):
            value = tag.get(field)
            if isinstance(value, str) and 0 < len(value.strip()) <= MAX_TAG_CHARS:
                names.add(value.strip().lower())
    return frozenset(names)
