"""The Dome WebSocket source: connect, subscribe the tracked wallets, stream their fills.

One connection carries every subscription (chunks of at most DOME_WALLETS_PER_SUBSCRIPTION
wallets). Acks are matched to subscribes first-in first-out. Each frame is classified by
`frames.parse_frame`: fills go to the publisher as soon as they arrive, rejected frames are logged
(`frame_rejected`) and dead-lettered with their reason, and streaming goes on.

On any close or error the source reconnects with exponential backoff and jitter (reset once a
connection has stayed up for DOME_STABLE_AFTER_S) and subscribes everything again: the server keeps
no subscriptions across connections, and the ids change. A handshake rejected with 401/403 is an
auth failure: logged as such and retried at the maximum backoff, since retrying sooner cannot fix
a key.

The key is part of the URL path. It never reaches a log line: errors are described without the
URL, the library's own logger goes through a scrubbing filter, and the key is registered with
`shared.logs.register_secret` as a last line of defence.

Frames over DOME_MAX_FRAME_BYTES are rejected and their first `DEAD_LETTER_PREFIX_BYTES` kept in
the dead letter. The socket's own limit is `HARD_LIMIT_FACTOR` times larger, to bound memory: a
frame past it makes the library close the connection (1009); that is recorded as an oversized
rejection without the frame (the library discards it), and the source reconnects.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from typing import NoReturn, Protocol

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.frames import CloseCode

from services.ingestor import metrics
from services.ingestor.backoff import Backoff
from services.ingestor.feed_status import ConnectionState, FeedStatus
from services.ingestor.frames import Ack, Fill, Rejected, RejectKind, ServerError, parse_frame
from services.ingestor.settings import IngestorSettings
from services.ingestor.subscriptions import SubscriptionRegistry, subscribe_message
from shared.logs import redact_url, register_secret, scrub
from shared.models import OrderFill, Source

log = logging.getLogger(__name__)

SOURCE = Source.DOME_WS.value
HARD_LIMIT_FACTOR = 4
DEAD_LETTER_PREFIX_BYTES = 64 * 1024
AUTH_FAILURE_STATUSES = (401, 403)
CLOSE_TIMEOUT_S = 5.0


class FillSink(Protocol):
    """Where a source hands its output (the publisher)."""

    async def submit(self, fill: OrderFill) -> None: ...

    async def submit_dead(self, raw: bytes, reason: str) -> None: ...


class _ScrubFilter(logging.Filter):
    """The library logs request lines at DEBUG; the path holds the key."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = scrub(record.getMessage())
        record.args = None
        return True


_WIRE_LOG = logging.getLogger(__name__ + ".wire")
_WIRE_LOG.addFilter(_ScrubFilter())


class DomeWebSocketSource:
    def __init__(
        self,
        settings: IngestorSettings,
        subscriptions: Sequence[Sequence[str]],
        sink: FillSink,
        status: FeedStatus,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._endpoint = settings.dome_ws_endpoint()
        register_secret(settings.dome_api_key.get_secret_value())
        self._subscriptions = [tuple(chunk) for chunk in subscriptions]
        self._tracked = frozenset(wallet.lower() for chunk in subscriptions for wallet in chunk)
        self._sink = sink
        self.status = status
        self.registry = SubscriptionRegistry()
        self.backoff = Backoff(
            settings.dome_reconnect_min_s, settings.dome_reconnect_max_s, rng=rng or random.Random()
        )

    async def run(self) -> None:
        """Stream until cancelled; cancelling closes the socket."""
        first = True
        while True:
            if not first:
                metrics.RECONNECTS.labels(SOURCE).inc()
                self.status.reconnects += 1
            first = False
            self.status.state = ConnectionState.CONNECTING
            delay = await self._connection()
            log.info("reconnect_scheduled", extra={"source": SOURCE, "in_s": round(delay, 3)})
            await asyncio.sleep(delay)

    async def _connection(self) -> float:
        """One connection's whole life; returns the delay before the next attempt."""
        opened_at: float | None = None
        try:
            async with connect(
                self._endpoint,
                ping_interval=self._settings.dome_ping_interval_s,
                ping_timeout=self._settings.dome_ping_timeout_s,
                open_timeout=self._settings.dome_open_timeout_s,
                close_timeout=CLOSE_TIMEOUT_S,
                max_size=self._settings.dome_max_frame_bytes * HARD_LIMIT_FACTOR,
                logger=_WIRE_LOG,
            ) as ws:
                opened_at = time.monotonic()
                await self._stream(ws)
        except InvalidStatus as exc:
            status_code = exc.response.status_code
            if status_code in AUTH_FAILURE_STATUSES:
                return self._auth_failed(status_code)
            error = f"handshake rejected with HTTP {status_code}"
        except ConnectionClosed as exc:
            error = await self._closed(exc)
        except (OSError, TimeoutError, WebSocketException) as exc:
            error = self._describe(exc)
        finally:
            metrics.CONNECTED.labels(SOURCE).set(0)
            metrics.SUBSCRIPTIONS.labels(SOURCE).set(0)
        uptime = None if opened_at is None else time.monotonic() - opened_at
        if uptime is not None and uptime >= self._settings.dome_stable_after_s:
            self.backoff.reset()
        self.status.mark_down(ConnectionState.DISCONNECTED, error, time.time())
        log.warning(
            "connection_lost",
            extra={
                "source": SOURCE,
                "error": error,
                "uptime_s": None if uptime is None else round(uptime, 3),
            },
        )
        return self.backoff.next_delay()

    def _auth_failed(self, status_code: int) -> float:
        metrics.AUTH_FAILURES.labels(SOURCE).inc()
        error = f"auth failure: handshake rejected with HTTP {status_code}"
        self.status.mark_down(ConnectionState.AUTH_FAILED, error, time.time())
        log.error(
            "auth_failed",
            extra={"source": SOURCE, "status": status_code, "hint": "check DOME_API_KEY"},
        )
        return self.backoff.max_delay()

    async def _stream(self, ws: ClientConnection) -> NoReturn:
        """Subscribe, then handle frames until the connection fails (ConnectionClosed)."""
        self.registry.clear()
        self.status.mark_connected()
        metrics.CONNECTED.labels(SOURCE).set(1)
        log.info(
            "connected",
            extra={
                "source": SOURCE,
                "endpoint": redact_url(self._settings.dome_ws_url),
                "subscribes": len(self._subscriptions),
            },
        )
        try:
            for chunk in self._subscriptions:
                await ws.send(orjson.dumps(subscribe_message(chunk)).decode())
                self.registry.sent(chunk)
            self.status.pending_subscribes = self.registry.pending
            while True:
                raw = await ws.recv(decode=False)
                await self._handle(raw, time.time())
        except asyncio.CancelledError:
            # Stopping, not failing: say so to the server (the library would send 1011).
            await ws.close(CloseCode.GOING_AWAY, "client stopping")
            raise

    async def _handle(self, raw: bytes, received_at: float) -> None:
        frame = parse_frame(
            raw,
            tracked=self._tracked,
            received_at=received_at,
            max_bytes=self._settings.dome_max_frame_bytes,
        )
        if isinstance(frame, Fill):
            metrics.EVENTS_RECEIVED.labels(SOURCE).inc()
            self.status.mark_event(received_at, frame.fill.timestamp)
            await self._sink.submit(frame.fill)
        elif isinstance(frame, Ack):
            self._acked(frame.subscription_id)
        elif isinstance(frame, ServerError):
            metrics.SERVER_ERRORS.labels(SOURCE).inc()
            log.warning(
                "server_error",
                extra={
                    "source": SOURCE,
                    "detail": scrub(frame.detail),
                    "pending_subscribes": self.registry.pending,
                },
            )
        else:
            await self._reject(raw, frame)

    def _acked(self, subscription_id: str) -> None:
        users = self.registry.acked(subscription_id)
        if users is None:
            log.warning(
                "unexpected_ack", extra={"source": SOURCE, "subscription_id": subscription_id}
            )
            return
        self.status.subscriptions = len(self.registry.active)
        self.status.pending_subscribes = self.registry.pending
        metrics.SUBSCRIPTIONS.labels(SOURCE).set(len(self.registry.active))
        if self.registry.pending == 0:
            log.info(
                "subscribed",
                extra={
                    "source": SOURCE,
                    "subscriptions": len(self.registry.active),
                    "wallets": self.registry.wallets,
                },
            )

    async def _reject(self, raw: bytes, frame: Rejected) -> None:
        metrics.REJECTED.labels(SOURCE, frame.kind.value).inc()
        log.warning(
            "frame_rejected",
            extra={
                "source": SOURCE,
                "reason_class": frame.kind.value,
                "reason": frame.reason,
                "subscription_id": frame.subscription_id,
            },
        )
        reason = f"{frame.kind.value}: {frame.reason}"
        if len(raw) > DEAD_LETTER_PREFIX_BYTES and frame.kind is RejectKind.OVERSIZED:
            raw = raw[:DEAD_LETTER_PREFIX_BYTES]
            reason += f"; only the first {DEAD_LETTER_PREFIX_BYTES} bytes are kept"
        await self._sink.submit_dead(raw, reason)

    async def _closed(self, exc: ConnectionClosed) -> str:
        if exc.sent is not None and exc.sent.code == CloseCode.MESSAGE_TOO_BIG:
            limit = self._settings.dome_max_frame_bytes * HARD_LIMIT_FACTOR
            await self._reject(
                b"",
                Rejected(
                    RejectKind.OVERSIZED,
                    f"frame over the socket's hard limit of {limit} bytes; the connection was "
                    "closed (1009) and the frame discarded",
                ),
            )
        return self._describe(exc)

    def _describe(self, exc: BaseException) -> str:
        # Some exceptions quote the URL (InvalidURI); it holds the key.
        text = str(exc).replace(self._endpoint, redact_url(self._endpoint))
        return f"{type(exc).__name__}: {scrub(text)}"[:500]
