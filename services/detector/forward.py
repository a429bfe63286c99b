"""Lanes' signals into `signals`, once each and in order (partitions, or any lane on a cluster).

A lane's apply script cannot add to `signals`, which lives in another slot (on a cluster, often
another node), so it adds them to the lane's outbox (shared/streams.py), in the order the lane
decided them. One detector replica at a time forwards an outbox: the holder of its lease
(`{signals}:fwd:lease:<outbox>`, in the slot of `signals`). It reads the outbox after the id of
the last entry forwarded, kept beside `signals` (`{signals}:fwd:last:<outbox>`), and one script
there checks the lease and that this id is still the one it read from, adds the batch's signals
and moves the id past them: exactly once, since the id moves with the signals in one step.

Why a lease and not a consumer group: two replicas reading consecutive batches of one outbox
would forward them in either order, and a retraction could reach `signals` before the signal it
retracts. Why a moving id and not deleting what was forwarded: on a cluster, a failover of the
node of `signals` can lose the last writes it acknowledged, signals and id together; the id then
stands where the surviving signals end, the next batch finds it behind the one it read from, and
the forwarder reads again from there. So forwarded entries stay in the outbox for
`RETAIN_S`, far longer than a replica lags, and are trimmed after. The other way round, a
failover of the lane's node can lose a decision whose signal was forwarded already; the fill comes
back (the ingestor's re-backfill), is decided again, and its signal would go out twice: each
signal's status on `signals` is remembered (`{signals}:fwd:sig:<id>:<status>`, cleared by the
status that replaces it, as the ingestor's seen keys are), so only a new status goes out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from prometheus_client import Counter

from shared.backoff import Backoff
from shared.consumer import GroupHealth
from shared.errors import describe
from shared.models import FillStatus
from shared.redis_streams import DATA_FIELD, UNREACHABLE, dead_letter, entry_payload
from shared.streams import Streams

log = logging.getLogger(__name__)

FORWARDED = Counter(
    "betterbot_detector_signals_forwarded_total",
    "Signals forwarded from a partition's outbox to `signals`",
    ["outbox"],
)

# KEYS[1] = signals, KEYS[2] = the lease, KEYS[3] = the last id forwarded, then per entry its
# status key and the status keys it clears; ARGV[1] = MAXLEN ~, ARGV[2] = the caller's name,
# ARGV[3] = the last id it read from ('' none), ARGV[4] = the batch's last id, ARGV[5] = the
# status keys' TTL (s), then per entry a header `<keys it clears>` (-1: no status key: added as
# it is) and its `data`, in order. Returns {added} or {-1} (not the lease holder) or {-2, the id it
# stands at} (not where the caller read from): nothing done then.
_FORWARD = """
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return {-1} end
local at = redis.call('GET', KEYS[3]) or ''
if at ~= ARGV[3] then return {-2, at} end
local added, k = 0, 4
for a = 6, #ARGV, 2 do
  local cleared = tonumber(ARGV[a])
  local add = true
  if cleared >= 0 then
    add = redis.call('SET', KEYS[k], '1', 'NX', 'EX', ARGV[5])
    if add then
      for i = k + 1, k + cleared do redis.call('DEL', KEYS[i]) end
    end
    k = k + 1 + cleared
  end
  if add then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'data', ARGV[a + 1])
    added = added + 1
  end
end
redis.call('SET', KEYS[3], ARGV[4])
return {added}
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

LEASE_MS = 5_000
# How long a signal's status is remembered as forwarded: a fill decided again after a failover
# comes back within minutes; the detector's own decisions are kept a week.
STATUS_TTL_S = 7 * 24 * 3600
# Forwarded entries stay this long: far beyond a replica's lag, so a failover that takes the last
# forwarded signals back finds them in the outbox still.
RETAIN_S = 120


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
        # The lease must outlive a blocked read several times over, or it would pass between
        # replicas with every read.
        self.lease_ms = max(lease_ms, 4 * block_ms)
        self.health = GroupHealth()
        # The id of the last entry forwarded, as this holder knows it (None: read it first).
        self.cursor: str | None = None
        self._forward = client.register_script(_FORWARD)
        self._hold = client.register_script(_HOLD)
        self._release = client.register_script(_RELEASE)
        prefix = streams.forwarded_key_prefix()
        self._lease = f"{prefix}lease:{outbox}"
        self._last = f"{prefix}last:{outbox}"
        self._signals_seen = f"{prefix}sig:"

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
        """Take or extend the lease; False when another replica holds it (then this one reads
        where the holder got to, should the lease come back)."""
        held = bool(await self._hold(keys=[self._lease], args=[self.owner, self.lease_ms]))
        if not held:
            self.cursor = None
        return held

    async def forward_once(self, block_ms: int | None = None) -> int:
        """Forward what the outbox holds after the last entry forwarded (waiting up to
        `block_ms` for something); how many entries were forwarded."""
        if self.cursor is None:
            stored: Any = await self.client.get(self._last)
            self.cursor = stored.decode() if stored else ""
        block = self.block_ms if block_ms is None else block_ms
        # BLOCK 0 would wait forever: no block at all then.
        reply: Any = await self.client.xread(
            {self.outbox: self.cursor or "0-0"}, count=self.batch, block=block or None
        )
        entries = [(eid.decode(), fields) for _, items in reply or [] for eid, fields in items]
        if not entries:
            return 0
        ready = [(eid, fields[DATA_FIELD]) for eid, fields in entries if DATA_FIELD in fields]
        if not await self.forward(ready, read_from=self.cursor, last=entries[-1][0]):
            return 0
        await self._dead_letter([(eid, f) for eid, f in entries if DATA_FIELD not in f])
        FORWARDED.labels(self.outbox).inc(len(ready))
        await self._trim()
        return len(entries)

    async def forward(
        self, entries: Sequence[tuple[str, bytes]], *, read_from: str, last: str
    ) -> bool:
        """Add the entries' signals to `signals` and move the last id to `last`, if this replica
        holds the lease and the id still stands at `read_from`; else (False) learn where it
        stands, to read from there next. A signal already on `signals` in its status is not
        added again (a fill decided twice: its lane's slot lost the first decision)."""
        keys = [self.streams.signals, self._lease, self._last]
        args: list[bytes | int | str] = [self.maxlen, self.owner, read_from, last, STATUS_TTL_S]
        for _, data in entries:
            status_keys = self._status_keys(data)
            keys += status_keys
            args += [len(status_keys) - 1, data]
        reply: Any = await self._forward(keys=keys, args=args)
        code = int(reply[0])
        if code >= 0:
            self.cursor = last
            return True
        if code == -2:
            at = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
            log.warning(
                "forward_rewound",
                extra={"outbox": self.outbox, "read_from": read_from, "stands_at": at},
            )
            self.cursor = at
        return False

    def _status_keys(self, data: bytes) -> list[str]:
        """The key that says a signal is on `signals` in its status, then those its status
        clears (as the ingestor's seen keys: a retraction clears the first sight, a re-inclusion
        the retraction); none for an entry that is not a signal."""
        try:
            signal = orjson.loads(data)
            base = f"{self._signals_seen}{signal['signal_id']}:"
            status = FillStatus(signal.get("status", FillStatus.CONFIRMED.value))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            return []
        clears = {
            FillStatus.PENDING: (),
            FillStatus.CONFIRMED: (FillStatus.RETRACTED,),
            FillStatus.RETRACTED: (FillStatus.CONFIRMED, FillStatus.PENDING),
        }[status]
        return [base + status.value, *(base + other.value for other in clears)]

    async def _trim(self) -> None:
        """Drop what was forwarded more than RETAIN_S ago (by the entries' own clock)."""
        if not self.cursor:
            return
        forwarded_ms = int(self.cursor.split("-", 1)[0])
        await self.client.xtrim(self.outbox, minid=forwarded_ms - RETAIN_S * 1000)

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
                before = self.cursor
                if not await self.forward_once(block_ms=0) and self.cursor == before:
                    break  # nothing left (a rewind moves the cursor: read again from there)
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


async def unforwarded(client: aioredis.Redis, streams: Streams, outbox: str) -> int:
    """How many entries of `outbox` wait to be forwarded (up to 10,000 counted)."""
    last: Any = await client.get(f"{streams.forwarded_key_prefix()}last:{outbox}")
    after = "(" + last.decode() if last else "-"
    waiting: Any = await client.xrange(outbox, min=after, max="+", count=10_000)
    return len(waiting)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
