"""Dead letters of webhooks, on `webhooks.dead`, and writing to Redis until it lands.

A `webhooks.dead` entry: `raw` (the signal's JSON as on `signals`), `reason`, `origin`
(`notifier`), `deliveries` (POST attempts made), `at`, plus `webhook` (the endpoint's name),
`signal_id` and `entry_id` (its id on `signals`), so it can be inspected and replayed. One entry
per endpoint that gave up on the signal: the others may well have had it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.notifier.metrics import WEBHOOK_OUTCOMES
from services.notifier.webhooks.config import Webhook
from shared.backoff import retrying

log = logging.getLogger(__name__)

DEAD_MAXLEN = 100_000
_T = TypeVar("_T")


async def until_done(command: Callable[[], Awaitable[_T]]) -> _T:
    """Run a Redis command until it succeeds: the outcome is known, only Redis is away."""
    return await retrying(command, transient=(RedisError, OSError), on_retry=_said)


def _said(exc: BaseException, delay: float) -> None:
    log.warning(
        "webhooks_write_failed",
        extra={"error": f"{type(exc).__name__}: {exc}", "retry_in_s": delay},
    )


class DeadLetters:
    def __init__(self, redis: aioredis.Redis, stream: str) -> None:
        self._redis = redis
        self._stream = stream

    async def add(
        self,
        hook: Webhook,
        entry_id: str,
        signal_id: str,
        data: bytes,
        reason: str,
        attempts: int,
    ) -> None:
        """Record that `hook` will never get the signal of `entry_id`, and why."""
        WEBHOOK_OUTCOMES.labels(hook.name, "dead").inc()
        log.warning(
            "webhook_dead_lettered",
            extra={
                "webhook": hook.name,
                "signal_id": signal_id,
                "entry_id": entry_id,
                "attempts": attempts,
                "reason": reason,
            },
        )
        fields = {
            b"raw": data,
            b"reason": reason.encode()[:2000],
            b"origin": b"notifier",
            b"deliveries": str(attempts).encode(),
            b"at": f"{time.time():.6f}".encode(),
            b"webhook": hook.name.encode(),
            b"signal_id": signal_id.encode(),
            b"entry_id": entry_id.encode(),
        }
        await until_done(
            lambda: self._redis.xadd(
                self._stream, cast(Any, fields), maxlen=DEAD_MAXLEN, approximate=True
            )
        )
