"""The relays the benchmark can drive, by name. Add one by subclassing Target and registering it.

A target says how to start one relay process per vLLM worker (all of the worker's DP ranks in
it), how to tell it is ready, and what its output looks like to the consumer. `requires` names
the packages its process imports beyond kvrelay's own dependencies; the `bench` extra holds
those of every default target (a test checks it), and `unavailable()` names what is missing
and the pip command that installs it; the benchmark lists such a target and skips it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from bench import dynamo_relay, naive
from bench.consumer import OutputKind
from bench.procstat import mapped_files

NAMESPACE = "dynamo"
COMPONENT = "backend"
DYNAMO_SUBJECT = "namespace.*.component.*.endpoint.*.kv-events"


@dataclass(frozen=True)
class Worker:
    """One vLLM worker of a trial: its ID and the ZMQ endpoint of its DP rank 0."""

    index: int
    worker_id: int
    zmq: str  # tcp://127.0.0.1:<port of rank 0>; rank r publishes on port + r
    system_port: int


@dataclass(frozen=True)
class TrialSite:
    """What every target of a trial shares: the NATS server, a scratch dir, the workers."""

    nats_url: str
    workdir: Path
    workers: list[Worker]
    dp_ranks: int


@dataclass(frozen=True)
class Launch:
    """One relay process to start: its command, environment, log and readiness check."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    ready: Callable[[], bool]


def log_says(log: Path, marker: str) -> Callable[[], bool]:
    def ready() -> bool:
        return log.exists() and marker.encode() in log.read_bytes()

    return ready


def health_ok(port: int) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
                return int(resp.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    return ready


INSTALL = "pip install '.[bench]'"
"""What installs every default target's packages, from a checkout (bench/ is not in the wheel)."""


@dataclass(frozen=True)
class Requirement:
    """A package a target's process imports: its import name and its distribution."""

    module: str
    distribution: str


class Target:
    """A relay under test. Subclasses set the class attributes and `launches`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    output: ClassVar[OutputKind]
    subject: ClassVar[str]
    stream: ClassVar[str | None]
    requires: ClassVar[tuple[Requirement, ...]] = ()

    def unavailable(self) -> str | None:
        """Why this target cannot run here and the pip command that fixes it, or None."""
        missing = [r.distribution for r in self.requires
                   if importlib.util.find_spec(r.module) is None]
        if missing:
            return (f"not available: {', '.join(missing)} not installed; "
                    f"fix: {INSTALL}")
        return None

    def launches(self, site: TrialSite) -> list[Launch]:
        raise NotImplementedError

    def build(self, pids: list[int], launches: list[Launch]) -> str:
        """What the running relay processes are built as (asked of them, not of this one)."""
        return "python"


KVRELAY_COMPILED = "kvrelay__mypyc"
"""The library mypyc compiles kvrelay's per-batch path into (setup.py's group): a process that
loaded it runs the compiled build."""


def kvrelay_build(pids: list[int]) -> str:
    """'compiled' when the relay processes loaded kvrelay's mypyc library, else 'python'
    (both, joined, if they differ): read from their memory maps, so it is what they import,
    whatever this process imports."""
    builds = {"compiled" if any(Path(path).name.startswith(f"{KVRELAY_COMPILED}.")
                                for path in mapped_files(pid)) else "python"
              for pid in pids}
    return "/".join(sorted(builds))


TARGETS: dict[str, Target] = {}
DEFAULT_TARGETS: tuple[str, ...] = ("kvrelay", "kvrelay-dynamo", "dynamo")
"""What `python -m bench` runs without --targets: kvrelay's two outputs and the yardstick."""


def register(cls: type[Target]) -> type[Target]:
    TARGETS[cls.name] = cls()
    return cls


def _kvrelay_argv(site: TrialSite, worker: Worker, *extra: str) -> list[str]:
    # -P: the kvrelay installed (compiled by a plain install), not the checkout's source, which
    # the working directory would put first on the path when run from a checkout
    return [sys.executable, "-P", "-m", "kvrelay", "run", "--zmq", worker.zmq,
            "--dp-ranks", str(site.dp_ranks), "--nats", site.nats_url,
            "--namespace", NAMESPACE, "--component", COMPONENT,
            "--instance-id", str(worker.worker_id), "--system-host", "127.0.0.1",
            "--system-port", str(worker.system_port), "--log-level", "warning", *extra]


@register
class KvRelay(Target):
    name = "kvrelay"
    summary = "kvrelay run into JetStream (file storage), as in production"
    output = "relaybatch"
    subject = "kv.>"
    stream = "KV_EVENTS"
    flags: tuple[str, ...] = ()  # what a variant adds to `kvrelay run`

    def launches(self, site: TrialSite) -> list[Launch]:
        return [Launch(f"{self.name}-{w.index}", _kvrelay_argv(site, w, *self.flags), {},
                       site.workdir / f"{self.name}-{w.index}.log", health_ok(w.system_port))
                for w in site.workers]

    def build(self, pids: list[int], launches: list[Launch]) -> str:
        return kvrelay_build(pids)


@register
class KvRelaySnap(KvRelay):
    name = "kvrelay-relaysnap"
    summary = ("kvrelay run into JetStream writing its worker's snapshots itself "
               "(--snapshot-interval 30 --snapshot-events 50000), to set against kvrelay's "
               "default, where routers write them")
    flags = ("--snapshot-interval", "30", "--snapshot-events", "50000")


@register
class KvRelayNoPack(KvRelay):
    name = "kvrelay-nopack"
    summary = ("kvrelay run into JetStream, one message per batch (--batches-per-message 1, "
               "schema 1's way), to show what packs buy")
    flags = ("--batches-per-message", "1")


@register
class KvRelayLibzmq(KvRelay):
    name = "kvrelay-libzmq"
    summary = "kvrelay run into JetStream, reading vLLM through libzmq (--zmq-engine libzmq)"
    flags = ("--zmq-engine", "libzmq")


@register
class KvRelayPublic(KvRelay):
    name = "kvrelay-public"
    summary = ("kvrelay run into JetStream through nats-py's publish() and a subscription "
               "(--nats-engine public)")
    flags = ("--nats-engine", "public")


def _dynamo_env(site: TrialSite) -> dict[str, str]:
    return {"DYN_DISCOVERY_BACKEND": "file", "DYN_FILE_KV": str(site.workdir / "dynamo-kv"),
            "DYN_REQUEST_PLANE": "tcp", "DYN_EVENT_PLANE": "nats", "NATS_SERVER": site.nats_url,
            "DYN_LOG": os.environ.get("DYN_LOG", "warn")}


@register
class KvRelayDynamo(Target):
    name = "kvrelay-dynamo"
    summary = "kvrelay run --format dynamo: Dynamo's KV event plane on core NATS"
    output = "dynamo"
    subject = DYNAMO_SUBJECT
    stream = None
    requires = (Requirement("xxhash", "xxhash"),)  # --format dynamo's tokens_hash
    flags: tuple[str, ...] = ("--format", "dynamo")  # a variant's adds to these

    def build(self, pids: list[int], launches: list[Launch]) -> str:
        return kvrelay_build(pids)

    def launches(self, site: TrialSite) -> list[Launch]:
        return [Launch(f"{self.name}-{w.index}", _kvrelay_argv(site, w, *self.flags),
                       _dynamo_env(site), site.workdir / f"{self.name}-{w.index}.log",
                       health_ok(w.system_port))
                for w in site.workers]


@register
class KvRelayDynamoPublic(KvRelayDynamo):
    name = "kvrelay-dynamo-public"
    summary = ("kvrelay run --format dynamo through nats-py's publish() and a subscription "
               "(--nats-engine public)")
    flags = ("--format", "dynamo", "--nats-engine", "public")


@register
class Dynamo(Target):
    name = "dynamo"
    summary = "Dynamo 1.6.1's KvEventPublisher (ai-dynamo-runtime) onto core NATS: the yardstick"
    output = "dynamo"
    subject = DYNAMO_SUBJECT
    stream = None
    requires = (Requirement("dynamo", "ai-dynamo-runtime"),)

    def launches(self, site: TrialSite) -> list[Launch]:
        launches = []
        for w in site.workers:
            log = site.workdir / f"dynamo-{w.index}.log"
            argv = [sys.executable, "-m", "bench.dynamo_relay", "--zmq", w.zmq,
                    "--dp-ranks", str(site.dp_ranks), "--worker-id", str(w.worker_id),
                    "--namespace", NAMESPACE, "--component", COMPONENT]
            launches.append(Launch(f"dynamo-{w.index}", argv, _dynamo_env(site), log,
                                   log_says(log, dynamo_relay.READY)))
        return launches

    def build(self, pids: list[int], launches: list[Launch]) -> str:
        """The runtime version each relay process printed with READY."""
        versions = set()
        for launch in launches:
            for line in launch.log.read_text(errors="replace").splitlines():
                if line.startswith(f"{dynamo_relay.READY} "):
                    versions.add(line.removeprefix(f"{dynamo_relay.READY} "))
        return "/".join(sorted(versions)) or "ai-dynamo-runtime (version unknown)"


@register
class Naive(Target):
    name = "naive"
    summary = "the floor: one awaited JetStream publish per event (bench/naive.py)"
    output = "naive"
    subject = naive.SUBJECTS
    stream = naive.STREAM

    def launches(self, site: TrialSite) -> list[Launch]:
        launches = []
        for w in site.workers:
            log = site.workdir / f"naive-{w.index}.log"
            argv = [sys.executable, "-m", "bench.naive", "--zmq", w.zmq,
                    "--dp-ranks", str(site.dp_ranks), "--nats", site.nats_url,
                    "--worker-id", str(w.worker_id)]
            launches.append(Launch(f"naive-{w.index}", argv, {}, log,
                                   log_says(log, naive.READY)))
        return launches
