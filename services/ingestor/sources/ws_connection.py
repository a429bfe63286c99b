"""One WebSocket connection of the Dome source: connect, subscribe its share of the wallets,
stream their fills, backfill the gap, and reconnect when anything goes wrong.

Three tasks per open connection:
- the reader (`_stream`) classifies each frame (`frames.parse_frame`): fills go to the publisher as
  soon as they arrive, acks confirm subscribes first-in first-out, rejected frames are logged
  (`frame_rejected`) and dead-lettered with their reason, and streaming goes on;
- the syncer sends what `SubscriptionRegistry.reconcile` says (subscribe, update, unsubscribe) at
  connect, after each ack and whenever the wallet layout changes: a live wallet change never drops
  the connection;
- the backfiller catches up every wallet the server has confirmed since this connection opened
  (`backfill.CatchUp`: REST since the wallet's watermark, through the same dedupe), one at a
  time, each with its own retry backoff (wallets whose read failed are retried on the side, up to
  BACKFILL_RETRY_CONCURRENCY at once), and reads each again once the REST index has caught up
  with the feed (`backfill.BackfillSchedule`). Until a wallet
  is caught up its live fills are published without moving its watermark, so a failed backfill
  can never be skipped over by a later live fill. A wallet that leaves the connection's
  subscriptions is forgotten, so it is backfilled again from its watermark when it comes back;
  one added by an `update` (no reply) counts as caught up only after its re-read.

Liveness: the library pings every DOME_PING_INTERVAL_S and fails the connection when no pong comes
within DOME_PING_TIMEOUT_S (a stalled peer). Pings prove the link, not the feed: a server can keep
answering pings while its feed is frozen. So while anything is subscribed, no frame at all for
DOME_SILENCE_TIMEOUT_S also replaces the connection (and so backfills); see docs/ingestion.md for
the trade-off with quiet wallets.

On any close or error the connection reconnects with exponential backoff and jitter (reset once a
connection has stayed up for DOME_STABLE_AFTER_S) and subscribes everything again: the server keeps
no subscriptions across connections, and the ids change. A handshake refused with 401/403, or a
close with 4001/4003 (or 1008 naming auth), is an auth failure: logged as such and retried at the
maximum backoff, since retrying sooner cannot fix a key.

Dialects (`dialects`, DOME_DIALECT): Dome, Predexon and polynode speak one protocol with their own
requests; their frames are all read by `frames.parse_frame` and their fills carry their own
`Source`. polynode's `compress=zlib` event frames are binary raw deflate, opened within the frame
bound. A pending (pre-block) fill is published with status `pending` and never moves a watermark:
only its confirmation, under the same order_key, does.

An error frame (or a close reason) naming a refusal that retrying soon cannot fix (Predexon's
INVALID_FILTERS, ITEMS_LIMIT, CONNECTION_LIMIT; polynode's daily session used up) closes the
connection and is reported (`provider_refused`, with the code and what to change; the feed
status's `last_error`; `betterbot_ingestor_provider_refusals_total{code}`); the next attempt waits
from DOME_RECONNECT_MAX_S, doubling up to DOME_PLAN_LIMIT_WAIT_S: never a hot reconnect loop.
A connection left with no subscription at all (its last wallet removed) is closed at once rather
than held open: Predexon closes such a connection after 120 s anyway, and it costs a plan's
connection; it opens again when a wallet comes.

The key is in the URL (path for Dome and Predexon, query for polynode). It never reaches a log
line: errors are described without the URL, the library's logger goes through a scrubbing filter,
and the keys are registered with `shared.logs.register_secret` as a last line of defence.

Frames over DOME_MAX_FRAME_BYTES are rejected and their first `DEAD_LETTER_PREFIX_BYTES` kept in
the dead letter. The socket's own limit is `HARD_LIMIT_FACTOR` times larger, to bound memory: a
frame past it makes the library close the connection (1009); that is recorded as an oversized
rejection without the frame (the library discards it), and the connection is replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Container
from typing import TYPE_CHECKING, NoReturn, Protocol

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.frames import Close, CloseCode

from services.ingestor import metrics
from services.ingestor.backfill import (
    BackfillSchedule,
    CatchUp,
    Outcome,
    WalletRead,
    run_backfills,
)
from services.ingestor.dialects import Dialect, message
from services.ingestor.feed_status import ConnectionState, FeedStatus
from services.ingestor.frames import (
    Ack,
    Fill,
    Frame,
    Greeting,
    Heartbeat,
    Ignored,
    NotAFill,
    Refusal,
    Rejected,
    RejectKind,
    ServerError,
    Snapshot,
    Twins,
    Unsubscribed,
    inflate,
    parse_frame,
    refusal_of,
)
from services.ingestor.http_api import ApiError, AuthError
from services.ingestor.subscriptions import Slot, SubscriptionRegistry, Unsubscribe, Update
from shared.backoff import Backoff
from shared.logs import redact_url, scrub
from shared.models import FillStatus, OrderFill, Source
from shared.tasks import cancel_and_wait

if TYPE_CHECKING:
    from services.ingestor.settings import IngestorSettings

log = logging.getLogger(__name__)

SOURCE = Source.DOME_WS.value
# The watermark feed of everything read from Dome (live, backfill, polling).
DOME_FEED = "dome"
HARD_LIMIT_FACTOR = 4
DEAD_LETTER_PREFIX_BYTES = 64 * 1024
AUTH_FAILURE_STATUSES = (401, 403)
AUTH_CLOSE_CODES = (4001, 4003)
_AUTH_WORDS = ("auth", "unauthori", "api key", "forbidden")


class FillSink(Protocol):
    """Where a source hands its output (the publisher)."""

    async def submit(self, fill: OrderFill, watermark: str | None = None) -> None: ...

    async def submit_dead(self, raw: bytes, reason: str, source: str) -> None: ...


class SourceContext(Protocol):
    """What a connection needs from the source that owns it."""

    @property
    def settings(self) -> IngestorSettings: ...

    @property
    def endpoint(self) -> str: ...

    @property
    def sink(self) -> FillSink: ...

    @property
    def catch_up(self) -> CatchUp | None: ...

    @property
    def tracked(self) -> Container[str]: ...

    @property
    def removed(self) -> Container[str]: ...

    @property
    def twins(self) -> Twins: ...

    def slots(self, index: int) -> list[Slot]: ...

    def refreshed(self) -> None: ...


class FeedSilent(Exception):
    """No frame at all for the silence bound while subscribed."""


class ProviderRefused(Exception):
    """The server refused for the plan or the filters (an error frame's code, a close reason)."""

    def __init__(self, refusal: Refusal, detail: str) -> None:
        super().__init__(f"{refusal.value}: {detail}")
        self.refusal = refusal
        self.detail = detail


class _ScrubFilter(logging.Filter):
    """The library logs request lines at DEBUG; their path or query string holds the key."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = scrub(record.getMessage())
        record.args = None
        return True


_WIRE_LOG = logging.getLogger(__name__ + ".wire")
_WIRE_LOG.addFilter(_ScrubFilter())


def is_auth_close(close: Close | None) -> bool:
    if close is None:
        return False
    if close.code in AUTH_CLOSE_CODES:
        return True
    reason = close.reason.lower()
    return close.code == CloseCode.POLICY_VIOLATION and any(w in reason for w in _AUTH_WORDS)


class DomeConnection:
    def __init__(self, index: int, source: SourceContext, rng: random.Random) -> None:
        self.index = index
        self._source = source
        self._settings = settings = source.settings
        self.registry = SubscriptionRegistry()
        self.status = FeedStatus(source=SOURCE, wallets=0)
        self.backoff = Backoff(
            settings.dome_reconnect_min_s, settings.dome_reconnect_max_s, rng=rng
        )
        # After a refusal for the plan: from the reconnect maximum up to DOME_PLAN_LIMIT_WAIT_S.
        limit_wait = settings.dome_plan_limit_wait_s
        self.limit_backoff = Backoff(
            min(settings.dome_reconnect_max_s, limit_wait), limit_wait, rng=rng
        )
        self.dialect = Dialect(
            settings.dome_dialect, settings.pending_events(), settings.polynode_since_s
        )
        self._compressed = settings.dome_dialect == "polynode" and settings.polynode_compress
        # Set when this side closed the connection for having nothing subscribed.
        self._idle = False
        self.status.behind_limit_s = settings.health_max_backfill_behind_s
        self.backfills = BackfillSchedule(
            indexing_lag_s=settings.backfill_indexing_lag_s,
            update_apply_s=settings.dome_update_apply_s,
            retry_min_s=settings.dome_reconnect_min_s,
            retry_max_s=settings.dome_reconnect_max_s,
            rng=rng,
        )
        self._dirty = asyncio.Event()
        self._time_bounds = settings.exchange_time_bounds()
        self._backfill_wanted = asyncio.Event()
        self.caught_up: set[str] = set()
        # Since the last "backfill_done": wallets caught up and the fills their reads recovered.
        self._round = [0, 0]

    def changed(self) -> None:
        """The layout changed for this connection: reconcile with the server."""
        self._dirty.set()

    def catch_up_again(self) -> None:
        """Backfill every wallet again, as after a reconnect (Redis lost recent writes)."""
        self.caught_up.clear()
        self.backfills.again()
        self._backfill_wanted.set()

    def _wanted(self) -> bool:
        return any(slot.wallets for slot in self._source.slots(self.index))

    async def run(self) -> None:
        """Stream until cancelled; cancelling closes the socket."""
        first = True
        while True:
            if not self._wanted():
                # Every wallet of this connection was removed: connect again when one comes.
                self._dirty.clear()
                await self._dirty.wait()
                continue
            if not first:
                metrics.RECONNECTS.labels(SOURCE).inc()
                self.status.reconnects += 1
            first = False
            self.status.state = ConnectionState.CONNECTING
            delay = await self._connection()
            log.info(
                "reconnect_scheduled",
                extra={"source": SOURCE, "connection": self.index, "in_s": round(delay, 3)},
            )
            await asyncio.sleep(delay)

    async def _connection(self) -> float:
        """One connection's whole life; returns the delay before the next attempt."""
        opened_at: float | None = None
        settings = self._settings
        try:
            async with connect(
                self._source.endpoint,
                ping_interval=settings.dome_ping_interval_s,
                ping_timeout=settings.dome_ping_timeout_s,
                open_timeout=settings.dome_open_timeout_s,
                close_timeout=settings.dome_close_timeout_s,
                max_size=settings.dome_max_frame_bytes * HARD_LIMIT_FACTOR,
                logger=_WIRE_LOG,
            ) as ws:
                opened_at = time.monotonic()
                await self._stream(ws)
        except InvalidStatus as exc:
            status_code = exc.response.status_code
            if status_code in AUTH_FAILURE_STATUSES:
                return self._auth_failed(f"handshake rejected with HTTP {status_code}", status_code)
            error = f"handshake rejected with HTTP {status_code}"
        except ConnectionClosed as exc:
            if self._idle:
                return self._closed_idle()
            # Before the auth check: "session limit reached for this API key" is not a bad key.
            refusal = refusal_of(exc.rcvd.reason, exc.rcvd.reason) if exc.rcvd else None
            if refusal is not None and exc.rcvd is not None:
                reason = f"closed by the server with {exc.rcvd.code} ({scrub(exc.rcvd.reason)})"
                return self._refused(ProviderRefused(refusal, reason[:500]))
            if is_auth_close(exc.rcvd):
                assert exc.rcvd is not None
                close = f"closed by the server with {exc.rcvd.code} ({scrub(exc.rcvd.reason)})"
                return self._auth_failed(close, None)
            error = await self._closed(exc)
        except ProviderRefused as exc:
            return self._refused(exc)
        except FeedSilent as exc:
            metrics.SILENCE_TIMEOUTS.labels(SOURCE).inc()
            error = str(exc)
        except (OSError, TimeoutError, WebSocketException) as exc:
            error = self._describe(exc)
        finally:
            # Also on cancellation: a closed socket holds no subscriptions.
            self.status.connections = 0
            self.status.subscriptions = self.status.pending_subscribes = 0
            self._source.refreshed()
        uptime = None if opened_at is None else time.monotonic() - opened_at
        if uptime is not None and uptime >= settings.dome_stable_after_s:
            self.backoff.reset()
            self.limit_backoff.reset()
        self.status.mark_down(ConnectionState.DISCONNECTED, error, time.time())
        self._source.refreshed()
        log.warning(
            "connection_lost",
            extra={
                "source": SOURCE,
                "connection": self.index,
                "error": error,
                "uptime_s": None if uptime is None else round(uptime, 3),
            },
        )
        return self.backoff.next_delay()

    def _refused(self, exc: ProviderRefused) -> float:
        """Report a refusal for the plan or the filters, and wait long before trying again."""
        refusal = exc.refusal
        metrics.PROVIDER_REFUSALS.labels(SOURCE, refusal.value).inc()
        delay = self.limit_backoff.next_delay()
        self.status.mark_down(
            ConnectionState.DISCONNECTED, f"{exc}; {refusal.hint}"[:1000], time.time()
        )
        self._source.refreshed()
        log.error(
            "provider_refused",
            extra={
                "source": SOURCE,
                "connection": self.index,
                "code": refusal.value,
                "detail": exc.detail,
                "hint": refusal.hint,
                "retry_in_s": round(delay, 3),
            },
        )
        return delay

    def _closed_idle(self) -> float:
        """Closed by us with nothing subscribed: not a failure; reopened when a wallet comes."""
        self.status.state = ConnectionState.STOPPED
        self.status.down_since = None
        self.status.last_error = ""
        self._source.refreshed()
        log.info("connection_closed_idle", extra={"source": SOURCE, "connection": self.index})
        return 0.0

    def _auth_failed(self, error: str, status_code: int | None) -> float:
        metrics.AUTH_FAILURES.labels(SOURCE).inc()
        error = f"auth failure: {error}"
        self.status.mark_down(ConnectionState.AUTH_FAILED, error, time.time())
        self._source.refreshed()
        log.error(
            "auth_failed",
            extra={
                "source": SOURCE,
                "connection": self.index,
                "status": status_code,
                "error": error,
                "hint": "check DOME_API_KEY (POLYNODE_API_KEY for the polynode dialect)",
            },
        )
        return self.backoff.max_delay()

    async def _stream(self, ws: ClientConnection) -> NoReturn:
        """Subscribe, then handle frames until the connection fails."""
        self.registry.clear()
        self.caught_up.clear()
        self.backfills.reset()
        self._idle = False
        self.status.mark_connected()
        self.status.connections = 1
        self._source.refreshed()
        log.info(
            "connected",
            extra={
                "source": SOURCE,
                "connection": self.index,
                "endpoint": redact_url(self._settings.dome_ws_url),
                "dialect": self._settings.dome_dialect,
                "subscriptions": len(self._source.slots(self.index)),
            },
        )
        helpers = [asyncio.create_task(self._sync_forever(ws), name="dome_ws-sync")]
        if self._source.catch_up is not None:
            helpers.append(asyncio.create_task(self._backfill_forever(), name="dome_ws-backfill"))
        self._dirty.set()
        try:
            while True:
                raw = await self._receive(ws)
                await self._handle(raw, time.time())
        except asyncio.CancelledError:
            # Stopping, not failing: say so to the server (the library would send 1011).
            await ws.close(CloseCode.GOING_AWAY, "client stopping")
            raise
        except ProviderRefused as exc:
            await ws.close(CloseCode.NORMAL_CLOSURE, f"refused: {exc.refusal.value}")
            raise
        finally:
            for task in helpers:
                await cancel_and_wait(task)

    async def _receive(self, ws: ClientConnection) -> bytes | str:
        """The next frame: text frames as str, binary ones as bytes (compressed, with zlib)."""
        silence = self._settings.dome_silence_timeout_s
        if not silence or not (self.registry.active or self.registry.pending):
            return await ws.recv()
        try:
            async with asyncio.timeout(silence):
                return await ws.recv()
        except TimeoutError:
            log.warning(
                "feed_silent",
                extra={"source": SOURCE, "connection": self.index, "silence_s": silence},
            )
            raise FeedSilent(
                f"no frame for {silence:g}s while subscribed (DOME_SILENCE_TIMEOUT_S)"
            ) from None

    async def _sync_forever(self, ws: ClientConnection) -> None:
        """Send whatever brings the server to the desired subscriptions, each time it changes."""
        with contextlib.suppress(ConnectionClosed):
            while True:
                await self._dirty.wait()
                self._dirty.clear()
                actions = self.registry.reconcile(self._source.slots(self.index))
                for action in actions:
                    await ws.send(orjson.dumps(message(action, self.dialect)).decode())
                if self._nothing_subscribed():
                    self._idle = True
                    await ws.close(CloseCode.NORMAL_CLOSURE, "no subscriptions")
                    return
                if not actions:
                    continue
                self._plan_after_sync()
                changes = [a for a in actions if isinstance(a, Update | Unsubscribe)]
                if changes:
                    log.info(
                        "subscriptions_changed",
                        extra={
                            "source": SOURCE,
                            "connection": self.index,
                            "updates": sum(isinstance(a, Update) for a in changes),
                            "unsubscribes": sum(isinstance(a, Unsubscribe) for a in changes),
                        },
                    )
                self._subscriptions_changed()

    def _nothing_subscribed(self) -> bool:
        return not (self._wanted() or self.registry.active or self.registry.pending)

    def _plan_after_sync(self) -> None:
        """Wallets an update just added may not be followed by the server yet: read them afresh
        (and again later); wallets that left are forgotten, so a return is backfilled."""
        added = self.registry.take_added()
        if added:
            self.caught_up.difference_update(added)
            self.backfills.updated(added)
        self._forget_departed()

    def _forget_departed(self) -> None:
        confirmed = self.registry.confirmed()
        self.caught_up &= confirmed
        # While subscribes await their acks (a fresh connection), absent is not departed: a
        # wallet that was behind must stay behind since then, not since this reconnect.
        if not self.registry.pending:
            self.backfills.forget(confirmed)

    async def _backfill_forever(self) -> None:
        """Read every wallet that needs it; failing wallets are retried on the side."""
        catch_up = self._source.catch_up
        assert catch_up is not None
        await run_backfills(
            self.backfills,
            retry_concurrency=self._settings.backfill_retry_concurrency,
            forget=self._forget_departed,
            wanted=lambda: self.registry.confirmed() - self.caught_up,
            read=functools.partial(self._backfill, catch_up),
            report=self._backfill_changed,
            wake=self._backfill_wanted,
            task_name="dome_ws-backfill",
        )

    async def _backfill(self, catch_up: CatchUp, read: WalletRead) -> None:
        """One read of one wallet; its outcome goes into the schedule."""
        started_at, started_mono = time.time(), time.monotonic()
        try:
            new = await catch_up.wallet(read.wallet, read.reach_back)
        except ApiError as exc:
            self._backfill_failed(catch_up.source, read, exc)
        except Exception as exc:  # a bug must not leave the wallet silently never read
            log.exception("backfill_crashed", extra={"source": catch_up.source})
            self._backfill_failed(catch_up.source, read, ApiError(type(exc).__name__))
        else:
            self._backfilled(catch_up.source, read, new, started_at, started_mono)

    def _backfilled(
        self, source: str, read: WalletRead, new: int, started_at: float, started_mono: float
    ) -> None:
        reread = read.reach_back is not None
        outcome = self.backfills.succeeded(read, started_at, started_mono)
        if outcome is Outcome.STALE:
            return
        if outcome is not Outcome.UNCONFIRMED:
            self.caught_up.add(read.wallet)
        if reread:
            metrics.BACKFILL_REREADS.labels(source).inc()
        if reread and new:
            # Fills the first pass could not see: the REST index trailed, or an update was late.
            log.info(
                "backfill_reread_recovered",
                extra={
                    "source": source,
                    "connection": self.index,
                    "wallet": read.wallet,
                    "fills": new,
                },
            )
        if not reread:
            self._round[0] += 1
            self._round[1] += new

    def _backfill_failed(self, source: str, read: WalletRead, exc: ApiError) -> None:
        auth = isinstance(exc, AuthError)
        delay = self.backfills.failed(read, auth=auth)
        if delay is None:
            return
        metrics.BACKFILL_FAILURES.labels(source).inc()
        extra = {
            "source": source,
            "connection": self.index,
            "wallet": read.wallet,
            "attempt": read.failures,
            "retry_in_s": round(delay, 3),
            "error": str(exc),
        }
        if auth:
            # Retrying any wallet sooner cannot fix a key: hold them all.
            self.backfills.hold(delay)
            metrics.AUTH_FAILURES.labels(source).inc()
            log.error("backfill_auth_failed", extra=extra)
        else:
            log.warning("backfill_failed", extra=extra)

    def _backfill_changed(self) -> None:
        """Report the wallets behind; log a round's end once none is."""
        behind, since = self.backfills.behind()
        self.status.wallets_behind, self.status.behind_since = behind, since
        self._source.refreshed()
        wallets, recovered = self._round
        if behind or not wallets:
            return
        self._round = [0, 0]
        source = self._source.catch_up.source if self._source.catch_up else SOURCE
        log.info(
            "backfill_done",
            extra={
                "source": source,
                "connection": self.index,
                "wallets": wallets,
                "recovered": recovered,
            },
        )

    async def _handle(self, raw: bytes | str, received_at: float) -> None:
        text = raw
        if isinstance(raw, bytes) and self._compressed:
            opened = inflate(raw, self._settings.dome_max_frame_bytes)
            if isinstance(opened, Rejected):
                await self._reject(raw, opened)
                return
            text = opened
        frame = parse_frame(
            text,
            tracked=self._source.tracked,
            received_at=received_at,
            max_bytes=self._settings.dome_max_frame_bytes,
            ignored=self._source.removed,
            bounds=self._time_bounds,
            twins=self._source.twins,
            dialect=self.dialect.name,
        )
        # A rejected frame is dead-lettered as read: inflated, when it was compressed.
        await self._dispatch(frame, text, received_at)

    async def _dispatch(self, frame: Frame, raw: bytes | str, received_at: float) -> None:
        if isinstance(frame, Fill):
            await self._filled(frame.fill, received_at)
        elif isinstance(frame, Snapshot):
            for item in frame.items:
                await self._dispatch(item, raw, received_at)
        elif isinstance(frame, Ack):
            self._acked(frame.subscription_id, frame.warnings)
        elif isinstance(frame, ServerError):
            self._server_error(frame)
        elif isinstance(frame, Ignored):
            metrics.IGNORED.labels(SOURCE).inc()
            log.debug("event_of_removed_wallet", extra={"wallet": frame.user})
        elif isinstance(frame, NotAFill):
            metrics.NON_FILL_EVENTS.labels(SOURCE, frame.event_type).inc()
            log.debug("not_a_fill", extra={"source": SOURCE, "event_type": frame.event_type})
        elif isinstance(frame, Greeting):
            log.info(
                "server_greeting",
                extra={"source": SOURCE, "connection": self.index, "detail": scrub(frame.message)},
            )
        elif isinstance(frame, Unsubscribed):
            log.debug("unsubscribed", extra={"subscription_id": frame.subscription_id})
        elif not isinstance(frame, Heartbeat):  # a heartbeat only proves the feed alive
            await self._reject(frame.item or raw, frame)

    async def _filled(self, fill: OrderFill, received_at: float) -> None:
        metrics.EVENTS_RECEIVED.labels(SOURCE).inc()
        self.status.mark_event(received_at, fill.timestamp)
        # A pending fill may never confirm: only a confirmed one moves the watermark.
        caught_up = fill.user in self.caught_up and fill.status is FillStatus.CONFIRMED
        await self._source.sink.submit(fill, DOME_FEED if caught_up else None)

    def _server_error(self, frame: ServerError) -> None:
        if frame.refusal is not None:
            raise ProviderRefused(frame.refusal, scrub(frame.detail))
        metrics.SERVER_ERRORS.labels(SOURCE).inc()
        log.warning(
            "server_error",
            extra={
                "source": SOURCE,
                "code": frame.code,
                "detail": scrub(frame.detail),
                "pending_subscribes": self.registry.pending,
            },
        )

    def _acked(self, subscription_id: str, warnings: tuple[str, ...] = ()) -> None:
        if warnings:
            log.warning(
                "subscription_warnings",
                extra={
                    "source": SOURCE,
                    "subscription_id": subscription_id,
                    "warnings": [scrub(warning) for warning in warnings],
                },
            )
        users = self.registry.acked(subscription_id)
        if users is None:
            log.warning(
                "unexpected_ack", extra={"source": SOURCE, "subscription_id": subscription_id}
            )
            return
        # The slot may have changed while its subscribe was in flight.
        self._dirty.set()
        self._subscriptions_changed()
        if self.registry.pending == 0:
            log.info(
                "subscribed",
                extra={
                    "source": SOURCE,
                    "connection": self.index,
                    "subscriptions": len(self.registry.active),
                    "wallets": self.registry.wallets,
                },
            )

    def _subscriptions_changed(self) -> None:
        self.status.subscriptions = len(self.registry.active)
        self.status.pending_subscribes = self.registry.pending
        self.status.wallets = self.registry.wallets
        self._backfill_wanted.set()
        self._source.refreshed()

    async def _reject(self, raw: bytes | str, frame: Rejected) -> None:
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
        if isinstance(raw, str):
            raw = raw.encode()
        if len(raw) > DEAD_LETTER_PREFIX_BYTES and frame.kind is RejectKind.OVERSIZED:
            raw = raw[:DEAD_LETTER_PREFIX_BYTES]
            reason += f"; only the first {DEAD_LETTER_PREFIX_BYTES} bytes are kept"
        await self._source.sink.submit_dead(raw, reason, SOURCE)

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
        endpoint = self._source.endpoint
        text = str(exc).replace(endpoint, redact_url(endpoint))
        return f"{type(exc).__name__}: {scrub(text)}"[:500]
