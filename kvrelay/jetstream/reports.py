"""What snapshots tell the relay: a small interface, and its form that updates the metrics.

The Snapshotter runs in the snapshot process (kvrelay/jetstream/snapshotd.py), which sends what
it reports to the relay as lines (`kvrelay/jetstream/snapshotproc.py`); the relay applies them to
its metrics with `MetricsReports`, as if the Snapshotter ran in the relay itself.
"""

from __future__ import annotations

import time

from kvrelay.system.metrics import Metrics


class Reports:
    """What a Snapshotter reports. The base class drops everything."""

    def failed(self, reason: str) -> None:
        """A snapshot not written, or not read, for `reason` (a label of
        kvrelay_snapshot_failures)."""

    def built(self, cpu: float) -> None:
        """A snapshot was built in `cpu` CPU seconds."""

    def written(self, dp_rank: int, stream_seq: int, size: int, at: float) -> None:
        """The rank's snapshot, complete up to `stream_seq`, `size` bytes, written at `at`
        (Unix time)."""

    def live(self, dp_rank: int, stream_seq: int) -> None:
        """The rank's blocks were rebuilt up to `stream_seq`; stored batches now follow."""


class MetricsReports(Reports):
    """Reports as the relay's Prometheus metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self.live_ranks: dict[int, int] = {}  # rank -> stream sequence it went live at

    def failed(self, reason: str) -> None:
        self._metrics.snapshot_failures.labels(reason).inc()

    def built(self, cpu: float) -> None:
        self._metrics.snapshot_build_seconds.inc(cpu)

    def written(self, dp_rank: int, stream_seq: int, size: int, at: float) -> None:
        metrics, label = self._metrics, str(dp_rank)
        metrics.snapshots_written.inc()
        metrics.snapshot_stream_seq.labels(label).set(stream_seq)
        metrics.snapshot_bytes.labels(label).set(size)
        metrics.snapshot_age.labels(label).set_function(lambda: time.time() - at)

    def live(self, dp_rank: int, stream_seq: int) -> None:
        self.live_ranks[dp_rank] = stream_seq
