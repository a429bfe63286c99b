"""One signal to one endpoint: POST it, retry what may succeed later, report the outcome.

- 2xx: delivered.
- 5xx, 408 and 429, a timeout, a connection error: retried after an exponential backoff
  (`WEBHOOK_BACKOFF_S`, doubling up to `WEBHOOK_BACKOFF_MAX_S`, each delay shortened by up to half
  at random so replicas retrying together spread out; a `Retry-After` of a 429/503 is honoured up
  to the cap), at most `WEBHOOK_MAX_ATTEMPTS` tries in all.
- Any other status (4xx, and 3xx: redirects are not followed): final at once. 408 and 429 are the
  two 4xx retried, because they say "later", not "never".

Every attempt is signed afresh (see `signing`) with its own timestamp; the body is the same bytes
each time, and so are `Idempotency-Key` (the signal's `signal_id`, plus `:<status>` unless it is
confirmed) and `X-BetterBot-Status`. A 2xx whose response is lost (a timeout after the receiver
acted) is retried all the same: delivery is at least once.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum

import httpx

from services.notifier.metrics import WEBHOOK_ATTEMPTS
from services.notifier.webhooks.config import Webhook
from services.notifier.webhooks.signing import (
    ATTEMPT_HEADER,
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    STATUS_HEADER,
    TIMESTAMP_HEADER,
    idempotency_key,
    signature,
)
from shared.backoff import backoff_bound
from shared.models import FillStatus

USER_AGENT = "betterbot-notifier/1"
_RETRIED_4XX = (408, 429)
_ERROR_BODY_BYTES = 1024


class Verdict(Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    FINAL = "final"


def verdict(status: int) -> Verdict:
    if 200 <= status < 300:
        return Verdict.DELIVERED
    if status >= 500 or status in _RETRIED_4XX:
        return Verdict.RETRY
    return Verdict.FINAL


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int
    first_s: float
    cap_s: float

    def delay(
        self,
        attempt: int,
        retry_after: float | None = None,
        rand: Callable[[], float] = random.random,
    ) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        backoff = backoff_bound(attempt - 1, self.first_s, self.cap_s) * (1 - rand() / 2)
        if retry_after is not None:
            backoff = max(backoff, min(retry_after, self.cap_s))
        return backoff


@dataclass(frozen=True, slots=True)
class Outcome:
    delivered: bool
    attempts: int
    # Why it failed (for the dead letter); empty when delivered.
    reason: str = ""


@dataclass(frozen=True, slots=True)
class _Try:
    verdict: Verdict
    label: str
    detail: str
    retry_after: float | None = None


async def deliver(
    http: httpx.AsyncClient,
    hook: Webhook,
    body: bytes,
    signal_id: str,
    policy: RetryPolicy,
    *,
    status: FillStatus = FillStatus.CONFIRMED,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> Outcome:
    """POST until delivered, refused for good, or out of attempts."""
    last = ""
    fixed = {
        IDEMPOTENCY_HEADER: idempotency_key(signal_id, status),
        STATUS_HEADER: status.value,
    }
    for attempt in range(1, policy.max_attempts + 1):
        result = await _attempt(http, hook, body, fixed, attempt)
        WEBHOOK_ATTEMPTS.labels(hook.name, result.label).inc()
        if result.verdict is Verdict.DELIVERED:
            return Outcome(True, attempt)
        if result.verdict is Verdict.FINAL:
            return Outcome(False, attempt, f"{result.detail} (final, not retried)")
        last = result.detail
        if attempt < policy.max_attempts:
            await sleep(policy.delay(attempt, result.retry_after))
    return Outcome(False, policy.max_attempts, f"{policy.max_attempts} attempts, last: {last}")


async def _attempt(
    http: httpx.AsyncClient, hook: Webhook, body: bytes, fixed: dict[str, str], attempt: int
) -> _Try:
    """One POST; `fixed`: the headers that are the same on every attempt of this delivery."""
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        **fixed,
        ATTEMPT_HEADER: str(attempt),
        TIMESTAMP_HEADER: str(timestamp),
    }
    if hook.secret is not None:
        headers[SIGNATURE_HEADER] = signature(hook.secret.get_secret_value(), timestamp, body)
    try:
        async with http.stream("POST", hook.url, content=body, headers=headers) as response:
            head = await _head(response) if not 200 <= response.status_code < 300 else b""
    except httpx.TimeoutException as exc:
        return _Try(Verdict.RETRY, "timeout", f"timeout ({type(exc).__name__})")
    except httpx.HTTPError as exc:
        # The exception's text may carry the URL, which can be a credential: its type only.
        return _Try(Verdict.RETRY, "error", f"connection error ({type(exc).__name__})")
    status = response.status_code
    detail = f"HTTP {status}"
    snippet = " ".join(head.decode(errors="replace")[:200].split())
    if snippet:
        detail += f": {snippet}"
    return _Try(verdict(status), f"{status // 100}xx", detail, _retry_after(response))


async def _head(response: httpx.Response) -> bytes:
    """The start of an error response's body, for the dead letter; never the whole of it."""
    head = b""
    async for chunk in response.aiter_bytes():
        head += chunk
        if len(head) >= _ERROR_BODY_BYTES:
            break
    return head[:_ERROR_BODY_BYTES]


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        # The HTTP-date form is rare on webhook endpoints; the backoff applies instead.
        return None
