"""Reading `signals` and handing every entry to every connected client.

Every notifier replica reads the whole stream itself with plain XREAD (no consumer group: each
replica serves its own clients, and all of them want every signal). The reader starts at the
stream's newest entry when the process starts and then follows the ids it has read, so a Redis
outage or a dropped connection skips nothing while the process lives.

Each entry is decoded and validated once and turned into one message text that all clients share.
Handing it out never waits: a client whose bounded queue is full is marked to be closed as a slow
consumer (see `clients.Client.offer`), so one slow client cannot hold the others back. Clients
that filter on market tags get each read's entries once those tags are looked up (a task of its
own), the others at once: a slow Gamma does not hold their signals back.

`Backlog` reads the entries after a client's `last_id` for a resume (XRANGE, exclusive, in pages,
at most a given number of entries, letting other tasks run between pages).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import RedisError, ResponseError

from services.notifier.clients import Client, Delivery, StreamId
from services.notifier.filters import TaggedMatch
from services.notifier.market_tags import MarketTags
from services.notifier.metrics import ENTRIES_INVALID, READ_ERRORS, SIGNALS_READ
from services.notifier.protocol import Close, signal_message
from shared.backoff import Backoff
from shared.errors import validation_reason
from shared.models import Signal
from shared.redis_streams import DATA_FIELD, connect, decode

log = logging.getLogger(__name__)
# The longest the tagged clients wait for one round of tag lookups before their signals go out
# (a market whose tags are unknown then passes no `tags` filter).
TAGS_DEADLINE_S = 10.0

READ_COUNT = 500
BACKLOG_PAGE = 500
Entry = tuple[bytes, Mapping[bytes, bytes]]


def to_delivery(entry_id: bytes, fields: Mapping[bytes, bytes]) -> Delivery:
    """The message for one stream entry; ValueError (with the reason) when it is not a Signal."""
    signal = Signal.model_validate(decode(fields))
    stream_id = StreamId.parse(entry_id)
    return Delivery(signal_message(str(stream_id), fields[DATA_FIELD]), stream_id, signal)


def rejection_reason(exc: ValueError) -> str:
    """A short, single-line account of why an entry is not a Signal (no input values echoed)."""
    if isinstance(exc, ValidationError):
        return validation_reason(exc, whole="entry")
    return str(exc)[:300]


async def stream_tail(client: aioredis.Redis, stream: str) -> str:
    """The id of the newest entry ever added (XREAD's `$`, made concrete); `0-0` for no stream.

    A concrete id, unlike `$`, can be re-read after a reconnect without skipping what was added
    in between.
    """
    try:
        info = await client.xinfo_stream(stream)
    except ResponseError as exc:
        if "no such key" in str(exc).lower():
            return "0-0"
        raise
    last: bytes = info["last-generated-id"]
    return last.decode()


def reader_connection(
    url: str,
    stream: str,
    block_ms: int,
    *,
    role: str = "betterbot-notifier",
    cluster: bool = False,
) -> aioredis.Redis:
    # A connection of its own, since a blocked XREAD holds it. The socket timeout sits above the
    # block time, so a silently dead connection raises instead of hanging the reader for good.
    name = f"{role}:" + re.sub(r"\s", "_", stream)
    return connect(
        url,
        cluster=cluster,
        socket_timeout=block_ms / 1000 + 5,
        socket_connect_timeout=5,
        client_name=name,
        health_check_interval=0,
    )


class Fanout:
    """The stream reader and the set of clients it feeds."""

    def __init__(
        self,
        redis_url: str,
        stream: str,
        *,
        block_ms: int,
        count: int = READ_COUNT,
        cluster: bool = False,
    ) -> None:
        self._url = redis_url
        self._cluster = cluster
        self._stream = stream
        self._block_ms = block_ms
        self._count = count
        self._clients: set[Client] = set()
        self._no_clients = asyncio.Event()
        self._no_clients.set()
        self._refuse: Close | None = None
        # Set once the start position is fixed: from then on no entry can slip past a new client.
        self.ready = asyncio.Event()
        self.status = "starting"
        self.last_id: str | None = None
        # The reads' entries for the clients that filter on tags, handed out once their markets'
        # tags are looked up (`_tagged_delivery`); and how many of those each client awaits.
        self._tag_queue: asyncio.Queue[_TaggedBatch] = asyncio.Queue()
        self._tag_pending: dict[Client, int] = {}

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def add(self, client: Client) -> None:
        # `dispatch` runs without awaiting: everything up to `last_id` went out (or was set aside
        # for the clients that filter on tags) before this client was added, everything after it
        # will be offered to it.
        client.live_after = None if self.last_id is None else StreamId.parse(self.last_id)
        self._clients.add(client)
        self._no_clients.clear()
        if self._refuse is not None:
            client.kick(self._refuse)

    def remove(self, client: Client) -> None:
        self._clients.discard(client)
        if not self._clients:
            self._no_clients.set()

    async def close_all(self, close: Close, grace_s: float) -> None:
        """Close every client (and any that still connects); wait up to `grace_s` for them."""
        self._refuse = close
        for client in tuple(self._clients):
            client.kick(close)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._no_clients.wait(), grace_s)

    async def run(self) -> None:
        """Read the stream until cancelled; Redis errors are retried with backoff, never raised."""
        reader = reader_connection(self._url, self._stream, self._block_ms, cluster=self._cluster)
        backoff = Backoff(0.1, 5.0)
        tagged_delivery = asyncio.create_task(self._tagged_delivery())
        try:
            while True:
                try:
                    entries = await self._read(reader)
                except (RedisError, OSError) as exc:
                    READ_ERRORS.inc()
                    self.status = "retrying"
                    delay = backoff.next_delay()
                    log.warning(
                        "signals_read_failed",
                        extra={
                            "error": f"{type(exc).__name__}: {exc}",
                            "retry_in_s": delay,
                            "last_id": self.last_id,
                        },
                    )
                    await asyncio.sleep(delay)
                    continue
                backoff.reset()
                if entries:
                    self.dispatch(entries)
        finally:
            self.status = "stopped"
            tagged_delivery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await tagged_delivery
            with contextlib.suppress(RedisError, OSError):
                await reader.aclose()

    async def _read(self, reader: aioredis.Redis) -> Sequence[Entry]:
        if self.last_id is None:
            self.last_id = await stream_tail(reader, self._stream)
            self.status = "reading"
            self.ready.set()
            log.info(
                "signals_reader_started", extra={"stream": self._stream, "after": self.last_id}
            )
        response: Any = await reader.xread(
            {self._stream: self.last_id}, count=self._count, block=self._block_ms
        )
        self.status = "reading"
        # RESP2 shape, one stream asked: [[name, [(id, fields), ...]]], or empty on timeout.
        return cast(Sequence[Entry], response[0][1]) if response else ()

    def dispatch(self, entries: Sequence[Entry]) -> None:
        """Hand the entries to every client without waiting: now to the clients whose filters need
        no market tags; to the ones that filter on tags once those are looked up (Gamma, see
        `market_tags`; `_tagged_delivery`). So a `tags` subscriber never delays the others'
        signals. A client still awaiting earlier entries that way gets these the same way, even
        if its filter changed meanwhile: each client gets the entries in stream order."""
        deliveries = self._deliveries(entries)
        tagged: list[Client] = []
        plain: list[Client] = []
        for client in self._clients:
            waits = isinstance(client.accepts, TaggedMatch) or client in self._tag_pending
            (tagged if waits else plain).append(client)
        for delivery in deliveries:
            for client in plain:
                client.offer(delivery)
        # No await since the clients were picked: a client added later is in neither group, and
        # its `live_after` (this id) says it gets the entries after these.
        self.last_id = entries[-1][0].decode()
        if not (tagged and deliveries):
            return
        lookups = {
            id(c.accepts.market_tags): c.accepts.market_tags
            for c in tagged
            if isinstance(c.accepts, TaggedMatch) and c.accepts.market_tags is not None
        }
        for client in tagged:
            self._tag_pending[client] = self._tag_pending.get(client, 0) + 1
        self._tag_queue.put_nowait(_TaggedBatch(deliveries, tuple(tagged), list(lookups.values())))

    async def _tagged_delivery(self) -> None:
        """Hand the tagged clients their entries, in order, each batch once its markets' tags are
        looked up; the batches waiting meanwhile are looked up together on the next round."""
        while True:
            batches = [await self._tag_queue.get()]
            while not self._tag_queue.empty():
                batches.append(self._tag_queue.get_nowait())
            try:
                # httpx's timeouts are per phase: a Gamma trickling bytes would hold the tagged
                # clients (and the batches piling up behind them) without this bound.
                await asyncio.wait_for(self._prepare_tags(batches), TAGS_DEADLINE_S)
            except Exception as exc:  # never for Gamma's sake; the filters then see no tags
                log.warning("market_tags_failed", extra={"error": type(exc).__name__})
            for batch in batches:
                # The same clients as chosen then, whatever their filters are now: each gets
                # every entry exactly once, by the filter it has when the entry is offered.
                for delivery in batch.deliveries:
                    for client in batch.clients:
                        client.offer(delivery)
                for client in batch.clients:
                    left = self._tag_pending.pop(client, 1) - 1
                    if left > 0:
                        self._tag_pending[client] = left

    @staticmethod
    async def _prepare_tags(batches: Sequence[_TaggedBatch]) -> None:
        """Look up the market tags of these batches' signals, so that the tagged clients' filters
        (which never wait) find them cached. Bounded by the lookup's timeout."""
        markets: dict[int, list[str]] = {}
        lookups: dict[int, MarketTags] = {}
        for batch in batches:
            for lookup in batch.lookups:
                lookups[id(lookup)] = lookup
                markets.setdefault(id(lookup), []).extend(
                    d.signal.condition_id for d in batch.deliveries if d.signal is not None
                )
        await asyncio.gather(*(lookups[key].prefetch(markets[key]) for key in lookups))

    def _deliveries(self, entries: Sequence[Entry]) -> list[Delivery]:
        """The valid entries' messages; the ones that are not Signals are skipped (and logged)."""
        deliveries = []
        for entry_id, fields in entries:
            try:
                delivery = to_delivery(entry_id, fields)
            except ValueError as exc:
                # The producer dead-letters what it cannot process; here we only refuse to forward.
                ENTRIES_INVALID.inc()
                log.warning(
                    "signal_entry_skipped",
                    extra={
                        "stream": self._stream,
                        "id": entry_id.decode(),
                        "reason": rejection_reason(exc),
                    },
                )
                continue
            SIGNALS_READ.inc()
            deliveries.append(delivery)
        return deliveries


@dataclass(frozen=True)
class _TaggedBatch:
    """One read's entries for the clients that filter on tags, and the lookups they use."""

    deliveries: Sequence[Delivery]
    clients: tuple[Client, ...]
    lookups: Sequence[MarketTags]


class Backlog:
    """The entries of the stream after a given id, for clients that resume."""

    def __init__(self, client: aioredis.Redis, stream: str, page: int = BACKLOG_PAGE) -> None:
        self._client = client
        self._stream = stream
        self._page = page

    async def trimmed_after(self, after: StreamId) -> StreamId | None:
        """The oldest entry kept, when entries newer than `after` may have been trimmed away."""
        try:
            info = await self._client.xinfo_stream(self._stream)
        except ResponseError as exc:
            if "no such key" in str(exc).lower():
                return None
            raise
        first = info.get("first-entry")
        removed = int(info.get("entries-added") or 0) > int(info["length"])
        if not (removed and first):
            return None
        first_id = StreamId.parse(first[0])
        return first_id if first_id > after else None

    async def tail(self) -> StreamId:
        """The id of the newest entry ever added (`0-0` for no stream)."""
        return StreamId.parse(await stream_tail(self._client, self._stream))

    async def entries_after(
        self, after: StreamId, limit: int
    ) -> AsyncIterator[tuple[StreamId, Delivery | None]]:
        """The first `limit` entries after `after`, oldest first; None in place of an entry that
        is no Signal."""
        cursor, left = str(after), limit
        while left > 0:
            count = min(self._page, left)
            page = cast(
                Sequence[Entry],
                await self._client.xrange(self._stream, min=f"({cursor}", max="+", count=count),
            )
            for entry_id, fields in page:
                yield StreamId.parse(entry_id), _backlog_delivery(entry_id, fields)
            if len(page) < count:
                return
            left -= count
            cursor = page[-1][0].decode()
            # Validating a page is CPU work: let the live fan-out and other clients run between
            # pages even when Redis answers at once.
            await asyncio.sleep(0)


def _backlog_delivery(entry_id: bytes, fields: Mapping[bytes, bytes]) -> Delivery | None:
    try:
        return to_delivery(entry_id, fields)
    except ValueError as exc:
        # The live reader already reported it (or would have, had it been running then).
        log.debug(
            "backlog_entry_skipped",
            extra={"id": entry_id.decode(), "reason": rejection_reason(exc)},
        )
        return None
