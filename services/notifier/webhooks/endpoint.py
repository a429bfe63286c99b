"""One endpoint's queue: consumer group `webhooks` on `{signals}:webhook:<name>`.

The hand-off (see `handoff`) appends each signal meant for the endpoint to its queue. Every replica
joins the queue's group under its own name, so each queued signal goes to one replica at a time,
which POSTs it (with its retries, see `delivery`) and, on the final outcome (delivered, or
dead-lettered on `webhooks.dead`), acks and deletes it from the queue in one MULTI. The queue thus
holds exactly the signals this endpoint still owes: its length is the endpoint's backlog
(`betterbot_notifier_webhook_backlog{webhook}`). Up to `WEBHOOK_CONCURRENCY` signals are in
delivery at once per endpoint and replica, so the endpoint may receive signals out of stream order
(each carries its stream id and times). Nothing here waits on any other endpoint.

The queue's group starts at its beginning (`0`): whatever is queued is delivered, including what
was queued while no replica ran, and a queue or group deleted by hand is recreated the same way.

A replica that dies leaves its entries pending. Each replica, every `WEBHOOK_CLAIM_IDLE_MS / 3`:
- touches its own in-flight entries (XCLAIM ... JUSTID resets their idle time), so a delivery
  that is merely slow (retries, backoff) is never taken from a live replica;
- takes over (XAUTOCLAIM) entries idle longer than `WEBHOOK_CLAIM_IDLE_MS`: their owner stopped.
An entry claimed more than `WEBHOOK_MAX_DELIVERIES` times (replicas keep dying on it) is
dead-lettered instead of being tried again.

Delivery is at least once: the endpoint sees a signal again when a replica dies between the 2xx
and the ack (the new owner delivers it again), or when a response is lost and the POST retried.
Every request carries the signal's `signal_id` in `Idempotency-Key` for receivers to deduplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any, cast

import httpx
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from services.notifier.fanout import Backoff, reader_connection
from services.notifier.metrics import (
    WEBHOOK_BACKLOG,
    WEBHOOK_IN_FLIGHT,
    WEBHOOK_LATENCY,
    WEBHOOK_OUTCOMES,
    WEBHOOK_RECLAIMED,
)
from services.notifier.webhooks.dead import DeadLetters, until_done
from services.notifier.webhooks.delivery import RetryPolicy, deliver
from services.notifier.webhooks.handoff import Route
from services.notifier.webhooks.presets import render
from shared.models import Signal
from shared.redis_streams import DATA_FIELD, decode, ensure_group
from shared.streams import WEBHOOKS_GROUP

log = logging.getLogger(__name__)

Fields = dict[bytes, bytes]


class EndpointWorker:
    def __init__(
        self,
        redis: aioredis.Redis,
        redis_url: str,
        route: Route,
        http: httpx.AsyncClient,
        policy: RetryPolicy,
        dead: DeadLetters,
        *,
        consumer: str,
        concurrency: int,
        block_ms: int,
        claim_idle_ms: int,
        max_deliveries: int,
    ) -> None:
        self.consumer = consumer
        self.hook = route.hook
        self.redis = redis
        self._url = redis_url
        self._queue = route.queue
        self._http = http
        self._policy = policy
        self._dead = dead
        self._concurrency = concurrency
        self._block_ms = block_ms
        self._claim_idle_ms = claim_idle_ms
        self._max_deliveries = max_deliveries
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._slot_free = asyncio.Event()
        self._slot_free.set()
        self._claim_cursor = "0-0"
        self._in_flight_gauge = WEBHOOK_IN_FLIGHT.labels(self.hook.name)
        # Set once the queue's group exists.
        self.ready = asyncio.Event()
        self.status = "starting"
        # Queued signals this replica brought to an outcome.
        self.settled = 0

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def run(self, stop: asyncio.Event, grace_s: float) -> None:
        """Deliver until `stop` is set; then finish in-flight work for up to `grace_s` and return.

        Entries still unfinished then stay pending, for another replica (or the next start) to
        reclaim.
        """
        reader = reader_connection(
            self._url, self._queue, self._block_ms, role=f"betterbot-webhook-{self.consumer}"
        )
        maintenance = asyncio.ensure_future(self._maintain())
        reading = asyncio.ensure_future(self._read_loop(reader))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait((reading, stopping), return_when=asyncio.FIRST_COMPLETED)
            if reading.done():
                reading.result()
        finally:
            await _cancel(reading, stopping)
            with contextlib.suppress(RedisError, OSError):
                await reader.aclose()
            try:
                await self._finish(grace_s)
            finally:
                await _cancel(maintenance, *self._in_flight.values())
                self.status = "stopped"

    # Reading the queue.

    async def _read_loop(self, reader: aioredis.Redis) -> None:
        backoff = Backoff()
        while True:
            await self._slot_free.wait()
            free = self._concurrency - len(self._in_flight)
            if free <= 0:
                # Reclaimed entries took the slots meanwhile.
                self._slot_free.clear()
                continue
            try:
                if not self.ready.is_set():
                    await ensure_group(self.redis, self._queue, WEBHOOKS_GROUP, start="0")
                    self.ready.set()
                entries = await self._read(reader, free)
            except (RedisError, OSError) as exc:
                if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                    self.ready.clear()
                self.status = "retrying"
                delay = backoff.next()
                log.warning(
                    "webhook_queue_read_failed",
                    extra={
                        "webhook": self.hook.name,
                        "error": f"{type(exc).__name__}: {exc}",
                        "retry_in_s": delay,
                    },
                )
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            self.status = "reading"
            for entry_id, fields in entries:
                self._start(entry_id, fields, deliveries=1)

    async def _read(self, reader: aioredis.Redis, count: int) -> list[tuple[str, Fields]]:
        response: Any = await reader.xreadgroup(
            WEBHOOKS_GROUP, self.consumer, {self._queue: ">"}, count=count, block=self._block_ms
        )
        items = response[0][1] if response else []
        return [(entry_id.decode(), fields) for entry_id, fields in items]

    # One queued signal: deliver, then ack and delete.

    def _start(self, entry_id: str, fields: Fields | None, deliveries: int) -> None:
        task = asyncio.ensure_future(self._handle(entry_id, fields, deliveries))
        self._in_flight[entry_id] = task
        self._in_flight_gauge.inc()
        if len(self._in_flight) >= self._concurrency:
            self._slot_free.clear()
        task.add_done_callback(lambda done: self._finished(entry_id, done))

    def _finished(self, entry_id: str, task: asyncio.Task[None]) -> None:
        if self._in_flight.get(entry_id) is task:
            del self._in_flight[entry_id]
            self._in_flight_gauge.dec()
        if len(self._in_flight) < self._concurrency:
            self._slot_free.set()
        if not task.cancelled() and task.exception() is not None:
            # Left pending on purpose: it is reclaimed and, if it keeps failing, dead-lettered.
            log.error(
                "webhook_entry_failed",
                exc_info=task.exception(),
                extra={"webhook": self.hook.name, "queue_id": entry_id},
            )

    async def _handle(self, queue_id: str, fields: Fields | None, deliveries: int) -> None:
        try:
            entry_id, data, signal = _queued(fields)
        except ValueError as exc:
            # Only the hand-off writes here, and only Signals: a stray entry is dropped.
            log.warning(
                "webhook_queue_entry_skipped",
                extra={"webhook": self.hook.name, "queue_id": queue_id, "reason": str(exc)[:300]},
            )
        else:
            if deliveries > self._max_deliveries:
                reason = (
                    f"claimed {deliveries} times without an outcome "
                    "(the replicas delivering it stopped)"
                )
                await self._dead.add(self.hook, entry_id, signal.signal_id, data, reason, 0)
            else:
                await self._deliver(entry_id, signal, data)
        await until_done(lambda: self._settle(queue_id))
        self.settled += 1

    async def _deliver(self, entry_id: str, signal: Signal, data: bytes) -> None:
        body = render(self.hook.preset, entry_id, signal, data)
        outcome = await deliver(self._http, self.hook, body, signal.signal_id, self._policy)
        if outcome.delivered:
            WEBHOOK_OUTCOMES.labels(self.hook.name, "delivered").inc()
            WEBHOOK_LATENCY.observe(time.time() - signal.received_at)
            return
        await self._dead.add(
            self.hook, entry_id, signal.signal_id, data, outcome.reason, outcome.attempts
        )

    async def _settle(self, queue_id: str) -> None:
        # Acked and gone together: the queue holds exactly what the endpoint still owes.
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self._queue, WEBHOOKS_GROUP, queue_id)
            pipe.xdel(self._queue, queue_id)
            await pipe.execute()

    # Keeping own entries, taking over a dead replica's.

    async def _maintain(self) -> None:
        period = self._claim_idle_ms / 3000
        while True:
            await asyncio.sleep(period)
            if not self.ready.is_set():
                continue
            try:
                WEBHOOK_BACKLOG.labels(self.hook.name).set(await self.redis.xlen(self._queue))
                await self._touch()
                await self._reclaim()
            except (RedisError, OSError) as exc:
                log.warning(
                    "webhooks_claim_failed",
                    extra={"webhook": self.hook.name, "error": f"{type(exc).__name__}"},
                )
            except Exception:
                # A bug here must not end the heartbeat: other replicas would take over our work.
                log.exception("webhooks_claim_crashed", extra={"webhook": self.hook.name})

    async def _touch(self) -> None:
        """Reset the idle time of the entries in delivery here; let go of any taken over."""
        ids = list(self._in_flight)
        if not ids:
            return
        owners = await self._pending(ids)
        mine = [
            entry_id
            for entry_id in ids
            if entry_id in owners and owners[entry_id][0] == self.consumer
        ]
        if mine:
            await self.redis.xclaim(
                self._queue,
                WEBHOOKS_GROUP,
                self.consumer,
                min_idle_time=0,
                message_ids=cast(Any, mine),
                justid=True,
            )
        for entry_id in set(ids) - set(mine):
            task = self._in_flight.get(entry_id)
            if task is not None and entry_id in owners:
                # Another replica took it over (this one stalled): it delivers, this one stops.
                log.info(
                    "webhook_entry_taken_over",
                    extra={"webhook": self.hook.name, "queue_id": entry_id},
                )
                task.cancel()

    async def _reclaim(self) -> None:
        free = self._concurrency - len(self._in_flight)
        if free <= 0:
            return
        reply: Any = await self.redis.xautoclaim(
            self._queue,
            WEBHOOKS_GROUP,
            self.consumer,
            min_idle_time=self._claim_idle_ms,
            start_id=self._claim_cursor,
            count=free,
        )
        next_id, claimed = reply[0], reply[1]
        self._claim_cursor = next_id.decode() if isinstance(next_id, bytes) else str(next_id)
        entries = [
            (entry_id.decode(), fields)
            for entry_id, fields in claimed
            if fields and entry_id.decode() not in self._in_flight
        ]
        if not entries:
            return
        owners = await self._pending([entry_id for entry_id, _ in entries])
        log.info(
            "webhook_entries_reclaimed", extra={"webhook": self.hook.name, "count": len(entries)}
        )
        WEBHOOK_RECLAIMED.labels(self.hook.name).inc(len(entries))
        for entry_id, fields in entries:
            self._start(entry_id, fields, deliveries=owners.get(entry_id, ("", 1))[1])

    async def _pending(self, ids: Sequence[str]) -> dict[str, tuple[str, int]]:
        """Owner and delivery count of each entry still pending (absent when not)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id in ids:
                pipe.xpending_range(
                    self._queue, WEBHOOKS_GROUP, min=entry_id, max=entry_id, count=1
                )
            replies = await pipe.execute()
        return {
            reply[0]["message_id"].decode(): (
                reply[0]["consumer"].decode(),
                int(reply[0]["times_delivered"]),
            )
            for reply in replies
            if reply
        }

    # Shutdown.

    async def _finish(self, grace_s: float) -> None:
        """Adopt entries a cancelled read delivered, give in-flight work `grace_s`, leave."""
        with contextlib.suppress(RedisError, OSError):
            await self._adopt_own_pending()
        if self._in_flight:
            await asyncio.wait(tuple(self._in_flight.values()), timeout=grace_s)
        left = len(self._in_flight)
        await _cancel(*self._in_flight.values())
        if left:
            log.warning("webhooks_left_pending", extra={"webhook": self.hook.name, "count": left})
            return
        with contextlib.suppress(RedisError, OSError):
            summary: Any = await self.redis.xpending(self._queue, WEBHOOKS_GROUP)
            holders = {c["name"].decode() for c in summary.get("consumers") or ()}
            if self.consumer not in holders:
                await self.redis.xgroup_delconsumer(self._queue, WEBHOOKS_GROUP, self.consumer)

    async def _adopt_own_pending(self) -> None:
        if not self.ready.is_set():
            return
        response: Any = await self.redis.xreadgroup(
            WEBHOOKS_GROUP, self.consumer, {self._queue: "0"}, count=self._concurrency
        )
        items = response[0][1] if response else []
        for raw_id, fields in items:
            entry_id = raw_id.decode()
            if entry_id not in self._in_flight:
                self._start(entry_id, fields, deliveries=1)


def _queued(fields: Fields | None) -> tuple[str, bytes, Signal]:
    """The signal's id on `signals`, its JSON, and the Signal, of a queue entry."""
    if not fields or DATA_FIELD not in fields or b"entry_id" not in fields:
        raise ValueError("not a queued signal (deleted, or written by something else)")
    return fields[b"entry_id"].decode(), fields[DATA_FIELD], Signal.model_validate(decode(fields))


async def _cancel(*tasks: asyncio.Future[Any]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
