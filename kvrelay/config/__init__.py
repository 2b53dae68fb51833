"""Every setting of `kvrelay run`, its default, its environment variable and its validation.

The command line is built from the fields below (cli.py only parses), and a value is taken
from, in order: the flag, `KVRELAY_<FLAG>`, the Dynamo variable named in the field (so a relay
beside a Dynamo worker picks up the worker's settings), then the default. Invalid values raise
ConfigError, which the CLI turns into exit code 2.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from kvrelay.config.endpoint import parse_endpoint
from kvrelay.wire.names import BUCKET_RULE, NAME_RULE, SNAPSHOT_BUCKET

log = logging.getLogger("kvrelay.config")

SECRET_FIELDS = frozenset({"nats_password", "nats_token"})
MAX_U64 = 2**64 - 1


class ConfigError(ValueError):
    """A setting that cannot work; the message says which and why."""


def _opt(
    help: str,
    *,
    env: tuple[str, ...] = (),
    many: bool = False,
    choices: tuple[str, ...] = (),
    metavar: str | None = None,
) -> dict[str, Any]:
    return {
        "help": help,
        "env": env,
        "many": many,
        "choices": choices,
        "metavar": metavar,
    }


@dataclass(frozen=True)
class Config:
    """The whole configuration of one relay, validated; build it with `Config.load`."""

    zmq: tuple[str, ...] = field(default=(), metadata=_opt(
        "vLLM PUB endpoint to connect to (vLLM binds, e.g. its default tcp://*:5557); "
        "repeatable; with neither --zmq nor --zmq-bind: tcp://127.0.0.1:5557",
        many=True, metavar="ENDPOINT"))
    zmq_bind: tuple[str, ...] = field(default=(), metadata=_opt(
        "endpoint to bind for a vLLM PUB that connects (e.g. tcp://127.0.0.1:5557); repeatable",
        many=True, metavar="ENDPOINT"))
    replay: tuple[str, ...] = field(default=(), metadata=_opt(
        "vLLM replay ROUTER endpoint, one per ZMQ endpoint in the same order; repeatable",
        many=True, metavar="ENDPOINT"))
    topic: str = field(default="", metadata=_opt("ZMQ topic prefix to subscribe to (all)"))
    zmq_engine: Literal["native", "libzmq"] = field(default="native", metadata=_opt(
        "how vLLM's PUB stream is read: native (ZMTP on the relay's event loop, tcp:// and "
        "ipc://) or libzmq (pyzmq, every transport libzmq has)", choices=("native", "libzmq")))
    dp_ranks: int = field(default=1, metadata=_opt(
        "data-parallel ranks: expand the one ZMQ (and replay) endpoint to N consecutive ports"))
    dp_rank_start: int = field(default=0, metadata=_opt(
        "DP rank of the first endpoint (vLLM's data_parallel_start_rank on this node)"))
    nats: str = field(default="nats://127.0.0.1:4222", metadata=_opt(
        "NATS server URL(s), comma-separated", env=("NATS_SERVER",), metavar="URL"))
    nats_engine: Literal["direct", "public"] = field(default="direct", metadata=_opt(
        "how publishes and their replies pass through nats-py: direct (a loop turn's "
        "publishes in one socket write, replies read as the socket is read; relies on nats-py "
        "internals, checked at connect) or public (nats-py's publish() and a subscription; "
        "more CPU per batch)",
        choices=("direct", "public")))
    namespace: str = field(default="dynamo", metadata=_opt(
        "namespace of the subject, ^[a-z0-9-_]+$", env=("DYN_NAMESPACE",)))
    component: str = field(default="backend", metadata=_opt(
        "component of the subject, ^[a-z0-9-_]+$", env=("DYN_COMPONENT",)))
    instance_id: int | None = field(default=None, metadata=_opt(
        "worker instance ID (u64); default: discovered (see --discovery-backend)"))
    discovery_backend: str | None = field(default=None, metadata=_opt(
        "where the worker registers: kubernetes (its DynamoWorkerMetadata) or etcd; "
        "otherwise the ID is Dynamo's hash of POD_NAME (else the hostname); --format dynamo "
        "writes its records to Dynamo's file backend (file or unset) or to etcd, attached to "
        "a lease of its own whose ID is the instance ID with --dynamo-register worker",
        env=("DYN_DISCOVERY_BACKEND",)))
    discovery_timeout: float = field(default=300.0, metadata=_opt(
        "seconds to wait for the worker's registration before giving up (exit 1)"))
    discovery_retry_max: float = field(default=5.0, metadata=_opt(
        "cap of the backoff between discovery attempts in seconds"))
    discovery_host: str | None = field(default=None, metadata=_opt(
        "etcd: the worker's advertised host or host:port; default: any address of this host",
        metavar="HOST[:PORT]"))
    etcd_endpoints: str = field(default="http://localhost:2379", metadata=_opt(
        "etcd URL(s) for --discovery-backend etcd, comma-separated (v3 JSON gateway)",
        env=("ETCD_ENDPOINTS",),
        metavar="URL"))
    kube_serviceaccount_dir: str = field(
        default="/var/run/secrets/kubernetes.io/serviceaccount", metadata=_opt(
            "service-account token, CA and namespace for the Kubernetes API", metavar="DIR"))
    format: Literal["msgpack", "json", "dynamo"] = field(default="msgpack", metadata=_opt(
        "payload encoding of the RelayBatch; dynamo: NVIDIA Dynamo's own KV event plane "
        "(core NATS) instead", choices=("msgpack", "json", "dynamo")))
    dynamo_endpoint: str = field(default="generate", metadata=_opt(
        "--format dynamo: the worker's Dynamo endpoint, ^[a-z0-9-_]+$"))
    dynamo_register: str = field(default="worker", metadata=_opt(
        "--format dynamo: what the relay registers in Dynamo's discovery; worker: the worker "
        "(endpoint instance, model card with its DP ranks) and its event sources; events: "
        "only the event sources, for a worker Dynamo runs and registers itself",
        choices=("worker", "events")))
    dynamo_model: str = field(default="kvrelay", metadata=_opt(
        "--format dynamo: model name on the registered model card"))
    kv_block_size: int = field(default=16, metadata=_opt(
        "--format dynamo: vLLM's --block-size; blocks of another size are left out, as "
        "Dynamo's router cannot match them"))
    dynamo_batches_per_message: int = field(default=32, metadata=_opt(
        "--format dynamo: the most vLLM batches of a rank one message carries; a message takes "
        "the rank's batches in hand at once, never waits for more; 1: a message per batch"))
    dynamo_file_kv: str = field(default="", metadata=_opt(
        "--format dynamo: directory of Dynamo's file discovery backend; default: "
        "$TMPDIR/dynamo_store_kv, as Dynamo", env=("DYN_FILE_KV",), metavar="DIR"))
    system_host: str = field(default="0.0.0.0", metadata=_opt(
        "address of the /live, /health and /metrics server"))
    system_port: int = field(default=9090, metadata=_opt(
        "port of the /live, /health and /metrics server (0: any free port)",
        env=("DYN_SYSTEM_PORT",)))
    stream: str = field(default="KV_EVENTS", metadata=_opt(
        "JetStream stream, created if absent, verified if present"))
    stream_replicas: int = field(default=1, metadata=_opt("replicas when creating the stream"))
    stream_max_age: float = field(default=86400.0, metadata=_opt(
        "max age of stream messages in seconds when creating the stream"))
    stream_max_bytes: int = field(default=1 << 30, metadata=_opt(
        "max bytes of the stream when creating it (-1: unlimited)"))
    stream_duplicate_window: float = field(default=120.0, metadata=_opt(
        "JetStream duplicate window in seconds when creating the stream"))
    buffer_batches: int = field(default=50_000, metadata=_opt(
        "batches buffered while NATS is slow or away; past it the oldest are dropped"))
    buffer_bytes: int = field(default=64 << 20, metadata=_opt(
        "payload bytes buffered while NATS is slow or away; past it the oldest are dropped"))
    max_in_flight: int = field(default=4000, metadata=_opt(
        "publishes awaiting a JetStream ack at once"))
    ack_timeout: float = field(default=5.0, metadata=_opt(
        "seconds to wait for a JetStream ack before publishing again (dedup drops repeats)"))
    reconnect_wait_max: float = field(default=1.0, metadata=_opt(
        "cap of the NATS reconnect backoff in seconds"))
    replay_timeout: float = field(default=2.0, metadata=_opt(
        "seconds to wait for vLLM's replay before falling back to a resync"))
    replay_cooldown: float = field(default=5.0, metadata=_opt(
        "seconds after a failed replay before the next is tried on that endpoint"))
    drain_timeout: float = field(default=10.0, metadata=_opt(
        "seconds to publish what is buffered after SIGTERM before giving up"))
    snapshot_interval: float = field(default=30.0, metadata=_opt(
        "seconds between snapshots of the worker's blocks in --snapshot-bucket, written when "
        "something changed (0: none on a timer; with --snapshot-events 0 too, no snapshots)"))
    snapshot_events: int = field(default=50_000, metadata=_opt(
        "also snapshot once this many events were stored since the last snapshot (0: never "
        "on a count)"))
    snapshot_bucket: str = field(default=SNAPSHOT_BUCKET, metadata=_opt(
        "NATS KV bucket of the snapshots, created if absent (history 1)"))
    nats_user: str | None = field(default=None, metadata=_opt("NATS user"))
    nats_password: str | None = field(default=None, metadata=_opt("NATS password"))
    nats_token: str | None = field(default=None, metadata=_opt("NATS token"))
    nats_nkey_seed: str | None = field(default=None, metadata=_opt(
        "file holding an NKey seed", metavar="PATH"))
    nats_creds: str | None = field(default=None, metadata=_opt(
        "NATS credentials file (JWT + seed)", metavar="PATH"))
    nats_tls_ca: str | None = field(default=None, metadata=_opt(
        "CA bundle to verify the NATS server", metavar="PATH"))
    nats_tls_cert: str | None = field(default=None, metadata=_opt(
        "client certificate for NATS TLS", metavar="PATH"))
    nats_tls_key: str | None = field(default=None, metadata=_opt(
        "client key for NATS TLS", metavar="PATH"))
    log_level: str = field(default="info", metadata=_opt(
        "log level", choices=("debug", "info", "warning", "error")))

    @classmethod
    def load(cls, flags: Mapping[str, Any] | None = None,
             env: Mapping[str, str] | None = None) -> Config:
        """Merge flags (None = not given), environment and defaults, then validate."""
        flags = flags or {}
        env = env or {}
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            given = flags.get(f.name)
            if given is not None and given != [] and given != ():
                values[f.name] = _parse(f, given, "--" + f.name.replace("_", "-"))
                continue
            for var in (env_var(f.name), *f.metadata["env"]):
                if env.get(var, "") != "":
                    values[f.name] = _parse(f, env[var], var)
                    break
        try:
            config = cls(**values)
        except TypeError as exc:
            raise ConfigError(str(exc)) from None
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ConfigError for any value that cannot work."""
        for name in ("namespace", "component", "dynamo_endpoint"):
            if not NAME_RULE.match(getattr(self, name)):
                raise ConfigError(f"--{name} {getattr(self, name)!r} must match ^[a-z0-9-_]+$")
        if self.instance_id is not None and not 0 <= self.instance_id <= MAX_U64:
            raise ConfigError(f"--instance-id {self.instance_id} is not an unsigned 64-bit value")
        for name, low in (("dp_ranks", 1), ("dp_rank_start", 0), ("buffer_batches", 1),
                          ("buffer_bytes", 1024), ("max_in_flight", 1),
                          ("stream_replicas", 1), ("kv_block_size", 1),
                          ("dynamo_batches_per_message", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least {low}")
        for name in ("ack_timeout", "reconnect_wait_max", "replay_timeout", "replay_cooldown",
                     "drain_timeout", "stream_max_age", "stream_duplicate_window",
                     "discovery_timeout", "discovery_retry_max"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        for name in ("snapshot_interval", "snapshot_events"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be 0 (off) or positive")
        if not BUCKET_RULE.match(self.snapshot_bucket):
            raise ConfigError(f"--snapshot-bucket {self.snapshot_bucket!r} must match "
                              f"{BUCKET_RULE.pattern}")
        if self.discovery_host and not re.fullmatch(
                r"(\[[0-9a-fA-F:.]+\]|[^:\[\]\s]+)(:\d{1,5})?|[0-9a-fA-F:]+", self.discovery_host):
            raise ConfigError(f"--discovery-host {self.discovery_host!r} is not HOST or HOST:PORT "
                              "(IPv6 with a port: [ADDR]:PORT)")
        if not 0 <= self.system_port <= 65535:
            raise ConfigError(f"--system-port {self.system_port} is not a port")
        if bool(self.nats_tls_cert) != bool(self.nats_tls_key):
            raise ConfigError("--nats-tls-cert and --nats-tls-key go together")
        if not self.stream or any(c in self.stream for c in " .*>"):
            raise ConfigError(f"--stream {self.stream!r} is not a valid JetStream stream name")
        self.sources()  # validates the ZMQ layout
        if self.format == "dynamo":
            self._validate_dynamo()

    def dynamo_backend(self) -> str:
        """Where `--format dynamo` writes its discovery records: "file" or "etcd"."""
        return (self.discovery_backend or "file").strip().lower()

    def etcd_endpoint_list(self) -> list[str]:
        return [e.strip() for e in self.etcd_endpoints.split(",") if e.strip()]

    def _validate_dynamo(self) -> None:
        if self.dynamo_backend() not in ("file", "etcd"):
            raise ConfigError(
                f"--format dynamo registers in Dynamo's file or etcd discovery backend; "
                f"--discovery-backend (DYN_DISCOVERY_BACKEND) is {self.discovery_backend!r}")
        if self.dynamo_backend() == "etcd" and not self.etcd_endpoint_list():
            raise ConfigError("--format dynamo with --discovery-backend etcd needs "
                              "--etcd-endpoints (ETCD_ENDPOINTS)")
        try:
            importlib.import_module("xxhash")
        except ImportError:
            raise ConfigError("--format dynamo needs the xxhash package: "
                              "pip install 'kvrelay[dynamo]'") from None

    @property
    def snapshots(self) -> bool:
        """Whether the relay keeps its worker's blocks and writes snapshots of them."""
        return self.snapshot_interval > 0 or self.snapshot_events > 0

    def sources(self) -> tuple[SourceSpec, ...]:
        """One SourceSpec per vLLM publisher, with --dp-ranks expanded as vLLM lays ports out."""
        listed = [(e, False) for e in self.zmq] + [(e, True) for e in self.zmq_bind]
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
        if self.zmq_engine == "native":
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

    def redacted(self) -> dict[str, Any]:
        """The configuration for logs: secrets masked, credentials in URLs removed."""
        out = dataclasses.asdict(self)
        for name in SECRET_FIELDS:
            if out[name]:
                out[name] = "***"
        out["nats"] = re.sub(r"//[^@/]*@", "//***@", self.nats)
        return out


class SourceSpec(NamedTuple):
    endpoint: str
    bind: bool
    replay: str | None
    dp_rank: int


def env_var(name: str) -> str:
    return "KVRELAY_" + name.upper()


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


def _parse(f: dataclasses.Field[Any], raw: Any, origin: str) -> Any:
    meta = f.metadata
    if meta["many"]:
        items = raw if isinstance(raw, list | tuple) else str(raw).split(",")
        return tuple(str(i).strip() for i in items if str(i).strip())
    if meta["choices"] and str(raw) not in meta["choices"]:
        raise ConfigError(f"{origin}: {raw!r} is not one of {', '.join(meta['choices'])}")
    kind = str(f.type)
    convert: Callable[[str], Any]
    if kind.startswith("int"):
        convert = int
    elif kind.startswith("float"):
        convert = float
    else:
        return raw if isinstance(raw, str) else str(raw)
    try:
        return convert(str(raw))
    except ValueError:
        raise ConfigError(f"{origin}: {raw!r} is not a valid {convert.__name__}") from None
