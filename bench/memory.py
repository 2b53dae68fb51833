"""Memory of a relay process given the largest vLLM batches it takes, and a full buffer.

    python -m bench.memory [--size 4MiB] [--shapes stored,tiny,removed,extra_keys]
                           [--outage stop] [--outage pause] [--relay-arg=--flag=value ...]

Each shape runs in a fresh relay process (`python -m kvrelay run`, as it ships: snapshots on,
`--max-batch-bytes` at its default unless a `--relay-arg` sets it) reading a synthetic vLLM PUB
and publishing into a local nats-server whose max_payload is 64 MiB, so a batch up to that is
decoded, encoded and published, not refused at the end: the worst case. One message of the
shape, as large as fits in `--size` bytes (the batch and its 8-byte seq; the topic is empty),
goes out, then a typical one; once the relay has published or dropped both, its VmRSS
(`after`) and VmHWM (`peak`, since the process started) are read from /proc/<pid>/status,
with the proportional set size of its snapshot process added (`proc_status`).

Shapes, each one vLLM batch:
  stored      one BlockStored: many blocks of 16 token ids each
  tiny        hundreds of thousands of BlockRemoved events of one hash each
  removed     one BlockRemoved with a huge hash list
  extra_keys  one BlockStored whose blocks each carry 8 extra keys (a short string and an int)

`--outage stop` (NATS stopped) or `--outage pause` (SIGSTOP: hung, its connection open): then
typical vLLM steps (512 blocks of 16 tokens, about 33 KB; `--outage-shape` for batches of a
shape at `--size` instead) until the relay drops some as overflow (its buffer full at
`--buffer-bytes`): RSS then (`:full`), and once NATS is back and the relay has published
everything it held (`:back`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
from prometheus_client.parser import text_string_to_metric_families

from bench.procstat import live_children
from kvrelay.testing.natsserver import NatsServer
from kvrelay.testing.synthetic import (
    SyntheticVllm,
    WorkloadFactory,
    block_removed,
    block_stored,
    encode_batch,
)

MiB = 1 << 20
MAX_PAYLOAD = 64 * MiB  # nats-server's own ceiling


def _hashes(rng: random.Random, n: int) -> list[int]:
    return [rng.getrandbits(64) for _ in range(n)]


def _stored(n: int, rng: random.Random) -> list[Any]:
    return [block_stored(_hashes(rng, n), None, [rng.randrange(32_000) for _ in range(16 * n)],
                         form="array")]


def _tiny(n: int, rng: random.Random) -> list[Any]:
    return [block_removed(_hashes(rng, 1), form="array") for _ in range(n)]


def _removed(n: int, rng: random.Random) -> list[Any]:
    return [block_removed(_hashes(rng, n), form="array")]


def _extra_keys(n: int, rng: random.Random) -> list[Any]:
    keys = [[[f"mm{rng.getrandbits(24):06x}", k * 16] for k in range(8)] for _ in range(n)]
    return [block_stored(_hashes(rng, n), None, [rng.randrange(32_000) for _ in range(16 * n)],
                         extra_keys=keys, form="array")]


SHAPES: dict[str, Callable[[int, random.Random], list[Any]]] = {
    "stored": _stored, "tiny": _tiny, "removed": _removed, "extra_keys": _extra_keys}


def shape_payload(shape: str, size: int, seed: int = 0) -> bytes:
    """One vLLM batch of `shape` (see SHAPES), as large as fits in `size` bytes."""
    build = SHAPES[shape]

    def payload(n: int) -> bytes:
        return encode_batch(build(n, random.Random(seed)), 1.0)

    n = 1000
    per_unit = (len(payload(2 * n)) - len(payload(n))) / n
    n = max(1, int((size - len(payload(1))) / per_unit))
    while (data := payload(n)) and len(data) > size and n > 1:
        n = max(1, int(n * 0.999) - 1)
    return data


def typical_payload(seed: int) -> bytes:
    """A vLLM step at 8192 batched tokens of block size 16: 512 blocks stored."""
    factory = WorkloadFactory(seed=seed, blocks=512, remove_probability=0.0)
    return encode_batch(factory.next_events(), time.time())


# -- the relay process -----------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of `pid` in bytes, each with the memory of its running child processes
    (the relay's snapshot process) added: their proportional set size (Pss: private pages, and
    a share of those mapped by other processes too, such as shared libraries), so that what
    the pod holds is counted once. A child's peak is taken as its present size: the snapshot
    process grows with the worker's blocks, not with the relay's input."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith((b"VmRSS:", b"VmHWM:")):
                name, value = line.split()[:2]
                out[name[:-1].decode()] = int(value) * 1024
    children = sum(_pss(child) for child in live_children(pid))
    return {name: size + children for name, size in out.items()}


def _pss(pid: int) -> int:
    """The proportional set size of `pid` and its own children, in bytes (0 once ended)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            own = next((int(line.split()[1]) * 1024 for line in f
                        if line.startswith(b"Pss:")), 0)
    except OSError:
        return 0
    return own + sum(_pss(child) for child in live_children(pid))


class Relay:
    """`python -m kvrelay run` for the benchmark, its log in a file and its /metrics read."""

    def __init__(self, nats_url: str, zmq: str, log: Path, args: Sequence[str]) -> None:
        self.log = log
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("KVRELAY_", "DYN_", "NATS_SERVER", "POD_"))}
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kvrelay", "run", "--nats", nats_url, "--zmq", zmq,
                 "--instance-id", "1", "--namespace", "bench", "--component", "memory",
                 "--system-host", "127.0.0.1", "--system-port", "0", *args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
        self._port: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _system_port(self) -> int | None:
        if self._port is None:
            found = re.search(r"system server on http://[^:/]+:(\d+)", self.log.read_text())
            self._port = int(found.group(1)) if found else None
        return self._port

    def metric(self, name: str, **labels: str) -> float:
        """A sample of the relay's /metrics, 0 when absent or not served yet."""
        port = self._system_port()
        if port is None:
            return 0.0
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                body = r.read().decode()
        except OSError:
            return 0.0
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return 0.0

    def dropped(self) -> float:
        return sum(self.metric("kvrelay_batches_dropped_total", reason=reason)
                   for reason in ("overflow", "malformed", "too_large", "rejected"))

    def wait(self, cond: Callable[[], bool], what: str, within: float = 120.0) -> None:
        deadline = time.monotonic() + within
        while not cond():
            self.alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}:\n{self.tail()}")
            time.sleep(0.05)

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"relay exited {self.proc.returncode}:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@contextlib.contextmanager
def setup(work: Path, relay_args: Sequence[str]) -> Iterator[tuple[NatsServer, SyntheticVllm,
                                                                   Relay]]:
    """A nats-server (max_payload 64 MiB), a synthetic vLLM and a relay between them, joined."""
    conf = work / "nats.conf"
    conf.write_text(f"max_payload: {MAX_PAYLOAD}\n")
    with (NatsServer(work / "nats", extra_args=["-c", str(conf)]) as server,
          SyntheticVllm("tcp://127.0.0.1:*", topic=b"") as vllm):
        relay = Relay(server.url, vllm.address, work / "relay.log", relay_args)
        try:
            relay.wait(lambda: relay.metric("kvrelay_ready") == 1, "the relay to be ready")
            first = typical_payload(0)
            while relay.metric("kvrelay_batches_published_total") == 0:  # ZMQ's slow joiner
                vllm.publish_payload(first)
                relay.alive()
                time.sleep(0.1)
            relay.wait(lambda: relay.metric("kvrelay_batches_published_total")
                       + relay.dropped() + relay.metric("kvrelay_missed_batches_total")
                       >= vllm.seq, "the first batches to settle", within=10.0)
            yield server, vllm, relay
        finally:
            relay.stop()


class Measured(NamedTuple):
    case: str
    input_bytes: int
    events: int
    idle: int
    after: int
    peak: int
    outcome: str


def measure_shape(shape: str, size: int, relay_args: Sequence[str]) -> Measured:
    """A fresh relay given one message of `shape` in `size` bytes, then a typical one."""
    payload = shape_payload(shape, size - 8)  # the seq frame; the topic is empty
    events = len(msgspec.msgpack.decode(payload)[1])
    with tempfile.TemporaryDirectory(prefix="kvrelay-memory-") as tmp, \
            setup(Path(tmp), relay_args) as (_, vllm, relay):
        idle = proc_status(relay.pid)["VmRSS"]
        published = relay.metric("kvrelay_batches_published_total")
        dropped = relay.dropped()
        vllm.publish_payload(payload)
        vllm.publish_payload(typical_payload(1))
        relay.wait(lambda: relay.metric("kvrelay_batches_published_total") - published
                   + relay.dropped() - dropped >= 2, "both batches to be published or dropped")
        time.sleep(1.0)  # acks, a snapshot the batch may have triggered
        status = proc_status(relay.pid)
        outcome = (f"published {relay.metric('kvrelay_batches_published_total') - published:.0f}"
                   f", dropped {relay.dropped() - dropped:.0f}")
    return Measured(shape, len(payload) + 8, events, idle, status["VmRSS"], status["VmHWM"],
                    outcome)


def measure_outage(how: str, relay_args: Sequence[str],
                   payloads: Sequence[bytes]) -> list[Measured]:
    """NATS paused (`pause`: a hung server, the connection open) or stopped (`stop`), then
    typical batches until the buffer overflows: RSS with the buffer full, then once NATS is
    back and the relay has published what it held."""
    with tempfile.TemporaryDirectory(prefix="kvrelay-memory-") as tmp, \
            setup(Path(tmp), relay_args) as (server, vllm, relay):
        idle = proc_status(relay.pid)["VmRSS"]
        published = relay.metric("kvrelay_batches_published_total")
        if how == "pause":
            server.pause()
        else:
            server.stop()
            relay.wait(lambda: relay.metric("kvrelay_ready") == 0, "the relay to see NATS gone")
        try:
            sent = 0
            while relay.metric("kvrelay_batches_dropped_total", reason="overflow") == 0:
                for payload in payloads:
                    vllm.publish_payload(payload)
                    sent += len(payload)
                relay.wait(lambda: relay.metric("kvrelay_batches_received_total", dp_rank="0")
                           >= vllm.seq, "the relay to read")
            time.sleep(1.0)
            full = proc_status(relay.pid)
            state = (f"buffer {relay.metric('kvrelay_buffer_bytes') / MiB:.1f} MiB, "
                     f"{relay.metric('kvrelay_publish_in_flight'):.0f} in flight")
        finally:
            if how == "pause":
                server.resume()
            else:
                server.start()
        relay.wait(lambda: relay.metric("kvrelay_buffer_batches") == 0
                   and relay.metric("kvrelay_publish_in_flight") == 0, "the buffer to drain")
        time.sleep(1.0)
        drained = proc_status(relay.pid)
        count = relay.metric("kvrelay_batches_published_total") - published
    return [Measured(f"{how}:full", sent, 0, idle, full["VmRSS"], full["VmHWM"], state),
            Measured(f"{how}:back", sent, 0, idle, drained["VmRSS"], drained["VmHWM"],
                     f"published {count:.0f}")]


def _size(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(KiB|MiB|MB|KB|B)?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    unit = {"KiB": 1024, "KB": 1000, "MiB": MiB, "MB": 1_000_000, "B": 1, None: 1}
    return int(float(match.group(1)) * unit[match.group(2)])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--size", type=_size, default=4 * MiB,
                        help="bytes of each shape's message, its batch and seq (4MiB: "
                             "--max-batch-bytes's default)")
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--outage", choices=("pause", "stop"), action="append", default=[],
                        help="also: NATS paused (or stopped) until the buffer is full, then "
                             "back; repeatable")
    parser.add_argument("--outage-shape", choices=("typical", *SHAPES), default="typical",
                        help="what fills the buffer: typical vLLM steps, or a shape at --size")
    parser.add_argument("--relay-arg", action="append", default=[], dest="relay_args",
                        help="an argument for `kvrelay run`, repeatable "
                             "(--relay-arg=--max-batch-bytes=20000000)")
    args = parser.parse_args(argv)
    results: list[Measured] = []
    for shape in [s for s in args.shapes.split(",") if s]:
        results.append(measure_shape(shape, args.size, args.relay_args))
        _print(results[-1])
    if args.outage_shape == "typical":
        payloads = [typical_payload(seed) for seed in range(64)]
    else:
        payloads = [shape_payload(args.outage_shape, args.size - 8)]
    for how in args.outage:
        for measured in measure_outage(how, args.relay_args, payloads):
            results.append(measured)
            _print(measured)
    worst = max(results, key=lambda m: m.peak)
    print(f"worst peak: {worst.case} {worst.peak / MiB:.0f} MiB")


def _print(m: Measured) -> None:
    print(f"{m.case:<11} input {m.input_bytes / MiB:6.1f} MiB {m.events:>8} events  "
          f"RSS idle {m.idle / MiB:5.0f} MiB  after {m.after / MiB:5.0f} MiB  "
          f"peak {m.peak / MiB:5.0f} MiB  ({m.outcome})", flush=True)


if __name__ == "__main__":
    main()
