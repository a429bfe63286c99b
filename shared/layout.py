"""The partition count a Redis holds (`STREAM_PARTITIONS`), recorded so that no service runs with
another: fills routed by one count and read by another would be split silently.

The first service (or `betterbot partitions move`) to write `<ns>layout:partitions` sets it;
every service checks it on start and refuses a different count with what to do. A Redis written
by a release before this key holds the one-partition layout when `orders.raw` exists.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from shared.streams import Streams


class LayoutMismatch(RuntimeError):
    """This service's STREAM_PARTITIONS is not the count the Redis holds."""


async def claim(client: aioredis.Redis, streams: Streams) -> None:
    """Record this layout when none is, else check it is the one recorded."""
    key = streams.layout_key()
    held: Any = await client.get(key)
    if held is None:
        earlier = 1 if await client.exists(streams.orders_raw) else streams.partitions
        # SET NX GET: of several services starting at once, all agree with the first.
        previous: Any = await client.set(key, earlier, nx=True, get=True)
        held = previous if previous is not None else earlier
    if int(held) != streams.partitions:
        raise LayoutMismatch(
            f"STREAM_PARTITIONS is {streams.partitions}, but this Redis holds the layout of "
            f"{int(held)} partition(s): set STREAM_PARTITIONS={int(held)}, or move the state with "
            f"`STREAM_PARTITIONS={int(held)} betterbot partitions move --to "
            f"{streams.partitions}` (docs/operations.md, 'Changing the partition count')"
        )


async def record(client: aioredis.Redis, streams: Streams) -> None:
    """After a move: this layout is the one the Redis holds now."""
    await client.set(streams.layout_key(), streams.partitions)
