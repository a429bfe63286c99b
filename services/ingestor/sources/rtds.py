"""The `rtds` source: Polymarket's unofficial RTDS `activity` firehose, an opportunistic extra.

RTDS carries other traders' wallets about 0.65 s after the match, with no key, but it is
undocumented and unreliable (feeds.md): freezes every 14-63 minutes with the socket open and
pings answered, `trades` silent for weeks while `orders_matched` worked, 429s from the CDN. So it
is read as an extra beside a source to trust, never as the only guarantee, and everything it
misses is read back from a wallet history (the Data API by default) after every new socket.

One socket at a time (`RTDS_URL`):
- it subscribes to `activity` both `trades` and `orders_matched` with empty filters (a JSON
  string: there is no wallet filter, so every trade arrives and the tracked wallets' are kept;
  wallets added or removed live change only that local set);
- it sends the text `ping` every RTDS_PING_INTERVAL_S, as the official client does;
- frames are classified by `rtds_frames.parse_rtds_frame` (each quirk is handled there): a fill
  goes to the publisher, whose order_key dedupe makes the copy on the other type (and the same
  fill from any other source) one entry; a bad frame is dead-lettered with its reason;
- a payload watchdog: no payload of any wallet for RTDS_PAYLOAD_TIMEOUT_S means a frozen socket.
  Re-subscribing does not recover one (the maintainers' advice), so the socket is closed and a
  NEW one opened at once (`betterbot_ingestor_rtds_watchdog_reconnects_total`); after a socket
  that never carried a payload, only after the reconnect backoff (each new socket backfills
  every wallet, which must not happen every few seconds).

Gap backfill, as on the Dome WebSocket (`backfill.CatchUp` and `BackfillSchedule`): after every
new socket each tracked wallet is read from its `rtds` watermark less the overlap (from
RTDS_BACKFILL_VIA: `data_api`, `dome_rest` or `off`), then again once the history's indexing lag
has passed; failing wallets are retried on the side with their own backoff. Until a wallet is
caught up since this socket opened, its live fills do not move its watermark. A wallet added
live is read from its watermark (or the initial lookback) at once; Redis losing writes reads
every wallet again.

Errors (a refused or dropped socket, a 429 with its Retry-After) reconnect with the Dome source's
backoff (DOME_RECONNECT_MIN_S..MAX_S), reset once a socket stayed up DOME_STABLE_AFTER_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, NoReturn

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.frames import CloseCode

from services.ingestor import metrics
from services.ingestor.backfill import (
    BackfillSchedule,
    CatchUp,
    Outcome,
    WalletRead,
    run_backfills,
)
from services.ingestor.feed_status import ConnectionState, FeedStatus
from services.ingestor.frames import Rejected, RejectKind
from services.ingestor.http_api import ApiError, AuthError, retry_after_seconds
from services.ingestor.sources.rtds_frames import (
    TOPIC,
    TYPES,
    RtdsFill,
    SkipKind,
    Skipped,
    TypeOccurrences,
    parse_rtds_frame,
)
from services.ingestor.sources.ws_connection import (
    DEAD_LETTER_PREFIX_BYTES,
    HARD_LIMIT_FACTOR,
    FillSink,
)
from shared.backoff import Backoff
from shared.logs import redact_url, scrub
from shared.models import Source
from shared.tasks import cancel_and_wait

if TYPE_CHECKING:
    from services.ingestor.settings import IngestorSettings

log = logging.getLogger(__name__)

SOURCE = Source.RTDS.value
# The watermark feed of the wallets this source has caught up (`<feed>:<wallet>`).
RTDS_FEED = "rtds"
PING = "ping"
RATE_LIMITED_STATUS = 429


def subscribe_message() -> str:
    """Both types of the activity topic, every trade (filters is a JSON string; empty: all)."""
    subscriptions = [{"topic": TOPIC, "type": kind, "filters": ""} for kind in TYPES]
    return orjson.dumps({"action": "subscribe", "subscriptions": subscriptions}).decode()


class PayloadSilent(Exception):
    """No payload for the watchdog's bound: the socket is frozen."""

    def __init__(self, message: str, *, froze: bool) -> None:
        super().__init__(message)
        # True: payloads came, then stopped (a freeze: a new socket at once). False: none ever
        # came on this socket (the service sends nothing): back off, or every wallet would be
        # backfilled again every RTDS_PAYLOAD_TIMEOUT_S.
        self.froze = froze


class RtdsSource:
    def __init__(
        self,
        settings: IngestorSettings,
        wallets: Iterable[str],
        sink: FillSink,
        catch_up: CatchUp | None,
        rng: random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._sink = sink
        self.catch_up = catch_up
        self.tracked: set[str] = set(wallets)
        rng = rng or random.Random()
        self.status = FeedStatus(source=SOURCE, wallets=len(self.tracked))
        self.status.behind_limit_s = settings.health_max_backfill_behind_s
        self.backoff = Backoff(
            settings.dome_reconnect_min_s, settings.dome_reconnect_max_s, rng=rng
        )
        self.backfills = BackfillSchedule(
            indexing_lag_s=settings.backfill_indexing_lag_s,
            update_apply_s=0.0,
            retry_min_s=settings.dome_reconnect_min_s,
            retry_max_s=settings.dome_reconnect_max_s,
            rng=rng,
        )
        # Wallets read since this socket opened: their live fills may raise the watermark.
        self.caught_up: set[str] = set()
        self._wake_backfill = asyncio.Event()
        self._bounds = settings.exchange_time_bounds()
        self._occurrences = TypeOccurrences()
        self.sockets = 0
        metrics.WALLETS.labels(SOURCE).set(len(self.tracked))

    # --- wallets (the service's WalletSource protocol) ----------------------------------------

    def add_wallet(self, wallet: str) -> bool:
        """Keep this wallet's trades from now on, and read its gap (RTDS replays nothing)."""
        self.tracked.add(wallet)
        self.caught_up.discard(wallet)
        self._wallets_changed()
        return True

    def remove_wallet(self, wallet: str) -> None:
        self.tracked.discard(wallet)
        self.caught_up.discard(wallet)
        self._wallets_changed()

    def catch_up_again(self) -> None:
        """Backfill every wallet again (Redis lost recent writes)."""
        self.caught_up.clear()
        self.backfills.again()
        self._wake_backfill.set()

    def _wallets_changed(self) -> None:
        self.status.wallets = len(self.tracked)
        metrics.WALLETS.labels(SOURCE).set(len(self.tracked))
        self._wake_backfill.set()

    # --- the socket -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Read until cancelled, one socket after another; cancelling closes the socket."""
        while True:
            if self.sockets:
                metrics.RECONNECTS.labels(SOURCE).inc()
                self.status.reconnects += 1
            self.sockets += 1
            self.status.state = ConnectionState.CONNECTING
            delay = await self._connection()
            if delay:
                log.info("reconnect_scheduled", extra={"source": SOURCE, "in_s": round(delay, 3)})
                await asyncio.sleep(delay)

    async def _connection(self) -> float:
        """One socket's whole life; returns the delay before the next one (0: at once)."""
        settings = self._settings
        opened_at: float | None = None
        delay: float | None = None
        try:
            async with connect(
                settings.rtds_url,
                ping_interval=settings.dome_ping_interval_s,
                ping_timeout=settings.dome_ping_timeout_s,
                open_timeout=settings.dome_open_timeout_s,
                close_timeout=settings.dome_close_timeout_s,
                max_size=settings.dome_max_frame_bytes * HARD_LIMIT_FACTOR,
            ) as ws:
                opened_at = time.monotonic()
                await self._stream(ws)
        except PayloadSilent as exc:
            metrics.RTDS_WATCHDOG_RECONNECTS.inc()
            error, delay = str(exc), (0.0 if exc.froze else None)
        except InvalidStatus as exc:
            error = f"handshake rejected with HTTP {exc.response.status_code}"
            delay = self._refused(exc)
        except (OSError, TimeoutError, WebSocketException) as exc:
            error = f"{type(exc).__name__}: {scrub(str(exc))}"[:500]
        finally:
            self.status.connections = 0
            self.status.subscriptions = 0
            metrics.CONNECTED.labels(SOURCE).set(0)
        uptime = None if opened_at is None else time.monotonic() - opened_at
        if uptime is not None and uptime >= settings.dome_stable_after_s:
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
        return self.backoff.next_delay() if delay is None else delay

    def _refused(self, exc: InvalidStatus) -> float | None:
        """A 429 (the CDN's limit) waits its Retry-After at least; None: the usual backoff."""
        if exc.response.status_code != RATE_LIMITED_STATUS:
            return None
        metrics.RATE_LIMITED.labels(SOURCE).inc()
        wait = retry_after_seconds(exc.response.headers.get("Retry-After"))
        log.warning("rate_limited", extra={"source": SOURCE, "retry_after_s": wait})
        return max(wait, self.backoff.next_delay())

    async def _stream(self, ws: ClientConnection) -> NoReturn:
        """Subscribe, ping, backfill, and handle frames until the socket fails or freezes."""
        self.caught_up.clear()
        self.backfills.reset()
        self._occurrences = TypeOccurrences()  # counted per socket: a new one replays nothing
        await ws.send(subscribe_message())
        self.status.mark_connected()
        self.status.connections = 1
        self.status.subscriptions = len(TYPES)
        metrics.CONNECTED.labels(SOURCE).set(1)
        log.info(
            "connected",
            extra={"source": SOURCE, "endpoint": redact_url(self._settings.rtds_url)},
        )
        helpers = [asyncio.create_task(self._ping_forever(ws), name="rtds-ping")]
        if self.catch_up is not None:
            helpers.append(asyncio.create_task(self._backfill_forever(), name="rtds-backfill"))
        try:
            await self._read_forever(ws)
        except asyncio.CancelledError:
            await ws.close(CloseCode.GOING_AWAY, "client stopping")
            raise
        except PayloadSilent:
            # A new socket follows at once; say goodbye on this one without waiting long.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(CloseCode.GOING_AWAY, "payload watchdog"), 1.0)
            raise
        finally:
            for task in helpers:
                await cancel_and_wait(task)

    async def _read_forever(self, ws: ClientConnection) -> NoReturn:
        bound = self._settings.rtds_payload_timeout_s
        last_payload, payloads = time.monotonic(), 0
        while True:
            left = last_payload + bound - time.monotonic() if bound else None
            try:
                async with asyncio.timeout(left):
                    raw = await ws.recv()
            except TimeoutError:
                log.warning("rtds_payload_silent", extra={"source": SOURCE, "silence_s": bound})
                raise PayloadSilent(
                    f"no payload for {bound:g}s (RTDS_PAYLOAD_TIMEOUT_S): a new socket",
                    froze=payloads > 0,
                ) from None
            if await self._handle(raw, time.time()):
                last_payload, payloads = time.monotonic(), payloads + 1

    async def _ping_forever(self, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.send(PING)
                await asyncio.sleep(self._settings.rtds_ping_interval_s)

    async def _handle(self, raw: str | bytes, received_at: float) -> bool:
        """Handle one frame; True when it carried a payload (any wallet's, even a bad one)."""
        frame = parse_rtds_frame(
            raw,
            tracked=self.tracked,
            received_at=received_at,
            max_bytes=self._settings.dome_max_frame_bytes,
            occurrences=self._occurrences,
            bounds=self._bounds,
        )
        if isinstance(frame, RtdsFill):
            metrics.RTDS_FRAMES.labels("fill").inc()
            metrics.EVENTS_RECEIVED.labels(SOURCE).inc()
            fill = frame.fill
            self.status.mark_event(received_at, fill.timestamp)
            watermark = RTDS_FEED if fill.user in self.caught_up else None
            await self._sink.submit(fill, watermark)
            return True
        if isinstance(frame, Skipped):
            metrics.RTDS_FRAMES.labels(frame.kind.value).inc()
            return frame.kind is SkipKind.UNTRACKED
        metrics.RTDS_FRAMES.labels("rejected").inc()
        await self._reject(raw, frame)
        # A payload that was bad still shows the feed is alive.
        return frame.kind in (RejectKind.INVALID_EVENT, RejectKind.IMPLAUSIBLE_TIMESTAMP)

    async def _reject(self, raw: str | bytes, frame: Rejected) -> None:
        metrics.REJECTED.labels(SOURCE, frame.kind.value).inc()
        log.warning(
            "frame_rejected",
            extra={"source": SOURCE, "reason_class": frame.kind.value, "reason": frame.reason},
        )
        data = raw.encode() if isinstance(raw, str) else raw
        reason = f"{frame.kind.value}: {frame.reason}"
        if len(data) > DEAD_LETTER_PREFIX_BYTES:
            data = data[:DEAD_LETTER_PREFIX_BYTES]
            reason += f"; only the first {DEAD_LETTER_PREFIX_BYTES} bytes are kept"
        await self._sink.submit_dead(data, reason, SOURCE)

    # --- gap backfill -----------------------------------------------------------------------------

    async def _backfill_forever(self) -> None:
        """Read every tracked wallet not caught up since this socket opened; wallets whose read
        failed are retried on the side (BACKFILL_RETRY_CONCURRENCY at once)."""
        catch_up = self.catch_up
        assert catch_up is not None
        await run_backfills(
            self.backfills,
            retry_concurrency=self._settings.backfill_retry_concurrency,
            forget=lambda: self.backfills.forget(self.tracked),
            wanted=lambda: self.tracked - self.caught_up,
            read=functools.partial(self._read, catch_up),
            report=self._report_behind,
            wake=self._wake_backfill,
            task_name="rtds-backfill-read",
        )

    async def _read(self, catch_up: CatchUp, read: WalletRead) -> None:
        started_at, started_mono = time.time(), time.monotonic()
        reread = read.reach_back is not None
        try:
            new = await catch_up.wallet(read.wallet, read.reach_back)
        except ApiError as exc:
            self._read_failed(catch_up.source, read, exc)
            return
        except Exception as exc:  # a bug must not leave the wallet silently never read
            log.exception("backfill_crashed", extra={"source": catch_up.source})
            self._read_failed(catch_up.source, read, ApiError(type(exc).__name__))
            return
        outcome = self.backfills.succeeded(read, started_at, started_mono)
        if outcome is not Outcome.STALE and read.wallet in self.tracked:
            self.caught_up.add(read.wallet)
        if reread and outcome is not Outcome.STALE:
            metrics.BACKFILL_REREADS.labels(catch_up.source).inc()
        if new:
            log.debug(
                "backfill_recovered",
                extra={
                    "source": SOURCE,
                    "via": catch_up.source,
                    "wallet": read.wallet,
                    "fills": new,
                },
            )

    def _read_failed(self, via: str, read: WalletRead, exc: ApiError) -> None:
        auth = isinstance(exc, AuthError)
        delay = self.backfills.failed(read, auth=auth)
        if delay is None:
            return
        metrics.BACKFILL_FAILURES.labels(via).inc()
        if auth:
            self.backfills.hold(delay)  # retrying any wallet sooner cannot fix a key
            metrics.AUTH_FAILURES.labels(via).inc()
        log.warning(
            "backfill_failed",
            extra={
                "source": SOURCE,
                "via": via,
                "wallet": read.wallet,
                "attempt": read.failures,
                "retry_in_s": round(delay, 3),
                "error": str(exc),
            },
        )

    def _report_behind(self) -> None:
        behind, since = self.backfills.behind()
        self.status.wallets_behind, self.status.behind_since = behind, since
        metrics.WALLETS_BEHIND.labels(SOURCE).set(behind)
        metrics.WALLETS_BEHIND_SINCE.labels(SOURCE).set(since or 0)
