"""Everything Redis-specific in the detector: the atomic state step (Lua), dead letters, the group.

The state step decides, for each order, in one script call:
1. `<prefix>done:<order_key>` exists -> the order was decided before (a redelivery): nothing.
2. Otherwise read the wallet's position in the token from the hash `<prefix>pos:<wallet>` (field
   token_id, integer micro-shares; tracked wallets only), emit every candidate whose condition holds
   (`always`, or `opens`: a BUY while that position is 0) with XADD to `signals` (MAXLEN ~, one
   field `data` holding the Signal JSON), move the position (BUY adds, SELL subtracts, floor 0: the
   field is deleted at 0), and set the done key with a TTL.

One call carries up to `DETECTOR_SCRIPT_BATCH` orders for speed; a script runs without
interleaving, so each order's effect is atomic and every order sees the effects of the ones before
it. The done key is written last: if a write fails mid-order (e.g. Redis out of memory), the order
is not marked done and its redelivery emits again (at least once; consumers dedupe by `signal_id`)
instead of losing a signal. Every key carries the `{<namespace>signals}` hash tag
(`Streams.detector_prefix()`), the slot of the `signals` stream itself, so the script runs
unchanged on Redis Cluster.

Order: one replica decides its batch in stream order. Replicas run their batches side by side, so
two fills of one wallet and token that land in different replicas' batches may be decided in
either order (a SELL before the BUY it follows): positions and entries are exact per replica
and best effort across them, until `orders.raw` is partitioned by wallet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.detector.rules import Condition
from shared.models import Side, SignalKind
from shared.redis_streams import dead_letter, ensure_group
from shared.streams import Streams

log = logging.getLogger(__name__)

DUPLICATE = -1

# KEYS[1]: the signals stream; KEYS[2k], KEYS[2k+1]: order k's done key and position key.
# ARGV[1]: MAXLEN ~ of the signals stream; ARGV[2]: done-key TTL in seconds; then per order:
#   side, size in micro-shares, token_id, tracked ("1"/"0"), candidate count n,
#   then n x (condition, Signal JSON).
# Returns one integer per order: -1 when already done, else the bitmask of the emitted candidates.
# Sizes stay strings and go to HINCRBY as such: Lua numbers are doubles and would round big ones.
_STEP = """
local stream, maxlen, ttl = KEYS[1], ARGV[1], ARGV[2]
local results = {}
local a, k = 3, 2
while a <= #ARGV do
  local done_key, pos_key = KEYS[k], KEYS[k + 1]
  local side, size, token, tracked = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3] == '1'
  local first = a + 5
  a = first + 2 * tonumber(ARGV[a + 4])
  k = k + 2
  if redis.call('EXISTS', done_key) == 1 then
    results[#results + 1] = -1
  else
    local prior = 0
    if tracked then
      prior = tonumber(redis.call('HGET', pos_key, token) or '0')
    end
    local opens = side == 'BUY' and prior <= 0
    local emitted, bit = 0, 1
    for c = first, a - 1, 2 do
      local condition = ARGV[c]
      if condition == 'always' or (condition == 'opens' and opens) then
        redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'data', ARGV[c + 1])
        emitted = emitted + bit
      end
      bit = bit * 2
    end
    if tracked and size ~= '0' then
      if side == 'BUY' then
        redis.call('HINCRBY', pos_key, token, size)
      elseif prior <= tonumber(size) then
        redis.call('HDEL', pos_key, token)
      else
        redis.call('HINCRBY', pos_key, token, '-' .. size)
      end
    end
    redis.call('SET', done_key, '1', 'EX', ttl)
    results[#results + 1] = emitted
  end
end
return results
"""

# Leave the group only when nothing is pending: checked and done in one step, so an entry delivered
# to this consumer in between cannot be dropped from the pending list with it.
_RELEASE = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then
  return -1
end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""

_TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError)
T = TypeVar("T")


@dataclass(frozen=True)
class Emission:
    """A candidate signal as the script gets it: the condition and the finished Signal JSON."""

    kind: SignalKind
    condition: Condition
    payload: bytes


@dataclass(frozen=True)
class OrderStep:
    """What the script needs to decide one order. Untracked wallets have no position."""

    order_key: str
    wallet: str
    token_id: str
    side: Side
    micro_shares: int
    tracked: bool
    candidates: tuple[Emission, ...]


@dataclass(frozen=True)
class StepResult:
    """`duplicate`: decided before, nothing done. `emitted`: the kinds written to `signals`."""

    duplicate: bool
    emitted: tuple[SignalKind, ...]


@dataclass(frozen=True)
class Rejection:
    """An entry that cannot be processed: its raw payload, why, and a category for metrics."""

    entry_id: str
    raw: bytes
    reason: str
    category: str


class DetectorState:
    """The detector's Redis side: the state step, dead letters, and this consumer's membership."""

    def __init__(
        self,
        client: aioredis.Redis,
        streams: Streams,
        *,
        maxlen: int,
        done_ttl_s: int,
        script_batch: int,
        retry_s: float,
    ) -> None:
        self.client = client
        self.streams = streams
        self.maxlen = maxlen
        self.done_ttl_s = done_ttl_s
        self.script_batch = script_batch
        self.retry_s = retry_s
        self._prefix = streams.detector_prefix()
        self._script = client.register_script(_STEP)
        self._release = client.register_script(_RELEASE)

    def done_key(self, order_key: str) -> str:
        return f"{self._prefix}done:{order_key}"

    def position_key(self, wallet: str) -> str:
        return f"{self._prefix}pos:{wallet}"

    async def position(self, wallet: str, token_id: str) -> int:
        """The wallet's position in the token, in micro-shares (0 when none)."""
        value = await self.client.hget(self.position_key(wallet), token_id)
        return int(value) if value is not None else 0

    async def apply(self, steps: Sequence[OrderStep]) -> list[StepResult]:
        """Decide the orders in sequence, `script_batch` per script call; one result per step."""
        results: list[StepResult] = []
        for start in range(0, len(steps), self.script_batch):
            chunk = steps[start : start + self.script_batch]
            raw = await self._retrying(partial(self._run, chunk))
            results.extend(_result(step, int(code)) for step, code in zip(chunk, raw, strict=True))
        return results

    async def _run(self, steps: Sequence[OrderStep]) -> list[int]:
        keys: list[str] = [self.streams.signals]
        args: list[str | bytes | int] = [self.maxlen, self.done_ttl_s]
        for step in steps:
            keys += [self.done_key(step.order_key), self.position_key(step.wallet)]
            args += [
                step.side.value, str(step.micro_shares), step.token_id,
                "1" if step.tracked else "0", len(step.candidates),
            ]
            for emission in step.candidates:
                args += [emission.condition.value, emission.payload]
        result = await self._script(keys=keys, args=args)
        return list(result)

    async def dead_letter(self, rejections: Sequence[Rejection], *, origin: str) -> None:
        for item in rejections:
            reason = f"{item.reason} (entry {item.entry_id})"
            await self._retrying(
                partial(dead_letter, self.client, self.streams.orders_dead, item.raw, reason,
                        origin=origin)
            )

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """Retry while Redis is unreachable, up to `retry_s`: every effect here is idempotent."""
        deadline = time.monotonic() + self.retry_s
        delay = 0.05
        while True:
            try:
                return await call()
            except _TRANSIENT as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("redis_retry", extra={"error": repr(exc), "delay_s": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def ping(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self.client.ping(), timeout=2))
        except (TimeoutError, *_TRANSIENT):
            return False

    async def ensure_group(self, group: str) -> None:
        """Create the group on `orders.raw` (from id 0, creating the stream) unless it exists."""
        await self._retrying(partial(ensure_group, self.client, self.streams.orders_raw, group))

    async def own_pending(
        self, group: str, consumer: str, count: int
    ) -> list[tuple[str, dict[bytes, bytes] | None]]:
        """Entries delivered to this consumer and not acked (XREADGROUP from id 0), oldest first.

        Fields are None for an entry trimmed from the stream since its delivery.
        """
        reply: Any = await self.client.xreadgroup(
            group, consumer, {self.streams.orders_raw: "0"}, count=count
        )
        if not reply:
            return []
        _, entries = reply[0]
        return [(entry_id.decode(), fields or None) for entry_id, fields in entries]

    async def ack(self, group: str, entry_ids: Sequence[str]) -> None:
        if entry_ids:
            await self.client.xack(self.streams.orders_raw, group, *entry_ids)

    async def consumer_pending(self, group: str, consumer: str) -> int:
        """How many entries of `orders.raw` this consumer holds unacknowledged."""
        entries = await self.client.xpending_range(
            self.streams.orders_raw, group, min="-", max="+", count=1, consumername=consumer
        )
        return len(entries)

    async def release_consumer(self, group: str, consumer: str) -> bool:
        """Leave the group if nothing is pending here; pending entries stay for a reclaimer."""
        code = await self._release(keys=[self.streams.orders_raw], args=[group, consumer])
        return int(code) >= 0


def _result(step: OrderStep, code: int) -> StepResult:
    if code == DUPLICATE:
        return StepResult(duplicate=True, emitted=())
    emitted = tuple(c.kind for i, c in enumerate(step.candidates) if code >> i & 1)
    return StepResult(duplicate=False, emitted=emitted)
