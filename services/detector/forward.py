"""Partitions' signals into `signals`, exactly once (only with `STREAM_PARTITIONS` > 1).

A partition's apply script cannot add to `signals`, which lives in another slot (on a cluster,
often another node), so it adds them to the partition's outbox (shared/streams.py). The detector
forwards each outbox in a consumer group of the shared runtime: one script in the slot of
`signals` marks the outbox entry forwarded (SET NX `{signals}:fwd:<outbox>:<entry id>`) and adds
its signal only when the mark was new; the entry is then acked and deleted with one MULTI. A crash
between the two leaves the entry pending, its redelivery finds the mark and adds nothing twice.
The outbox of a lane holds its signals in the order the lane decided them, and one consumer at a
time forwards a batch in that order (`max_in_flight` 1), so a retraction never overtakes the
signal it retracts.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis

from shared.consumer import Entry, Handled
from shared.redis_streams import DATA_FIELD
from shared.streams import Streams

# KEYS[1] = signals, then one mark per entry; ARGV[1] = MAXLEN ~, ARGV[2] = mark TTL (s), then
# the entries' `data`, in order. Returns how many were added.
_FORWARD = """
local added = 0
for i = 2, #KEYS do
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', ARGV[2]) then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'data', ARGV[i + 1])
    added = added + 1
  end
end
return added
"""

# An entry is deleted from its outbox when acked, so its mark only has to outlive a redelivery.
MARK_TTL_S = 86_400


class Forwarder:
    """The handler of one outbox's group: its batch into `signals`, each entry once."""

    def __init__(
        self, client: aioredis.Redis, streams: Streams, outbox: str, *, maxlen: int
    ) -> None:
        self.streams = streams
        self.outbox = outbox
        self.maxlen = maxlen
        self._forward = client.register_script(_FORWARD)
        self._marks = f"{streams.forwarded_key_prefix()}{outbox}:"

    async def __call__(self, batch: list[Entry]) -> Handled:
        ready = [
            (entry_id, fields[DATA_FIELD]) for entry_id, fields in batch if DATA_FIELD in fields
        ]
        failed = {
            entry_id: "outbox entry has no 'data' field"
            for entry_id, fields in batch
            if DATA_FIELD not in fields
        }
        if ready:
            await self.forward(ready)
        return Handled([entry_id for entry_id, _ in ready], failed)

    async def forward(self, entries: Sequence[tuple[str, bytes]]) -> int:
        keys = [self.streams.signals, *(self._marks + entry_id for entry_id, _ in entries)]
        args: list[bytes | int] = [self.maxlen, MARK_TTL_S, *(data for _, data in entries)]
        return int(await self._forward(keys=keys, args=args))
