"""Tallies: counters and histograms for once-per-batch paths, as plain numbers.

prometheus_client takes a lock on every increment and observation; a tally is a number (or a
list of bucket counts) that kvrelay/system/metrics.py exports as a Prometheus counter or
histogram at scrape time. Compiled with the per-batch path.
"""

from __future__ import annotations

from bisect import bisect_left

__all__ = ["HistogramTally", "LabelledTally", "Tally"]


class Tally:
    """A counter for once-per-batch paths: a plain number, exported as a Prometheus counter
    at scrape time (prometheus_client's counters take a lock on every increment)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class LabelledTally:
    """A Tally per value of one label."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.children: dict[str, Tally] = {}

    def labels(self, value: str) -> Tally:
        return self.children.setdefault(value, Tally())


class HistogramTally:
    """A histogram for once-per-batch paths: bucket counts in a plain list, exported at scrape
    time like prometheus_client's Histogram."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
