"""`betterbot replay-tape FILE`: feed a Polymarket Data-API trades file through the pipeline.

Choice: the fills go straight into `orders.raw` through the ingestor's own dedupe step
(`shared.orders_raw.OrdersRaw`, as its backfill uses: SET NX of the order_key and XADD in one Lua
script), not through the simulator. So it needs only Redis, works against a
production deployment, and is idempotent: replaying a file twice adds nothing the second time, and a
fill the live feed already delivered (same order_key from any source) is not added again. The
detector and the store then treat the fills like any other (`source` = `data_api`).

Mapping: `shared.data_api.order_from_data_api`, the ingestor's own. Trades are fed oldest first
(the Data API lists newest first). Only tracked wallets' trades go in (as the ingestor would only
receive those) unless `--all-wallets`. An item that cannot be mapped is reported with its index and
reason and skipped; the rest go in.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis

from shared.data_api import order_from_data_api
from shared.errors import describe
from shared.models import OrderFill, Source
from shared.orders_raw import OrdersRaw
from shared.streams import Streams

SHARE_SCALE = 1_000_000


class TapeFileError(ValueError):
    pass


@dataclass
class TapeReport:
    read: int = 0
    skipped_untracked: int = 0
    added: int = 0
    duplicates: int = 0
    invalid: list[str] = field(default_factory=list)


def read_tape(path: Path) -> list[Any]:
    try:
        items = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise TapeFileError(f"tape not found: {path}") from None
    except orjson.JSONDecodeError as exc:
        raise TapeFileError(f"tape {path} is not JSON: {exc}") from None
    if not isinstance(items, list):
        raise TapeFileError(f"tape {path} must be a JSON list of Data-API trades")
    return items


def to_fills(items: Sequence[Any], tracked: set[str] | None, report: TapeReport) -> list[OrderFill]:
    """Map, filter and order the items; problems go to `report.invalid`."""
    now = time.time()
    fills = []
    for index, item in enumerate(items):
        report.read += 1
        if not isinstance(item, dict):
            report.invalid.append(f"item {index}: not an object")
            continue
        try:
            order = order_from_data_api(item)
        except ValueError as exc:
            report.invalid.append(f"item {index}: {describe(exc)}")
            continue
        if tracked is not None and order.user not in tracked:
            report.skipped_untracked += 1
            continue
        fills.append(OrderFill.from_dome(order, Source.DATA_API, now))
    # Newest first in the file: reverse, then a stable sort keeps same-second trades in order.
    fills.reverse()
    fills.sort(key=lambda f: f.timestamp)
    return fills


async def replay(
    client: aioredis.Redis,
    streams: Streams,
    fills: Sequence[OrderFill],
    report: TapeReport,
    *,
    stream_maxlen: int,
    dedupe_ttl_s: int,
    batch: int = 500,
) -> TapeReport:
    orders = OrdersRaw(client, streams, stream_maxlen=stream_maxlen, dedupe_ttl_s=dedupe_ttl_s)
    added = await orders.publish_all(fills, batch)
    report.added += added
    report.duplicates += len(fills) - added
    return report
