"""A connected client as the fan-out sees it: a bounded queue, a filter, and how it must be closed.

Nothing here touches a socket or Redis, so the queueing, filtering and resume rules are plain code.
The fan-out never waits for a client: `offer` puts without blocking, and a client whose queue is
full is marked to be closed (slow consumer) instead of slowing the others down.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from services.notifier.protocol import Close, slow_consumer
from shared.models import Signal

_STREAM_ID = re.compile(r"^(\d{1,20})-(\d{1,20})$")
_MAX_ID_PART = 2**64 - 1

# Decides whether a client wants a signal; None means every signal.
SignalFilter = Callable[[Signal], bool]


class StreamId(NamedTuple):
    """A Redis stream entry id; tuples compare in stream order."""

    ms: int
    seq: int

    @classmethod
    def parse(cls, text: str | bytes) -> StreamId:
        """Parse `<ms>-<seq>`; ValueError naming the problem otherwise."""
        raw = text.decode() if isinstance(text, bytes) else text
        match = _STREAM_ID.match(raw)
        if match is None:
            raise ValueError(f"not a stream id of the form <ms>-<seq>: {raw[:40]!r}")
        ms, seq = int(match[1]), int(match[2])
        if ms > _MAX_ID_PART or seq > _MAX_ID_PART:
            raise ValueError(f"stream id out of range: {raw[:40]!r}")
        return cls(ms, seq)

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}"


@dataclass(frozen=True, slots=True)
class Delivery:
    """One outgoing message, shared by every client it goes to.

    Signals carry their stream id (for resume de-duplication) and the parsed Signal (for filters
    and the latency metric); control messages such as pong carry only text.
    """

    text: str
    stream_id: StreamId | None = None
    signal: Signal | None = None


class Client:
    def __init__(
        self,
        queue_size: int,
        *,
        peer: str = "",
        accepts: SignalFilter | None = None,
        resume_after: StreamId | None = None,
    ) -> None:
        self.peer = peer
        self.queue: asyncio.Queue[Delivery] = asyncio.Queue(queue_size)
        self.accepts = accepts
        # Set when the client asked to resume: it gets the stream after this id before live ones.
        self.resume_after = resume_after
        # Set by the fan-out when it adds the client: every entry after this id reaches the queue.
        self.live_after: StreamId | None = None
        self.close: Close | None = None
        self.kicked = asyncio.Event()
        self._sent_through: StreamId | None = None

    def offer(self, delivery: Delivery) -> bool:
        """Queue a message without waiting; False (and the client marked to close) when full."""
        if self.close is not None:
            return False
        signal = delivery.signal
        if signal is not None and self.accepts is not None and not self.accepts(signal):
            return True
        try:
            self.queue.put_nowait(delivery)
        except asyncio.QueueFull:
            self.kick(slow_consumer(self.queue.maxsize))
            return False
        return True

    def change_filter(self, accepts: SignalFilter | None, reply: Delivery) -> bool:
        """Swap the filter and queue `reply` in one step: signals queued before the reply were
        chosen by the old filter, those after it by the new one. False if the queue was full."""
        self.accepts = accepts
        return self.offer(reply)

    def kick(self, close: Close) -> None:
        """Mark the client to be closed with this code and reason; the first reason wins."""
        if self.close is None:
            self.close = close
            self.kicked.set()

    def sent_through(self, stream_id: StreamId) -> None:
        """The client has every entry up to this id (its backlog): skip those from now on."""
        self._sent_through = stream_id

    async def next_delivery(self) -> Delivery:
        """The next queued message this client has not had yet."""
        while True:
            delivery = await self.queue.get()
            done = self._sent_through
            if done is None or delivery.stream_id is None or delivery.stream_id > done:
                return delivery
