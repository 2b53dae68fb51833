"""What a router's KvConsumer counts, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

SNAPSHOT_OUTCOMES = ("restored", "tail_missing", "stale", "undecodable")

WRITE_OUTCOMES = ("written", "too_large", "bucket", "build", "write")


class ConsumerMetrics:
    """What a router's KvConsumer counts, prefixed `kvrelay_consumer_`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.batches = Counter(
            "kvrelay_consumer_batches", "RelayBatches applied to the index", registry=r)
        self.events = Counter(
            "kvrelay_consumer_events", "Events in RelayBatches applied to the index", registry=r)
        self.duplicates = Counter(
            "kvrelay_consumer_duplicates",
            "Batches skipped because their (epoch, seq) was already applied", registry=r)
        self.undecodable = Counter(
            "kvrelay_consumer_undecodable",
            "Stream messages dropped because they are not RelayBatches", registry=r)
        self.gaps = Counter(
            "kvrelay_consumer_gaps",
            "Gaps in a worker's (epoch, seq) the relay did not announce", registry=r)
        self.resyncs = Counter(
            "kvrelay_consumer_resyncs", "resync events received, by reason", ["reason"],
            registry=r)
        self.unknown_events = Counter(
            "kvrelay_consumer_unknown_events", "Events of a type the index does not know",
            registry=r)
        self.stream_seq = Gauge(
            "kvrelay_consumer_stream_sequence", "JetStream sequence of the last message handled",
            registry=r)
        self.nats_reconnects = Counter(
            "kvrelay_consumer_nats_reconnects", "Reconnections to NATS", registry=r)
        self.snapshots = Counter(
            "kvrelay_consumer_snapshots",
            "Worker snapshots read at start, by outcome: restored, tail_missing (restored "
            "empty: the stream no longer holds what followed), stale (older than the stream), "
            "undecodable", ["outcome"], registry=r)
        for outcome in SNAPSHOT_OUTCOMES:
            self.snapshots.labels(outcome)
        self.snapshot_writes = Counter(
            "kvrelay_consumer_snapshot_writes",
            "Worker snapshots a SnapshotWriter wrote or could not write, by outcome: written, "
            "too_large (above the server's max_payload), bucket (the bucket could not be "
            "opened or created), build, write", ["outcome"], registry=r)
        for outcome in WRITE_OUTCOMES:
            self.snapshot_writes.labels(outcome)
        for reason in ("gap", "restart", "overflow", "start"):
            self.resyncs.labels(reason)
