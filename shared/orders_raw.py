"""Adding fills to `orders.raw`: the one way, for the ingestor, `betterbot replay-tape` and
`betterbot dead replay`.

The script sets `<seen prefix><order_key>` (one key per status, `seen_keys`) with NX and a TTL,
and only when that key was new adds the fill to the stream. Both happen in one script, so a crash
or a lost reply can neither lose a fill nor double it: a retried batch finds its keys set and adds
nothing twice. The seen keys carry the stream's name as their Redis Cluster hash tag
(`{<ns>orders.raw}:seen:<order_key>`), so they hash to the stream's slot and the script runs
unchanged on a cluster.

Watermarks: the hash `{<ns>orders.raw}:watermark` (same slot) maps `<feed>:<wallet>` to the newest
exchange `timestamp` read and published for that wallet; a fill may raise its wallet's mark in the
script that publishes it, and a backfill raises it after reading every page (the ingestor's
`publisher.py` says when). It only ever grows, and never past the moment the fill was received.

Partitions (`STREAM_PARTITIONS` > 1, shared/streams.py): each fill goes to its wallet's partition,
whose slot holds its seen keys and its wallet's watermark, and a BUY also to its token's partition
(seen keys of its own, no watermark). The token partitions are written first: if the process dies
between the two, the wallet partition, which raises the watermark, does not have the fill either,
so the next backfill reads it again and the token partition's seen key drops the second copy.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from redis.typing import EncodableT

from shared.backoff import Backoff, retrying
from shared.models import FillStatus, OrderFill, Side, Source
from shared.redis_streams import DATA_FIELD, encode
from shared.source_lag import RECORD_LUA, lag_hash
from shared.streams import Streams

# KEYS[1] = the stream, KEYS[2] = the watermark hash, KEYS[3] = the source lag hash, then per fill
# its seen key, the seen keys its status clears and those that hold it back; ARGV[1] = TTL (s),
# ARGV[2] = MAXLEN, ARGV[3] = '1' to count source lags (not on a token partition's copy), then two
# per fill: its JSON, and one header `<keys it clears>,<keys that hold it back>,<exchange
# timestamp>,<source>,<received ms>,<watermark field to raise, or nothing>` (one argument: each
# costs redis-py's packing per fill). A seen key holds `<source>:<received ms>`, the first
# delivery (shared/source_lag.py). Returns two numbers per fill, in order: 1 (added) or 0
# (duplicate), and the lag in ms behind the first source (-1: none).
DEDUPE_XADD = (
    RECORD_LUA
    + """
local added = {}
local k, a = 4, 4
local counting = ARGV[3] == '1'
while a <= #ARGV do
  local cleared, held, ts, src, ms, field =
    string.match(ARGV[a + 1], '^(%d+),(%d+),(%d+),([%w_]*),(%d+),(.*)$')
  cleared, held = tonumber(cleared), tonumber(held)
  local free = true
  for i = k + 1 + cleared, k + cleared + held do
    if redis.call('EXISTS', KEYS[i]) == 1 then free = false end
  end
  local prior = false
  if free then
    if redis.call('SET', KEYS[k], src .. ':' .. ms, 'NX', 'EX', ARGV[1]) then
      prior = nil
      redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'data', ARGV[a])
      for i = k + 1, k + cleared do redis.call('DEL', KEYS[i]) end
    else
      prior = redis.call('GET', KEYS[k])
    end
  end
  added[#added + 1] = prior == nil and 1 or 0
  added[#added + 1] = counting and record_lag(KEYS[3], KEYS[k], src, ms, prior) or -1
  if field ~= '' then
    local current = tonumber(redis.call('HGET', KEYS[2], field) or '0')
    if tonumber(ts) > current then
      redis.call('HSET', KEYS[2], field, ts)
    end
  end
  k = k + 1 + cleared + held
  a = a + 2
end
return added
"""
)

# KEYS[1] = the watermark hash; ARGV[1] = field, ARGV[2] = timestamp. Raises it, never lowers it.
RAISE_WATERMARK = """
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > current then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
"""


def seen_keys(fill: OrderFill) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """The dedupe key of the fill in its status, the keys a new entry in that status clears, and
    those that hold it back.

    A fill is published once per status: first sight (`pending` or `confirmed`), then each change.
    A retraction clears the fill's first sight, so a block that includes the fill again publishes
    it again; that re-inclusion clears the retraction, so a later reorg can retract it again. Only
    the chain can tell a new inclusion from a late copy of the old one: from any other source a
    retracted fill stays retracted.

    A pending sighting of a fill already confirmed or retracted is held back (a `since` replay
    or a snapshot can resend one). A retraction from another source than the chain is a pending
    fill that did not confirm within its bound (services/ingestor/pending.py): it is kept apart
    (`:expired`), held back by a confirmation already written (in the same script, so one that
    lands just before the deadline always wins), and undone by a confirmation from any source
    that comes later (a restart or an outage can delay one past the bound: the fill did
    happen)."""
    key = fill.order_key
    expired, retracted = f"{key}:expired", f"{key}:retracted"
    if fill.status is FillStatus.RETRACTED and fill.source is not Source.POLYGON:
        return expired, (), (key, retracted)
    if fill.status is FillStatus.RETRACTED:
        return retracted, (key, f"{key}:pending"), ()
    if fill.status is FillStatus.PENDING:
        # A pending sighting after the fill was confirmed or retracted is stale (a replay).
        return f"{key}:pending", (), (key, retracted, expired)
    if fill.source is Source.POLYGON:
        return key, (retracted, expired), ()
    return key, (expired,), (retracted,)


@dataclass(frozen=True, slots=True)
class Delivery:
    """What publishing one fill did."""

    added: bool
    # Seconds behind the first source that delivered this fill (None: first, or the same source).
    lag_s: float | None = None


NOT_ADDED = Delivery(False)


@dataclass(frozen=True, slots=True)
class Outgoing:
    fill: OrderFill
    # The watermark feed this fill may raise (None: publish only).
    watermark: str | None = None


def watermark_key(streams: Streams, stream: str | None = None) -> str:
    """The watermark hash of `stream` (`orders.raw`, or a wallet partition), in its slot (its hash
    tag), so one script touches both."""
    return "{" + (stream or streams.orders_raw) + "}:watermark"


def watermark_field(feed: str, wallet: str) -> str:
    return f"{feed}:{wallet}"


class OrdersRaw:
    """The dedupe-and-XADD script and the watermarks, on one client."""

    def __init__(
        self, client: aioredis.Redis, streams: Streams, *, stream_maxlen: int, dedupe_ttl_s: int
    ) -> None:
        self.client = client
        self.streams = streams
        self._script = client.register_script(DEDUPE_XADD)
        self._raise = client.register_script(RAISE_WATERMARK)
        self._maxlen = stream_maxlen
        self._ttl = dedupe_ttl_s
        # One batch at a time across the partitions: two batches interleaved (the live queue and
        # a backfill) could reach a wallet partition in one order and a token partition in the
        # other, and the lanes would then disagree on which fill came first.
        self._one_at_a_time = asyncio.Lock()

    async def publish(self, items: Sequence[Outgoing]) -> list[bool]:
        """Add the fills new in their status; True for each one added."""
        return [delivery.added for delivery in await self.deliver(items)]

    async def deliver(self, items: Sequence[Outgoing]) -> list[Delivery]:
        """Add the fills new in their status, one script call per partition: for each, whether
        it was added (to its wallet's partition: the token partitions are a copy for the
        detector) and how far its source ran behind the first one that delivered it."""
        if not self.streams.partitioned:
            return await self._add(self.streams.orders_raw, items)
        async with self._one_at_a_time:
            return await self._publish_partitioned(items)

    async def _publish_partitioned(self, items: Sequence[Outgoing]) -> list[Delivery]:
        by_token: dict[str, list[Outgoing]] = defaultdict(list)
        by_wallet: dict[str, list[int]] = defaultdict(list)
        for index, item in enumerate(items):
            by_wallet[self.streams.wallet_stream(item.fill.user)].append(index)
            token_stream = self.streams.token_stream(item.fill.token_id)
            if token_stream is not None and item.fill.side is Side.BUY:
                by_token[token_stream].append(Outgoing(item.fill))
        if by_token:
            await asyncio.gather(*(self._add(s, group, copy=True) for s, group in by_token.items()))
        streams = list(by_wallet)
        replies = await asyncio.gather(
            *(self._add(s, [items[i] for i in by_wallet[s]]) for s in streams)
        )
        delivered = [NOT_ADDED] * len(items)
        for stream, deliveries in zip(streams, replies, strict=True):
            for index, delivery in zip(by_wallet[stream], deliveries, strict=True):
                delivered[index] = delivery
        return delivered

    async def _add(
        self, stream: str, items: Sequence[Outgoing], *, copy: bool = False
    ) -> list[Delivery]:
        prefix = self.streams.seen_order_prefix(stream)
        keys = [stream, watermark_key(self.streams, stream), lag_hash(stream)]
        args: list[EncodableT] = [self._ttl, self._maxlen, "0" if copy else "1"]
        for item in items:
            fill = item.fill
            own, cleared, held = seen_keys(fill)
            keys += [prefix + key for key in (own, *cleared, *held)]
            field = watermark_field(item.watermark, fill.user) if item.watermark else ""
            # A retraction is not a delivery of the fill: no source is first or behind with it.
            source = "" if fill.status is FillStatus.RETRACTED else fill.source.value
            delivery = f"{source},{max(0, round(fill.received_at * 1000))}"
            header = f"{len(cleared)},{len(held)},{_mark(fill)},{delivery},{field}"
            args += [encode(fill)[DATA_FIELD], header]
        reply = await self._script(keys=keys, args=args)
        return [
            Delivery(bool(reply[i]), reply[i + 1] / 1000 if reply[i + 1] >= 0 else None)
            for i in range(0, len(reply), 2)
        ]

    async def publish_all(self, fills: Sequence[OrderFill], batch_max: int = 500) -> int:
        """Publish in batches, waiting out Redis outages (a retried batch adds nothing twice);
        returns how many were new."""
        new = 0
        for start in range(0, len(fills), batch_max):
            chunk = [Outgoing(fill) for fill in fills[start : start + batch_max]]
            added = await retrying(
                functools.partial(self.publish, chunk),
                transient=(RedisError, OSError),
                backoff=Backoff(0.05, 5.0),
            )
            new += sum(added)
        return new

    def watermarks(self, wallet: str) -> str:
        """The watermark hash that holds `wallet`'s marks."""
        return watermark_key(self.streams, self.streams.wallet_stream(wallet))

    async def watermark(self, feed: str, wallet: str) -> int | None:
        raw = await self.client.hget(self.watermarks(wallet), watermark_field(feed, wallet))
        return int(raw) if raw is not None else None

    async def raise_watermark(self, feed: str, wallet: str, timestamp: int) -> None:
        """Raise the wallet's mark to `timestamp` (never lower it), never past now."""
        mark = min(timestamp, int(time.time()))
        field = watermark_field(feed, wallet)
        await self._raise(keys=[self.watermarks(wallet)], args=[field, mark])


def _mark(fill: OrderFill) -> int:
    """What a fill may raise its wallet's watermark to: its exchange time, but never past the
    moment it was received. An exchange clock a little ahead (allowed by the ingestor's bounds)
    would otherwise put the mark in the future, and the next backfill would start after fills
    that have not happened yet."""
    return min(fill.timestamp, math.floor(fill.received_at))
