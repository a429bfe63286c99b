"""From `signals` to the endpoints' queues: consumer group `webhooks` on `signals`.

Every replica reads `signals` through the group (each entry reaches one replica) and hands the
entry to the queue of each endpoint whose filters it matches: one Redis stream per endpoint,
`{signals}:webhook:<name>`, in the slot of `signals`. A Lua script acks the entry on `signals` and
appends it to those queues atomically, and only when its ack is the first: an entry handed off
twice (its replica stalled, another took it over) still lands in each queue once. From there each
endpoint is delivered at its own pace (see `endpoint`), so a dead endpoint delays only itself.

The group is created at the stream's end (`$`) the first time any replica starts: endpoints get
the signals from then on. Afterwards it keeps its place, so signals published while every replica
was down are handed off when one comes back (as long as the stream still holds them). A hand-off
takes milliseconds whatever the endpoints do, so the group stays at the head of `signals`, and an
endpoint's backlog waits in its own queue, out of reach of the trimming of `signals`.

An endpoint whose queue already holds `max_backlog` signals takes no more: each further signal is
dead-lettered for it at once ("backlog full"), so a long-dead endpoint cannot fill Redis.

The group runs on the shared consumer runtime (`shared/consumer.py`): a replica that dies between
a read and its hand-off leaves the entry pending, and every replica takes over entries idle longer
than `WEBHOOK_CLAIM_IDLE_MS` and hands them off.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis

from services.notifier.fanout import rejection_reason
from services.notifier.market_tags import MarketTags
from services.notifier.metrics import WEBHOOK_SKIPPED
from services.notifier.webhooks.config import Webhook
from services.notifier.webhooks.dead import DeadLetters, until_done
from shared.consumer import Entry, Fields, Handled
from shared.models import Signal
from shared.redis_streams import DATA_FIELD, decode
from shared.streams import WEBHOOKS_GROUP, Streams

log = logging.getLogger(__name__)

HANDOFF_BATCH = 100

# KEYS[1]: signals; KEYS[2..]: the queues. ARGV: the group, the entry's id, the entry's JSON.
# The first ack wins: a second hand-off of the same entry appends nothing.
_HAND_OFF = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return 0
end
for i = 2, #KEYS do
  redis.call('XADD', KEYS[i], '*', 'entry_id', ARGV[2], 'data', ARGV[3])
end
return 1
"""


def queue_key(streams: Streams, name: str) -> str:
    """The queue of endpoint `name`; hash-tagged with `signals`, so the hand-off is one slot."""
    return "{" + streams.signals + "}:webhook:" + name


@dataclass(frozen=True)
class Route:
    hook: Webhook
    queue: str


class Handoff:
    """The handler of group `webhooks` on `signals`: every entry of a batch handed off."""

    def __init__(
        self,
        redis: aioredis.Redis,
        stream: str,
        routes: Sequence[Route],
        dead: DeadLetters,
        market_tags: MarketTags | None = None,
    ) -> None:
        self.redis = redis
        # Asked only when an endpoint filters on tags; None leaves tags unknown (no match).
        self._market_tags = market_tags
        self._needs_tags = any(route.hook.filters.needs_tags for route in routes)
        self._stream = stream
        self._routes = tuple(routes)
        self._dead = dead
        self._script = redis.register_script(_HAND_OFF)

    async def __call__(self, batch: list[Entry]) -> Handled:
        for entry_id, fields in batch:
            await self.hand_off(entry_id, fields)
        return Handled([entry_id for entry_id, _ in batch])

    async def hand_off(self, entry_id: str, fields: Fields | None) -> None:
        """Ack `entry_id` and append it to the queue of every endpoint it is for, at once."""
        data, routes = b"", []
        try:
            if not fields:
                raise ValueError("entry deleted from the stream")
            signal = Signal.model_validate(decode(fields))
        except ValueError as exc:
            # The store dead-letters what is not a Signal (signals.dead); here it is only skipped.
            WEBHOOK_SKIPPED.inc()
            log.warning(
                "webhook_entry_skipped",
                extra={"entry_id": entry_id, "reason": rejection_reason(exc)},
            )
        else:
            data = fields[DATA_FIELD]
            tags = None
            if self._needs_tags and self._market_tags is not None:
                tags = await self._market_tags.lookup(signal.condition_id)
            wanted = [r for r in self._routes if r.hook.filters.matches(signal, tags)]
            routes = await self._with_room(wanted, entry_id, signal.signal_id, data)
        keys = [self._stream, *(route.queue for route in routes)]
        await until_done(lambda: self._script(keys=keys, args=[WEBHOOKS_GROUP, entry_id, data]))

    async def _with_room(
        self, routes: list[Route], entry_id: str, signal_id: str, data: bytes
    ) -> list[Route]:
        """The routes whose queue has room; the signal is dead-lettered for the others.

        Dead letters go first: should this replica die before the hand-off, the entry is handed
        off again, and a letter may repeat but never go missing.
        """
        if not routes:
            return routes
        lengths = await until_done(lambda: self._lengths(routes))
        open_routes = []
        for route, length in zip(routes, lengths, strict=True):
            limit = route.hook.max_backlog
            if length < limit:
                open_routes.append(route)
                continue
            reason = (
                f"backlog full: {length} signals waiting for this endpoint (max_backlog {limit})"
            )
            await self._dead.add(route.hook, entry_id, signal_id, data, reason, attempts=0)
        return open_routes

    async def _lengths(self, routes: Sequence[Route]) -> list[int]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for route in routes:
                pipe.xlen(route.queue)
            return [int(length) for length in await pipe.execute()]
