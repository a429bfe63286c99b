"""The Redis side of webhooks: consumer group `webhooks` on `signals`.

Every replica joins the group under a name of its own, so each entry goes to exactly one replica,
which delivers it to every endpoint whose filters match (in parallel, each with its retries) and
acks it only once every endpoint has a final outcome: delivered, or dead-lettered on
`webhooks.dead`. Up to `WEBHOOK_CONCURRENCY` entries are in delivery at once, so one slow endpoint
does not hold the others up; as a consequence an endpoint may receive signals out of stream order
(each carries its stream id and times).

The group is created at the stream's end (`$`) the first time any replica starts: endpoints get
the signals from then on, not the stream's whole history. From then on the group keeps its place,
so signals published while every replica was down are delivered when one comes back (as long as
the stream still holds them).

A replica that dies leaves its entries pending. Each replica, every `WEBHOOK_CLAIM_IDLE_MS / 3`:
- touches its own in-flight entries (XCLAIM ... JUSTID resets their idle time), so a delivery
  that is merely slow (retries, backoff) is never taken from a live replica;
- takes over (XAUTOCLAIM) entries idle longer than `WEBHOOK_CLAIM_IDLE_MS`: their owner stopped.
An entry claimed more than `WEBHOOK_MAX_DELIVERIES` times (replicas keep dying on it) is
dead-lettered for its endpoints instead of being tried again.

An endpoint may see a signal twice when a replica dies between an endpoint's 2xx and the ack (the
new owner delivers to every matching endpoint again): the `Idempotency-Key` header (the
`signal_id`) lets receivers drop the repeat. Works on Redis 7.0 (no XREADGROUP CLAIM needed).

A `webhooks.dead` entry: `raw` (the signal's JSON as on `signals`), `reason`, `origin`
(`notifier`), `deliveries` (POST attempts made), `at`, plus `webhook` (the endpoint's name),
`signal_id` and `entry_id` (its id on `signals`), so it can be inspected and replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import httpx
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from services.notifier.fanout import Backoff, reader_connection, rejection_reason
from services.notifier.metrics import (
    WEBHOOK_IN_FLIGHT,
    WEBHOOK_LATENCY,
    WEBHOOK_OUTCOMES,
    WEBHOOK_RECLAIMED,
    WEBHOOK_SKIPPED,
)
from services.notifier.webhooks.config import Webhook
from services.notifier.webhooks.delivery import RetryPolicy, deliver
from services.notifier.webhooks.presets import render
from shared.models import Signal
from shared.redis_streams import DATA_FIELD, connect, decode, ensure_group
from shared.streams import WEBHOOKS_GROUP, Streams

log = logging.getLogger(__name__)

DEAD_MAXLEN = 100_000
_T = TypeVar("_T")
Fields = Mapping[bytes, bytes]


class WebhookConsumer:
    def __init__(
        self,
        redis_url: str,
        streams: Streams,
        hooks: Sequence[Webhook],
        http: httpx.AsyncClient,
        policy: RetryPolicy,
        *,
        consumer: str,
        concurrency: int,
        block_ms: int,
        claim_idle_ms: int,
        max_deliveries: int,
    ) -> None:
        self.consumer = consumer
        self.hooks = tuple(hooks)
        self._url = redis_url
        self._stream = streams.signals
        self._dead = streams.webhooks_dead
        self._http = http
        self._policy = policy
        self._concurrency = concurrency
        self._block_ms = block_ms
        self._claim_idle_ms = claim_idle_ms
        self._max_deliveries = max_deliveries
        # Short commands (ack, dead letters, claims); the blocking reader has its own connection.
        self.redis = connect(redis_url)
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._slot_free = asyncio.Event()
        self._slot_free.set()
        self._claim_cursor = "0-0"
        # Set once the group exists: signals published from then on reach the endpoints.
        self.ready = asyncio.Event()
        self.status = "starting"
        # Entries this replica brought to an outcome and acked.
        self.settled = 0

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def run(self, stop: asyncio.Event, grace_s: float) -> None:
        """Deliver until `stop` is set; then finish in-flight work for up to `grace_s` and return.

        Entries still unfinished then stay pending, for another replica to reclaim.
        """
        reader = reader_connection(
            self._url, self._stream, self._block_ms, role=f"betterbot-webhooks-{self.consumer}"
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
                await self.redis.aclose()

    # Reading new entries.

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
                    await ensure_group(self.redis, self._stream, WEBHOOKS_GROUP, start="$")
                    self.ready.set()
                    log.info(
                        "webhooks_group_joined",
                        extra={
                            "stream": self._stream,
                            "consumer": self.consumer,
                            "endpoints": [hook.name for hook in self.hooks],
                        },
                    )
                entries = await self._read(reader, free)
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
            for entry_id, fields in entries:
                self._start(entry_id, fields, deliveries=1)

    async def _read(self, reader: aioredis.Redis, count: int) -> list[tuple[str, Fields]]:
        response: Any = await reader.xreadgroup(
            WEBHOOKS_GROUP, self.consumer, {self._stream: ">"}, count=count, block=self._block_ms
        )
        # RESP2 shape, one stream asked: [[name, [(id, fields), ...]]], or empty on timeout.
        items = response[0][1] if response else []
        return [(entry_id.decode(), fields) for entry_id, fields in items]

    # One entry: deliver to every matching endpoint, then ack.

    def _start(self, entry_id: str, fields: Fields | None, deliveries: int) -> None:
        task = asyncio.ensure_future(self._handle(entry_id, fields, deliveries))
        self._in_flight[entry_id] = task
        WEBHOOK_IN_FLIGHT.inc()
        if len(self._in_flight) >= self._concurrency:
            self._slot_free.clear()
        task.add_done_callback(lambda done: self._finished(entry_id, done))

    def _finished(self, entry_id: str, task: asyncio.Task[None]) -> None:
        if self._in_flight.get(entry_id) is task:
            del self._in_flight[entry_id]
            WEBHOOK_IN_FLIGHT.dec()
        if len(self._in_flight) < self._concurrency:
            self._slot_free.set()
        if not task.cancelled() and task.exception() is not None:
            # Left pending on purpose: it is reclaimed and, if it keeps failing, dead-lettered.
            log.error(
                "webhook_entry_failed", exc_info=task.exception(), extra={"entry_id": entry_id}
            )

    async def _handle(self, entry_id: str, fields: Fields | None, deliveries: int) -> None:
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
            await self._settle(entry_id)
            return
        data = fields[DATA_FIELD]
        hooks = [hook for hook in self.hooks if hook.filters.matches(signal)]
        if deliveries > self._max_deliveries:
            reason = (
                f"claimed {deliveries} times without an outcome "
                "(the replicas delivering it stopped)"
            )
            for hook in hooks:
                await self._dead_letter(hook, entry_id, signal, data, reason, attempts=0)
        else:
            await asyncio.gather(*(self._deliver(hook, entry_id, signal, data) for hook in hooks))
        await self._settle(entry_id)

    async def _deliver(self, hook: Webhook, entry_id: str, signal: Signal, data: bytes) -> None:
        body = render(hook.preset, entry_id, signal, data)
        outcome = await deliver(self._http, hook, body, signal.signal_id, self._policy)
        if outcome.delivered:
            WEBHOOK_OUTCOMES.labels(hook.name, "delivered").inc()
            WEBHOOK_LATENCY.observe(time.time() - signal.received_at)
            return
        await self._dead_letter(hook, entry_id, signal, data, outcome.reason, outcome.attempts)

    async def _dead_letter(
        self,
        hook: Webhook,
        entry_id: str,
        signal: Signal,
        data: bytes,
        reason: str,
        attempts: int,
    ) -> None:
        WEBHOOK_OUTCOMES.labels(hook.name, "dead").inc()
        log.warning(
            "webhook_dead_lettered",
            extra={
                "webhook": hook.name,
                "signal_id": signal.signal_id,
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
            b"signal_id": signal.signal_id.encode(),
            b"entry_id": entry_id.encode(),
        }
        await self._until_done(
            lambda: self.redis.xadd(
                self._dead, cast(Any, fields), maxlen=DEAD_MAXLEN, approximate=True
            )
        )

    async def _settle(self, entry_id: str) -> None:
        await self._until_done(lambda: self.redis.xack(self._stream, WEBHOOKS_GROUP, entry_id))
        self.settled += 1

    async def _until_done(self, command: Callable[[], Awaitable[_T]]) -> _T:
        """Run a Redis command until it succeeds: the outcome is known, only Redis is away."""
        backoff = Backoff()
        while True:
            try:
                return await command()
            except (RedisError, OSError) as exc:
                delay = backoff.next()
                log.warning(
                    "webhooks_write_failed",
                    extra={"error": f"{type(exc).__name__}: {exc}", "retry_in_s": delay},
                )
                await asyncio.sleep(delay)

    # Keeping own entries, taking over a dead replica's.

    async def _maintain(self) -> None:
        period = self._claim_idle_ms / 3000
        while True:
            await asyncio.sleep(period)
            if not self.ready.is_set():
                continue
            try:
                await self._touch()
                await self._reclaim()
            except (RedisError, OSError) as exc:
                log.warning("webhooks_claim_failed", extra={"error": f"{type(exc).__name__}"})
            except Exception:
                # A bug here must not end the heartbeat: other replicas would take over our work.
                log.exception("webhooks_claim_crashed")

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
                self._stream,
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
                log.info("webhook_entry_taken_over", extra={"entry_id": entry_id})
                task.cancel()

    async def _reclaim(self) -> None:
        free = self._concurrency - len(self._in_flight)
        if free <= 0:
            return
        reply: Any = await self.redis.xautoclaim(
            self._stream,
            WEBHOOKS_GROUP,
            self.consumer,
            min_idle_time=self._claim_idle_ms,
            start_id=self._claim_cursor,
            count=free,
        )
        next_id, claimed = reply[0], reply[1]
        self._claim_cursor = next_id.decode() if isinstance(next_id, bytes) else str(next_id)
        # Redis 7 drops entries trimmed from the stream from the pending list and lists them apart.
        entries = [
            (entry_id.decode(), fields)
            for entry_id, fields in claimed
            if fields and entry_id.decode() not in self._in_flight
        ]
        if not entries:
            return
        owners = await self._pending([entry_id for entry_id, _ in entries])
        log.info("webhook_entries_reclaimed", extra={"count": len(entries)})
        WEBHOOK_RECLAIMED.inc(len(entries))
        for entry_id, fields in entries:
            self._start(entry_id, fields, deliveries=owners.get(entry_id, ("", 1))[1])

    async def _pending(self, ids: Sequence[str]) -> dict[str, tuple[str, int]]:
        """Owner and delivery count of each entry still pending (absent when not)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id in ids:
                pipe.xpending_range(
                    self._stream, WEBHOOKS_GROUP, min=entry_id, max=entry_id, count=1
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
            log.warning("webhooks_left_pending", extra={"count": left})
            return
        with contextlib.suppress(RedisError, OSError):
            summary: Any = await self.redis.xpending(self._stream, WEBHOOKS_GROUP)
            holders = {c["name"].decode() for c in summary.get("consumers") or ()}
            if self.consumer not in holders:
                await self.redis.xgroup_delconsumer(self._stream, WEBHOOKS_GROUP, self.consumer)

    async def _adopt_own_pending(self) -> None:
        if not self.ready.is_set():
            return
        response: Any = await self.redis.xreadgroup(
            WEBHOOKS_GROUP, self.consumer, {self._stream: "0"}, count=self._concurrency
        )
        items = response[0][1] if response else []
        for raw_id, fields in items:
            entry_id = raw_id.decode()
            if entry_id not in self._in_flight:
                self._start(entry_id, fields, deliveries=1)


async def _cancel(*tasks: asyncio.Future[Any]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
