"""Idle CPU: what a relay costs a sidecar whose engine sends nothing.

The target's relays start against a fresh nats-server and connect to the vLLM publishers, which
stay bound and silent (heartbeating with --pub-heartbeat). Once every publisher has its
subscriber and a few seconds have settled start-up, the relay processes' CPU (all threads, as
in the trials: bench/procstat.py) is read at the start and the end of the window and given per
hour. A relay that exits during the window fails the measurement.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Any

from bench.procstat import cpu_seconds, peak_rss_bytes
from bench.site import READY_TIMEOUT, TrialError, expect, start_site, tail
from bench.targets import Target
from bench.workload import WorkloadSpec, build_pool

SETTLE = 3.0  # seconds after every publisher has its subscriber, before the window opens
_QUIET = WorkloadSpec(pool_batches=2)  # the feeder needs pools; nothing of them is sent


@dataclass
class IdleResult:
    target: str
    relay_build: str
    window_s: float  # measured, wall clock
    relay_cpu_s: float
    relay_cpu_s_per_hour: float
    relay_processes: int
    relay_peak_rss_mib: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def relays_cpu(pids: list[int]) -> float:
    """CPU seconds the processes have spent so far, all threads."""
    return sum(cpu_seconds(pid) for pid in pids)


def measure_idle(target: Target, window: float, *, workers: int = 1, dp_ranks: int = 2,
                 pub_heartbeat_ms: int = 0, settle: float = SETTLE) -> IdleResult:
    """The relay processes' CPU over `window` seconds of silence, and per hour."""
    if window <= 0:
        raise ValueError("the idle window must be positive")
    pools = [build_pool(_QUIET, p, p % dp_ranks) for p in range(workers * dp_ranks)]
    with contextlib.ExitStack() as stack:
        running = start_site(stack, target, pools, capacity=1, workers=workers,
                             dp_ranks=dp_ranks, pub_heartbeat_ms=pub_heartbeat_ms)
        running.feeder_conn.send(("await_subscribers", READY_TIMEOUT))
        expect(running.feeder_conn, "subscribed", READY_TIMEOUT + 5, "feeder")
        time.sleep(settle)
        pids = running.relay_pids
        started, before = time.monotonic(), relays_cpu(pids)
        time.sleep(window)
        relays = running.relays
        exited = [f"{launch.name} exited with {proc.returncode}:\n{tail(launch.log)}"
                  for launch, proc in zip(relays.launches, relays.procs, strict=True)
                  if proc.poll() is not None]
        if exited:
            raise TrialError("\n".join(exited))
        after, ended = relays_cpu(pids), time.monotonic()
        rss = max(peak_rss_bytes(pid) for pid in pids)
    spent = ended - started
    return IdleResult(target.name, running.build, spent, after - before,
                      (after - before) / spent * 3600, len(pids), rss / (1 << 20))
