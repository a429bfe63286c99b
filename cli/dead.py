"""`betterbot dead list|replay`: inspect dead letters and send them back to their stream.

A dead entry (`shared.redis_streams.dead_letter`) has flat fields: `raw` (what could not be
processed), `reason`, `origin` (the service that gave up on it), `deliveries` and `at`. Replay
puts it back where it came from: `orders.dead` -> `orders.raw`, `signals.dead` -> `signals`
(`--to` names another stream). How depends on what `raw` holds:

- From a consumer (origin `detector`, `store`, ...): `raw` is the entry's `data`, XADDed again as
  `data` to the stream. Consumers are idempotent (order_key, signal_id), so a stream entry a
  group had already handled changes nothing twice. Before that, `raw` must validate as the
  stream's payload (OrderFill, Signal): one that would only fail again stays put, with the reason
  shown; `--force` skips the check.
- From the ingestor: `raw` is a feed frame, not an entry. Its order (a Dome `event` frame, or a
  bare Dome order) becomes an OrderFill and goes through the ingestor's dedupe-and-XADD step, so
  a fill the feed delivered meanwhile is not added twice. Frames without a valid order stay put.

The dead entry is deleted after its payload is in the target stream (XADD, then XDEL: on a crash
between them it is still listed, and replaying it again is harmless for the reasons above). The
two keys live in different Redis Cluster slots, which is why this is not one MULTI.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from pydantic import BaseModel, ValidationError

from shared.errors import validation_reason
from shared.models import DomeOrder, OrderFill, Side, Signal, Source
from shared.orders_raw import OrdersRaw
from shared.streams import Streams

INGESTOR_ORIGIN = "ingestor"
RAW_PREVIEW = 300


@dataclass(frozen=True)
class DeadEntry:
    entry_id: str
    raw: bytes
    reason: str
    origin: str
    deliveries: int
    at: float

    @classmethod
    def parse(cls, entry_id: bytes, fields: Mapping[bytes, bytes]) -> DeadEntry:
        def text(name: bytes) -> str:
            return fields.get(name, b"").decode("utf-8", "replace")

        try:
            deliveries = int(text(b"deliveries") or 0)
            at = float(text(b"at") or 0)
        except ValueError:
            deliveries, at = 0, 0.0
        return cls(
            entry_id.decode(),
            fields.get(b"raw", b""),
            text(b"reason"),
            text(b"origin"),
            deliveries,
            at,
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.entry_id,
            "at": self.at,
            "origin": self.origin,
            "deliveries": self.deliveries,
            "reason": self.reason,
            "raw": self.raw.decode("utf-8", "backslashreplace"),
        }

    def line(self) -> str:
        when = dt.datetime.fromtimestamp(self.at, dt.UTC).isoformat(timespec="seconds")
        raw = self.raw.decode("utf-8", "backslashreplace")
        preview = raw if len(raw) <= RAW_PREVIEW else raw[:RAW_PREVIEW] + "..."
        return (
            f"{self.entry_id}  {when.removesuffix('+00:00')}Z  origin={self.origin} "
            f"deliveries={self.deliveries}\n  reason: {self.reason}\n  raw: {preview}"
        )


@dataclass(frozen=True)
class Outcome:
    entry_id: str
    replayed: bool
    detail: str


def origin_stream(streams: Streams, dead_stream: str) -> str | None:
    """The stream a dead stream's entries came from, when there is one."""
    return {streams.orders_dead: streams.orders_raw, streams.signals_dead: streams.signals}.get(
        dead_stream
    )


def payload_model(streams: Streams, stream: str) -> type[BaseModel] | None:
    if stream in (streams.orders_raw, *streams.order_streams()):
        return OrderFill
    return Signal if stream == streams.signals else None


async def list_entries(
    client: aioredis.Redis, stream: str, count: int, start: str = "-"
) -> list[DeadEntry]:
    entries: Any = await client.xrange(stream, min=start, max="+", count=count)
    return [DeadEntry.parse(entry_id, fields) for entry_id, fields in entries]


async def select(
    client: aioredis.Redis, stream: str, ids: Iterable[str], replay_all: bool
) -> tuple[list[DeadEntry], list[str]]:
    """The entries to replay, and the requested ids that are not there."""
    if replay_all:
        everything: Any = await client.xrange(stream, min="-", max="+")
        return [DeadEntry.parse(i, f) for i, f in everything], []
    found, missing = [], []
    for entry_id in ids:
        entries: Any = await client.xrange(stream, min=entry_id, max=entry_id)
        if entries:
            found.append(DeadEntry.parse(*entries[0]))
        else:
            missing.append(entry_id)
    return found, missing


def frame_order(raw: bytes) -> DomeOrder:
    """The Dome order in a feed frame (an `event` frame or a bare order); ValueError if none."""
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"the frame is not JSON ({exc})") from None
    if isinstance(message, dict) and message.get("type") == "event":
        message = message.get("data")
    if not isinstance(message, dict):
        raise ValueError("the frame holds no order object")
    try:
        return DomeOrder.model_validate(message)
    except ValidationError as exc:
        raise ValueError(f"the frame's order is invalid: {validation_reason(exc)}") from None


class Replayer:
    def __init__(
        self,
        client: aioredis.Redis,
        streams: Streams,
        *,
        stream_maxlen: int,
        dedupe_ttl_s: int,
        force: bool = False,
    ) -> None:
        self.client = client
        self.streams = streams
        self.maxlen = stream_maxlen
        self.force = force
        self.orders = OrdersRaw(
            client, streams, stream_maxlen=stream_maxlen, dedupe_ttl_s=dedupe_ttl_s
        )

    async def replay(self, dead_stream: str, entry: DeadEntry, target: str) -> Outcome:
        if entry.origin == INGESTOR_ORIGIN and target == self.streams.orders_raw:
            outcome = await self._replay_frame(entry)
        elif target == self.streams.orders_raw and self.streams.partitioned:
            outcome = await self._replay_fill(entry)
        else:
            outcome = await self._replay_entry(entry, target, payload_model(self.streams, target))
        if outcome.replayed:
            await self.client.xdel(dead_stream, entry.entry_id)
        return outcome

    async def _replay_entry(
        self, entry: DeadEntry, target: str, model: type[BaseModel] | None
    ) -> Outcome:
        if model is not None and not self.force:
            try:
                model.model_validate_json(entry.raw)
            except ValidationError as exc:
                return Outcome(
                    entry.entry_id,
                    False,
                    f"kept: not a valid {model.__name__} ({validation_reason(exc)}); "
                    "--force replays anyway",
                )
        new_id: Any = await self.client.xadd(
            target, {b"data": entry.raw}, maxlen=self.maxlen, approximate=True
        )
        return Outcome(entry.entry_id, True, f"-> {target} {new_id.decode()}")

    async def _replay_fill(self, entry: DeadEntry) -> Outcome:
        """A fill a consumer gave up on, added again as it is (like `orders.raw` without
        partitions) to its wallet's partition, and a BUY to its token's: not through the dedupe,
        whose marks hold it as published already. Only a valid fill has a partition."""
        try:
            fill = OrderFill.model_validate_json(entry.raw)
        except ValidationError as exc:
            reason = validation_reason(exc)
            return Outcome(entry.entry_id, False, f"kept: not a valid OrderFill ({reason})")
        targets = [self.streams.wallet_stream(fill.user)]
        token_stream = self.streams.token_stream(fill.token_id)
        if token_stream is not None and fill.side is Side.BUY:
            targets.append(token_stream)
        added = []
        for target in targets:
            new_id: Any = await self.client.xadd(
                target, {b"data": entry.raw}, maxlen=self.maxlen, approximate=True
            )
            added.append(f"{target} {new_id.decode()}")
        return Outcome(entry.entry_id, True, "-> " + ", ".join(added))

    async def _replay_frame(self, entry: DeadEntry) -> Outcome:
        try:
            order = frame_order(entry.raw)
        except ValueError as exc:
            return Outcome(entry.entry_id, False, f"kept: {exc}")
        fill = OrderFill.from_dome(order, Source.DOME_WS, time.time())
        return await self._published(entry, fill)

    async def _published(self, entry: DeadEntry, fill: OrderFill) -> Outcome:
        """A rejected feed frame's fill, through the dedupe (the feed may have delivered it)."""
        stream = self.streams.wallet_stream(fill.user)
        if await self.orders.publish_all([fill]):
            return Outcome(entry.entry_id, True, f"-> {stream} (new order)")
        return Outcome(entry.entry_id, True, f"already in {stream} (order_key seen)")
