"""What Redis says about the streams: how many entries were added, and how far behind a group is.

A group's backlog is `lag` (entries added to the stream that the group has not yet read, from
XINFO GROUPS, Redis 7+) plus `pending` (read but not yet acknowledged). Consumers ack only after
their effect is durable, so backlog 0 means the stage is done with everything written so far.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from services.detector.forward import unforwarded
from shared.streams import Streams


@dataclass(frozen=True)
class GroupState:
    lag: int
    pending: int
    entries_read: int

    @property
    def backlog(self) -> int:
        return self.lag + self.pending


async def entries_added(client: aioredis.Redis, stream: str) -> int:
    """Entries ever added to the stream (trimming does not lower it); 0 for no stream."""
    try:
        info: Any = await client.xinfo_stream(stream)
    except ResponseError as exc:
        if "no such key" in str(exc).lower():
            return 0
        raise
    return int(info["entries-added"])


async def total_added(client: aioredis.Redis, streams: Sequence[str]) -> int:
    """Entries ever added to all of `streams` (a partitioned stream's partitions)."""
    return sum(await asyncio.gather(*(entries_added(client, stream) for stream in streams)))


async def unforwarded_signals(client: aioredis.Redis, streams: Streams) -> int:
    """Signals in the lanes' outboxes not forwarded to `signals` yet (none without outboxes).
    Forwarded entries stay in an outbox for a while: the detector's own count says which wait."""
    outboxes = [lane.signals for lane in streams.lanes() if lane.outbox]
    return sum(await asyncio.gather(*(unforwarded(client, streams, o) for o in outboxes)))


async def group_state(client: aioredis.Redis, stream: str, group: str) -> GroupState | None:
    try:
        groups: Any = await client.xinfo_groups(stream)
    except ResponseError as exc:
        if "no such key" in str(exc).lower():
            return None
        raise
    for info in groups:
        name = info["name"]
        if (name.decode() if isinstance(name, bytes) else name) != group:
            continue
        read = int(info.get("entries-read") or 0)
        lag = info.get("lag")
        if lag is None:  # undetermined after a deletion or trim: estimate from the counters
            lag = max(0, await entries_added(client, stream) - read)
        return GroupState(int(lag), int(info["pending"]), read)
    return None


async def until(
    check: Callable[[], Awaitable[bool]], within_s: float, every_s: float = 0.02
) -> float | None:
    """Poll `check` until true; the monotonic time it became true, None on timeout."""
    deadline = time.monotonic() + within_s
    while True:
        if await check():
            return time.monotonic()
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(every_s)


async def group_drained(client: aioredis.Redis, stream: str, group: str) -> bool:
    state = await group_state(client, stream, group)
    return state is not None and state.backlog == 0 and state.entries_read > 0


async def groups_state(client: aioredis.Redis, groups: Sequence[tuple[str, str]]) -> GroupState:
    """(stream, group) pairs' states summed: one stage's work over its partitions; a group not
    created yet counts as empty."""
    found = await asyncio.gather(*(group_state(client, stream, group) for stream, group in groups))
    states = [state for state in found if state is not None]
    return GroupState(
        sum(s.lag for s in states),
        sum(s.pending for s in states),
        sum(s.entries_read for s in states),
    )
