"""Prometheus metrics, one registry per relay so several relays can live in one process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)

DROP_REASONS = ("overflow", "malformed", "rejected", "too_large", "out_of_order", "shutdown")
SNAPSHOT_OUTCOMES = ("restored", "tail_missing", "stale", "undecodable")
SNAPSHOT_FAILURES = ("bucket", "write", "too_large", "undecodable", "stale", "tail_missing",
                     "bootstrap", "index")
DECODE_ERROR_KINDS = (
    "frame_count", "seq_length", "msgpack", "batch_shape", "invalid_event", "unencodable",
)


class Metrics:
    """Every metric the contract names, prefixed `kvrelay_`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.batches_received = Counter(
            "kvrelay_batches_received", "vLLM batches read from ZMQ", ["dp_rank"], registry=r
        )
        self.events_received = Counter(
            "kvrelay_events_received", "KV events decoded from vLLM batches", registry=r
        )
        self.batches_published = Counter(
            "kvrelay_batches_published", "Batches acknowledged by JetStream", registry=r
        )
        self.events_published = Counter(
            "kvrelay_events_published", "Events in batches acknowledged by JetStream", registry=r
        )
        self.duplicates = Counter(
            "kvrelay_publish_duplicates",
            "Publishes JetStream acknowledged as duplicates (retries, replays)",
            registry=r,
        )
        self.batches_dropped = Counter(
            "kvrelay_batches_dropped", "Batches the relay could not deliver", ["reason"], registry=r
        )
        self.events_dropped = Counter(
            "kvrelay_events_dropped", "Events the relay could not deliver", ["reason"], registry=r
        )
        self.gaps = Counter("kvrelay_gaps", "Sequence gaps seen on vLLM streams", registry=r)
        self.missed_batches = Counter(
            "kvrelay_missed_batches", "Batches missing in gaps that replay did not fill", registry=r
        )
        self.replays = Counter(
            "kvrelay_replays",
            "Replay requests to vLLM's ROUTER by outcome",
            ["outcome"],  # requested | succeeded | partial | failed
            registry=r,
        )
        self.restarts = Counter(
            "kvrelay_engine_restarts", "vLLM engine restarts seen (sequence went back)", registry=r
        )
        self.resyncs = Counter(
            "kvrelay_resyncs", "resync events emitted, by reason", ["reason"], registry=r
        )
        self.unknown_events = Counter(
            "kvrelay_unknown_events", "Events of a type this relay does not know", registry=r
        )
        self.decode_errors = Counter(
            "kvrelay_decode_errors", "Malformed input from vLLM, by kind", ["kind"], registry=r
        )
        self.in_flight = Gauge(
            "kvrelay_publish_in_flight", "Publishes awaiting a JetStream ack", registry=r
        )
        self.buffer_batches = Gauge(
            "kvrelay_buffer_batches", "Batches buffered for publishing", registry=r
        )
        self.buffer_bytes = Gauge(
            "kvrelay_buffer_bytes", "Payload bytes buffered for publishing", registry=r
        )
        self.publish_latency = Histogram(
            "kvrelay_publish_latency_seconds",
            "From publish to JetStream ack",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.lag = Histogram(
            "kvrelay_lag_seconds",
            "From vLLM's batch timestamp to the JetStream ack",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.nats_reconnects = Counter(
            "kvrelay_nats_reconnects", "Reconnections to NATS", registry=r
        )
        self.nats_errors = Counter(
            "kvrelay_nats_errors", "Errors reported by the NATS connection", registry=r
        )
        self.ready = Gauge("kvrelay_ready", "1 when the relay is ready", registry=r)
        self.instance = Gauge(
            "kvrelay_instance_info",
            "The worker instance ID this relay publishes for and how it was found",
            ["instance_id", "source"],
            registry=r,
        )
        self.snapshots_written = Counter(
            "kvrelay_snapshots_written", "Snapshots of the worker's blocks written to the KV "
            "bucket", registry=r)
        self.snapshot_failures = Counter(
            "kvrelay_snapshot_failures", "Snapshots not written or not read, by reason",
            ["reason"], registry=r)
        self.snapshot_stream_seq = Gauge(
            "kvrelay_snapshot_stream_sequence",
            "Stream sequence the last snapshot written is complete up to", ["dp_rank"],
            registry=r)
        self.snapshot_age = Gauge(
            "kvrelay_snapshot_age_seconds", "Seconds since the last snapshot was written",
            ["dp_rank"], registry=r)
        self.snapshot_bytes = Gauge(
            "kvrelay_snapshot_bytes", "Size of the last snapshot written", ["dp_rank"],
            registry=r)
        # Touch labelled children so every series shows from the first scrape.
        for reason in SNAPSHOT_FAILURES:
            self.snapshot_failures.labels(reason)
        for reason in DROP_REASONS:
            self.batches_dropped.labels(reason)
            self.events_dropped.labels(reason)
        for kind in DECODE_ERROR_KINDS:
            self.decode_errors.labels(kind)
        for reason in ("gap", "restart", "overflow", "start"):
            self.resyncs.labels(reason)
        for outcome in ("requested", "succeeded", "partial", "failed"):
            self.replays.labels(outcome)

    def drop(self, reason: str, batches: int, events: int = 0) -> None:
        """Count batches (and the events in them) that will never reach JetStream."""
        self.batches_dropped.labels(reason).inc(batches)
        if events:
            self.events_dropped.labels(reason).inc(events)


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
        for reason in ("gap", "restart", "overflow", "start"):
            self.resyncs.labels(reason)
