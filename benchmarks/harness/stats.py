"""Percentiles and duration summaries, the same everywhere."""

from __future__ import annotations

import math
import statistics


def percentiles(values: list[float]) -> dict:
    """Mean, p50 and p99 by nearest rank (the maximum when there are fewer than 100 values); NaNs left out."""
    ordered = sorted(v for v in values if not math.isnan(v))
    if not ordered:
        return {"mean": None, "p50": None, "p99": None}

    def rank(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)], 3)

    return {"mean": round(sum(ordered) / len(ordered), 3), "p50": rank(0.50), "p99": rank(0.99)}


def summary(values: list[float], scale: float = 1e3, digits: int = 3) -> dict:
    """Count, median, mean, min and max of durations in seconds, scaled (ms by default; 1e6 for µs, 1 for counts)."""
    if not values:
        return {"n": 0}
    scaled = [scale * v for v in values]
    return {
        "n": len(scaled),
        "median": round(statistics.median(scaled), digits),
        "mean": round(statistics.fmean(scaled), digits),
        "min": round(min(scaled), digits),
        "max": round(max(scaled), digits),
    }
