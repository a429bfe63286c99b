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

A replica that dies between a read and its hand-off leaves the entry pending; every replica takes
over entries idle longer than `WEBHOOK_CLAIM_IDLE_MS` (XAUTOCLAIM) and hands them off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from services.notifier.fanout import Backoff, reader_connection, rejection_reason
from services.notifier.metrics import WEBHOOK_SKIPPED
from services.notifier.webhooks.config import Webhook
from services.notifier.webhooks.dead import DeadLetters, until_done
from shared.models import Signal
from shared.redis_streams import DATA_FIELD, decode, ensure_group
from shared.streams import WEBHOOKS_GROUP, Streams

log = logging.getLogger(__name__)

HANDOFF_BATCH = 100
Fields = dict[bytes, bytes]

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
    def __init__(
        self,
        redis: aioredis.Redis,
        redis_url: str,
        stream: str,
        routes: Sequence[Route],
        dead: DeadLetters,
        *,
        consumer: str,
        block_ms: int,
        claim_idle_ms: int,
    ) -> None:
        self.consumer = consumer
        self.redis = redis
        self._url = redis_url
        self._stream = stream
        self._routes = tuple(routes)
        self._dead = dead
        self._block_ms = block_ms
        self._claim_idle_ms = claim_idle_ms
        self._script = redis.register_script(_HAND_OFF)
        self._claim_cursor = "0-0"
        # Set once the group exists: signals published from then on reach the endpoints.
        self.ready = asyncio.Event()
        self.status = "starting"

    async def run(self, stop: asyncio.Event, grace_s: float) -> None:
        """Hand off until `stop` is set; then, within `grace_s`, what this replica still holds."""
        reader = reader_connection(
            self._url, self._stream, self._block_ms, role=f"betterbot-webhooks-{self.consumer}"
        )
        reading = asyncio.ensure_future(self._read_loop(reader))
        reclaiming = asyncio.ensure_future(self._reclaim_loop())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait((reading, stopping), return_when=asyncio.FIRST_COMPLETED)
            if reading.done():
                reading.result()
        finally:
            await _cancel(reading, reclaiming, stopping)
            with contextlib.suppress(RedisError, OSError):
                await reader.aclose()
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await asyncio.wait_for(self._finish(), grace_s)
            self.status = "stopped"

    async def _read_loop(self, reader: aioredis.Redis) -> None:
        backoff = Backoff()
        while True:
            try:
                if not self.ready.is_set():
                    await self._join()
                response: Any = await reader.xreadgroup(
                    WEBHOOKS_GROUP,
                    self.consumer,
                    {self._stream: ">"},
                    count=HANDOFF_BATCH,
                    block=self._block_ms,
                )
            except (RedisError, OSError) as exc:
                if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                    # The stream or group was deleted under us: create it again.
                    self.ready.clear()
                self.status = "retrying"
                delay = backoff.next()
                log.warning(
                    "webhooks_read_failed",
                    extra={"error": f"{type(exc).__name__}: {exc}", "retry_in_s": delay},
                )
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            self.status = "reading"
            await self._hand_off_all(response)

    async def _join(self) -> None:
        await ensure_group(self.redis, self._stream, WEBHOOKS_GROUP, start="$")
        self.ready.set()
        log.info(
            "webhooks_group_joined",
            extra={
                "stream": self._stream,
                "consumer": self.consumer,
                "endpoints": [route.hook.name for route in self._routes],
            },
        )

    async def _hand_off_all(self, response: Any) -> None:
        # RESP2 shape, one stream asked: [[name, [(id, fields), ...]]], or empty on timeout.
        for entry_id, fields in response[0][1] if response else ():
            await self._hand_off(entry_id.decode(), fields)

    async def _hand_off(self, entry_id: str, fields: Fields | None) -> None:
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
            wanted = [route for route in self._routes if route.hook.filters.matches(signal)]
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

    # Taking over a dead replica's entries.

    async def _reclaim_loop(self) -> None:
        period = self._claim_idle_ms / 3000
        while True:
            await asyncio.sleep(period)
            if not self.ready.is_set():
                continue
            try:
                await self._reclaim()
            except (RedisError, OSError) as exc:
                log.warning("webhooks_claim_failed", extra={"error": f"{type(exc).__name__}"})
            except Exception:
                # A bug here must not end the loop: a dead replica's entries would wait for good.
                log.exception("webhooks_claim_crashed")

    async def _reclaim(self) -> None:
        reply: Any = await self.redis.xautoclaim(
            self._stream,
            WEBHOOKS_GROUP,
            self.consumer,
            min_idle_time=self._claim_idle_ms,
            start_id=self._claim_cursor,
            count=HANDOFF_BATCH,
        )
        next_id, claimed = reply[0], reply[1]
        self._claim_cursor = next_id.decode() if isinstance(next_id, bytes) else str(next_id)
        # Redis 7 lists entries trimmed from the stream apart (and drops them from the pending
        # list); older servers give (None, None) for them.
        entries = [(entry_id.decode(), fields) for entry_id, fields in claimed if entry_id]
        if entries:
            log.info("webhook_entries_reclaimed", extra={"count": len(entries)})
        for entry_id, fields in entries:
            await self._hand_off(entry_id, fields)

    # Shutdown.

    async def _finish(self) -> None:
        """Hand off what a cancelled read or hand-off left pending here, then leave the group."""
        if not self.ready.is_set():
            return
        while True:
            response: Any = await self.redis.xreadgroup(
                WEBHOOKS_GROUP, self.consumer, {self._stream: "0"}, count=HANDOFF_BATCH
            )
            if not response or not response[0][1]:
                break
            await self._hand_off_all(response)
        await self.redis.xgroup_delconsumer(self._stream, WEBHOOKS_GROUP, self.consumer)


async def _cancel(*tasks: asyncio.Future[Any]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
