"""One trial: a fresh nats-server, one target's relays, the feeder and the consumer, torn down
after, whatever happens (Ctrl-C included).

Order: server, feeder (binds the vLLM sockets first, as vLLM does), relays (wait until ready;
bench/site.py), consumer (subscribes), warm-up (seq 0 of every publisher, or its pre-fill with
--live-blocks, must arrive, so the path is live end to end), then the timed phase, then wait
until everything sent has arrived or nothing more comes.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from bench.consumer import ConsumePlan, ConsumerResult, consumer_main
from bench.feeder import PREFILL_RATE, FeedResult
from bench.procstat import CpuSampler, peak_rss_bytes
from bench.site import READY_TIMEOUT, SPAWN, TrialError, expect, start_site, stop_process, tail
from bench.targets import Target
from bench.workload import Pool

__all__ = ["TrialError", "TrialResult", "run_trial"]

MAX_RATE_GUESS = 300_000  # batches/s the timestamp array is sized for when sending flat out
WARM_TIMEOUT = 30.0  # for the warm-up batches to arrive, plus a second per PREFILL_FLOOR of them
PREFILL_FLOOR = 200.0  # batches/s of pre-fill the slowest relay is given to pass on
SETTLE_IDLE = 3.0  # seconds without a new message before the consumer stops waiting
SETTLE_MAX = 60.0


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
    # The timed window, wall clock: from the first timed batch sent to the last event received.
    window_start: float
    window_end: float
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


def run_trial(target: Target, pools: list[Pool], *, rate: float | None, duration: float,
              workers: int, dp_ranks: int, tick: float = 0.001,
              pub_heartbeat_ms: int = 0, together: threading.Barrier | None = None
              ) -> TrialResult:
    """Run `target` for `duration` seconds at `rate` batches/s in total (None: flat out).

    `together`: trials of other targets run at the same time, each in a thread of its own;
    every one of them sets up and warms up, then all start their timed phase at once, and none
    tears down before all have their results (so no start-up or teardown lands in another's
    timed phase). A trial that fails breaks the barrier and the others fail with it."""
    try:
        return _run_trial(target, pools, rate=rate, duration=duration, workers=workers,
                          dp_ranks=dp_ranks, tick=tick, pub_heartbeat_ms=pub_heartbeat_ms,
                          together=together)
    except BaseException:
        if together is not None:
            together.abort()
        raise


def _meet(together: threading.Barrier | None, timeout: float) -> None:
    if together is None:
        return
    try:
        together.wait(timeout)
    except threading.BrokenBarrierError:
        raise TrialError("a trial running at the same time failed") from None


def _run_trial(target: Target, pools: list[Pool], *, rate: float | None, duration: float,
               workers: int, dp_ranks: int, tick: float, pub_heartbeat_ms: int,
               together: threading.Barrier | None) -> TrialResult:
    publishers = workers * dp_ranks
    if len(pools) != publishers:
        raise ValueError(f"{len(pools)} pools for {publishers} publishers")
    warm = max(p.warm_batches for p in pools)
    capacity = warm + math.ceil((rate or MAX_RATE_GUESS) * duration * 1.1 / publishers) + 64
    warm_total = sum(p.warm_batches for p in pools)
    warm_timeout = WARM_TIMEOUT + warm_total / PREFILL_FLOOR
    with contextlib.ExitStack() as stack:
        running = start_site(stack, target, pools, capacity=capacity, workers=workers,
                             dp_ranks=dp_ranks, tick=tick, pub_heartbeat_ms=pub_heartbeat_ms)
        server, relays, build = running.server, running.relays, running.build
        feeder, feeder_conn, shm = running.feeder, running.feeder_conn, running.shm
        site_workers = running.site.workers

        keys = {(w.worker_id, r): w.index * dp_ranks + r
                for w in site_workers for r in range(dp_ranks)}
        consumer_conn, child = SPAWN.Pipe()
        plan = ConsumePlan(target.output, server.url, target.subject, target.stream, keys,
                           [p.fingerprints for p in pools], [p.prefix for p in pools], shm.name,
                           capacity)
        consumer = SPAWN.Process(target=consumer_main, name="bench-consumer", daemon=True,
                                 args=(child, plan))
        consumer.start()
        stack.callback(stop_process, consumer, consumer_conn)
        consumer_conn.send(("subscribe",))
        expect(consumer_conn, "subscribed", 30, "consumer")

        feeder_conn.send(("warm_up", READY_TIMEOUT))
        expect(feeder_conn, "warmed", READY_TIMEOUT + 5 + warm_total / PREFILL_RATE, "feeder")
        consumer_conn.send(("await_warm", warm_timeout))
        try:
            expect(consumer_conn, "warmed", warm_timeout + 5, "consumer")
        except TrialError as exc:
            logs = "\n".join(f"--- {launch.name} log:\n{tail(launch.log)}"
                             for launch in relays.launches)
            raise TrialError(f"{exc}\n{logs}") from None

        _meet(together, READY_TIMEOUT + warm_timeout + 60)  # all set up and warm
        # In CpuSplit's order; None: the whole machine.
        with CpuSampler([[p.pid for p in relays.procs], [server.pid or 0],
                         [consumer.pid or 0], [feeder.pid or 0], None]) as cpu:
            feeder_conn.send(("run", rate, duration))
            feed: FeedResult = expect(feeder_conn, "done", duration + 60, "feeder")[1]
            consumer_conn.send(("expect", feed.sent_batches, SETTLE_IDLE, SETTLE_MAX))
            got: ConsumerResult = expect(consumer_conn, "result", SETTLE_MAX + 10,
                                          "consumer")[1]
        exited = [f"{launch.name} exited with {proc.returncode} during the run"
                  for launch, proc in zip(relays.launches, relays.procs, strict=True)
                  if proc.poll() is not None]
        rss = max((peak_rss_bytes(p.pid) for p in relays.procs if p.poll() is None), default=0)
        _meet(together, SETTLE_MAX + 60)  # all timed: now each may tear down
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
        window_start=feed.started, window_end=got.last_receipt, ok=ok, notes=notes)
