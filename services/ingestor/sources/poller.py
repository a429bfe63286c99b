"""Polling sources: every tracked wallet in turn, through a `CatchUp` (the seed's REST fallback,
`dome_rest`, and Polymarket's Data API, `data_api`).

Wallets are polled round-robin, each at most once per interval (DOME_POLL_INTERVAL_S /
DATA_API_POLL_INTERVAL_S); the API's shared rate limiter paces the requests themselves, and a 429
holds every caller for its Retry-After. Each poll reads the wallet since its watermark (less the
overlap), so a missed cycle or a restart loses nothing. A failing API marks the source down (stale
after HEALTH_MAX_DISCONNECTED_S) and is retried with backoff; a refused key is an auth failure,
retried at the maximum backoff. Wallets come and go with the registry (`add` / `remove`).

A poll that gets nothing new is only "nothing new" if the answer was fresh: the Data API's CDN
serves an identical URL from its cache for minutes, so its reader never asks a URL twice within
that time and never uses a cached answer (it asks again with another URL; see `data_api`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Iterable

from services.ingestor import metrics
from services.ingestor.backfill import CatchUp
from services.ingestor.feed_status import ConnectionState, FeedStatus
from services.ingestor.http_api import ApiError, AuthError
from shared.backoff import Backoff

log = logging.getLogger(__name__)


class WalletPoller:
    def __init__(
        self,
        catch_up: CatchUp,
        wallets: Iterable[str],
        *,
        interval_s: float,
        retry_min_s: float,
        retry_max_s: float,
        rng: random.Random | None = None,
    ) -> None:
        self.catch_up = catch_up
        self.source = catch_up.source
        self._order: deque[str] = deque(dict.fromkeys(wallets))
        self._last: dict[str, float] = {}
        self._interval = interval_s
        self._changed = asyncio.Event()
        self.backoff = Backoff(retry_min_s, retry_max_s, rng=rng or random.Random())
        self.status = FeedStatus(source=self.source, wallets=len(self._order))
        self.polls = 0
        metrics.WALLETS.labels(self.source).set(len(self._order))

    def add_wallet(self, wallet: str) -> bool:
        if wallet in self._order:
            return True
        # Polled next: a newly tracked wallet is caught up at once.
        self._order.appendleft(wallet)
        self._changed_count()
        return True

    def remove_wallet(self, wallet: str) -> None:
        if wallet in self._order:
            self._order.remove(wallet)
            self._last.pop(wallet, None)
            self._changed_count()

    def _changed_count(self) -> None:
        self.status.wallets = len(self._order)
        metrics.WALLETS.labels(self.source).set(len(self._order))
        self._changed.set()

    async def run(self) -> None:
        while True:
            if not self._order:
                self._changed.clear()
                await self._changed.wait()
                continue
            wallet = self._order[0]
            wait = self._last.get(wallet, 0.0) + self._interval - time.monotonic()
            if wait > 0:
                self._changed.clear()
                # A wallet added meanwhile is due at once: wake up for it.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._changed.wait()
                continue
            self._order.rotate(-1)
            self._last[wallet] = time.monotonic()
            delay = await self._poll(wallet)
            if delay:
                await asyncio.sleep(delay)

    async def _poll(self, wallet: str) -> float:
        """Poll one wallet; returns how long to wait before the next poll (0: at once)."""
        try:
            new = await self.catch_up.wallet(wallet)
        except AuthError as exc:
            return self._failed(ConnectionState.AUTH_FAILED, f"auth failure: {exc}", max_wait=True)
        except ApiError as exc:
            return self._failed(ConnectionState.DISCONNECTED, str(exc), max_wait=False)
        self.polls += 1
        if self.status.state is not ConnectionState.CONNECTED:
            log.info("polling", extra={"source": self.source, "wallets": len(self._order)})
            self.status.mark_connected()
            metrics.CONNECTED.labels(self.source).set(1)
        self.backoff.reset()
        if new and self.catch_up.newest is not None:
            self.status.mark_event(time.time(), self.catch_up.newest)
        return 0.0

    def _failed(self, state: ConnectionState, error: str, *, max_wait: bool) -> float:
        self.status.mark_down(state, error[:500], time.time())
        metrics.CONNECTED.labels(self.source).set(0)
        if state is ConnectionState.AUTH_FAILED:
            metrics.AUTH_FAILURES.labels(self.source).inc()
            log.error("auth_failed", extra={"source": self.source, "error": error[:500]})
            return self.backoff.max_delay()
        log.warning("poll_failed", extra={"source": self.source, "error": error[:500]})
        return self.backoff.next_delay()
