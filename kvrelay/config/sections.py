"""The sections of the configuration, one per component; each component gets only its own.

Field order is the order of the command line's help and of the settings table.
"""

from __future__ import annotations

import logging
import re
import urllib.parse
from typing import Annotated, Literal, NamedTuple

import msgspec

from kvrelay.config.endpoint import parse_endpoint
from kvrelay.config.settings import ConfigError, setting
from kvrelay.wire.names import BUCKET_RULE, NAME_RULE, PREFIX_RULE, SNAPSHOT_BUCKET, SUBJECT_PREFIX

log = logging.getLogger("kvrelay.config")

MAX_U64 = 2**64 - 1
_NAME = NAME_RULE.pattern
_HEARTBEAT_RULE = "must be 0 (off) or from 0.1 to 60 seconds"
_HOST_PORT = Annotated[str, msgspec.Meta(
    pattern=r"^((\[[0-9a-fA-F:.]+\]|[^:\[\]\s]+)(:\d{1,5})?|[0-9a-fA-F:]+)$")]


class Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A frozen group of settings."""


class ZmqSettings(Section, frozen=True):
    """Ingest: where vLLM's PUB (and replay) sockets are and how they are read."""

    def __post_init__(self) -> None:
        if 0 < self.heartbeat < 0.1:  # 0 or a range: more than one Meta can say
            raise ValueError(f"--zmq-heartbeat {_HEARTBEAT_RULE} (got {self.heartbeat!r})")

    connect: Annotated[tuple[str, ...], setting(
        "vLLM PUB endpoint to connect to (vLLM binds, e.g. its default tcp://*:5557); "
        "repeatable; with neither --zmq nor --zmq-bind: tcp://127.0.0.1:5557",
        flag="zmq", metavar="ENDPOINT")] = ()
    bind: Annotated[tuple[str, ...], setting(
        "endpoint to bind for a vLLM PUB that connects (e.g. tcp://127.0.0.1:5557); repeatable",
        flag="zmq_bind", metavar="ENDPOINT")] = ()
    replay: Annotated[tuple[str, ...], setting(
        "vLLM replay ROUTER endpoint, one per ZMQ endpoint in the same order; repeatable",
        metavar="ENDPOINT")] = ()
    topic: Annotated[str, setting("ZMQ topic prefix to subscribe to (all)")] = ""
    engine: Annotated[Literal["native", "libzmq"], setting(
        "how vLLM's PUB stream is read: native (ZMTP on the relay's event loop, tcp:// and "
        "ipc://) or libzmq (pyzmq, every transport libzmq has)", flag="zmq_engine")] = "native"
    heartbeat: Annotated[float, setting(
        "seconds between ZMTP PINGs to each vLLM publisher (0: none, else 0.1 to 60); one that "
        "sends nothing back within that time is dropped and reconnected (publishers' own PINGs "
        "are always answered and their TTL honoured)", flag="zmq_heartbeat", ge=0, le=60,
        rule=_HEARTBEAT_RULE)] = 0.0
    dp_ranks: Annotated[int, setting(
        "data-parallel ranks: expand the one ZMQ (and replay) endpoint to N consecutive ports",
        ge=1)] = 1
    dp_rank_start: Annotated[int, setting(
        "DP rank of the first endpoint (vLLM's data_parallel_start_rank on this node)",
        ge=0)] = 0
    replay_timeout: Annotated[float, setting(
        "seconds to wait for vLLM's replay before falling back to a resync", gt=0)] = 2.0
    replay_cooldown: Annotated[float, setting(
        "seconds after a failed replay before the next is tried on that endpoint", gt=0)] = 5.0
    max_batch_bytes: Annotated[int, setting(
        "largest vLLM message (its frames together) read from the PUB or a replay, at most "
        "--buffer-bytes (unset: 4 MiB, or --buffer-bytes when smaller); a larger one is "
        "dropped unread, counted (too_large) and announced as a gap. With --zmq-engine libzmq "
        "it sets ZMQ_MAXMSGSIZE, which bounds each frame and drops the publisher's connection "
        "instead", ge=1024)] = 4 << 20

    def sources(self) -> tuple[SourceSpec, ...]:
        """One SourceSpec per vLLM publisher, with --dp-ranks expanded as vLLM lays ports out."""
        listed = [(e, False) for e in self.connect] + [(e, True) for e in self.bind]
        if not listed:
            listed = [("tcp://127.0.0.1:5557", False)]
        if self.dp_ranks > 1 and len(listed) != 1:
            raise ConfigError("--dp-ranks expands one base endpoint; give exactly one")
        if len(self.replay) not in (0, len(listed)):
            raise ConfigError(
                f"{len(self.replay)} --replay endpoints for {len(listed)} ZMQ endpoints: "
                "give none or one per ZMQ endpoint, in the same order")
        specs: list[SourceSpec] = []
        for index, (endpoint, bind) in enumerate(listed):
            replay = self.replay[index] if self.replay else None
            for offset in range(self.dp_ranks):
                specs.append(SourceSpec(
                    endpoint=offset_endpoint(endpoint, offset),
                    bind=bind,
                    replay=offset_endpoint(replay, offset) if replay else None,
                    dp_rank=self.dp_rank_start + index + offset,
                ))
        if self.engine == "native":
            for spec in specs:
                try:
                    parse_endpoint(spec.endpoint, spec.bind)
                except ValueError as exc:
                    raise ConfigError(str(exc)) from None
        subs = {s.endpoint for s in specs}
        for spec in specs:
            if spec.replay in subs:
                log.warning("replay endpoint %s is also a PUB endpoint: with DP ranks on "
                            "consecutive ports, move vLLM's replay_endpoint out of the PUB range",
                            spec.replay)
        return tuple(specs)


class SourceSpec(NamedTuple):
    endpoint: str
    bind: bool
    replay: str | None
    dp_rank: int


def offset_endpoint(endpoint: str, offset: int) -> str:
    """vLLM's DP layout: tcp port + rank, inproc name + `_dp<rank>`, ipc only for rank 0."""
    if offset == 0:
        return endpoint
    if endpoint.startswith("inproc://"):
        return f"{endpoint}_dp{offset}"
    if endpoint.startswith("ipc://"):
        raise ConfigError(f"{endpoint}: vLLM refuses ipc endpoints for DP ranks above 0")
    match = re.fullmatch(r"(tcp://.+):(\d+)", endpoint)
    if not match:
        raise ConfigError(f"{endpoint}: --dp-ranks needs a tcp://host:port endpoint")
    return f"{match.group(1)}:{int(match.group(2)) + offset}"


class NatsSettings(Section, frozen=True):
    """The NATS connection both outputs and every command use."""

    servers: Annotated[str, setting(
        "NATS server URL(s), comma-separated", flag="nats", env=("NATS_SERVER",),
        metavar="URL")] = "nats://127.0.0.1:4222"
    engine: Annotated[Literal["direct", "public"], setting(
        "how publishes and their replies pass through nats-py: direct (a loop turn's "
        "publishes in one socket write, replies read as the socket is read; relies on nats-py "
        "internals, checked at connect) or public (nats-py's publish() and subscriptions)",
        flag="nats_engine")] = "direct"
    reconnect_wait_max: Annotated[float, setting(
        "cap of the NATS reconnect backoff in seconds", gt=0)] = 1.0
    nats_user: Annotated[str | None, setting("NATS user")] = None
    nats_password: Annotated[str | None, setting("NATS password")] = None
    nats_token: Annotated[str | None, setting("NATS token")] = None
    nats_nkey_seed: Annotated[str | None, setting(
        "file holding an NKey seed", metavar="PATH")] = None
    nats_creds: Annotated[str | None, setting(
        "NATS credentials file (JWT + seed)", metavar="PATH")] = None
    nats_tls_ca: Annotated[str | None, setting(
        "CA bundle to verify the NATS server", metavar="PATH")] = None
    nats_tls_cert: Annotated[str | None, setting(
        "client certificate for NATS TLS", metavar="PATH")] = None
    nats_tls_key: Annotated[str | None, setting(
        "client key for NATS TLS", metavar="PATH")] = None

    def redacted_servers(self) -> str:
        """The server URLs with any credentials in them masked, for logs."""
        return re.sub(r"//[^@/]*@", "//***@", self.servers)

    def __post_init__(self) -> None:
        if bool(self.nats_tls_cert) != bool(self.nats_tls_key):
            raise ValueError("--nats-tls-cert and --nats-tls-key go together")
        for url in self.servers.split(","):
            if url.strip() and not _nats_url(url.strip()):
                shown = re.sub(r"//[^@/]*@", "//***@", url.strip())
                raise ValueError(f"--nats {shown!r} is not a NATS URL: give "
                                 "nats://HOST[:PORT] (or tls://, ws://, wss://)")
        if not self.servers.replace(",", "").strip():
            raise ValueError("--nats names no server")


def _nats_url(url: str) -> bool:
    """Whether nats-py can connect to `url`: a scheme it speaks, a host, a valid port."""
    try:
        parsed = urllib.parse.urlsplit(url)
        port = parsed.port
    except ValueError:
        return False
    return (parsed.scheme in ("nats", "tls", "ws", "wss") and bool(parsed.hostname)
            and (port is None or 0 < port < 65536))


class DiscoverySettings(Section, frozen=True):
    """Who the worker is: its namespace, component and instance ID, and where to find it."""

    namespace: Annotated[str, setting(
        "namespace of the subject, ^[a-z0-9-_]+$", env=("DYN_NAMESPACE",),
        pattern=_NAME)] = "dynamo"
    component: Annotated[str, setting(
        "component of the subject, ^[a-z0-9-_]+$", env=("DYN_COMPONENT",),
        pattern=_NAME)] = "backend"
    instance_id: Annotated[int | None, setting(
        "worker instance ID (u64); default: discovered (see --discovery-backend)")] = None
    discovery_backend: Annotated[str | None, setting(
        "where the worker registers: kubernetes (its DynamoWorkerMetadata) or etcd; "
        "otherwise the ID is Dynamo's hash of POD_NAME (else the hostname); --format dynamo "
        "writes its records to Dynamo's file backend (file or unset) or to etcd, attached to "
        "a lease of its own whose ID is the instance ID with --dynamo-register worker",
        env=("DYN_DISCOVERY_BACKEND",))] = None
    discovery_timeout: Annotated[float, setting(
        "seconds to wait for the worker's registration before giving up (exit 1)",
        gt=0)] = 300.0
    discovery_retry_max: Annotated[float, setting(
        "cap of the backoff between discovery attempts in seconds", gt=0)] = 5.0
    discovery_host: Annotated[_HOST_PORT | None, setting(
        "etcd: the worker's advertised host or host:port; default: any address of this host",
        metavar="HOST[:PORT]",
        rule="must be HOST or HOST:PORT (IPv6 with a port: [ADDR]:PORT)")] = None
    etcd_endpoints: Annotated[str, setting(
        "etcd URL(s) for --discovery-backend etcd, comma-separated (v3 JSON gateway)",
        env=("ETCD_ENDPOINTS",), metavar="URL")] = "http://localhost:2379"
    kube_serviceaccount_dir: Annotated[str, setting(
        "service-account token, CA and namespace for the Kubernetes API",
        metavar="DIR")] = "/var/run/secrets/kubernetes.io/serviceaccount"

    def __post_init__(self) -> None:
        if self.instance_id is not None and not 0 <= self.instance_id <= MAX_U64:
            # Outside what msgspec's bounds can state (int64).
            raise ValueError("--instance-id must be an unsigned 64-bit value "
                             f"(got {self.instance_id})")

    @property
    def backend(self) -> str:
        """The discovery backend's name, normalised; "" when none is set."""
        return (self.discovery_backend or "").strip().lower()

    def etcd_endpoint_list(self) -> list[str]:
        return [e.strip() for e in self.etcd_endpoints.split(",") if e.strip()]


class PublishSettings(Section, frozen=True):
    """What both outputs share: the format, the buffer, the window of unconfirmed publishes."""

    format: Annotated[Literal["msgpack", "json", "dynamo"], setting(
        "payload encoding of the RelayBatch; dynamo: NVIDIA Dynamo's own KV event plane "
        "(core NATS) instead")] = "msgpack"
    buffer_batches: Annotated[int, setting(
        "batches ingest holds, of every vLLM publisher together: buffered while NATS is slow "
        "or away, and held while a resume or a replay is under way; past it the oldest are "
        "dropped", ge=1)] = 50_000
    buffer_bytes: Annotated[int, setting(
        "payload bytes ingest holds, as --buffer-batches; past it the oldest are dropped",
        ge=1024)] = 64 << 20
    max_in_flight: Annotated[int, setting(
        "publishes awaiting a JetStream ack at once", ge=1)] = 4000
    max_in_flight_bytes: Annotated[int, setting(
        "payload bytes of the publishes awaiting an ack at once (the last one may pass it)",
        ge=1024)] = 4 << 20
    batches_per_message: Annotated[int, setting(
        "JetStream: the most batches of a rank one message carries (a pack, schema 2); a "
        "message takes the rank's batches in hand at once, never waits for more; 1: a message "
        "per batch, as routers reading schema 1 need", ge=1, le=4096)] = 64
    ack_timeout: Annotated[float, setting(
        "seconds to wait for a JetStream ack before publishing again (dedup drops repeats)",
        gt=0)] = 5.0
    drain_timeout: Annotated[float, setting(
        "seconds to publish what is buffered after SIGTERM before giving up", gt=0)] = 10.0


class StreamSettings(Section, frozen=True):
    """The JetStream stream: its name, and how it is created when absent."""

    name: Annotated[str, setting(
        "JetStream stream, created if absent, verified if present", flag="stream",
        pattern=r"^[^ .*>]+$", rule="must be a valid JetStream stream name (no spaces, "
        "'.', '*' or '>')")] = "KV_EVENTS"
    subject_prefix: Annotated[str, setting(
        "first token(s) of every subject, <prefix>.<namespace>.<component>.<instance>.<rank>; "
        "a stream the relay creates takes <prefix>.>", pattern=PREFIX_RULE.pattern,
        rule="must be subject tokens (letters, digits, '-', '_') joined by '.', no "
        "wildcards")] = SUBJECT_PREFIX
    stream_replicas: Annotated[int, setting(
        "replicas when creating the stream (3 for production on a 3-node cluster)",
        ge=1)] = 1
    stream_max_age: Annotated[float, setting(
        "max age of stream messages in seconds when creating the stream", gt=0)] = 86400.0
    stream_max_bytes: Annotated[int, setting(
        "max bytes of the stream when creating it (-1: unlimited)")] = 1 << 30
    stream_duplicate_window: Annotated[float, setting(
        "JetStream duplicate window in seconds when creating the stream", gt=0)] = 120.0


class DynamoSettings(Section, frozen=True):
    """`--format dynamo`: the worker as NVIDIA Dynamo's router and discovery see it."""

    dynamo_endpoint: Annotated[str, setting(
        "--format dynamo: the worker's Dynamo endpoint, ^[a-z0-9-_]+$",
        pattern=_NAME)] = "generate"
    dynamo_register: Annotated[Literal["worker", "events"], setting(
        "--format dynamo: what the relay registers in Dynamo's discovery; worker: the worker "
        "(endpoint instance, model card with its DP ranks) and its event sources; events: "
        "only the event sources, for a worker Dynamo runs and registers itself")] = "worker"
    dynamo_model: Annotated[str, setting(
        "--format dynamo: model name on the registered model card")] = "kvrelay"
    kv_block_size: Annotated[int, setting(
        "--format dynamo: vLLM's --block-size; blocks of another size are left out, as "
        "Dynamo's router cannot match them", ge=1)] = 16
    dynamo_batches_per_message: Annotated[int, setting(
        "--format dynamo: the most vLLM batches of a rank one message carries; a message takes "
        "the rank's batches in hand at once, never waits for more; 1: a message per batch",
        ge=1)] = 32
    dynamo_file_kv: Annotated[str, setting(
        "--format dynamo: directory of Dynamo's file discovery backend; default: "
        "$TMPDIR/dynamo_store_kv, as Dynamo", env=("DYN_FILE_KV",), metavar="DIR")] = ""


class SnapshotSettings(Section, frozen=True):
    """Snapshots of the worker's blocks in a NATS KV bucket, for routers that start late."""

    snapshot_interval: Annotated[float, setting(
        "the relay writes its worker's snapshots itself, every this many seconds, in "
        "--snapshot-bucket (0: none on a timer; with --snapshot-events 0 too, the relay writes "
        "none: routers' snapshot writers do, e.g. `kvrelay index`); costs a second decode of "
        "every batch, in a process beside the relay",
        ge=0, rule="must be 0 (off) or positive")] = 0.0
    snapshot_events: Annotated[int, setting(
        "the relay also snapshots once this many events were stored since the last (0: never "
        "on a count)", ge=0, rule="must be 0 (off) or positive")] = 0
    snapshot_bucket: Annotated[str, setting(
        "NATS KV bucket of the snapshots, created if absent (history 1)",
        pattern=BUCKET_RULE.pattern)] = SNAPSHOT_BUCKET

    @property
    def enabled(self) -> bool:
        """Whether the relay keeps its worker's blocks and writes snapshots of them."""
        return self.snapshot_interval > 0 or self.snapshot_events > 0


class SystemSettings(Section, frozen=True):
    """The relay's own surface: the /live, /health and /metrics server, and its logs."""

    system_host: Annotated[str, setting(
        "address of the /live, /health and /metrics server")] = "0.0.0.0"
    system_port: Annotated[int, setting(
        "port of the /live, /health and /metrics server (0: any free port)",
        env=("DYN_SYSTEM_PORT",), ge=0, le=65535, rule="must be a port (0 to 65535)")] = 9090
    log_level: Annotated[Literal["debug", "info", "warning", "error"], setting(
        "log level")] = "info"
    log_format: Annotated[Literal["text", "json"], setting(
        "log format: text, or json (one object per line: ts, level, logger, message, and "
        "exception when there is one)")] = "text"
    summary_interval: Annotated[float, setting(
        "seconds between the summary lines logged at INFO (batches, events, drops, resyncs, "
        "lag p99, buffer); one more at exit (0: only that one)", ge=0,
        rule="must be 0 (only at exit) or positive")] = 60.0
