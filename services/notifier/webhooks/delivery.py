"""One signal to one endpoint: POST it, retry what may succeed later, report the outcome.

- 2xx: delivered.
- 5xx, 408 and 429, a timeout, a connection error: retried after an exponential backoff
  (`WEBHOOK_BACKOFF_S`, doubling up to `WEBHOOK_BACKOFF_MAX_S`, each delay shortened by up to half
  at random so replicas retrying together spread out; a `Retry-After` of a 429/503 is honoured up
  to the cap), at most `WEBHOOK_MAX_ATTEMPTS` tries in all.
- Any other status (4xx, and 3xx: redirects are not followed): final at once. 408 and 429 are the
  two 4xx retried, because they say "later", not "never".
- Telegram's Bot API says why in its JSON answer, `{"ok": false, "error_code": 429, "description":
  "Too Many Requests: retry after 5", "parameters": {"retry_after": 5}}`: the description is the
  reason (a 403 "Forbidden: bot was blocked by the user", a 400 "Bad Request: chat not found",
  both final), and `parameters.retry_after` is honoured like a Retry-After header, up to the cap.
  A group that became a supergroup answers 400 with `parameters.migrate_to_chat_id`: the reason
  names the new id, for the operator to put in `WEBHOOKS_FILE`.

A telegram request goes to a URL that carries the bot token (`Webhook.target()`): it is never
logged, an exception's text (which may hold the URL) is reduced to its type, and the endpoint's
secrets are blanked out of any reason (a receiver may echo the path back).

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
import orjson

from services.notifier.metrics import WEBHOOK_ATTEMPTS
from services.notifier.webhooks.config import Preset, Webhook
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
_DETAIL_CHARS = 200


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
        async with http.stream("POST", hook.target(), content=body, headers=headers) as response:
            head = await _head(response) if not 200 <= response.status_code < 300 else b""
    except httpx.TimeoutException as exc:
        return _Try(Verdict.RETRY, "timeout", f"timeout ({type(exc).__name__})")
    except httpx.HTTPError as exc:
        # The exception's text may carry the URL, which can be a credential: its type only.
        return _Try(Verdict.RETRY, "error", f"connection error ({type(exc).__name__})")
    return _answered(hook, response, head)


def _answered(hook: Webhook, response: httpx.Response, head: bytes) -> _Try:
    """The verdict on an answer, `head` the start of its body (empty for a 2xx)."""
    status = response.status_code
    said, retry_after = _bot_api_error(head) if hook.preset is Preset.TELEGRAM else ("", None)
    if retry_after is None:
        retry_after = _retry_after(response)
    detail = f"HTTP {status}"
    # Secrets blanked before the cut, which could leave a part of one.
    said = _blanked(said or head.decode(errors="replace"), hook)
    snippet = " ".join(said[:_DETAIL_CHARS].split())
    if snippet:
        detail += f": {snippet}"
    return _Try(verdict(status), f"{status // 100}xx", detail, retry_after)


async def _head(response: httpx.Response) -> bytes:
    """The start of an error response's body, for the dead letter; never the whole of it."""
    head = b""
    async for chunk in response.aiter_bytes():
        head += chunk
        if len(head) >= _ERROR_BODY_BYTES:
            break
    return head[:_ERROR_BODY_BYTES]


def _bot_api_error(head: bytes) -> tuple[str, float | None]:
    """What a Bot API error answer says: its description (with a migrated group's new id) and
    `parameters.retry_after`; nothing when it is not one (a proxy's page, a cut body)."""
    try:
        answer = orjson.loads(head)
    except orjson.JSONDecodeError:
        return "", None
    if not isinstance(answer, dict):
        return "", None
    said = str(answer.get("description") or "")
    parameters = answer.get("parameters")
    if not isinstance(parameters, dict):
        return said, None
    migrated = parameters.get("migrate_to_chat_id")
    if type(migrated) is int:
        said = f"{said} (migrate_to_chat_id {migrated})"
    wait = parameters.get("retry_after")
    if isinstance(wait, int | float) and not isinstance(wait, bool) and wait >= 0:
        return said, float(wait)
    return said, None


def _blanked(text: str, hook: Webhook) -> str:
    """`text` without the endpoint's secrets: the reason is logged and dead-lettered."""
    for secret in hook.secrets():
        text = text.replace(secret, "***")
    return text


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        # The HTTP-date form is rare on webhook endpoints; the backoff applies instead.
        return None
