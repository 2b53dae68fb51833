"""What the end-to-end and fault tests share: in-process and subprocess relays, polling,
reading JetStream back, the system port, and ways to break a replay socket.

Tests on the shared session server use their own instance ID (above 2**63, as real worker IDs
can be), so each reads only its own subjects of the one `kv.>` stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import nats
import nats.errors
import nats.js.errors
import zmq
from nats.js.api import DeliverPolicy
from prometheus_client.parser import text_string_to_metric_families

from kvrelay.app import Relay
from kvrelay.config import Config
from kvrelay.testing.natsserver import NatsServer, free_port
from kvrelay.testing.synthetic import SyntheticVllm
from kvrelay.wire.relaybatch import decode_relay_batches, decode_resume_point
from kvrelay.wire.schema import RelayBatch, Resync

REPO = Path(__file__).resolve().parent.parent
VECTOR_DIR = REPO / "schemas" / "vectors" / "input"  # frames captured from vLLM 0.32
STREAM = "KV_EVENTS"
NS = "kvtest"
COMP = "worker"
ANY_PORT = "tcp://127.0.0.1:*"
VLLM_TYPES = {"BlockStored": "stored", "BlockRemoved": "removed", "AllBlocksCleared": "cleared"}
CONTRACT_METRICS = (
    "kvrelay_batches_received_total",
    "kvrelay_batches_published_total",
    "kvrelay_batches_dropped_total",
    "kvrelay_events_received_total",
    "kvrelay_events_published_total",
    "kvrelay_events_dropped_total",
    "kvrelay_gaps_total",
    "kvrelay_replays_total",
    "kvrelay_engine_restarts_total",
    "kvrelay_resyncs_total",
    "kvrelay_publish_in_flight",
    "kvrelay_buffer_batches",
    "kvrelay_buffer_bytes",
    "kvrelay_publish_latency_seconds_bucket",
    "kvrelay_lag_seconds_bucket",
    "kvrelay_nats_reconnects_total",
    "kvrelay_decode_errors_total",
)

_instance_ids = itertools.count(2**63 + 1001)


def new_instance_id() -> int:
    """A worker ID no other test of this run uses (above 2**63, as u64 IDs can be)."""
    return next(_instance_ids)


def subject_of(instance_id: int, dp_rank: int = 0) -> str:
    return f"kv.{NS}.{COMP}.{instance_id}.{dp_rank}"


# -- polling ---------------------------------------------------------------------------------------


async def eventually(cond: Callable[[], bool], what: str, within: float = 8.0) -> None:
    """Poll `cond` until it holds; fail saying `what` did not happen."""
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


def metric(relay: Relay, name: str, **labels: str) -> float:
    """A sample of the relay's own registry, 0 when the series does not exist yet."""
    value = relay.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def is_ready(relay: Relay) -> bool:
    return all(state == "ok" for state in relay.readiness().values())


# -- in-process relays -----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_relay(**flags: Any) -> AsyncIterator[Relay]:
    """Serve a relay in this event loop; on exit drain it and check it stopped cleanly."""
    base: dict[str, Any] = {"system_port": 0, "system_host": "127.0.0.1", "namespace": NS,
                            "component": COMP, "drain_timeout": 3.0}
    relay = Relay(Config.load({**base, **flags}, {}), env={})
    served = asyncio.ensure_future(relay.serve())
    clean = False
    try:
        await eventually(lambda: relay.started.is_set() or served.done(), "relay start-up")
        if served.done():
            raise AssertionError(f"relay stopped during start-up: {served.result()}")
        yield relay
        clean = True
    finally:
        relay.handle_exit()
        code = await asyncio.wait_for(served, timeout=15)
    if clean:
        assert code == 0, f"relay exit code {code}"
        assert metric(relay, "kvrelay_batches_dropped_total", reason="shutdown") == 0


async def join(vllm: SyntheticVllm, relay: Relay, within: float = 5.0) -> None:
    """Beat ZMQ's slow joiner without spending a seq: send 1-frame probes until the relay counts
    one as malformed, then wait until the probes still in flight have landed."""

    def probes() -> float:
        return metric(relay, "kvrelay_decode_errors_total", kind="frame_count")

    before = probes()
    deadline = time.monotonic() + within
    while probes() == before:
        if time.monotonic() > deadline:
            raise AssertionError(f"relay never received a probe from {vllm.address}")
        vllm.send_raw([b"kvrelay-test-probe"])
        await asyncio.sleep(0.02)
    last = -1.0
    while probes() != last:
        last = probes()
        await asyncio.sleep(0.1)


# -- reading JetStream -----------------------------------------------------------------------------


class Received(NamedTuple):
    subject: str
    headers: dict[str, str]
    data: bytes
    batch: RelayBatch


def received(msg: Any) -> list[Received]:
    """A stream message as its batches: one Received each, a pack's sharing its headers."""
    headers = dict(msg.headers or {})
    return [Received(msg.subject, headers, msg.data, batch)
            for batch in decode_relay_batches(msg.data)]


@contextlib.asynccontextmanager
async def nats_client(url: str) -> AsyncIterator[Any]:
    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=2)
    try:
        yield nc
    finally:
        await nc.close()


async def read_stream(nc: Any, subject: str, count: int, *, within: float = 10.0,
                      settle: float = 0.3, stream: str = STREAM) -> list[Received]:
    """Everything on `subject` from the start (ordered consumer): at least `count` messages,
    plus whatever else arrives within `settle` seconds, so duplicates and extras show."""
    deadline = time.monotonic() + within
    while True:  # the relay may not have created the stream yet
        try:
            sub = await nc.jetstream().subscribe(subject, stream=stream, ordered_consumer=True,
                                                 deliver_policy=DeliverPolicy.ALL)
            break
        except nats.js.errors.NotFoundError:
            assert time.monotonic() < deadline, f"no stream {stream}"
            await asyncio.sleep(0.05)
    out: list[Received] = []
    try:
        while len(out) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                msg = await sub.next_msg(timeout=min(left, 1.0))
            except nats.errors.TimeoutError:
                continue
            out.extend(received(msg))
        while True:
            try:
                msg = await sub.next_msg(timeout=settle)
            except nats.errors.TimeoutError:
                break
            out.extend(received(msg))
    finally:
        await sub.unsubscribe()
    assert len(out) >= count, f"{len(out)} of {count} batches on {subject}: " + str(
        [(r.batch.epoch, r.batch.seq) for r in out])
    return out


async def last_seq(nc: Any, subject: str) -> int | None:
    """Seq of the last RelayBatch stored on `subject`, None when there is none."""
    try:
        msg = await nc.jetstream().get_last_msg(STREAM, subject)
    except nats.js.errors.NotFoundError:
        return None
    return decode_resume_point(msg.data).seq


def batch_id(got: Received) -> str:
    """The `Nats-Msg-Id` a batch would carry alone, read from its message's: a pack's id
    `<instance>.<rank>.<epoch>.<first>-<last>` names each batch from first to last (the
    message's own id when the batch is not in its range, so a comparison fails)."""
    msg_id = got.headers["Nats-Msg-Id"]
    head, _, last = msg_id.rpartition(".")
    first, dash, end = last.partition("-")
    if dash and int(first) <= got.batch.seq <= int(end):
        return f"{head}.{got.batch.seq}"
    return msg_id


def seqs(got: list[Received]) -> list[tuple[int, int]]:
    return [(r.batch.epoch, r.batch.seq) for r in got]


def resyncs(got: list[Received]) -> list[tuple[int, Resync]]:
    return [(r.batch.seq, e) for r in got for e in r.batch.events if isinstance(e, Resync)]


def plain(event: Any) -> Any:
    """An output event as builtins (bytes kept as bytes), for comparing with vLLM's input."""
    return msgspec.to_builtins(event, builtin_types=(bytes,))


def as_output(vllm_event: dict[str, Any]) -> dict[str, Any]:
    """What a vLLM map event must become on the output: same fields, relay's type tag."""
    return {**vllm_event, "type": VLLM_TYPES[vllm_event["type"]]}


# -- HTTP on the system port -----------------------------------------------------------------------


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=5)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def scrape(port: int, name: str, **labels: str) -> float:
    """One sample from a relay process's /metrics, 0 when absent."""
    _, body = await http_get(port, "/metrics")
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


# -- relay processes -------------------------------------------------------------------------------


class RelayProcess:
    """`python -m kvrelay run ...` with its log in a file and its system port known."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        """`env`: variables set for the relay on top of this process's (whose KVRELAY_, DYN_,
        NATS_SERVER and POD_ variables are left out)."""
        self._system_port: int | None = None
        self.log = log
        inherited = {k: v for k, v in os.environ.items()
                     if not k.startswith(("KVRELAY_", "DYN_", "NATS_SERVER", "POD_"))}
        env = {**inherited, **(env or {}), "PYTHONUNBUFFERED": "1"}
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kvrelay", "run", "--system-host", "127.0.0.1",
                 "--system-port", "0", *args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                cwd=REPO)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def system_port(self) -> int:
        """The port the relay bound (it picks a free one: no race with parallel runs)."""
        if self._system_port is None:
            found = re.search(r"system server on http://[^:/]+:(\d+)", self.output())
            if found is None:
                raise LookupError("the relay has not opened its system port yet")
            self._system_port = int(found.group(1))
        return self._system_port

    async def healthy(self, within: float = 10.0) -> None:
        deadline = time.monotonic() + within
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"relay exited {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(OSError, IndexError, ValueError, LookupError):
                if (await http_get(self.system_port, "/health"))[0] == 200:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"relay not healthy after {within}s:\n{self.output()}")
            await asyncio.sleep(0.05)

    async def exited(self, within: float) -> int:
        deadline = time.monotonic() + within
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"relay still running after {within}s:\n{self.output()}")
            await asyncio.sleep(0.02)
        return self.proc.returncode

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def run_cli(args: list[str], timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVRELAY_", "DYN_"))}
    return subprocess.run([sys.executable, "-m", "kvrelay", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO, check=False)


# -- misc ------------------------------------------------------------------------------------------


def load_vector(name: str) -> list[list[bytes]]:
    """Captured vLLM frames, each [topic, seq, payload] as they left vLLM's PUB socket."""
    return msgspec.msgpack.decode((VECTOR_DIR / name).read_bytes(), type=list[list[bytes]])


def consecutive_ports(n: int) -> int:
    """A base port with n free ports from it (on all interfaces, as `tcp://*:p` binds)."""
    for _ in range(50):
        base = free_port("0.0.0.0")
        socks: list[socket.socket] = []
        try:
            for offset in range(n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("0.0.0.0", base + offset))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


def publish(vllm: SyntheticVllm, n: int) -> list[int]:
    return [vllm.publish_next() for _ in range(n)]


@contextlib.contextmanager
def dead_replay_endpoint(kind: str) -> Iterator[str]:
    """A replay endpoint where nobody listens (`absent`), a ROUTER that never answers
    (`silent`), or one that answers every request with frames that are not a replay
    (`garbage`)."""
    if kind == "absent":
        yield f"tcp://127.0.0.1:{free_port()}"
        return
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    stop = threading.Event()

    def answer_garbage() -> None:
        while not stop.is_set():
            if router.poll(50):
                identity, *_ = router.recv_multipart()
                router.send_multipart([identity, b"", b"\x00" * 8, b"not", b"a replay"])

    thread = threading.Thread(target=answer_garbage, daemon=True)
    try:
        router.bind(ANY_PORT)
        if kind == "garbage":
            thread.start()
        yield router.getsockopt_string(zmq.LAST_ENDPOINT)
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(timeout=5)
        router.close(linger=0)
        ctx.term()


async def publish_then_crash_nats(relay: Relay, vllm: SyntheticVllm, server: NatsServer,
                                  instance: int, batches: int) -> None:
    """Get `batches` stored through a ready relay, then SIGKILL nats-server."""
    await eventually(lambda: is_ready(relay), "relay ready")
    await join(vllm, relay)
    publish(vllm, batches)
    async with nats_client(server.url) as client:
        await read_stream(client, subject_of(instance), batches, settle=0)
    await asyncio.sleep(0.2)  # let nats-server's file store flush before the crash
    server.kill()


class SteadyLoad:
    """Publishes the synthetic vLLM's next batch every `period` seconds until stopped."""

    def __init__(self, vllm: SyntheticVllm, period: float = 0.004) -> None:
        self.vllm = vllm
        self.period = period
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.vllm.publish_next()
            next_at += self.period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    def start(self) -> SteadyLoad:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def stop(self) -> int:
        """Stop publishing; returns how many batches this engine has sent."""
        self._stop.set()
        if self._task is not None:
            await self._task
        return self.vllm.seq

    async def __aenter__(self) -> SteadyLoad:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


