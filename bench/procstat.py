"""CPU time and peak memory of running processes, from /proc (Linux).

CPU is utime + stime of /proc/<pid>/stat, which covers every thread of the process (the ZMQ I/O
thread, Dynamo's runtime threads); a sampler thread records it over time so a trial can take
the CPU spent between two instants without stopping anything.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import threading
import time
from types import TracebackType

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` so far, all threads included."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # The command name may hold spaces; the fields after it are fixed.
    fields = stat[stat.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def peak_rss_bytes(pid: int) -> int:
    """VmHWM of `pid`: the most resident memory it has had."""
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmHWM:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no VmHWM for pid {pid}")


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine has spent busy (not idle, not waiting on I/O)."""
    with open("/proc/stat", "rb") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle, iowait = fields[3], fields[4]
    return (sum(fields[:8]) - idle - iowait) / _TICK


class CpuSampler:
    """Samples the total CPU seconds of a set of pids every `period` seconds, in a thread;
    with no pids, the busy seconds of the whole machine."""

    def __init__(self, pids: list[int], period: float = 0.1) -> None:
        self.pids = pids
        self.period = period
        self._times: list[float] = []
        self._cpu: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def _total(self) -> float:
        if not self.pids:
            return machine_busy_seconds()
        total = 0.0
        for pid in self.pids:
            # A process that has ended left what it spent in the earlier samples.
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += cpu_seconds(pid)
        return total

    def sample(self) -> None:
        self._times.append(time.time())
        self._cpu.append(self._total())

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

    def cpu_at(self, when: float) -> float:
        """CPU seconds at wall-clock `when`, interpolated between samples."""
        times, cpu = self._times, self._cpu
        if not times:
            return 0.0
        i = bisect.bisect_left(times, when)
        if i == 0:
            return cpu[0]
        if i >= len(times):
            return cpu[-1]
        t0, t1 = times[i - 1], times[i]
        return cpu[i - 1] + (cpu[i] - cpu[i - 1]) * (when - t0) / (t1 - t0 or 1.0)

    def between(self, start: float, end: float) -> float:
        return max(0.0, self.cpu_at(end) - self.cpu_at(start))

    def __enter__(self) -> CpuSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
