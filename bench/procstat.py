"""CPU time and peak memory of running processes, read from outside them (Linux).

CPU is what /proc/<pid>/stat reports as utime + stime: every thread of the process (the ZMQ
I/O thread, Dynamo's runtime threads), ended ones included. /proc gives it in clock ticks
(10 ms), too coarse for a relay spending a few ms a second at 100 batches/s, so it is read at
full resolution (ns) from the kernel's CPU clock of the process, the same account
(clock_getcpuclockid(3)); /proc/<pid>/stat where that clock cannot be read. To it comes the CPU
of its child processes, running (read the same way, theirs included) or reaped (cutime + cstime,
in ticks), so work a relay hands to another process (its snapshot process) counts as the
relay's. Memory likewise: a relay's peak RSS is its own plus its running children's. A sampler
thread records it over time so a trial can take the CPU spent between two instants without stopping
anything.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import threading
import time
from collections.abc import Sequence
from types import TracebackType

_TICK = os.sysconf("SC_CLK_TCK")


CPU_SOURCE = ("utime + stime of each relay process, all threads, read from outside at ns "
              "resolution (the kernel's CPU clock of the process, the account /proc/<pid>/stat "
              "gives in 10 ms ticks), plus its child processes', running or reaped")


def process_cpu_clock(pid: int) -> int:
    """The clock ID of `pid`'s CPU time, all threads: clock_getcpuclockid(3) on Linux
    (CPUCLOCK_SCHED of the process, encoded as the kernel expects)."""
    return (~pid << 3) | 2


def _stat(pid: int) -> list[bytes]:
    """The fields of /proc/<pid>/stat after the command name (state first)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # The command name may hold spaces; the fields after it are fixed.
    return stat[stat.rindex(b")") + 2:].split()


def proc_stat_cpu_seconds(pid: int) -> float:
    """utime + stime of /proc/<pid>/stat in seconds (10 ms ticks), all threads included."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / _TICK


def reaped_children_cpu_seconds(pid: int) -> float:
    """cutime + cstime of /proc/<pid>/stat in seconds: the CPU of the child processes `pid`
    has waited for (and of theirs)."""
    fields = _stat(pid)
    return (int(fields[13]) + int(fields[14])) / _TICK


def live_children(pid: int) -> list[int]:
    """The running (not yet reaped) child processes of `pid`, from every thread's list."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), \
                    open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                found += [int(child) for child in f.read().split()]
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` so far, all threads included, at ns resolution
    where the kernel lets the process's CPU clock be read, else in /proc's ticks; plus those
    of its child processes, running or reaped."""
    total = reaped_children_cpu_seconds(pid)
    try:
        total += time.clock_gettime(process_cpu_clock(pid))
    except OSError:
        total += proc_stat_cpu_seconds(pid)
    for child in live_children(pid):
        # One that ended meanwhile is in the next sample's reaped account.
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += cpu_seconds(child)
    return total


def peak_rss_bytes(pid: int) -> int:
    """VmHWM of `pid` (the most resident memory it has had), plus that of each of its running
    child processes."""
    with open(f"/proc/{pid}/status", "rb") as f:
        own = next((int(line.split()[1]) * 1024 for line in f if line.startswith(b"VmHWM:")),
                   None)
    if own is None:
        raise ValueError(f"no VmHWM for pid {pid}")
    for child in live_children(pid):
        with contextlib.suppress(OSError, ValueError):
            own += peak_rss_bytes(child)
    return own


def mapped_files(pid: int) -> set[str]:
    """The files `pid` has mapped into memory: among them every shared library and extension
    module it has loaded."""
    paths: set[str] = set()
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.rstrip("\n").split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):
                paths.add(fields[5])
    return paths


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine has spent busy (not idle, not waiting on I/O)."""
    with open("/proc/stat", "rb") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle, iowait = fields[3], fields[4]
    return (sum(fields[:8]) - idle - iowait) / _TICK


class CpuSampler:
    """Samples the total CPU seconds of each group of pids every `period` seconds, in one
    thread; a group of None stands for the whole machine's busy seconds."""

    def __init__(self, groups: Sequence[list[int] | None], period: float = 0.1) -> None:
        self.groups = list(groups)
        self.period = period
        self._times: list[float] = []
        self._cpu: list[list[float]] = []  # per sample, per group
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    @staticmethod
    def _total(pids: list[int] | None) -> float:
        if pids is None:
            return machine_busy_seconds()
        total = 0.0
        for pid in pids:
            # A process that has ended left what it spent in the earlier samples.
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += cpu_seconds(pid)
        return total

    def sample(self) -> None:
        self._times.append(time.time())
        self._cpu.append([self._total(pids) for pids in self.groups])

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

    def cpu_at(self, when: float, group: int = 0) -> float:
        """CPU seconds of `group` at wall-clock `when`, interpolated between samples."""
        times = self._times
        if not times:
            return 0.0
        i = bisect.bisect_left(times, when)
        if i == 0:
            return self._cpu[0][group]
        if i >= len(times):
            return self._cpu[-1][group]
        t0, t1 = times[i - 1], times[i]
        c0, c1 = self._cpu[i - 1][group], self._cpu[i][group]
        return c0 + (c1 - c0) * (when - t0) / (t1 - t0 or 1.0)

    def between(self, start: float, end: float) -> list[float]:
        """CPU seconds each group spent from `start` to `end`."""
        return [max(0.0, self.cpu_at(end, g) - self.cpu_at(start, g))
                for g in range(len(self.groups))]

    def __enter__(self) -> CpuSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
