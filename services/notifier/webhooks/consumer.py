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

Both kinds of group run on the shared consumer runtime (`shared/consumer.py`): reading, acking,
keeping slow deliveries claimed, reclaiming a dead replica's entries, dead-lettering after
`WEBHOOK_MAX_DELIVERIES`, waiting out a Redis restart, draining and leaving on stop. Works on
Redis 7.0 (no XREADGROUP CLAIM needed).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import httpx
from redis.exceptions import RedisError

from services.notifier.market_tags import MarketTags
from services.notifier.metrics import WEBHOOK_BACKLOG
from services.notifier.webhooks.config import Webhook
from services.notifier.webhooks.dead import DeadLetters
from services.notifier.webhooks.delivery import RetryPolicy
from services.notifier.webhooks.endpoint import Endpoint
from services.notifier.webhooks.handoff import HANDOFF_BATCH, Handoff, Route, queue_key
from shared.consumer import ConsumerGroup, GroupConfig
from shared.redis_streams import connect
from shared.streams import WEBHOOKS_GROUP, Streams


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
        grace_s: float,
        cluster: bool = False,
        market_tags: MarketTags | None = None,
    ) -> None:
        """`timeout_s`: of one POST; `concurrency`: deliveries at once per endpoint and replica;
        `block_ms`: XREADGROUP BLOCK; `claim_idle_ms`: pending this long, an entry is taken over;
        `max_deliveries`: claims of one queued signal before it is dead-lettered; `grace_s`: what
        is in flight at shutdown gets this long; `market_tags`: for `tags` filters."""
        self.consumer = consumer
        self.hooks = tuple(hooks)
        self.redis = connect(redis_url, cluster=cluster)
        dead = DeadLetters(self.redis, streams.webhooks_dead)
        routes = [Route(hook, queue_key(streams, hook.name)) for hook in self.hooks]

        def config(stream: str, **own: int | bool | str) -> GroupConfig:
            return GroupConfig(
                stream=stream,
                group=WEBHOOKS_GROUP,
                consumer=consumer,
                dead_stream=streams.webhooks_dead,
                origin="notifier",
                block_ms=block_ms,
                claim_min_idle_ms=claim_idle_ms,
                reclaim_every_s=claim_idle_ms / 3000,
                max_deliveries=max_deliveries,
                drain_s=grace_s,
                max_deliveries_setting="WEBHOOK_MAX_DELIVERIES",
                **own,  # type: ignore[arg-type]
            )

        # From the stream's end the first time: endpoints get the signals from then on.
        handoff = Handoff(self.redis, streams.signals, routes, dead, market_tags)
        self.handoff = ConsumerGroup(
            self.redis, config(streams.signals, batch_size=HANDOFF_BATCH, start_id="$"), handoff
        )
        # A pool per endpoint: a hanging endpoint holds its own connections, never another's.
        self._clients = [_http_client(timeout_s, concurrency) for _ in routes]
        self.endpoints = [
            Endpoint(route, http, policy, dead)
            for route, http in zip(routes, self._clients, strict=True)
        ]
        self.queues = [
            ConsumerGroup(
                self.redis,
                config(
                    endpoint.queue,
                    batch_size=1,
                    max_in_flight=concurrency,
                    delete_on_settle=True,
                    start_id="0",
                ),
                endpoint,
                dead_letter=endpoint.dead_letter,
            )
            for endpoint in self.endpoints
        ]
        # Set once every group exists: signals published from then on reach the endpoints.
        self.ready = asyncio.Event()

    @property
    def groups(self) -> list[ConsumerGroup]:
        return [self.handoff, *self.queues]

    @property
    def status(self) -> str:
        """Worst first: what a health check or the dashboard shows for all the groups."""
        health = [group.health for group in self.groups]
        if any(h.stopped for h in health):
            return "stopped"
        if any(h.redis_down_since is not None for h in health):
            return "retrying"
        if not self.ready.is_set():
            return "starting"
        return "reading"

    @property
    def in_flight(self) -> int:
        return sum(group.health.in_flight for group in self.queues)

    @property
    def settled(self) -> int:
        """Queued signals this replica brought to an outcome, over all endpoints."""
        return sum(endpoint.settled for endpoint in self.endpoints)

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set; then let every group drain (within `grace_s`) and leave."""
        try:
            for group in self.groups:
                if not await group.join(stop):
                    return  # stopped before Redis answered
            self.ready.set()
            backlog = asyncio.ensure_future(self._watch_backlog())
            try:
                await asyncio.gather(*(group.run(stop) for group in self.groups))
            finally:
                backlog.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await backlog
        finally:
            for http in self._clients:
                await http.aclose()
            with contextlib.suppress(RedisError, OSError):
                await self.redis.aclose()

    async def _watch_backlog(self) -> None:
        """Each endpoint's queue length: the signals it still owes."""
        while True:
            for endpoint in self.endpoints:
                with contextlib.suppress(RedisError, OSError):
                    length = await self.redis.xlen(endpoint.queue)
                    WEBHOOK_BACKLOG.labels(endpoint.hook.name).set(length)
            await asyncio.sleep(1.0)


def _http_client(timeout_s: float, concurrency: int) -> httpx.AsyncClient:
    # Redirects are not followed (see `delivery`): a 3xx is a final answer.
    return httpx.AsyncClient(
        timeout=timeout_s,
        follow_redirects=False,
        limits=httpx.Limits(max_connections=concurrency),
    )
