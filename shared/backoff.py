"""Exponential backoff with jitter, for reconnects and for Redis retries.

The n-th delay (from 0) is `min(maximum, minimum * 2**n)`, shortened by up to `jitter` of itself at
random so that many clients dropped at once do not reconnect in lockstep. Never longer than the
bound, never shorter than `(1 - jitter)` of it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


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
