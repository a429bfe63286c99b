"""Partitions' signals into `signals`, once each and in order (only with `STREAM_PARTITIONS` > 1).

A partition's apply script cannot add to `signals`, which lives in another slot (on a cluster,
often another node), so it adds them to the partition's outbox (shared/streams.py), in the order
the lane decided them. One detector replica at a time forwards an outbox: the holder of its lease
(`{signals}:fwd:lease:<outbox>`, in the slot of `signals`). It reads the outbox from its start,
and one script in the slot of `signals` checks that it still holds the lease, marks each entry
forwarded (SET NX `{signals}:fwd:<outbox>:<entry id>`) and adds its signal only when the mark was
new; then the forwarded entries are deleted from the outbox. A holder that dies between the two
leaves the entries in the outbox; the next holder finds their marks and adds nothing twice.

Why a lease and not a consumer group: two replicas reading consecutive batches of one outbox would
forward them in either order, and a retraction could then reach `signals` before the signal it
retracts. With the lease checked inside the forwarding script, only one replica's batch can go at
a time, so `signals` holds each lane's signals in the lane's order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Counter

from shared.backoff import Backoff
from shared.consumer import GroupHealth
from shared.errors import describe
from shared.redis_streams import DATA_FIELD, UNREACHABLE, dead_letter, entry_payload
from shared.streams import Streams

log = logging.getLogger(__name__)

FORWARDED = Counter(
    "betterbot_detector_signals_forwarded_total",
    "Signals forwarded from a partition's outbox to `signals`",
    ["outbox"],
)

# KEYS[1] = signals, KEYS[2] = the lease, then one mark per entry; ARGV[1] = MAXLEN ~, ARGV[2] =
# mark TTL (s), ARGV[3] = the caller's name, then the entries' `data`, in order. Returns how many
# were added, or -1 when the caller does not hold the lease (nothing done).
_FORWARD = """
if redis.call('GET', KEYS[2]) ~= ARGV[3] then return -1 end
local added = 0
for i = 3, #KEYS do
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', ARGV[2]) then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'data', ARGV[i + 1])
    added = added + 1
  end
end
return added
"""

# Take the lease when it is free, extend it when it is the caller's: 1 held, 0 someone else's.
_HOLD = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# A mark only has to outlive its entry in the outbox, deleted right after it is forwarded.
MARK_TTL_S = 86_400
LEASE_MS = 5_000


class Forwarder:
    """Forwards one outbox to `signals` while it holds the outbox's lease."""

    def __init__(
        self,
        client: aioredis.Redis,
        streams: Streams,
        outbox: str,
        *,
        owner: str,
        maxlen: int,
        batch: int = 500,
        block_ms: int = 100,
        lease_ms: int = LEASE_MS,
    ) -> None:
        self.client = client
        self.streams = streams
        self.outbox = outbox
        self.owner = owner
        self.maxlen = maxlen
        self.batch = batch
        self.block_ms = block_ms
        self.lease_ms = lease_ms
        self.health = GroupHealth()
        self._forward = client.register_script(_FORWARD)
        self._hold = client.register_script(_HOLD)
        self._release = client.register_script(_RELEASE)
        prefix = streams.forwarded_key_prefix()
        self._lease = f"{prefix}lease:{outbox}"
        self._marks = f"{prefix}{outbox}:"

    async def run(self, stop: asyncio.Event, drain_s: float = 10.0) -> None:
        """Forward while holding the lease, until `stop`; then empty the outbox once more (within
        `drain_s`) and give the lease up. Redis being away is waited out."""
        backoff = Backoff(0.1, 5.0)
        while not stop.is_set():
            try:
                if await self.hold():
                    await self.forward_once()
                else:
                    await _wait(stop, self.lease_ms / 3000)
            except UNREACHABLE as exc:
                self._down(exc)
                await _wait(stop, backoff.next_delay())
                continue
            except Exception as exc:
                # Redis out of memory, a refused command: said and retried, never the silent end
                # of this outbox's forwarding (its signals would wait there unseen).
                log.error("forward_failed", extra={"outbox": self.outbox, "error": describe(exc)})
                await _wait(stop, backoff.next_delay())
                continue
            backoff.reset()
            self._up()
        await self._drain(time.monotonic() + drain_s)

    async def hold(self) -> bool:
        """Take or extend the lease; False when another replica holds it."""
        return bool(await self._hold(keys=[self._lease], args=[self.owner, self.lease_ms]))

    async def forward_once(self, block_ms: int | None = None) -> int:
        """Forward what the outbox holds (waiting up to `block_ms` for something); how many
        entries left the outbox."""
        block = self.block_ms if block_ms is None else block_ms
        # BLOCK 0 would wait forever: no block at all then.
        reply: Any = await self.client.xread(
            {self.outbox: "0-0"}, count=self.batch, block=block or None
        )
        entries = [(eid.decode(), fields) for _, items in reply or [] for eid, fields in items]
        if not entries:
            return 0
        ready = [(eid, fields[DATA_FIELD]) for eid, fields in entries if DATA_FIELD in fields]
        if ready and await self.forward(ready) < 0:
            return 0  # the lease went to another replica meanwhile: it forwards them
        await self._dead_letter([(eid, f) for eid, f in entries if DATA_FIELD not in f])
        await self.client.xdel(self.outbox, *(eid for eid, _ in entries))
        FORWARDED.labels(self.outbox).inc(len(ready))
        return len(entries)

    async def forward(self, entries: Sequence[tuple[str, bytes]]) -> int:
        """Add each entry's signal to `signals` unless it was before; -1 without the lease."""
        keys = [self.streams.signals, self._lease, *(self._marks + eid for eid, _ in entries)]
        args: list[bytes | int | str] = [self.maxlen, MARK_TTL_S, self.owner]
        args += [data for _, data in entries]
        return int(await self._forward(keys=keys, args=args))

    async def _dead_letter(self, broken: Sequence[tuple[str, Any]]) -> None:
        # Only the apply script writes an outbox, always with `data`: anything else is kept.
        for entry_id, fields in broken:
            reason = f"outbox entry has no 'data' field (entry {entry_id} of {self.outbox})"
            await dead_letter(
                self.client,
                self.streams.signals_dead,
                entry_payload(fields),
                reason,
                origin="detector",
            )

    async def _drain(self, deadline: float) -> None:
        try:
            while time.monotonic() < deadline and await self.hold():
                if not await self.forward_once(block_ms=0):
                    break
            await self._release(keys=[self._lease], args=[self.owner])
        except Exception as exc:
            log.warning(
                "forward_drain_incomplete", extra={"outbox": self.outbox, "error": describe(exc)}
            )

    def _down(self, exc: BaseException) -> None:
        if self.health.redis_down_since is None:
            self.health.redis_down_since = time.time()
            log.warning(
                "forward_redis_unreachable", extra={"outbox": self.outbox, "error": describe(exc)}
            )

    def _up(self) -> None:
        self.health.redis_down_since = None


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
