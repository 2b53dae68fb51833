"""A whole benchmark: fixed offered rates, the search for the maximum sustained rate, the raw
limits, each repeated and interleaved across targets so a slow moment of a shared machine does
not land on one target only.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from bench.idle import IdleResult, measure_idle
from bench.limits import measure_limits, sample_payloads
from bench.pathlag import measure_path_lag
from bench.site import STOP
from bench.targets import TARGETS, Target
from bench.trial import TrialError, TrialResult, run_trial
from bench.workload import Pool, WorkloadSpec, build_pools


@dataclass(frozen=True)
class SearchSpec:
    """Step the offered rate up by `factor` until a step fails, then refine between the last
    pass and the first failure. A step fails on any loss, when the relay delivers less than
    95% of the offered rate, or when its p99 lag exceeds `lag_limit_ms` (a growing backlog)."""

    start: float = 2000.0
    factor: float = 1.5
    ceiling: float = 200_000.0
    step_duration: float = 5.0
    lag_limit_ms: float = 500.0
    refine: int = 1


@dataclass(frozen=True)
class BenchSpec:
    targets: list[str]
    rates: list[float | None]  # None: as fast as possible
    duration: float = 10.0
    min_batches: int = 3000  # a fixed rate runs until it has sent this many batches at least
    workers: int = 1
    dp_ranks: int = 2
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    search: SearchSpec | None = None
    repeat: int = 1
    limits_duration: float | None = 2.0  # None: skip the raw limits
    tick: float = 0.001
    pub_heartbeat_ms: int = 0  # the synthetic vLLM PUBs' ZMQ_HEARTBEAT_IVL; 0: none
    idle_window: float = 60.0  # seconds of each target's idle CPU measurement; 0: none
    idle_only: bool = False  # measure idle CPU only: no rates, search or limits
    # Fixed rates up to this run every target at the same time (`run_together`); 0: never.
    together_below: float = 1000.0


@dataclass
class SearchResult:
    target: str
    max_batches_per_s: float | None  # None: not even the first step passed
    max_events_per_s: float | None
    stopped_by: str  # what failed at the step above the maximum
    steps: list[TrialResult]
    aborted: bool = False  # a step could not run: the maximum is not known

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["steps"] = [s.as_dict() for s in self.steps]
        return out


@dataclass
class BenchRun:
    spec: BenchSpec
    unavailable: dict[str, str] = field(default_factory=dict)
    trials: list[TrialResult] = field(default_factory=list)
    searches: list[SearchResult] = field(default_factory=list)
    limits: list[dict[str, float]] = field(default_factory=list)
    path_lag: list[dict[str, dict[str, float]]] = field(default_factory=list)  # rate -> lags
    idle: list[IdleResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def verdict(result: TrialResult, rate: float, lag_limit_ms: float) -> str | None:
    """Why a search step failed, or None when it passed."""
    if result.feeder_batches_per_s < 0.95 * rate:
        return f"feeder could not offer {rate:.0f}/s (sent {result.feeder_batches_per_s:.0f}/s)"
    if not result.ok:
        return (f"loss ({result.lost_events} events lost, {result.resyncs} resyncs, "
                f"{result.duplicates} duplicates, {result.out_of_order} out of order)")
    if result.batches_per_s < 0.95 * rate:
        return f"fell behind ({result.batches_per_s:.0f} of {rate:.0f} batches/s)"
    if result.lag_p99_ms is None or result.lag_p99_ms > lag_limit_ms:
        return f"lag p99 {result.lag_p99_ms or 0:.0f} ms > {lag_limit_ms:.0f} ms"
    return None


def trial_seconds(rate: float | None, duration: float, min_batches: int) -> float:
    """How long a fixed rate runs: `duration`, or long enough for `min_batches` batches. At a
    low rate CPU per batch is mostly the cost of waking up, and a few hundred batches say
    little about it (nor about p99.9 lag)."""
    return duration if rate is None else max(duration, min_batches / rate)


PATH_LAG_DURATION = 4.0  # seconds per NATS path and offered rate
SATURATED = 90.0  # % of a core at which a one-threaded part counts as the cap
MACHINE_SATURATED = 85.0  # % of all cores: past this, processes wait for a core to run on


def capped_by(result: TrialResult) -> str:
    """Which part the machine's CPU went to at a step, and what, if anything, was saturated.

    The feeder, the consumer and kvrelay each run on one thread, so one of them near a full
    core is a cap by itself (nats-server spreads over every core); with every core busy the
    machine is, whoever holds the most."""
    parts = {"relay": result.relay_cpu_percent, "nats-server": result.nats_cpu_percent,
             "consumer": result.consumer_cpu_percent, "feeder": result.feeder_cpu_percent}
    split = ", ".join(f"{name} {share:.0f}%" for name, share in
                      sorted(parts.items(), key=lambda item: -item[1]))
    if result.machine_busy_percent >= MACHINE_SATURATED:
        cap = f"the machine ({result.machine_busy_percent:.0f}% of all cores busy)"
    else:
        full = [name for name, share in parts.items()
                if share >= SATURATED and name != "nats-server"]
        cap = (f"the {' and the '.join(full)} (a full core)" if full
               else f"no part saturated ({result.machine_busy_percent:.0f}% busy)")
    return f"capped by {cap}; % of one core: {split}"


Progress = Callable[[str], None]


def search(target: Target, pools: list[Pool], spec: BenchSpec, progress: Progress,
           errors: list[str]) -> SearchResult:
    """The highest offered rate the target sustains with zero loss and bounded lag."""
    assert spec.search is not None
    s = spec.search
    steps: list[TrialResult] = []
    best: TrialResult | None = None
    best_rate = 0.0
    failed_rate: float | None = None
    stopped_by = f"reached the ceiling of {s.ceiling:.0f}/s"

    def step(rate: float) -> str | None:
        try:
            result = run_trial(target, pools, rate=rate, duration=s.step_duration,
                               workers=spec.workers, dp_ranks=spec.dp_ranks, tick=spec.tick,
                               pub_heartbeat_ms=spec.pub_heartbeat_ms)
        except TrialError as exc:
            errors.append(f"search {target.name} @ {rate:.0f}/s: {exc}")
            progress(f"  search {target.name} @ {rate:.0f}/s: failed to run: {exc}")
            return f"trial failed: {str(exc).splitlines()[0]}"
        steps.append(result)
        why = verdict(result, rate, s.lag_limit_ms)
        if why is not None:
            why = f"{why}, {capped_by(result)}"
        progress(f"  search {target.name} @ {rate:.0f}/s: {describe(result)}"
                 f"{'' if why is None else ' -> ' + why}")
        return why

    rate = s.start
    while rate <= s.ceiling:
        why = step(rate)
        if why is not None:
            failed_rate, stopped_by = rate, why
            break
        best, best_rate = steps[-1], rate
        rate *= s.factor
    if (failed_rate is not None and best is not None
            and not stopped_by.startswith(("feeder", "trial failed"))):
        low, high = best_rate, failed_rate
        for _ in range(s.refine):
            mid = math.sqrt(low * high)
            if step(mid) is None:
                best, low = steps[-1], mid
            else:
                high = mid
    aborted = stopped_by.startswith("trial failed")
    if aborted:
        best = None
    return SearchResult(target.name, best.batches_per_s if best else None,
                        best.events_per_s if best else None, stopped_by, steps, aborted)


def describe(r: TrialResult) -> str:
    lag = "no lag samples"
    if r.lag_p50_ms is not None and r.lag_p99_ms is not None:
        lag = f"lag p50 {r.lag_p50_ms:.1f} ms, p99 {r.lag_p99_ms:.1f} ms"
    return (f"{r.batches_per_s:.0f} batches/s, {r.events_per_s:.0f} events/s, {lag}, "
            f"CPU {r.relay_cpu_percent:.0f}%, lost {r.lost_events}")


def stderr_progress(line: str, out: TextIO = sys.stderr) -> None:
    print(line, file=out, flush=True)


def idle_round(targets: list[Target], spec: BenchSpec, run: BenchRun,
               progress: Progress) -> None:
    """Each target's idle CPU, once."""
    for target in targets:
        try:
            result = measure_idle(target, spec.idle_window, workers=spec.workers,
                                  dp_ranks=spec.dp_ranks, pub_heartbeat_ms=spec.pub_heartbeat_ms)
        except TrialError as exc:
            run.errors.append(f"{target.name} idle: {exc}")
            progress(f"  {target.name} idle: failed to run: {exc}")
            continue
        run.idle.append(result)
        progress(f"  {target.name} idle {result.window_s:.0f} s: {result.relay_cpu_s:.3f} CPU s, "
                 f"{result.relay_cpu_s_per_hour:.1f} CPU s/hour")


def _outcome(target: Target, pools: list[Pool], rate: float | None, spec: BenchSpec,
             together: threading.Barrier | None) -> TrialResult | TrialError:
    try:
        return run_trial(target, pools, rate=rate,
                         duration=trial_seconds(rate, spec.duration, spec.min_batches),
                         workers=spec.workers, dp_ranks=spec.dp_ranks, tick=spec.tick,
                         pub_heartbeat_ms=spec.pub_heartbeat_ms, together=together)
    except TrialError as exc:
        return exc


def run_together(targets: list[Target], pools: list[Pool], rate: float, spec: BenchSpec
                 ) -> list[TrialResult | TrialError]:
    """One trial of each target at `rate`, all at the same time (each with its own server,
    feeder and consumer, set up before and torn down after all of their timed phases): at a
    low rate what else a shared machine runs moves every relay's CPU per batch by a fifth or
    more from one trial to the next, and relays measured together share those moments. An
    interrupt stops every trial (each tears down what it started) before it goes on."""
    together = threading.Barrier(len(targets))
    with ThreadPoolExecutor(len(targets), thread_name_prefix="trial") as pool:
        futures = [pool.submit(_outcome, target, pools, rate, spec, together)
                   for target in targets]
        try:
            return [future.result() for future in futures]
        except BaseException:
            STOP.set()
            together.abort()
            for future in futures:
                future.exception()  # wait for each to stop
            STOP.clear()
            raise


def run_bench(spec: BenchSpec, progress: Progress = stderr_progress) -> BenchRun:
    """Run every configuration `spec.repeat` times, interleaved across targets."""
    run = BenchRun(spec)
    targets: list[Target] = []
    for name in spec.targets:
        reason = TARGETS[name].unavailable()
        if reason is None:
            targets.append(TARGETS[name])
        else:
            run.unavailable[name] = reason
            progress(f"{name}: {reason}")
    if spec.idle_only:
        for rep in range(spec.repeat):
            progress(f"round {rep + 1} of {spec.repeat}")
            idle_round(targets, spec, run, progress)
        return run
    if spec.workload.live_blocks:
        progress(f"pre-encoding {spec.workload.live_blocks:,} live blocks per worker")
    pools = build_pools(spec.workload, spec.workers, spec.dp_ranks)
    vllm, relayed = sample_payloads(pools[0]) if spec.limits_duration is not None else ([], [])
    for rep in range(spec.repeat):
        progress(f"round {rep + 1} of {spec.repeat}")
        if spec.idle_window > 0:
            idle_round(targets, spec, run, progress)
        if spec.limits_duration is not None:
            run.limits.append(measure_limits(vllm, relayed, spec.limits_duration))
            progress("  raw limits (msg/s): " + ", ".join(
                f"{k} {v:,.0f}" for k, v in run.limits[-1].items()))
            lags = {f"{rate:.0f}": measure_path_lag(relayed, rate, PATH_LAG_DURATION, spec.tick)
                    for rate in spec.rates if rate is not None}
            if lags:
                run.path_lag.append(lags)
                progress("  lag of the NATS path alone, p99 ms: " + "; ".join(
                    f"@{rate}/s core {v['core_p99_ms']:.1f}, JetStream {v['jetstream_p99_ms']:.1f}"
                    for rate, v in lags.items()))
        for rate in spec.rates:
            if rate is not None and rate <= spec.together_below and len(targets) > 1:
                outcomes = run_together(targets, pools, rate, spec)
            else:
                outcomes = [_outcome(target, pools, rate, spec, None) for target in targets]
            for target, outcome in zip(targets, outcomes, strict=True):
                offered = "max" if rate is None else f"{rate:.0f}/s"
                if isinstance(outcome, TrialError):
                    run.errors.append(f"{target.name} @ {offered}: {outcome}")
                    progress(f"  {target.name} @ {offered}: failed to run: {outcome}")
                    continue
                run.trials.append(outcome)
                progress(f"  {target.name} @ {offered}: {describe(outcome)}")
        if spec.search is not None:
            for target in targets:
                run.searches.append(search(target, pools, spec, progress, run.errors))
    return run
