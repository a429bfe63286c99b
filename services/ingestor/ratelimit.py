"""One rate limiter per HTTP API, shared by every task that calls it (backfill, polling).

Dome states its limits as two windows at once (Free: 10 per second and 100 per 10 seconds; Dev:
100/s and 500/10 s), so the limiter keeps the start times of recent requests and lets a request go
only when both the last second and the last window have room: a sliding log, exact at any instant
(a token bucket would allow a burst across a window edge). A 429's Retry-After holds every caller,
not only the one that got it: the limit is the key's, not the task's.

Callers are served in arrival order (one lock), so a busy poller cannot starve a backfill.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable

ONE_SECOND = 1.0


class RateLimiter:
    def __init__(
        self,
        per_second: float,
        per_window: int,
        window_s: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if per_second <= 0 or per_window < 1 or window_s <= 0:
            raise ValueError("rates and window must be positive")
        # A fractional rate (0.5/s) means one request per 1/rate seconds.
        self._per_second = max(1, int(per_second))
        self._second = ONE_SECOND if per_second >= 1 else 1.0 / per_second
        self._per_window = per_window
        self._window = window_s
        self._clock = clock
        self._sleep = sleep
        self._sent: deque[float] = deque()
        self._hold_until = 0.0
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        """Wait until a request may go, and count it as sent."""
        async with self._lock:
            while True:
                now = self._clock()
                wait = self.wait_time(now)
                if wait <= 0:
                    self._sent.append(now)
                    return
                await self._sleep(wait)

    def hold(self, seconds: float) -> None:
        """Send nothing for `seconds` from now (a 429's Retry-After)."""
        self._hold_until = max(self._hold_until, self._clock() + max(0.0, seconds))

    def wait_time(self, now: float) -> float:
        """How long a request arriving now must wait (0: it may go)."""
        horizon = max(self._window, self._second)
        while self._sent and self._sent[0] <= now - horizon:
            self._sent.popleft()
        wait = self._hold_until - now
        recent = [at for at in self._sent if at > now - self._second]
        if len(recent) >= self._per_second:
            wait = max(wait, recent[-self._per_second] + self._second - now)
        in_window = [at for at in self._sent if at > now - self._window]
        if len(in_window) >= self._per_window:
            wait = max(wait, in_window[-self._per_window] + self._window - now)
        return wait
