"""Plain counters the worker keeps on its event loop, read by the metrics endpoint at scrape
time: a dict increment costs tens of nanoseconds, a prometheus-client metric with labels costs
microseconds and a lock, on every job."""

from __future__ import annotations

from bisect import bisect_left

# Job duration buckets, seconds: from a 1 ms trivial job to multi-minute imports.
DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip


class Durations:
    """A histogram per queue: counts per bucket (the last one is +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "sums")

    def __init__(self, bounds: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.bounds = bounds
        self.counts: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}

    def observe(self, queue: str, seconds: float) -> None:
        counts = self.counts.get(queue)
        if counts is None:
            counts = self.counts[queue] = [0] * (len(self.bounds) + 1)
            self.sums[queue] = 0.0
        counts[bisect_left(self.bounds, seconds)] += 1
        self.sums[queue] += seconds


def count(counter: dict, key: object, n: int = 1) -> None:
    """`counter[key] += n` for a plain dict."""
    counter[key] = counter.get(key, 0) + n
