"""Prometheus metrics, one registry per relay so several relays can live in one process."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from kvrelay.system.tally import HistogramTally, LabelledTally, Tally

# No `_created` series: a timestamp per counter that nothing here alerts or graphs on, and
# about half of /metrics otherwise.
disable_created_metrics()  # type: ignore[no-untyped-call]

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)

DROP_REASONS = ("overflow", "malformed", "rejected", "too_large", "out_of_order", "shutdown",
                "duplicate")
# Blocks `--format dynamo` cannot carry, by why (see kvrelay/dynamo/translate.py).
BLOCK_DROP_REASONS = ("block_size", "short_tokens", "duplicate", "medium", "invalid")
SNAPSHOT_FAILURES = ("bucket", "write", "too_large", "undecodable", "stale", "tail_missing",
                     "bootstrap", "index", "build", "behind", "process")
DECODE_ERROR_KINDS = (
    "frame_count", "seq_length", "msgpack", "batch_shape", "invalid_event", "unencodable",
)


class _TallyCollector(Collector):
    def __init__(self, documented: list[tuple[str, str, Tally | LabelledTally | HistogramTally]]
                 ) -> None:
        self._documented = documented

    def collect(self) -> Iterator[Metric]:
        for name, doc, tally in self._documented:
            if isinstance(tally, Tally):
                yield CounterMetricFamily(name, doc, value=tally.value)
            elif isinstance(tally, LabelledTally):
                family = CounterMetricFamily(name, doc, labels=[tally.label])
                for value, child in list(tally.children.items()):
                    family.add_metric([value], child.value)
                yield family
            else:
                cumulative, buckets = 0, []
                for bound, count in zip((*tally.bounds, float("inf")), tally.counts,
                                        strict=True):
                    cumulative += count
                    buckets.append((_bound_label(bound), float(cumulative)))
                yield HistogramMetricFamily(name, doc, buckets=buckets, sum_value=tally.sum)

    def describe(self) -> Iterator[Metric]:
        return self.collect()


def _bound_label(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class Metrics:
    """Every metric the contract names, prefixed `kvrelay_`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # Counted once per batch: tallies, read at scrape time.
        self.batches_received = LabelledTally("dp_rank")
        self.events_received = Tally()
        self.batches_published = Tally()
        self.events_published = Tally()
        self.publish_latency = HistogramTally(_LATENCY_BUCKETS)
        self.lag = HistogramTally(_LATENCY_BUCKETS)
        r.register(_TallyCollector([
            ("kvrelay_batches_received", "vLLM batches read from ZMQ, live or replayed",
             self.batches_received),
            ("kvrelay_events_received", "KV events decoded from vLLM batches",
             self.events_received),
            ("kvrelay_batches_published", "Batches acknowledged by JetStream",
             self.batches_published),
            ("kvrelay_events_published", "Events in batches acknowledged by JetStream",
             self.events_published),
            ("kvrelay_publish_latency_seconds", "From publish to reading its ack (acks are read "
             "in groups, every 100 ms while a flow lasts)", self.publish_latency),
            ("kvrelay_lag_seconds", "From vLLM's batch timestamp to its publish (observed once "
             "acknowledged)", self.lag),
        ]))
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
            "kvrelay_engine_restarts",
            "vLLM engine restarts seen (sequence back to 0 or far below, or back after the "
            "publisher's connection went away)", registry=r
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
            "kvrelay_buffer_batches", "Batches ingest holds for publishing (buffered, or held "
            "while the stream's resume point or a replay is awaited)", registry=r
        )
        self.buffer_bytes = Gauge(
            "kvrelay_buffer_bytes", "Payload bytes of the batches in kvrelay_buffer_batches",
            registry=r
        )
        self.nats_reconnects = Counter(
            "kvrelay_nats_reconnects", "Reconnections to NATS", registry=r
        )
        self.nats_errors = Counter(
            "kvrelay_nats_errors", "Errors reported by the NATS connection", registry=r
        )
        self.dynamo_blocks_dropped = Counter(
            "kvrelay_dynamo_blocks_dropped",
            "Blocks --format dynamo left out (Dynamo's format or router cannot take them)",
            ["reason"],
            registry=r,
        )
        self.republished = Counter(
            "kvrelay_dynamo_republished",
            "--format dynamo: messages published again because NATS had not confirmed them "
            "(Dynamo's router ignores the repeats)",
            registry=r,
        )
        self.ready = Gauge("kvrelay_ready", "1 when the relay is ready", registry=r)
        self.vllm_attached = Gauge(
            "kvrelay_vllm_attached", "1 once a vLLM publisher has attached to the rank's "
            "endpoint since the relay started (0: none ever has)", ["dp_rank"], registry=r)
        self.vllm_publishers = Gauge(
            "kvrelay_vllm_publishers", "vLLM publishers attached to the rank's endpoint now",
            ["dp_rank"], registry=r)
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
        self.snapshot_build_seconds = Counter(
            "kvrelay_snapshot_build_cpu_seconds",
            "CPU seconds spent building and encoding snapshots (in a forked child)", registry=r)
        self.snapshot_bytes = Gauge(
            "kvrelay_snapshot_bytes", "Size of the last snapshot written", ["dp_rank"],
            registry=r)
        # Touch labelled children so every series shows from the first scrape.
        for reason in SNAPSHOT_FAILURES:
            self.snapshot_failures.labels(reason)
        # drop() counts on paths that run per batch when the relay is behind (the buffer's
        # overflow): children looked up once, not by label on every call.
        self._dropped: dict[str, tuple[Counter, Counter]] = {
            reason: (self.batches_dropped.labels(reason), self.events_dropped.labels(reason))
            for reason in DROP_REASONS}
        self.events_dropped.labels("untranslatable")  # --format dynamo: no Dynamo equivalent
        for reason in BLOCK_DROP_REASONS:
            self.dynamo_blocks_dropped.labels(reason)
        for kind in DECODE_ERROR_KINDS:
            self.decode_errors.labels(kind)
        for reason in ("gap", "restart", "overflow", "start"):
            self.resyncs.labels(reason)
        for outcome in ("requested", "succeeded", "partial", "failed"):
            self.replays.labels(outcome)

    def drop(self, reason: str, batches: int, events: int = 0) -> None:
        """Count batches (and the events in them) that will never reach JetStream."""
        children = self._dropped.get(reason)
        if children is None:
            children = self.batches_dropped.labels(reason), self.events_dropped.labels(reason)
        children[0].inc(batches)
        if events:
            children[1].inc(events)
