"""One trial: a fresh nats-server, one target's relays, the feeder and the consumer, torn down
after, whatever happens (Ctrl-C included).

Order: server, feeder (binds the vLLM sockets first, as vLLM does), relays (wait until ready),
consumer (subscribes), warm-up (seq 0 of every publisher must arrive, so the path is live end to
end), then the timed phase, then wait until everything sent has arrived or nothing more comes.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import multiprocessing.context
import os
import socket
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any, NamedTuple

from bench.consumer import ConsumePlan, ConsumerResult, consumer_main
from bench.feeder import PREFILL_RATE, FeedPlan, FeedResult, feeder_main
from bench.procstat import CpuSampler, peak_rss_bytes
from bench.targets import Launch, Target, TrialSite, Worker
from bench.workload import Pool
from kvrelay.testing.natsserver import NatsServer, free_port

WORKER_ID_BASE = 10_000_000_000_000_000_000  # above 2**63, as real instance IDs can be
MAX_RATE_GUESS = 300_000  # batches/s the timestamp array is sized for when sending flat out
READY_TIMEOUT = 60.0
WARM_TIMEOUT = 30.0  # for the warm-up batches to arrive, plus a second per PREFILL_FLOOR of them
PREFILL_FLOOR = 200.0  # batches/s of pre-fill the slowest relay is given to pass on
SETTLE_IDLE = 3.0  # seconds without a new message before the consumer stops waiting
SETTLE_MAX = 60.0

_SPAWN = multiprocessing.get_context("spawn")


class TrialError(RuntimeError):
    """The trial could not run (a process failed to start, nothing arrived at warm-up, ...)."""


@dataclass
class TrialResult:
    target: str
    relay_build: str  # what the relay processes run: kvrelay python/compiled, Dynamo's version
    offered_batches_per_s: float | None  # None: as fast as possible
    duration_s: float
    workers: int
    dp_ranks: int
    sent_batches: int
    sent_events: int
    feeder_batches_per_s: float
    received_batches: int
    received_events: int
    lost_batches: int
    lost_events: int
    duplicates: int
    out_of_order: int
    corrupt: int
    resyncs: int
    batches_per_s: float
    events_per_s: float
    lag_p50_ms: float | None
    lag_p99_ms: float | None
    lag_p999_ms: float | None
    lag_max_ms: float | None
    relay_cpu_s: float
    relay_cpu_us_per_batch: float | None  # relay CPU over the window / batches received in it
    relay_cpu_s_per_m_events: float | None
    relay_cpu_percent: float
    relay_peak_rss_mib: float
    relay_processes: int
    nats_cpu_s_per_m_events: float | None
    # Where the machine's CPU went over the timed phase, in % of one core (machine: % of all
    # cores), so a search can say which part capped the rate.
    nats_cpu_percent: float
    consumer_cpu_percent: float
    feeder_cpu_percent: float
    machine_busy_percent: float
    ok: bool
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class CpuSplit(NamedTuple):
    """CPU seconds over a trial's timed phase: each part, and the machine's busy seconds."""
    relay: float
    nats: float
    consumer: float
    feeder: float
    machine: float


def _free_port_run(count: int) -> int:
    """A base port with `count` consecutive free ports above it (racy, like free_port)."""
    for _ in range(100):
        base = free_port()
        if base + count >= 65536:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + count):
                    s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise TrialError(f"no run of {count} free ports found")


def _expect(conn: Connection, reply: str, timeout: float, who: str) -> tuple[Any, ...]:
    if not conn.poll(timeout):
        raise TrialError(f"{who} did not answer within {timeout:.0f}s")
    message: tuple[Any, ...] = conn.recv()
    if message[0] == "error":
        raise TrialError(message[1])
    if message[0] != reply:
        raise TrialError(f"{who} said {message[0]!r}, expected {reply!r}")
    return message


class _Relays:
    """The target's relay processes; stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, launches: list[Launch]) -> None:
        self.launches = launches
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        for launch in self.launches:
            env = {**os.environ, **launch.env}
            with launch.log.open("ab") as log:
                self.procs.append(subprocess.Popen(
                    launch.argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT))

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for launch, proc in zip(self.launches, self.procs, strict=True):
            while not launch.ready():
                if proc.poll() is not None:
                    raise TrialError(f"{launch.name} exited with {proc.returncode}:\n"
                                     f"{_tail(launch.log)}")
                if time.monotonic() > deadline:
                    raise TrialError(f"{launch.name} not ready after {timeout:.0f}s:\n"
                                     f"{_tail(launch.log)}")
                time.sleep(0.05)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _tail(log: Path, size: int = 3000) -> str:
    return log.read_bytes()[-size:].decode(errors="replace") if log.exists() else "<no log>"


def _stop_process(proc: multiprocessing.process.BaseProcess, conn: Connection) -> None:
    with contextlib.suppress(BrokenPipeError, OSError):
        conn.send(("stop",))
    proc.join(3)
    if proc.is_alive():
        proc.kill()
        proc.join()


def run_trial(target: Target, pools: list[Pool], *, rate: float | None, duration: float,
              workers: int, dp_ranks: int, tick: float = 0.001,
              pub_heartbeat_ms: int = 0) -> TrialResult:
    """Run `target` for `duration` seconds at `rate` batches/s in total (None: flat out)."""
    publishers = workers * dp_ranks
    if len(pools) != publishers:
        raise ValueError(f"{len(pools)} pools for {publishers} publishers")
    warm = max(p.warm_batches for p in pools)
    capacity = warm + math.ceil((rate or MAX_RATE_GUESS) * duration * 1.1 / publishers) + 64
    warm_total = sum(p.warm_batches for p in pools)
    warm_timeout = WARM_TIMEOUT + warm_total / PREFILL_FLOOR
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvrelay-bench-")))
        server = NatsServer(tmp / "nats", name="bench")
        server.start()
        stack.callback(server.stop)
        shm = SharedMemory(create=True, size=publishers * capacity * 8)
        stack.callback(shm.unlink)
        stack.callback(shm.close)

        site_workers = []
        endpoints = []
        for w in range(workers):
            base = _free_port_run(dp_ranks)
            site_workers.append(Worker(w, WORKER_ID_BASE + w, f"tcp://127.0.0.1:{base}",
                                       free_port()))
            endpoints += [f"tcp://127.0.0.1:{base + r}" for r in range(dp_ranks)]
        site = TrialSite(server.url, tmp, site_workers, dp_ranks)

        feeder_conn, child = _SPAWN.Pipe()
        feeder = _SPAWN.Process(target=feeder_main, name="bench-feeder", daemon=True,
                                args=(child, FeedPlan(endpoints, pools, shm.name, capacity,
                                                      tick, pub_heartbeat_ms)))
        feeder.start()
        stack.callback(_stop_process, feeder, feeder_conn)
        _expect(feeder_conn, "bound", 30, "feeder")

        relays = _Relays(target.launches(site))
        stack.callback(relays.stop)
        relays.start()
        relays.wait_ready(READY_TIMEOUT)
        build = target.build([p.pid for p in relays.procs], relays.launches)

        keys = {(w.worker_id, r): w.index * dp_ranks + r
                for w in site_workers for r in range(dp_ranks)}
        consumer_conn, child = _SPAWN.Pipe()
        plan = ConsumePlan(target.output, server.url, target.subject, target.stream, keys,
                           [p.fingerprints for p in pools], [p.prefix for p in pools], shm.name,
                           capacity)
        consumer = _SPAWN.Process(target=consumer_main, name="bench-consumer", daemon=True,
                                  args=(child, plan))
        consumer.start()
        stack.callback(_stop_process, consumer, consumer_conn)
        consumer_conn.send(("subscribe",))
        _expect(consumer_conn, "subscribed", 30, "consumer")

        feeder_conn.send(("warm_up", READY_TIMEOUT))
        _expect(feeder_conn, "warmed", READY_TIMEOUT + 5 + warm_total / PREFILL_RATE, "feeder")
        consumer_conn.send(("await_warm", warm_timeout))
        try:
            _expect(consumer_conn, "warmed", warm_timeout + 5, "consumer")
        except TrialError as exc:
            logs = "\n".join(f"--- {launch.name} log:\n{_tail(launch.log)}"
                             for launch in relays.launches)
            raise TrialError(f"{exc}\n{logs}") from None

        # In CpuSplit's order; None: the whole machine.
        with CpuSampler([[p.pid for p in relays.procs], [server.pid or 0],
                         [consumer.pid or 0], [feeder.pid or 0], None]) as cpu:
            feeder_conn.send(("run", rate, duration))
            feed: FeedResult = _expect(feeder_conn, "done", duration + 60, "feeder")[1]
            consumer_conn.send(("expect", feed.sent_batches, SETTLE_IDLE, SETTLE_MAX))
            got: ConsumerResult = _expect(consumer_conn, "result", SETTLE_MAX + 10,
                                          "consumer")[1]
        exited = [f"{launch.name} exited with {proc.returncode} during the run"
                  for launch, proc in zip(relays.launches, relays.procs, strict=True)
                  if proc.poll() is not None]
        rss = max((peak_rss_bytes(p.pid) for p in relays.procs if p.poll() is None), default=0)
        result = _summarize(target, rate, duration, workers, dp_ranks, pools, feed, got,
                            CpuSplit(*cpu.between(feed.started, got.last_receipt)),
                            rss, len(relays.procs), build)
        result.notes += exited
    return result


def _summarize(target: Target, rate: float | None, duration: float, workers: int,
               dp_ranks: int, pools: list[Pool], feed: FeedResult, got: ConsumerResult,
               cpu: CpuSplit, rss: int, processes: int, build: str) -> TrialResult:
    warm_events = sum(p.warm_events for p in pools)
    warm_batches = sum(p.warm_batches for p in pools)
    sent_batches, sent_events = sum(feed.sent_batches), sum(feed.sent_events)
    received_batches, received_events = sum(got.matched_batches), sum(got.matched_events)
    timed_events = max(0, received_events - warm_events)
    timed_batches = max(0, received_batches - warm_batches)
    span = max(got.last_receipt - feed.started, 1e-9)

    def per_m(cpu: float) -> float | None:
        return cpu / (timed_events / 1e6) if timed_events else None

    lags: list[float | None] = [v * 1000 for v in got.lags] or [None, None, None, None]
    lost_events = sent_events - received_events
    notes = list(got.notes)
    if feed.capacity_reached:
        notes.append("the feeder stopped early: its timestamp array was full")
    ok = (lost_events == 0 and got.duplicates == 0 and got.out_of_order == 0
          and got.corrupt == 0 and got.resyncs == 0)
    return TrialResult(
        target=target.name, relay_build=build, offered_batches_per_s=rate,
        duration_s=duration, workers=workers,
        dp_ranks=dp_ranks, sent_batches=sent_batches, sent_events=sent_events,
        feeder_batches_per_s=(sent_batches - warm_batches) / max(feed.finished - feed.started,
                                                                 1e-9),
        received_batches=received_batches, received_events=received_events,
        lost_batches=sent_batches - received_batches, lost_events=lost_events,
        duplicates=got.duplicates, out_of_order=got.out_of_order, corrupt=got.corrupt,
        resyncs=got.resyncs, batches_per_s=timed_batches / span,
        events_per_s=timed_events / span, lag_p50_ms=lags[0], lag_p99_ms=lags[1],
        lag_p999_ms=lags[2], lag_max_ms=lags[3], relay_cpu_s=cpu.relay,
        relay_cpu_us_per_batch=cpu.relay / timed_batches * 1e6 if timed_batches else None,
        relay_cpu_s_per_m_events=per_m(cpu.relay), relay_cpu_percent=100 * cpu.relay / span,
        relay_peak_rss_mib=rss / (1 << 20), relay_processes=processes,
        nats_cpu_s_per_m_events=per_m(cpu.nats), nats_cpu_percent=100 * cpu.nats / span,
        consumer_cpu_percent=100 * cpu.consumer / span,
        feeder_cpu_percent=100 * cpu.feeder / span,
        machine_busy_percent=100 * cpu.machine / span / (os.cpu_count() or 1),
        ok=ok, notes=notes)
