"""The summary line the relay logs every `--summary-interval` seconds and once at exit: what it
received, dropped and announced since the last line, its lag and what it holds, in one line an
operator can read without Prometheus."""

from __future__ import annotations

import time
from typing import NamedTuple

from prometheus_client import Counter

from kvrelay.system.metrics import Metrics


class Totals(NamedTuple):
    """The counters a summary line reports, as they stood at one time."""

    at: float
    batches: float
    events: float
    drops: float
    resyncs: float
    lag_counts: tuple[int, ...]


def _sum(counter: Counter) -> float:
    return sum(sample.value for family in counter.collect() for sample in family.samples
               if sample.name.endswith("_total"))


class Summary:
    """Reads one relay's metrics; each `line()` covers the time since the previous one."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._start = self._last = self._totals()

    def _totals(self) -> Totals:
        m = self._metrics
        return Totals(
            at=time.monotonic(),
            batches=sum(t.value for t in list(m.batches_received.children.values())),
            events=m.events_received.value, drops=_sum(m.batches_dropped),
            resyncs=_sum(m.resyncs), lag_counts=tuple(m.lag.counts))

    def line(self, final: bool = False) -> str:
        """Counts since the last line (`final`: since start, for the line at exit), the lag's
        p99 over the same time and what the buffer holds now."""
        now = self._totals()
        since = self._start if final else self._last
        self._last = now
        lag = [b - a for a, b in zip(since.lag_counts, now.lag_counts, strict=True)]
        registry = self._metrics.registry
        held = registry.get_sample_value("kvrelay_buffer_batches") or 0.0
        held_bytes = registry.get_sample_value("kvrelay_buffer_bytes") or 0.0
        head = ("summary at exit (whole run" if final else "summary (last") + \
            f" {now.at - since.at:.1f}s)"
        return (f"{head}: batches {now.batches - since.batches:.0f}, "
                f"events {now.events - since.events:.0f}, drops {now.drops - since.drops:.0f}, "
                f"resyncs {now.resyncs - since.resyncs:.0f}, "
                f"lag p99 {_p99(self._metrics.lag.bounds, lag)}, "
                f"buffer {held:.0f} batches ({held_bytes:.0f} bytes)")


def _p99(bounds: tuple[float, ...], counts: list[int]) -> str:
    """The 99th percentile as the histogram knows it: the bucket bound it falls under."""
    total = sum(counts)
    if total == 0:
        return "-"
    seen = 0
    for bound, count in zip((*bounds, float("inf")), counts, strict=True):
        seen += count
        if seen >= 0.99 * total:
            return f"<= {bound * 1000:g}ms" if bound != float("inf") else f"> {bounds[-1]:g}s"
    return "-"  # pragma: no cover - the last bucket always reaches the total
