"""One consumer-group runtime for every service that reads a stream in a group (detector, store,
webhooks): the plumbing around a handler, so the handler is one plain async function.

A handler takes a batch of entries `(entry id, fields)` and returns `Handled`: the ids it settled,
which the runtime acks, and those that failed, with why. What is not settled stays pending: it is
retried after `claim_min_idle_ms` (by this or any replica) and dead-lettered after `max_deliveries`
deliveries, with the last error recorded for it. A handler that raises settles nothing; its error
is recorded for every entry of the batch unless it is Redis being unreachable (nobody's fault).

The runtime owns, around that:
- reading batches (XREADGROUP `>`), acking what is settled, and keeping slow entries claimed: while
  a handler runs, its entries' idle time is reset (XCLAIM JUSTID, own entries only) every
  `claim_min_idle_ms / 3`, so another replica never reclaims work that is merely slow;
- reclaiming entries idle past `claim_min_idle_ms` (XAUTOCLAIM; the ids it reports as deleted,
  trimmed from the stream while pending, are counted, logged as errors and dead-lettered with their
  ids, their content being gone) and dead-lettering those delivered too often;
- riding out a Redis restart: a connection error is retried with backoff, and a group that vanished
  with a Redis that lost its data (NOGROUP) is created again; the service never exits for it;
- draining on stop: no new reads, the batch in flight finishes, what is still pending here is
  handled once more (bounded by `drain_s`), and the consumer leaves the group only when nothing is
  pending under its name, checked and done in one script (an entry delivered in between cannot be
  dropped with it).

Why not FastStream's subscriber (faststream 0.7.8, docs/operations.md): it retries a failed read
every 5 s but never re-creates a lost group, its reclaiming needs Redis 8.4 (`XREADGROUP ...
CLAIM`), and it has no dead-lettering by delivery count. FastStream declares the streams'
contract instead (`cli/docs_gen.py` generates the AsyncAPI document from a `RedisBroker`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge
from redis.exceptions import ResponseError

from shared.backoff import Backoff, retrying
from shared.errors import describe
from shared.redis_streams import (
    UNREACHABLE,
    calling,
    dead_letter,
    ensure_group,
    entry_payload,
    entry_position,
)
from shared.streams import slot_tag
from shared.tasks import cancel_and_wait

log = logging.getLogger(__name__)

Fields = Mapping[bytes, bytes]
Entry = tuple[str, Fields]


@dataclass(frozen=True)
class Handled:
    """What a handler did with a batch: the entries it settled (acked), and the ones that failed
    on their own, with why (kept pending, the reason recorded for their dead letter)."""

    settled: Sequence[str]
    failed: Mapping[str, str] = field(default_factory=dict)


Handler = Callable[[list[Entry]], Awaitable[Handled]]
# Writes the dead letter of an entry delivered too often: (entry, reason, deliveries).
DeadLetter = Callable[[Entry, str, int], Awaitable[None]]

# Redis unreachable (or restarting): retried, never a reason to exit or to blame an entry.
TRANSIENT = UNREACHABLE
ERROR_TEXT_MAX = 1000

READ = Counter(
    "betterbot_consumer_entries_read_total", "Entries read by a consumer group", ["group", "stream"]
)
ACKED = Counter("betterbot_consumer_entries_acked_total", "Entries settled", ["group", "stream"])
RECLAIMED = Counter(
    "betterbot_consumer_entries_reclaimed_total",
    "Entries taken over after idling past the claim bound (their consumer died or failed)",
    ["group", "stream"],
)
DELETED = Counter(
    "betterbot_consumer_entries_deleted_while_pending_total",
    "Pending entries XAUTOCLAIM reported as trimmed from the stream before they were settled",
    ["group", "stream"],
)
DEAD = Counter(
    "betterbot_consumer_entries_dead_lettered_total",
    "Entries dead-lettered after too many deliveries",
    ["group", "stream"],
)
FAILURES = Counter(
    "betterbot_consumer_handler_failures_total",
    "Batches whose handler raised (the entries stay pending)",
    ["group", "stream"],
)
REDIS_DOWN = Gauge(
    "betterbot_consumer_redis_unreachable", "1 while the group's reads fail", ["group", "stream"]
)

# Reset the idle time of entries this consumer still owns (XCLAIM JUSTID is not a delivery); an
# entry another consumer has meanwhile claimed is left alone.
_TOUCH = """
local touched = 0
for i = 3, #ARGV do
  local entry = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)[1]
  if entry and entry[2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    touched = touched + 1
  end
end
return touched
"""

# Leave the group only when nothing is pending here: checked and done in one step.
_LEAVE = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then
  return -1
end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""


def consumer_name() -> str:
    """A name no other process of any host takes: host, pid and a random part."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def errors_key(stream: str, group: str) -> str:
    """Hash entry id -> the last error of a failed attempt, in the stream's slot."""
    tag = slot_tag(stream)
    if tag == "{" + stream + "}":
        return tag + ":errors:" + group
    return f"{tag}:errors:{stream}:{group}"  # a stream with a tag of its own (an outbox)


@dataclass(frozen=True)
class GroupConfig:
    stream: str
    group: str
    consumer: str
    dead_stream: str
    # `origin` of the dead letters: the service's name.
    origin: str
    batch_size: int = 500
    block_ms: int = 1000
    claim_min_idle_ms: int = 30_000
    reclaim_every_s: float = 5.0
    max_deliveries: int = 5
    # Where a new group starts: "0" (the stream's whole history) or "$" (from now on).
    start_id: str = "0"
    drain_s: float = 10.0
    # Which setting bounds deliveries, named in the dead letter's reason.
    max_deliveries_setting: str = "MAX_DELIVERIES"
    # Batches handled at once. 1 keeps stream order (the detector, the store); more suits
    # independent entries whose handling waits on the network (webhook deliveries).
    max_in_flight: int = 1
    # Delete a settled entry from the stream with its ack, in one MULTI: for work queues, whose
    # length is then what is still owed.
    delete_on_settle: bool = False


@dataclass
class GroupHealth:
    redis_down_since: float | None = None
    in_flight: int = 0
    stopped: bool = False


class ConsumerGroup:
    """One consumer of one group on one stream, running `handler` on its batches."""

    def __init__(
        self,
        client: aioredis.Redis,
        config: GroupConfig,
        handler: Handler,
        *,
        can_reclaim: Callable[[], bool] = lambda: True,
        dead_letter: DeadLetter | None = None,
    ) -> None:
        self.client = client
        self.config = config
        self.handler = handler
        self.dead_letter = dead_letter or self._dead_letter_to_stream
        # False while the handler's own backend is away: claiming then would only hold entries.
        self.can_reclaim = can_reclaim
        self.health = GroupHealth()
        self._labels = (config.group, config.stream)
        self._log = {"group": config.group, "consumer": config.consumer}
        self._touch = client.register_script(_TOUCH)
        self._leave = client.register_script(_LEAVE)
        self._errors = errors_key(config.stream, config.group)
        self._stop = asyncio.Event()
        self._deadline = 0.0

    # --- running ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Read, handle and reclaim until `stop` is set (or `stop()` is called), then drain and
        leave the group. Returns only then; Redis being away is waited out, never raised."""
        watcher = asyncio.ensure_future(self._watch_stop(stop)) if stop is not None else None
        try:
            if not await self.join():
                return  # stopped while Redis was away: nothing was read
            reclaim = asyncio.create_task(self._reclaim_loop(), name=f"reclaim-{self.config.group}")
            try:
                await self._read_loop()
            finally:
                await cancel_and_wait(reclaim)
                await self._drain()
                await self._leave_group()
        finally:
            if watcher is not None:
                watcher.cancel()
            self.health.stopped = True

    def stop(self) -> None:
        self._stop.set()

    async def join(self, stop: asyncio.Event | None = None) -> bool:
        """Create the group unless it exists, waiting out a Redis outage; False when stopped
        (`stop` or `stop()`) before Redis answered."""
        watcher = asyncio.ensure_future(self._watch_stop(stop)) if stop is not None else None
        try:
            await self._redis_call(self.ensure_group)
        except TRANSIENT:
            return False
        finally:
            if watcher is not None:
                watcher.cancel()
        return True

    async def _watch_stop(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._stop.set()

    async def _read_loop(self) -> None:
        backoff = Backoff(0.1, 5.0)
        slots = asyncio.Semaphore(self.config.max_in_flight)
        handling: set[asyncio.Task[list[str]]] = set()
        while await self._free_slot(slots):
            try:
                batch = await self._redis_call(self.read_batch)
            except TRANSIENT:
                slots.release()
                break  # Stopping while Redis is away: nothing was read.
            except Exception as exc:
                # Not an outage (Redis out of memory, a command refused): said, retried, never
                # the end of the service.
                slots.release()
                log.error("read_failed", extra={**self._log, "error": describe(exc)})
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            if not batch:
                slots.release()
                continue
            task = asyncio.create_task(self.handle(batch))
            handling.add(task)
            task.add_done_callback(handling.discard)
            task.add_done_callback(lambda _: slots.release())
        self._deadline = time.monotonic() + self.config.drain_s
        if handling:
            # In flight at the stop: finished within the drain bound, else cancelled and left
            # pending (for a reclaimer, or this consumer's next start).
            _, late = await asyncio.wait(handling, timeout=self.config.drain_s)
            for task in late:
                await cancel_and_wait(task)

    async def _free_slot(self, slots: asyncio.Semaphore) -> bool:
        """Take a slot for the next batch; False once stopping (also while every slot is busy)."""
        if self._stop.is_set():
            return False
        slot = asyncio.ensure_future(slots.acquire())
        stopping = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait((slot, stopping), return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if slot.done() and not self._stop.is_set():
            return True
        if slot.done():
            slots.release()
        else:
            slot.cancel()
        return False

    async def read_batch(self) -> list[Entry]:
        """One XREADGROUP `>`; an empty list when nothing came within `block_ms`."""
        try:
            reply: Any = await self.client.xreadgroup(
                self.config.group,
                self.config.consumer,
                {self.config.stream: ">"},
                count=self.config.batch_size,
                block=self.config.block_ms,
            )
        except ResponseError as exc:
            # NOGROUP: no group to read from; UNBLOCKED: the stream was deleted under a blocked
            # read. Either way the group went away (a Redis that lost its data): make it again.
            if not str(exc).startswith(("NOGROUP", "UNBLOCKED")):
                raise
            log.warning("group_recreated", extra={"group": self.config.group})
            # From the stream's start whatever `start_id` says: it holds only what was written
            # since the loss, which no one has read.
            await ensure_group(self.client, self.config.stream, self.config.group, "0")
            return []
        entries = [(eid.decode(), f) for _, items in reply or [] for eid, f in items if f]
        READ.labels(*self._labels).inc(len(entries))
        return entries

    async def ensure_group(self) -> None:
        await ensure_group(self.client, self.config.stream, self.config.group, self.config.start_id)

    async def handle(self, batch: list[Entry]) -> list[str]:
        """Run the handler on the batch, keeping it claimed meanwhile; ack and return what it
        settled. A handler error is recorded for the batch's entries (they stay pending)."""
        ids = [entry_id for entry_id, _ in batch]
        self.health.in_flight += len(ids)
        keeper = asyncio.create_task(self._keep_claimed(ids), name="keep-claimed")
        try:
            handled = await self.handler(batch)
        except Exception as exc:
            FAILURES.labels(*self._labels).inc()
            log.warning(
                "batch_failed",
                extra={"group": self.config.group, "entries": len(ids), "error": describe(exc)},
            )
            if isinstance(exc, TRANSIENT):
                await asyncio.sleep(Backoff(0.1, 2.0).next_delay())
            else:
                errors = dict.fromkeys(ids, describe(exc))
                await self._redis_call(lambda: self.record_errors(errors))
            return []
        finally:
            await cancel_and_wait(keeper)
            self.health.in_flight -= len(ids)
        settled = list(handled.settled)
        await self._redis_call(lambda: self.ack(settled))
        if handled.failed:
            await self._redis_call(lambda: self.record_errors(handled.failed))
        return settled

    async def _keep_claimed(self, ids: Sequence[str]) -> None:
        every = self.config.claim_min_idle_ms / 3000
        while True:
            await asyncio.sleep(every)
            with contextlib.suppress(*TRANSIENT):
                await self.touch(ids)

    async def touch(self, ids: Sequence[str]) -> int:
        """Reset the idle time of those entries this consumer still owns."""
        if not ids:
            return 0
        keys = [self.config.stream]
        return int(
            await self._touch(keys=keys, args=[self.config.group, self.config.consumer, *ids])
        )

    async def ack(self, ids: Sequence[str]) -> None:
        if not ids:
            return
        async with self.client.pipeline(transaction=self.config.delete_on_settle) as pipe:
            pipe.xack(self.config.stream, self.config.group, *ids)
            if self.config.delete_on_settle:
                pipe.xdel(self.config.stream, *ids)
            pipe.hdel(self._errors, *ids)
            await pipe.execute()
        ACKED.labels(*self._labels).inc(len(ids))

    async def record_errors(self, errors: Mapping[str, str]) -> None:
        """Remember why each entry's attempt failed, for its dead letter if it fails too often."""
        if not errors:
            return
        texts: dict[Any, Any] = {
            eid: text[:ERROR_TEXT_MAX].encode() for eid, text in errors.items()
        }
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self._errors, mapping=texts)
            # Kept a day past the last failure: long enough for any retry, bounded if none comes.
            pipe.expire(self._errors, 86_400)
            await pipe.execute()

    # --- reclaiming ---------------------------------------------------------------------------

    async def _reclaim_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.reclaim_every_s)
            if not self.can_reclaim():
                continue
            try:
                await self.reclaim()
            except TRANSIENT:
                continue  # The read loop reports the outage.
            except Exception:
                log.exception("reclaim_failed", extra={"group": self.config.group})

    async def reclaim(self) -> int:
        """One pass over the group's pending list; returns how many entries were claimed."""
        cursor, total = "0-0", 0
        while not self._stop.is_set():
            reply: Any = await self.client.xautoclaim(
                self.config.stream,
                self.config.group,
                self.config.consumer,
                self.config.claim_min_idle_ms,
                start_id=cursor,
                count=self.config.batch_size,
            )
            cursor = reply[0].decode()
            deleted = reply[2] if len(reply) > 2 else []
            if deleted:
                await self._trimmed([entry_id.decode() for entry_id in deleted])
            # Redis 6.2 lists a trimmed entry as (id, None); 7 reports it in `deleted` instead.
            claimed = [(eid.decode(), f) for eid, f in reply[1] if f]
            if claimed:
                total += len(claimed)
                RECLAIMED.labels(*self._labels).inc(len(claimed))
                await self._handle_reclaimed(claimed)
            if cursor == "0-0":
                break
        return total

    async def _trimmed(self, ids: list[str]) -> None:
        """Pending entries trimmed away before they were settled (MAXLEN caught up with a slow or
        dead consumer): their content is gone, so the dead letter keeps their ids and why, for
        people to find what was lost (Redis has dropped them from the pending list already)."""
        DELETED.labels(*self._labels).inc(len(ids))
        log.error(
            "pending_entries_trimmed",
            extra={**self._log, "stream": self.config.stream, "count": len(ids), "ids": ids[:20]},
        )
        for entry_id in ids:
            reason = (
                f"trimmed from {self.config.stream} (MAXLEN) before group {self.config.group} "
                f"settled it; its content is lost (entry {entry_id}): raise STREAM_MAXLEN or "
                "add consumers"
            )
            payload = {b"trimmed_entry": entry_id.encode(), b"stream": self.config.stream.encode()}
            # Redis has dropped these ids from the pending list already: a dead letter not
            # written now is never written, so each waits out an outage instead of failing.
            await retrying(
                functools.partial(self.dead_letter, (entry_id, payload), reason, 0),
                transient=UNREACHABLE,
                backoff=Backoff(0.05, 5.0),
            )
        DEAD.labels(*self._labels).inc(len(ids))

    async def _handle_reclaimed(self, claimed: list[Entry]) -> None:
        counts = await self.deliveries([entry_id for entry_id, _ in claimed])
        worn = [e for e in claimed if counts.get(e[0], 1) > self.config.max_deliveries]
        if worn:
            await self._dead_letter(worn, counts)
        live = [e for e in claimed if counts.get(e[0], 1) <= self.config.max_deliveries]
        log.info(
            "entries_reclaimed",
            extra={"group": self.config.group, "count": len(claimed), "dead_lettered": len(worn)},
        )
        if live:
            await self.handle(live)

    async def deliveries(self, ids: Sequence[str]) -> dict[str, int]:
        """Delivery count of each entry pending here (the claim included)."""
        if not ids:
            return {}
        pending: Any = await self.client.xpending_range(
            self.config.stream,
            self.config.group,
            min=min(ids, key=entry_position),
            max=max(ids, key=entry_position),
            count=len(ids) + 1000,
            consumername=self.config.consumer,
        )
        wanted = set(ids)
        return {
            item["message_id"].decode(): int(item["times_delivered"])
            for item in pending
            if item["message_id"].decode() in wanted
        }

    async def _dead_letter(self, worn: list[Entry], counts: Mapping[str, int]) -> None:
        ids = [entry_id for entry_id, _ in worn]
        errors: list[Any] = await self.client.hmget(self._errors, ids)
        for entry, error in zip(worn, errors, strict=True):
            entry_id = entry[0]
            last = error.decode(errors="replace") if error else "none recorded (its consumer died)"
            reason = (
                f"delivered {counts[entry_id]} times ({self.config.max_deliveries_setting} "
                f"{self.config.max_deliveries}); last error: {last} (entry {entry_id})"
            )
            await self.dead_letter(entry, reason, counts[entry_id])
            log.warning("entry_dead_lettered", extra={"entry_id": entry_id, "reason": reason[:500]})
        DEAD.labels(*self._labels).inc(len(worn))
        await self.ack(ids)

    async def _dead_letter_to_stream(self, entry: Entry, reason: str, deliveries: int) -> None:
        await dead_letter(
            self.client,
            self.config.dead_stream,
            entry_payload(entry[1]),
            reason,
            origin=self.config.origin,
            deliveries=deliveries,
        )

    # --- stopping -----------------------------------------------------------------------------

    async def _drain(self) -> None:
        """Handle once more what is pending here (a read cut short by the stop delivered it)."""
        deadline = self._deadline
        after = "0"
        try:
            while time.monotonic() < deadline:
                reply: Any = await self.client.xreadgroup(
                    self.config.group,
                    self.config.consumer,
                    {self.config.stream: after},
                    count=self.config.batch_size,
                )
                items = [(eid.decode(), f) for _, entries in reply or [] for eid, f in entries]
                if not items:
                    return
                trimmed = [entry_id for entry_id, fields in items if not fields]
                await self.ack(trimmed)
                live = [(entry_id, fields) for entry_id, fields in items if fields]
                if live:
                    await self._handle_within(live, deadline - time.monotonic())
                # What is still unsettled stays pending for a reclaimer; read on past it.
                after = items[-1][0]
        except Exception as exc:
            log.warning(
                "drain_incomplete", extra={"group": self.config.group, "error": describe(exc)}
            )

    async def _handle_within(self, batch: list[Entry], within_s: float) -> None:
        """Handle the batch, or stop it for sure (`cancel_and_wait`) once `within_s` is up."""
        task = asyncio.ensure_future(self.handle(batch))
        await asyncio.wait([task], timeout=max(0.1, within_s))
        if not task.done():
            await cancel_and_wait(task)

    async def _leave_group(self) -> None:
        try:
            left = (
                int(
                    await self._leave(
                        keys=[self.config.stream], args=[self.config.group, self.config.consumer]
                    )
                )
                >= 0
            )
        except Exception as exc:
            log.warning(
                "leave_group_failed", extra={"group": self.config.group, "error": describe(exc)}
            )
            left = False
        log.info(
            "group_left" if left else "group_kept",
            extra={"group": self.config.group, "consumer": self.config.consumer},
        )

    # --- Redis outages ------------------------------------------------------------------------

    async def _redis_call(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """Run `call`, waiting out Redis outages with backoff; the outage shows in health."""
        backoff = Backoff(0.1, 5.0)
        while True:
            try:
                result = await calling(call)
            except TRANSIENT as exc:
                if self.health.redis_down_since is None:
                    self.health.redis_down_since = time.time()
                    REDIS_DOWN.labels(*self._labels).set(1)
                    log.warning(
                        "redis_unreachable",
                        extra={"group": self.config.group, "error": describe(exc)},
                    )
                if self._stop.is_set():
                    raise
                await asyncio.sleep(backoff.next_delay())
                continue
            if self.health.redis_down_since is not None:
                log.info(
                    "redis_back",
                    extra={
                        "group": self.config.group,
                        "down_s": round(time.time() - self.health.redis_down_since, 1),
                    },
                )
                self.health.redis_down_since = None
                REDIS_DOWN.labels(*self._labels).set(0)
            return result
