"""Small statistics: percentiles of a sample and the trend of a series."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank: a value that was actually observed."""
    if not sorted_values:
        return math.nan
    rank = math.ceil(q / 100 * len(sorted_values))
    return sorted_values[min(len(sorted_values), max(1, rank)) - 1]


def summary_ms(latencies_s: Sequence[float]) -> dict[str, float | None]:
    """p50, p99, p99.9 and max, in milliseconds (None for an empty sample)."""
    values = sorted(latencies_s)
    if not values:
        return {"p50_ms": None, "p99_ms": None, "p999_ms": None, "max_ms": None}
    return {
        "p50_ms": round(percentile(values, 50) * 1000, 2),
        "p99_ms": round(percentile(values, 99) * 1000, 2),
        "p999_ms": round(percentile(values, 99.9) * 1000, 2),
        "max_ms": round(values[-1] * 1000, 2),
    }


def slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (t, y): how fast y grows per unit of t (0 for fewer than 2 points)."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    return sum((t - mean_t) * (y - mean_y) for t, y in points) / var


def ratio(value: float | None, ceiling: float | None) -> float | None:
    if value is None or not ceiling:
        return None
    return round(value / ceiling, 3)
