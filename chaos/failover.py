"""A Redis Cluster failover that loses writes the master had acknowledged, made deterministic.

Replication is asynchronous: a master answers a write before its replica has it, so a master that
dies a moment later takes that write with it and the promoted replica never had it. Left to
chance, the window is a fraction of a millisecond on loopback and a kill rarely hits it; so the
replica is frozen and its replication link closed first (`Cluster.freeze_replica`), the master
goes on acknowledging writes for a moment (`min_unreplicated` entries of the watched stream, at
most `freeze_within_s`), then it is SIGKILLed, the replica thawed and promoted. The writes of that
moment are gone for good, acknowledged: what the services must recover on their own.

What is lost is measured, not assumed: the stream's entries on the master just before the kill,
against those on the promoted replica once the failover settled. A write acknowledged between the
last read and the kill is lost too but not counted.
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from chaos.truth import read_stream
from devtools.cluster import Cluster
from shared.redis_streams import DATA_FIELD

Entry = tuple[str, bytes]

# Well under the 10 node timeouts (cluster-replica-validity-factor) after which a replica whose
# link is down refuses to be promoted, and long enough for a few fills to land.
FREEZE_WITHIN_S = 3.0
LOOK_EVERY_S = 0.05


@dataclass
class Failover:
    stream: str
    master: int
    replica: int
    # Entries the master held when the replica stopped receiving them, and just before the kill.
    replicated: list[Entry]
    acknowledged: list[Entry]
    lost: list[Entry] = field(default_factory=list)
    frozen_s: float = 0.0
    failover_s: float = 0.0

    @property
    def unreplicated(self) -> list[Entry]:
        """Acknowledged after the replica's link was closed: what the failover must lose."""
        known = {entry_id for entry_id, _ in self.replicated}
        return [entry for entry in self.acknowledged if entry[0] not in known]


async def entries_on(port: int, stream: str) -> list[Entry]:
    """The stream's entries (id, `data`) as the node on `port` holds them: no cluster client,
    which would follow the slot to whichever node serves it now."""
    async with aioredis.Redis(port=port, socket_timeout=5) as node:
        rows = await read_stream(node, stream)
    return [(entry_id, fields.get(DATA_FIELD, b"")) for entry_id, fields in rows]


async def _until_grown(port: int, stream: str, length: int, within_s: float) -> list[Entry]:
    deadline = time.monotonic() + within_s
    while True:
        entries = await entries_on(port, stream)
        if len(entries) >= length or time.monotonic() > deadline:
            return entries
        await asyncio.sleep(LOOK_EVERY_S)


async def lose_acknowledged_writes(
    cluster: Cluster,
    stream: str,
    *,
    min_unreplicated: int = 3,
    freeze_within_s: float = FREEZE_WITHIN_S,
) -> Failover:
    """Fail over the master serving `stream` so that its last writes are lost; returns once the
    replica serves the slots. The old master stays down: `cluster.restart(result.master)`."""
    master = cluster.master_of(stream)
    replica = await asyncio.to_thread(cluster.freeze_replica, master)
    frozen = time.monotonic()
    try:
        replicated = await entries_on(master, stream)
        wanted = len(replicated) + min_unreplicated
        acknowledged = await _until_grown(master, stream, wanted, freeze_within_s)
        await asyncio.to_thread(cluster.kill, master)
    finally:
        # Thawed whatever happened: a frozen node would stall the shared cluster for good.
        cluster.signal(replica, signal.SIGCONT)
    killed = time.monotonic()
    result = Failover(stream, master, replica, replicated, acknowledged)
    result.frozen_s = killed - frozen
    await asyncio.to_thread(cluster.wait_failover, master)
    result.failover_s = time.monotonic() - killed
    present = {entry_id for entry_id, _ in await entries_on(replica, stream)}
    result.lost = [entry for entry in acknowledged if entry[0] not in present]
    return result
