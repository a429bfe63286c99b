"""Exponential backoff with jitter, for reconnects and for Redis retries, and the one retry loop.

The n-th delay (from 0) is `min(maximum, minimum * 2**n)`, shortened by up to `jitter` of itself at
random so that many clients dropped at once do not reconnect in lockstep. Never longer than the
bound, never shorter than `(1 - jitter)` of it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


def backoff_bound(attempt: int, minimum: float, maximum: float) -> float:
    """The delay before jitter for the given 0-based attempt."""
    if attempt >= 64:  # 2**64 x minimum is past any sane maximum; avoid overflowing floats.
        return maximum
    return min(maximum, minimum * 2.0**attempt)


@dataclass
class Backoff:
    minimum: float
    maximum: float
    jitter: float = 0.25
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.minimum <= self.maximum:
            raise ValueError(f"need 0 < minimum <= maximum, got {self.minimum}, {self.maximum}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")

    def next_delay(self) -> float:
        """The delay before the next attempt; each call doubles the bound up to the maximum."""
        bound = backoff_bound(self.attempt, self.minimum, self.maximum)
        self.attempt += 1
        return self._jittered(bound)

    def max_delay(self) -> float:
        """A delay at the maximum bound (for failures that retrying sooner cannot fix)."""
        self.attempt = max(self.attempt, 64)
        return self._jittered(self.maximum)

    def reset(self) -> None:
        self.attempt = 0

    def _jittered(self, bound: float) -> float:
        return bound * (1.0 - self.jitter * self.rng.random())


async def retrying(
    call: Callable[[], Awaitable[T]],
    *,
    transient: tuple[type[BaseException], ...],
    within_s: float | None = None,
    backoff: Backoff | None = None,
    on_retry: Callable[[BaseException, float], None] | None = None,
) -> T:
    """`call()` again after each `transient` error, with backoff, until it succeeds; with
    `within_s`, the last error is raised once the next wait would pass that bound. For effects that
    are idempotent, or whose outcome is already known and only needs writing down."""
    wait = backoff or Backoff(0.05, 2.0)
    deadline = None if within_s is None else time.monotonic() + within_s
    while True:
        try:
            return await call()
        except transient as exc:
            delay = wait.next_delay()
            if deadline is not None and time.monotonic() + delay > deadline:
                raise
            if on_retry is not None:
                on_retry(exc, delay)
            await asyncio.sleep(delay)
