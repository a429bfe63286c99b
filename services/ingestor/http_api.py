"""GET JSON from a rate-limited HTTP API (Dome REST, Polymarket Data API), politely.

Every request first takes a slot from the API's shared `RateLimiter`. A 429 holds the limiter for
Retry-After (seconds or an HTTP date; `RETRY_AFTER_DEFAULT_S` when absent or unreadable) and the
request is tried again, up to `MAX_THROTTLED` times in a row. 401/403 raise `AuthError` (a key
problem that retrying soon cannot fix); other failures raise `ApiError` with a description that
holds neither the key (it travels in a header, and every text is scrubbed) nor a response body
longer than a line. Retrying a failed read is the caller's choice (see `backfill`, `poller`).
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import Mapping
from typing import Any

import httpx

from services.ingestor import metrics
from services.ingestor.ratelimit import RateLimiter
from shared.logs import scrub

log = logging.getLogger(__name__)

RETRY_AFTER_DEFAULT_S = 1.0
RETRY_AFTER_MAX_S = 300.0
MAX_THROTTLED = 10
_BODY_CHARS = 200


class ApiError(Exception):
    """A request that failed; the text is safe to log."""


class AuthError(ApiError):
    """The API refused the key (HTTP 401/403)."""


def retry_after_seconds(value: str | None, now: float | None = None) -> float:
    """Seconds to wait from a Retry-After header: delta seconds or an HTTP date."""
    if not value:
        return RETRY_AFTER_DEFAULT_S
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError, IndexError):
            return RETRY_AFTER_DEFAULT_S
        seconds = when - (time.time() if now is None else now)
    return min(RETRY_AFTER_MAX_S, max(0.0, seconds))


class JsonApi:
    def __init__(
        self,
        source: str,
        base_url: str,
        limiter: RateLimiter,
        *,
        timeout_s: float,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.source = source
        self.limiter = limiter
        self._client = httpx.AsyncClient(
            base_url=base_url,
            headers=dict(headers or {}),
            timeout=timeout_s,
            transport=transport,
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def get(self, path: str, params: Mapping[str, str | int]) -> Any:
        """The decoded JSON body of a 2xx answer; raises ApiError/AuthError otherwise."""
        for _ in range(MAX_THROTTLED):
            await self.limiter.acquire()
            response = await self._request(path, params)
            metrics.HTTP_REQUESTS.labels(self.source, str(response.status_code)).inc()
            if response.status_code != 429:
                return self._decoded(response)
            self._throttled(response)
        raise ApiError(f"{path}: still rate limited (429) after {MAX_THROTTLED} attempts")

    async def _request(self, path: str, params: Mapping[str, str | int]) -> httpx.Response:
        try:
            return await self._client.get(path, params=dict(params))
        except httpx.HTTPError as exc:
            metrics.HTTP_REQUESTS.labels(self.source, "error").inc()
            raise ApiError(f"{path}: {type(exc).__name__}: {scrub(str(exc))[:300]}") from None

    def _throttled(self, response: httpx.Response) -> None:
        delay = retry_after_seconds(response.headers.get("retry-after"))
        self.limiter.hold(delay)
        metrics.RATE_LIMITED.labels(self.source).inc()
        log.warning(
            "rate_limited",
            extra={"source": self.source, "status": 429, "retry_after_s": round(delay, 3)},
        )

    def _decoded(self, response: httpx.Response) -> Any:
        path = response.request.url.path
        status = response.status_code
        if status in (401, 403):
            raise AuthError(f"{path}: HTTP {status}: {self._excerpt(response)}")
        if status >= 300:
            raise ApiError(f"{path}: HTTP {status}: {self._excerpt(response)}")
        try:
            return response.json()
        except ValueError:
            raise ApiError(f"{path}: HTTP {status} with a body that is not JSON") from None

    @staticmethod
    def _excerpt(response: httpx.Response) -> str:
        text = " ".join(response.text.split())
        return scrub(text[:_BODY_CHARS])
