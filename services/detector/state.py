"""Everything Redis-specific in the detector: the atomic apply step (Lua), the pending-list reads
that order replicas, and dead letters (the group itself is run by `shared/consumer.py`).

The apply step gets, per order, what `pipeline.py` decided with `rules.decide` and applies it in one
script call, each order atomically:
1. A prerequisite (an earlier order of the stream that touches one of the same state units and was
   still pending when this batch looked) has no done key yet, or an earlier order of this call on
   one of the same units was not applied -> nothing (`WAITING`); the caller retries later. This
   comes first, so that even a redelivered order settles only in its place in the stream.
2. `<prefix>done:<order_key>` exists -> decided before (a redelivery): nothing (`DUPLICATE`).
3. A unit's current value differs from the one the decision was computed from -> nothing
   (`CONFLICT`); the caller re-reads and decides again.
4. Otherwise: XADD every signal to `signals` (MAXLEN ~, one field `data` holding the Signal JSON)
   and count the order as applied. Returns the number of signals.
Steps 1-3 of an order that is not applied block its units for the rest of the call. At the end,
each unit touched by an applied order is written once, with its last applied order's value (delete
when empty; a TTL when it holds no position), then every applied order's done key is set with a
TTL. A unit's value is compared once per call, at its first order: the caller decided the orders
after it from the value the earlier ones leave. Reads and writes go per unit rather than per order
because the orders of a call often share units, and each shared unit then costs one read and one
write (the measurement: bench/README.md).

The done key is written last: if a write fails mid-order (e.g. Redis out of memory), the order is
not marked done and its redelivery emits again (at least once; consumers dedupe by `signal_id`)
instead of losing a signal. Every key the script touches carries the `{<namespace>signals}` hash
tag (`Streams.detector_prefix()`), the slot of the `signals` stream, so the script runs unchanged
on Redis Cluster; the pending-list reads and the touch script use `orders.raw` alone.

A wallet's `/positions` seeding (`seed:<wallet>`, `_SEED`, `_FORGET`) is one more key of its lane:
every order of a tracked wallet carries it as a read-only unit (TTL `READ_ONLY`), compared with the
others and never written by the apply step.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, TypeVar

import redis.asyncio as aioredis

from services.detector.rules import (
    WalletMarketState,
    load_unit,
    seed_unit,
    seeded,
    seeding_time,
    wallet_unit,
)
from shared.backoff import retrying
from shared.redis_streams import UNREACHABLE, calling, dead_letter, entry_position
from shared.streams import Lane, Streams

log = logging.getLogger(__name__)

# Codes of the apply script for an order it did not apply (an applied order returns its number of
# signals, >= 0). The script is built with these values, so the two cannot drift apart.
DUPLICATE = -1
WAITING = -2
CONFLICT = -3
# The TTL of a unit the apply step compares but never writes (a wallet's seeding).
READ_ONLY = -1

PENDING_PAGE = 1000
# read_entries reads one span of up to this many entries per id wanted before going one by one.
SPAN_FACTOR = 4

# KEYS[1]: the signals stream; then per order: its done key, np prerequisite done keys, nu unit
# keys, nf done keys it forgets. ARGV[1]: MAXLEN ~ of signals; ARGV[2]: done-key TTL (s); then per
# order: one header `np,nu,nf,<entry id>,<its done key's value>` (the value: its effect, for a
# retraction to undo; one argument, as each argument costs redis-py's packing per order),
# nu x (expected value, new value, TTL s; '' = absent / delete, TTL 0 = none, TTL -1 = read-only:
# compared, never written), ns, ns x Signal JSON.
# Per-unit compare and write, done keys last: see the module docstring. A retraction turns its
# fill's done key into a tombstone `x:<its entry id>`: an entry of the fill up to there is a
# repeat (a redelivery), one after it a new inclusion of the fill, decided afresh.
_APPLY = (
    f"local DUPLICATE, WAITING, CONFLICT = {DUPLICATE}, {WAITING}, {CONFLICT}\n"
    + """
local stream, maxlen, done_ttl = KEYS[1], ARGV[1], ARGV[2]
local results, blocked, checked = {}, {}, {}
local written, values, ttls, dones, done_values = {}, {}, {}, {}, {}
local function after_tombstone(value, position)
  local tms, tseq = string.match(value, '^x:(%d+)-(%d+)$')
  if not tms then return false end
  local ms, seq = string.match(position, '^(%d+)-(%d+)$')
  ms, seq, tms, tseq = tonumber(ms), tonumber(seq), tonumber(tms), tonumber(tseq)
  return ms > tms or (ms == tms and seq > tseq)
end
local a, k = 3, 2
while a <= #ARGV do
  local np, nu, nf, position, done_value =
    string.match(ARGV[a], '^(%d+),(%d+),(%d+),([%d-]+),(.*)$')
  np, nu, nf = tonumber(np), tonumber(nu), tonumber(nf)
  local done, first_prereq, first_unit = KEYS[k], k + 1, k + 1 + np
  local first_forget = first_unit + nu
  k = first_forget + nf
  local unit_args = a + 1
  local ns = tonumber(ARGV[unit_args + 3 * nu])
  local first_signal = unit_args + 3 * nu + 1
  a = first_signal + ns
  local code
  for i = first_unit, first_forget - 1 do
    if blocked[KEYS[i]] then code = WAITING end
  end
  if not code then
    for i = first_prereq, first_unit - 1 do
      if redis.call('EXISTS', KEYS[i]) == 0 then code = WAITING break end
    end
  end
  if not code then
    local known = done_values[done] or redis.call('GET', done)
    if known and not after_tombstone(known, position) then code = DUPLICATE end
  end
  if not code then
    for i = 0, nu - 1 do
      local key = KEYS[first_unit + i]
      if not checked[key] then
        checked[key] = true
        if (redis.call('GET', key) or '') ~= ARGV[unit_args + 3 * i] then code = CONFLICT end
      end
    end
  end
  if code then
    for i = first_unit, first_forget - 1 do blocked[KEYS[i]] = true end
  else
    for i = 0, nu - 1 do
      local key = KEYS[first_unit + i]
      if not values[key] then written[#written + 1] = key end
      values[key] = ARGV[unit_args + 3 * i + 1]
      ttls[key] = tonumber(ARGV[unit_args + 3 * i + 2])
    end
    for i = first_signal, a - 1 do
      redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'data', ARGV[i])
    end
    for i = first_forget, k - 1 do
      if not done_values[KEYS[i]] then dones[#dones + 1] = KEYS[i] end
      done_values[KEYS[i]] = 'x:' .. position
    end
    if not done_values[done] then dones[#dones + 1] = done end
    done_values[done] = done_value
    code = ns
  end
  results[#results + 1] = code
end
for _, key in ipairs(written) do
  local value, ttl = values[key], ttls[key]
  if ttl < 0 then
    -- read-only (a wallet's seeding): compared above, never written here
  elseif value == '' then
    redis.call('DEL', key)
  elseif ttl > 0 then
    redis.call('SET', key, value, 'EX', ttl)
  else
    redis.call('SET', key, value)
  end
end
for _, done in ipairs(dones) do
  if done_values[done] then
    redis.call('SET', done, done_values[done], 'EX', done_ttl)
  end
end
return results
"""
)

# A wallet's seeding (`DetectorState.seed`, `forget_seeded`) lives in the lane with its units, one
# key per wallet, `seed:<wallet>` (a unit name: `unit_key` puts it in the lane's hash-tag slot):
# `<as_of>|<registry id>` once seeded (the snapshot's exchange time, and the wallet registry's
# control-stream id as of which the seeding replica knew the wallet tracked: its generation), or
# `|<registry id>` once the wallet was removed there (a tombstone). Every order of a tracked
# wallet reads it with its units (`look`) and compares it in the apply step as it compares the
# units (a read-only unit, TTL -1), so no order is decided on a seeding that changed meanwhile.
# Registry ids compare as stream ids (ms, seq).
_IDS = """
local function newer(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  if not ams or not bms then return false end
  ams, aseq, bms, bseq = tonumber(ams), tonumber(aseq), tonumber(bms), tonumber(bseq)
  return ams > bms or (ams == bms and aseq > bseq)
end
"""

# Seeding a wallet's positions. KEYS[1]: its seed key; KEYS[2..n+1]: the wallet's units. ARGV[1]:
# as_of, ARGV[2]: the generation, then n x (expected value, new value, TTL s; '' = absent /
# delete, TTL 0 = none). Seeded already (by another replica, any generation not removed since):
# that seeding holds, its time is returned. Removed at or after this generation (a seeding that
# finished after the wallet was untracked): -2, nothing written. A unit changed since it was read:
# -1 (the caller reads again). Else the units are written and the seed key set, in one step, so
# no order is decided between the two.
_SEED = (
    _IDS
    + """
local current = redis.call('GET', KEYS[1])
if current then
  local as_of, generation = string.match(current, '^(%d*)|(.*)$')
  if as_of and as_of ~= '' then return tonumber(as_of) end
  if generation and not newer(ARGV[2], generation) then return -2 end
end
local n = #KEYS - 1
for i = 1, n do
  if (redis.call('GET', KEYS[i + 1]) or '') ~= ARGV[3 * i] then return -1 end
end
for i = 1, n do
  local value, ttl = ARGV[3 * i + 1], tonumber(ARGV[3 * i + 2])
  if value == '' then
    redis.call('DEL', KEYS[i + 1])
  elseif ttl > 0 then
    redis.call('SET', KEYS[i + 1], value, 'EX', ttl)
  else
    redis.call('SET', KEYS[i + 1], value)
  end
end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[2])
return tonumber(ARGV[1])
"""
)
SEED_CONFLICT = -1
SEED_REMOVED = -2
# A seeding whose units changed (orders of the wallet applied) this many times in a row gives up:
# the wallet counts as failed and is asked again later (`DETECTOR_SEED_RETRY_S`).
SEED_ATTEMPTS = 5
# Keys per SCAN step when looking for a wallet's units (or the lane's seedings): Redis walks
# about this many keys of the keyspace per round trip.
SCAN_COUNT = 10_000


class SeedConflict(RuntimeError):
    """A wallet's units kept changing while it was being seeded (`DetectorState.seed`)."""


# A wallet removed from the registry (its control-stream id ARGV[1]; ARGV[2]: the tombstone's TTL
# s): its seeding goes, replaced by a tombstone, unless it is of a later generation (the wallet
# added again since, seen first by a faster replica) or a later removal's tombstone is there.
_FORGET = (
    _IDS
    + """
local current = redis.call('GET', KEYS[1])
if current then
  local _, generation = string.match(current, '^(%d*)|(.*)$')
  if generation and not newer(ARGV[1], generation) then return 0 end
end
redis.call('SET', KEYS[1], '|' .. ARGV[1], 'EX', tonumber(ARGV[2]))
return 1
"""
)

TRANSIENT = UNREACHABLE
T = TypeVar("T")

Fields = dict[bytes, bytes]


@dataclass(frozen=True)
class UnitWrite:
    """One state unit of an order: the value decided from, the value to write, its TTL (0: none)."""

    unit: str
    expected: bytes
    value: bytes
    ttl_s: int


@dataclass(frozen=True)
class ApplyStep:
    """One decided order, as the apply script takes it: the key its done key is named by, the
    value it holds (its effect), and the done keys it forgets."""

    order_key: str
    prerequisites: tuple[str, ...]
    units: tuple[UnitWrite, ...]
    payloads: tuple[bytes, ...]
    done_value: bytes = b"1"
    # Done keys this order turns into tombstones (a retraction: its fill's).
    forgets: tuple[str, ...] = ()
    # Its entry id: where a tombstone it writes stands, and how a fill compares to one.
    position: str = "0-0"


@dataclass(frozen=True)
class Rejection:
    """An entry that cannot be processed: its raw payload, why, and a category for metrics."""

    entry_id: str
    raw: bytes
    reason: str
    category: str


class KeyLayout(Protocol):
    def done_key(self, order_key: str) -> str: ...

    def unit_key(self, unit: str) -> str: ...


def encode_apply(
    steps: Sequence[ApplyStep], signals: str, maxlen: int, done_ttl_s: int, layout: KeyLayout
) -> tuple[list[str], list[str | bytes | int]]:
    """KEYS and ARGV of one apply-script call, in the layout described above `_APPLY`."""
    keys: list[str] = [signals]
    args: list[str | bytes | int] = [maxlen, done_ttl_s]
    seen: set[str] = set()
    for step in steps:
        keys.append(layout.done_key(step.order_key))
        keys += [layout.done_key(key) for key in step.prerequisites]
        keys += [layout.unit_key(write.unit) for write in step.units]
        keys += [layout.done_key(key) for key in step.forgets]
        header = f"{len(step.prerequisites)},{len(step.units)},{len(step.forgets)},{step.position},"
        args.append(header.encode() + step.done_value)
        for write in step.units:
            # The script compares only a unit's first expected value in a call.
            expected = b"" if write.unit in seen else write.expected
            seen.add(write.unit)
            args += [expected, write.value, write.ttl_s]
        args.append(len(step.payloads))
        args += step.payloads
    return keys, args


class DetectorState:
    """The detector's Redis side: the apply step, the pending list, dead letters, membership."""

    def __init__(
        self,
        client: aioredis.Redis,
        streams: Streams,
        *,
        maxlen: int,
        done_ttl_s: int,
        script_batch: int,
        retry_s: float,
        lane: Lane | None = None,
    ) -> None:
        self.client = client
        self.streams = streams
        if lane is None:
            if streams.partitioned:
                raise ValueError("a partitioned layout needs the lane the state is for")
            lane = streams.lanes()[0]
        self.lane = lane
        self.maxlen = maxlen
        self.done_ttl_s = done_ttl_s
        self.script_batch = script_batch
        self.retry_s = retry_s
        self._prefix = lane.state_prefix
        self._apply = client.register_script(_APPLY)
        self._seed = client.register_script(_SEED)
        self._forget = client.register_script(_FORGET)

    # --- keys -----------------------------------------------------------------------------------

    def done_key(self, order_key: str) -> str:
        return f"{self._prefix}done:{order_key}"

    def unit_key(self, unit: str) -> str:
        return f"{self._prefix}{unit}"

    # --- state ----------------------------------------------------------------------------------

    async def position(self, wallet: str, market: str, token_id: str) -> int:
        """A tracked wallet's position in a token, in micro-shares (0 when none)."""
        raw: Any = await self.client.get(self.unit_key(wallet_unit(wallet, market)))
        return int(WalletMarketState.load(raw).positions.get(token_id, 0)) if raw else 0

    # --- positions seeded from `/positions` -------------------------------------------------

    async def seeded(self) -> dict[str, int]:
        """Every wallet seeded in this lane (and not removed since), and its snapshot's time."""
        pattern = self.unit_key(seed_unit("*"))

        async def read() -> dict[str, int]:
            keys = [key async for key in self.client.scan_iter(match=pattern, count=SCAN_COUNT)]
            values: list[Any] = await self.client.mget(keys) if keys else []
            prefix = len(self.unit_key(seed_unit("")))
            times = {
                k.decode()[prefix:]: seeding_time(v) for k, v in zip(keys, values, strict=True)
            }
            return {wallet: at for wallet, at in times.items() if at is not None}

        return await self._retrying(read)

    async def seeding(self, wallet: str) -> int | None:
        """The time of the wallet's seeding in this lane, None when it has none."""
        raw: Any = await self._retrying(partial(self.client.get, self.unit_key(seed_unit(wallet))))
        return seeding_time(raw)

    async def forget_seeded(self, wallet: str, removed_at: str) -> None:
        """A wallet removed from the registry (control-stream id `removed_at`): tracked again
        later, it is seeded afresh; a seeding made before the removal and finishing after it is
        refused. A later generation's seeding stays (`_FORGET`)."""
        keys = [self.unit_key(seed_unit(wallet))]
        args: list[str | int] = [removed_at, self.done_ttl_s]
        await self._retrying(partial(self._forget, keys=keys, args=args))

    async def seed(
        self,
        wallet: str,
        positions: Mapping[str, Mapping[str, int]],
        as_of: int,
        generation: str = "0-0",
    ) -> int | None:
        """Set the wallet's positions in every market to its holdings (micro-shares by market and
        token) and mark it seeded at `as_of`, unless it is seeded already; returns the time of
        the seeding that holds, None when the wallet was removed at or after `generation` (the
        registry id as of which the caller knew it tracked). Markets it holds none of lose the
        positions its fills made. Redis unreachable: retried up to `retry_s`, then raised; the
        units changed at each of `SEED_ATTEMPTS` attempts: `SeedConflict`."""
        prefix = self.unit_key(wallet_unit(wallet, ""))
        # The wallet's units: found once, by one scan of the lane's keys with a large COUNT (few
        # round trips, however many keys Redis holds), and the ones the snapshot names.
        found: list[str] = await self._retrying(partial(self._scan, f"{prefix}*"))
        markets = {key[len(prefix) :] for key in found} | set(positions)
        units = sorted(wallet_unit(wallet, market) for market in markets)
        keys = [self.unit_key(unit) for unit in units]
        script_keys = [self.unit_key(seed_unit(wallet)), *keys]
        for _ in range(SEED_ATTEMPTS):
            # A unit changed meanwhile (an order of the wallet applied): only the values again.
            values: list[Any] = (
                await self._retrying(partial(self.client.mget, keys)) if keys else []
            )
            args: list[str | bytes | int] = [as_of, generation]
            for unit, value in zip(units, values, strict=True):
                market = unit[len(wallet_unit(wallet, "")) :]
                after = seeded(load_unit(unit, value), positions.get(market, {}))
                written = b"" if after is None else after.dump()
                ttl = 0 if after is not None and after.positions else self.done_ttl_s
                args += [value or b"", written, ttl]
            held = int(await self._retrying(partial(self._seed, keys=script_keys, args=args)))
            if held == SEED_REMOVED:
                return None
            if held != SEED_CONFLICT:
                return held
        raise SeedConflict(f"{wallet}: its units changed at each of {SEED_ATTEMPTS} attempts")

    async def _scan(self, pattern: str) -> list[str]:
        return [
            key.decode() async for key in self.client.scan_iter(match=pattern, count=SCAN_COUNT)
        ]

    async def look(
        self, group: str, units: Sequence[str]
    ) -> tuple[dict[str, int], dict[str, bytes | None]]:
        """How many entries of `orders.raw` each consumer of the group holds pending, and the
        current value of `units`, in one round trip."""
        keys = [self.unit_key(unit) for unit in units]

        async def read() -> list[Any]:
            # Two commands at once rather than one pipeline: a cluster client refuses MGET in a
            # pipeline (the lane's units share a slot, which it does not know).
            pending = self.client.xpending(self.lane.stream, group)
            values = self.client.mget(keys) if keys else _nothing()
            return list(await asyncio.gather(pending, values))

        replies = await self._retrying(read)
        values = replies[1]
        holders = {c["name"].decode(): int(c["pending"]) for c in replies[0]["consumers"] or ()}
        return holders, dict(zip(units, values, strict=True))

    async def effects(self, order_keys: Sequence[str]) -> dict[str, bytes | None]:
        """The done key of each order: what it did when it was decided (None: never decided)."""
        keys = [self.done_key(key) for key in order_keys]
        values: list[Any] = await self._retrying(partial(self.client.mget, keys))
        return dict(zip(order_keys, values, strict=True))

    async def apply(self, steps: Sequence[ApplyStep]) -> list[int]:
        """Apply the steps in order, `script_batch` per script call; one code per step.

        Across calls as within one, a step after an unapplied step on the same unit waits.
        """
        codes: list[int] = []
        blocked: set[str] = set()
        for start in range(0, len(steps), self.script_batch):
            chunk = steps[start : start + self.script_batch]
            ready = []
            for step in chunk:
                units = {w.unit for w in step.units}
                ready.append(blocked.isdisjoint(units))
                if not ready[-1]:
                    # Blocks the rest of this chunk too: the script compares a unit only at its
                    # first step sent, so a later step must not go without this one.
                    blocked |= units
            to_run = [step for step, ok in zip(chunk, ready, strict=True) if ok]
            raw = iter(await self._retrying(partial(self._run, to_run)) if to_run else [])
            for step, ok in zip(chunk, ready, strict=True):
                code = int(next(raw)) if ok else WAITING
                if code in (WAITING, CONFLICT):
                    blocked.update(w.unit for w in step.units)
                codes.append(code)
        return codes

    async def _run(self, steps: Sequence[ApplyStep]) -> list[int]:
        keys, args = encode_apply(steps, self.lane.signals, self.maxlen, self.done_ttl_s, self)
        return list(await self._apply(keys=keys, args=args))

    # --- the pending list -----------------------------------------------------------------------

    async def pending_upto(self, group: str, last_id: str) -> list[str]:
        """Ids of every entry of `orders.raw` pending in the group up to `last_id`, oldest first."""
        found: list[str] = []
        start = "-"
        while True:
            page: Any = await self._retrying(
                partial(
                    self.client.xpending_range,
                    self.lane.stream,
                    group,
                    min=start,
                    max=last_id,
                    count=PENDING_PAGE,
                )
            )
            found += [item["message_id"].decode() for item in page]
            if len(page) < PENDING_PAGE:
                return found
            start = "(" + found[-1]

    async def read_entries(self, entry_ids: Sequence[str]) -> dict[str, Fields | None]:
        """The fields of the given `orders.raw` entries, in the order given (None for one trimmed
        away).

        Other replicas' pending entries come in runs (their batches): one XRANGE over the span
        reads them, with a bound on what lies between; ids past that bound are read one by one.
        """
        if not entry_ids:
            return {}
        ids = sorted(entry_ids, key=entry_position)
        span: Any = await self._retrying(
            partial(
                self.client.xrange,
                self.lane.stream,
                min=ids[0],
                max=ids[-1],
                count=SPAN_FACTOR * len(ids) + PENDING_PAGE,
            )
        )
        found = {entry_id.decode(): fields for entry_id, fields in span}
        rest = [entry_id for entry_id in ids if entry_id not in found]
        if span and rest:
            reached = entry_position(span[-1][0].decode())
            rest = [entry_id for entry_id in rest if entry_position(entry_id) > reached]
        if rest:
            found.update(await self._read_each(rest))
        return {entry_id: found.get(entry_id) for entry_id in entry_ids}

    async def _read_each(self, entry_ids: Sequence[str]) -> dict[str, Fields]:
        async def read() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                for entry_id in entry_ids:
                    pipe.xrange(self.lane.stream, min=entry_id, max=entry_id, count=1)
                return list(await pipe.execute())

        replies = await self._retrying(read)
        pairs = zip(entry_ids, replies, strict=True)
        return {entry_id: reply[0][1] for entry_id, reply in pairs if reply}

    # --- dead letters, group, health ------------------------------------------------------------

    async def dead_letter(
        self,
        rejections: Sequence[Rejection],
        *,
        origin: str,
        deliveries: Mapping[str, int] | None = None,
    ) -> None:
        counts = deliveries or {}
        for item in rejections:
            reason = f"{item.reason} (entry {item.entry_id})"
            await self._retrying(
                partial(
                    dead_letter,
                    self.client,
                    self.streams.orders_dead,
                    item.raw,
                    reason,
                    origin=origin,
                    deliveries=counts.get(item.entry_id, 1),
                )
            )

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """Retry while Redis is unreachable, up to `retry_s`: every effect here is idempotent."""
        return await retrying(
            lambda: calling(call), transient=TRANSIENT, within_s=self.retry_s, on_retry=_said
        )

    async def ping(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self.client.ping(), timeout=2))
        except TimeoutError:
            return False
        except TRANSIENT:
            return False


async def _nothing() -> list[Any]:
    return []


def _said(exc: BaseException, delay: float) -> None:
    log.warning("redis_retry", extra={"error": repr(exc), "delay_s": delay})
