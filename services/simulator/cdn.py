"""The CDN in front of Polymarket's Data API, as a peer measured it (feeds.md, 2026-09): Cloudflare
answers a URL it has seen within the cache's lifetime (up to 300 s) from its cache, with the same
body, `cf-cache-status: HIT` and an `age` header (seconds since it was cached); otherwise the
origin answers, `cf-cache-status: MISS`, and the body is cached. The key is the path and the query
string exactly as sent, so two URLs that differ in any byte are two entries.

Only 200 answers are cached (an error or a 429 is never served from cache). With the cache off
(SIM_CDN_CACHE_S=0, or `POST /_sim/cdn {"seconds": 0}`) every answer is the origin's and says
`cf-cache-status: DYNAMIC`, as Cloudflare does for what it does not cache.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

HIT, MISS, DYNAMIC = "HIT", "MISS", "DYNAMIC"
MAX_ENTRIES = 10_000


@dataclass(frozen=True, slots=True)
class Cached:
    body: bytes
    age_s: int


class Cdn:
    """Bodies by URL, each served for `ttl_s` after the origin answered it (0: off)."""

    def __init__(
        self,
        ttl_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._max = max_entries
        self._bodies: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @property
    def ttl_s(self) -> float:
        return self._ttl_s

    @ttl_s.setter
    def ttl_s(self, seconds: float) -> None:
        """A new lifetime empties the cache: what it held was cached under other rules."""
        self._ttl_s = seconds
        self._bodies.clear()

    @property
    def on(self) -> bool:
        return self._ttl_s > 0

    def lookup(self, url: str) -> Cached | None:
        """The cached answer of `url`, or None (counted as a miss when the cache is on)."""
        if not self.on:
            return None
        entry = self._bodies.get(url)
        now = self._clock()
        if entry is None or now - entry[0] >= self._ttl_s:
            self._bodies.pop(url, None)
            self.misses += 1
            return None
        self.hits += 1
        return Cached(entry[1], int(now - entry[0]))

    def store(self, url: str, body: bytes) -> None:
        if not self.on:
            return
        self._bodies[url] = (self._clock(), body)
        self._bodies.move_to_end(url)
        while len(self._bodies) > self._max:
            self._bodies.popitem(last=False)

    def status(self) -> str:
        """The `cf-cache-status` of an answer the origin gave."""
        return MISS if self.on else DYNAMIC

    def state(self) -> dict[str, float | int]:
        return {
            "cdn_cache_s": self._ttl_s,
            "entries": len(self._bodies),
            "hits": self.hits,
            "misses": self.misses,
        }
