"""How far each source runs behind the first one to deliver a fill: the figure that tells a user
which feed is worth paying for.

Several sources may carry the same fill (the chain, a Dome-protocol service, the Data API, RTDS).
The first to deliver it publishes it; each later delivery from another source is a duplicate that
the publishing script (shared/orders_raw.py) measures against the first: the seen key of a fill
holds `<first source>:<received_at in ms>`, and the script counts, per wallet partition, in the hash
`{<partition>}:sourcelag` (the seen key then lists the later sources, `,<source>` each, so each
counts once per fill):

- `<source>:first`: deliveries that were first (they published the fill);
- `<source>:behind`: deliveries that came after another source's, with their lag in buckets
  (`<source>:le:<bound ms>`, the first bound at or above the lag; `inf` past the last),
  `<source>:sum_ms` and `<source>:max_ms`.

A fill's statuses count apart: a mempool `pending` sight and its `confirmed` sight are two
deliveries, each with its own first source. A source that delivers the same fill again (a resend, a
poll or backfill reading it again) counts nothing more. Lags are between the moments
the ingestor received each copy, so they measure the feeds, not the exchange. The counts live in
Redis beside the fills (the script writes them atomically with the dedupe), so every ingestor
process adds to the same figures and the notifier's dashboard reads them (`read_source_lag`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from shared.streams import Streams

# Upper bounds (ms) of the lag buckets: sub-second feeds apart, then the polling feeds' minutes.
BUCKETS_MS: tuple[int, ...] = (
    250,
    500,
    1_000,
    2_000,
    3_000,
    5_000,
    10_000,
    30_000,
    60_000,
    120_000,
    300_000,
    900_000,
)

# The Lua function the publishing script calls for each delivery: `prior` is nil when this delivery
# published the fill, the seen key's value when it was a duplicate, false when it was held back (a
# retracted fill); `src` is empty for a retraction, which no source delivers first or late. A
# source's first late delivery is appended to the seen key (`,<source>`), so a
# poller reading the same fill again and again counts once. Returns the lag in ms, or -1.
RECORD_LUA = (
    "local lag_bounds = {"
    + ", ".join(str(bound) for bound in BUCKETS_MS)
    + """}
local function record_lag(lag_hash, seen_key, src, ms, prior)
  if src == '' then return -1 end
  if prior == nil then
    redis.call('HINCRBY', lag_hash, src .. ':first', 1)
    return -1
  end
  if not prior then return -1 end
  local psrc, pms, others = string.match(prior, '^([%w_]+):(%d+)(.*)$')
  if not psrc or psrc == src or string.find(others .. ',', ',' .. src .. ',', 1, true) then
    return -1
  end
  redis.call('SET', seen_key, prior .. ',' .. src, 'KEEPTTL')
  local lag = math.max(0, tonumber(ms) - tonumber(pms))
  redis.call('HINCRBY', lag_hash, src .. ':behind', 1)
  redis.call('HINCRBY', lag_hash, src .. ':sum_ms', lag)
  local bucket = 'inf'
  for _, bound in ipairs(lag_bounds) do
    if lag <= bound then bucket = tostring(bound) break end
  end
  redis.call('HINCRBY', lag_hash, src .. ':le:' .. bucket, 1)
  if lag > tonumber(redis.call('HGET', lag_hash, src .. ':max_ms') or '-1') then
    redis.call('HSET', lag_hash, src .. ':max_ms', lag)
  end
  return lag
end
"""
)


def lag_hash(stream: str) -> str:
    """The hash of `stream`'s lag counts, in its slot (a wallet partition or `orders.raw`)."""
    return "{" + stream + "}:sourcelag"


@dataclass(frozen=True, slots=True)
class SourceLag:
    source: str
    first: int
    behind: int
    lag_p50_s: float | None
    lag_p90_s: float | None
    lag_max_s: float | None
    lag_mean_s: float | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


async def read_source_lag(
    client: aioredis.Redis | RedisCluster, streams: Streams
) -> list[SourceLag]:
    """Each source's counts over every partition, the sources that delivered most first first."""
    totals: dict[str, int] = {}
    for stream in streams.order_streams():
        raw: Mapping[bytes | str, bytes | str] = await client.hgetall(lag_hash(stream))
        for field, value in raw.items():
            name = field.decode() if isinstance(field, bytes) else field
            number = int(value)
            if name.endswith(":max_ms"):
                totals[name] = max(totals.get(name, 0), number)
            else:
                totals[name] = totals.get(name, 0) + number
    sources = sorted({name.split(":", 1)[0] for name in totals})
    lags = [summarise(source, totals) for source in sources]
    return sorted(lags, key=lambda lag: (-lag.first, lag.source))


def summarise(source: str, totals: Mapping[str, int]) -> SourceLag:
    """One source's figures from the summed hash fields."""
    behind = totals.get(f"{source}:behind", 0)
    buckets = [(bound, totals.get(f"{source}:le:{bound}", 0)) for bound in BUCKETS_MS]
    max_ms = totals.get(f"{source}:max_ms")
    return SourceLag(
        source=source,
        first=totals.get(f"{source}:first", 0),
        behind=behind,
        lag_p50_s=quantile(buckets, behind, 0.5, max_ms),
        lag_p90_s=quantile(buckets, behind, 0.9, max_ms),
        lag_max_s=max_ms / 1000 if behind and max_ms is not None else None,
        lag_mean_s=round(totals.get(f"{source}:sum_ms", 0) / behind / 1000, 3) if behind else None,
    )


def quantile(
    buckets: Iterable[tuple[int, int]], count: int, q: float, max_ms: int | None
) -> float | None:
    """The bucket bound at or above the q-quantile (an upper estimate, never past the maximum
    seen): what a histogram can promise without keeping every lag."""
    if count <= 0:
        return None
    rank, seen = q * count, 0
    for bound, number in buckets:
        seen += number
        if seen >= rank:
            return min(bound, max_ms if max_ms is not None else bound) / 1000
    return max_ms / 1000 if max_ms is not None else None
