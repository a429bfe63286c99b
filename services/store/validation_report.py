"""Pure: the validation report, the same for `betterbot validate`, `GET /signals/validation` and
the tape replay's `--validate`.

Per group (signal kind, wallet or source) and horizon (5m, 1h, 24h, settlement): how many signals
were measured (`n`), the mean markout net of fees in cents per share, the mean fee counted, the
hits (markout > 0), the flat ones (exactly 0: they count as misses), the hit rate with its 95%
Wilson score interval, and a verdict. The rule (`RULE`): a hit rate says something only when
`n >= MIN_N` and its interval excludes 50%; anything else is "not significant", said as such.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from services.store.markouts import LABELS
from shared.models import SignalKind

Grouping = Literal["kind", "wallet", "source"]
GROUPINGS: tuple[Grouping, ...] = ("kind", "wallet", "source")
Z95 = 1.959963984540054  # the standard normal's 97.5th percentile
MIN_N = 10
RULE = (
    f"hit = net markout > 0 (flat counts as a miss); a hit rate is significant only when "
    f"n >= {MIN_N} and its 95% Wilson interval excludes 50%"
)
_KIND_ORDER = {kind.value: index for index, kind in enumerate(SignalKind)}


@dataclass(frozen=True)
class Measured:
    """One signal measured at one horizon."""

    kind: str
    wallet: str
    wallet_label: str
    source: str
    horizon: str
    markout_cents: float
    fee_cents: float

    def group(self, by: Grouping) -> tuple[str, str]:
        """The group's key and its label for people."""
        if by == "wallet":
            return self.wallet, self.wallet_label
        return (self.kind if by == "kind" else self.source), ""


@dataclass(frozen=True)
class Tally:
    """One group at one horizon."""

    group: str
    label: str
    horizon: str
    n: int
    hits: int
    flat: int
    total_cents: float
    total_fee_cents: float

    @property
    def mean_cents(self) -> float | None:
        return self.total_cents / self.n if self.n else None

    @property
    def mean_fee_cents(self) -> float | None:
        return self.total_fee_cents / self.n if self.n else None

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.n if self.n else None

    @property
    def interval(self) -> tuple[float, float] | None:
        return wilson(self.hits, self.n) if self.n else None

    @property
    def verdict(self) -> str:
        return verdict(self.hits, self.n)


def wilson(hits: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion `hits / n` (n > 0): unlike the normal
    approximation it stays inside [0, 1] and keeps its coverage for small n and extreme rates."""
    rate, z2 = hits / n, z * z
    centre = (rate + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(rate * (1 - rate) / n + z2 / (4 * n * n))
    # The bounds are exactly 0 with no hit and 1 with no miss; rounding would leave a hair off.
    low = 0.0 if hits == 0 else max(0.0, centre - half)
    high = 1.0 if hits == n else min(1.0, centre + half)
    return low, high


def verdict(hits: int, n: int) -> str:
    if n == 0:
        return "not measured"
    if n < MIN_N:
        return f"not significant (n < {MIN_N})"
    low, high = wilson(hits, n)
    if low > 0.5:
        return "significant: hits more often than not"
    if high < 0.5:
        return "significant: misses more often than not"
    return "not significant (interval includes 50%)"


def tally(measured: Iterable[Measured], by: Grouping) -> list[Tally]:
    """The tallies of the measured signals, grouped `by`, in report order."""
    sums: dict[tuple[str, str], list[float]] = {}
    labels: dict[str, str] = {}
    for m in measured:
        key, label = m.group(by)
        labels[key] = labels.get(key) or label
        s = sums.setdefault((key, m.horizon), [0, 0, 0, 0.0, 0.0])
        s[0] += 1
        s[1] += m.markout_cents > 0
        s[2] += m.markout_cents == 0
        s[3] += m.markout_cents
        s[4] += m.fee_cents
    tallies = [
        Tally(key, labels[key], horizon, int(s[0]), int(s[1]), int(s[2]), s[3], s[4])
        for (key, horizon), s in sums.items()
    ]
    return ordered(tallies, by)


def ordered(tallies: Iterable[Tally], by: Grouping) -> list[Tally]:
    """Kinds in their own order; wallets and sources by signals measured, most first."""
    items = list(tallies)
    size: dict[str, int] = {}
    for t in items:
        size[t.group] = max(size.get(t.group, 0), t.n)

    def key(t: Tally) -> tuple[Any, ...]:
        place = _KIND_ORDER.get(t.group, len(_KIND_ORDER)) if by == "kind" else -size[t.group]
        horizon = LABELS.index(t.horizon) if t.horizon in LABELS else len(LABELS)
        return (place, t.group, horizon)

    return sorted(items, key=key)


def complete(tallies: Sequence[Tally], groups: Iterable[str] = ()) -> list[Tally]:
    """The tallies with an empty one (n = 0, "not measured") for every horizon a group lacks, so
    a report says what was not measured rather than leaving it out; `groups` adds groups that
    have no tally at all (a kind that gave no signal)."""
    have = {(t.group, t.horizon) for t in tallies}
    labels = {t.group: t.label for t in tallies}
    names = list(dict.fromkeys([*(t.group for t in tallies), *groups]))
    empty = [
        Tally(g, labels.get(g, ""), h, 0, 0, 0, 0.0, 0.0)
        for g in names
        for h in LABELS
        if (g, h) not in have
    ]
    return [*tallies, *empty]


def render(tallies: Sequence[Tally], by: Grouping) -> list[str]:
    """The report as a markdown table, rows in the order given."""
    lines = [
        f"| {by} | horizon | n | mean markout ¢ | fee ¢ | hits | flat | hit rate | 95% CI "
        "| verdict |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    previous = None
    for t in tallies:
        name = _name(t, by) if t.group != previous else ""
        previous = t.group
        lines.append(f"| {name} | {t.horizon} | {t.n} | {_row_numbers(t)} | {t.verdict} |")
    return lines


def _name(t: Tally, by: Grouping) -> str:
    if by == "wallet":
        short = f"{t.group[:6]}...{t.group[-4:]}" if len(t.group) > 12 else t.group
        return f"{t.label} ({short})" if t.label else short
    return f"`{t.group}`"


def _row_numbers(t: Tally) -> str:
    if not t.n or t.interval is None or t.hit_rate is None:
        return " |  |  |  |  | "
    low, high = t.interval
    return (
        f"{t.mean_cents:+.2f} | {t.mean_fee_cents:.2f} | {t.hits} | {t.flat} | "
        f"{100 * t.hit_rate:.1f}% | {100 * low:.1f}-{100 * high:.1f}%"
    )


def to_json(t: Tally) -> dict[str, Any]:
    interval = t.interval
    return {
        "group": t.group,
        "label": t.label,
        "horizon": t.horizon,
        "n": t.n,
        "mean_markout_cents": t.mean_cents,
        "mean_fee_cents": t.mean_fee_cents,
        "hits": t.hits,
        "flat": t.flat,
        "hit_rate": t.hit_rate,
        "ci95_low": interval[0] if interval else None,
        "ci95_high": interval[1] if interval else None,
        "verdict": t.verdict,
    }
