"""The Redis side of webhooks: one hand-off from `signals`, then one queue per endpoint.

    signals --(group `webhooks`: `handoff`)--> {signals}:webhook:<name> --(`endpoint`)--> POST

- `handoff`: consumer group `webhooks` on `signals`; each entry is acked as it is appended, in one
  script, to the queue of every endpoint whose filters it matches. Milliseconds per entry, so the
  group keeps up with the stream whatever the endpoints do.
- `endpoint`: per endpoint, consumer group `webhooks` on its queue: deliveries with retries, acked
  and deleted from the queue on the final outcome, dead letters on `webhooks.dead`.

So each endpoint progresses at its own pace: a dead or hanging endpoint fills its own queue (up to
its `max_backlog`) and retries on its own slots and its own HTTP connection pool, and no other
endpoint waits for it. Everything an endpoint still owes is in Redis, so a restart (or another
replica) picks it up where it was. Delivery is at least once (see `endpoint`): receivers
deduplicate on `Idempotency-Key`, the signal's `signal_id`.

Works on Redis 7.0 (no XREADGROUP CLAIM needed).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import httpx
from redis.exceptions import RedisError

from services.notifier.webhooks.config import Webhook
from services.notifier.webhooks.dead import DeadLetters
from services.notifier.webhooks.delivery import RetryPolicy
from services.notifier.webhooks.endpoint import EndpointWorker
from services.notifier.webhooks.handoff import Handoff, Route, queue_key
from shared.redis_streams import connect
from shared.streams import Streams

# Worst first: the state a health check or the dashboard shows for all the parts together.
_STATES = ("stopped", "retrying", "starting")


class WebhookConsumer:
    def __init__(
        self,
        redis_url: str,
        streams: Streams,
        hooks: Sequence[Webhook],
        policy: RetryPolicy,
        *,
        consumer: str,
        timeout_s: float,
        concurrency: int,
        block_ms: int,
        claim_idle_ms: int,
        max_deliveries: int,
    ) -> None:
        """`timeout_s`: of one POST; `concurrency`: deliveries at once per endpoint and replica;
        `block_ms`: XREADGROUP BLOCK; `claim_idle_ms`: pending this long, an entry is taken over;
        `max_deliveries`: claims of one queued signal before it is dead-lettered."""
        self.consumer = consumer
        self.hooks = tuple(hooks)
        # Short commands of every part (acks, dead letters, claims); each reader has its own.
        self.redis = connect(redis_url)
        dead = DeadLetters(self.redis, streams.webhooks_dead)
        routes = [Route(hook, queue_key(streams, hook.name)) for hook in self.hooks]
        self.handoff = Handoff(
            self.redis,
            redis_url,
            streams.signals,
            routes,
            dead,
            consumer=consumer,
            block_ms=block_ms,
            claim_idle_ms=claim_idle_ms,
        )
        # A pool per endpoint: a hanging endpoint holds its own connections, never another's.
        self._clients = [_http_client(timeout_s, concurrency) for _ in routes]
        self.endpoints = [
            EndpointWorker(
                self.redis,
                redis_url,
                route,
                http,
                policy,
                dead,
                consumer=consumer,
                concurrency=concurrency,
                block_ms=block_ms,
                claim_idle_ms=claim_idle_ms,
                max_deliveries=max_deliveries,
            )
            for route, http in zip(routes, self._clients, strict=True)
        ]
        # Set once every group exists: signals published from then on reach the endpoints.
        self.ready = asyncio.Event()

    @property
    def status(self) -> str:
        states = {self.handoff.status, *(worker.status for worker in self.endpoints)}
        return next((state for state in _STATES if state in states), "reading")

    @property
    def in_flight(self) -> int:
        return sum(worker.in_flight for worker in self.endpoints)

    @property
    def settled(self) -> int:
        """Queued signals this replica brought to an outcome, over all endpoints."""
        return sum(worker.settled for worker in self.endpoints)

    async def run(self, stop: asyncio.Event, grace_s: float) -> None:
        """Deliver until `stop` is set; then let every part finish within `grace_s` and return.

        Should a part fail, the others are stopped the same way and the failure is raised.
        """
        halt = asyncio.Event()
        parts = [
            asyncio.ensure_future(self.handoff.run(halt, grace_s)),
            *(asyncio.ensure_future(worker.run(halt, grace_s)) for worker in self.endpoints),
        ]
        helpers = [
            asyncio.ensure_future(self._until_ready()),
            asyncio.ensure_future(_relay(stop, halt)),
        ]
        try:
            await asyncio.wait(parts, return_when=asyncio.FIRST_EXCEPTION)
            halt.set()
            results = await asyncio.gather(*parts, return_exceptions=True)
        finally:
            halt.set()
            await _cancel(*parts, *helpers)
            for http in self._clients:
                await http.aclose()
            with contextlib.suppress(RedisError, OSError):
                await self.redis.aclose()
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _until_ready(self) -> None:
        await self.handoff.ready.wait()
        for worker in self.endpoints:
            await worker.ready.wait()
        self.ready.set()


def _http_client(timeout_s: float, concurrency: int) -> httpx.AsyncClient:
    # Redirects are not followed (see `delivery`): a 3xx is a final answer.
    return httpx.AsyncClient(
        timeout=timeout_s,
        follow_redirects=False,
        limits=httpx.Limits(max_connections=concurrency),
    )


async def _relay(stop: asyncio.Event, halt: asyncio.Event) -> None:
    await stop.wait()
    halt.set()


async def _cancel(*tasks: asyncio.Future[Any]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
