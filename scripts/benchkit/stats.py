"""Percentiles: the one every benchmark's table uses, and the streams benchmark's histogram one."""

from __future__ import annotations

from collections import Counter


def percentile(values: list[float], q: float) -> float:
    """The `q` per cent point (0 to 100) of `values`, by linear interpolation between closest ranks (numpy's
    default): may fall between two measured values. NaN for no values."""
    if not values:
        return float("nan")
    data = sorted(values)
    pos = (len(data) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def histogram_percentile(counts: Counter, q: float) -> float | None:
    """The `q` quantile (0 to 1) of a histogram ({value: count}; scripts/bench_streams.py's load processes send back
    delays in whole milliseconds instead of every delay), by nearest rank: always a value that was measured. Unlike
    `percentile` it reads a histogram, takes `q` as a fraction and does not interpolate; kept so, the streams
    benchmark's figures stay comparable with those recorded in docs/benchmarks.md. None for an empty histogram."""
    total = sum(counts.values())
    if not total:
        return None
    target, seen = q * total, 0
    for value in sorted(counts):
        seen += counts[value]
        if seen >= target:
            return value
    return max(counts)
