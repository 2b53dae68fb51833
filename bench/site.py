"""What a trial and an idle measurement share: a fresh nats-server, the feeder binding the vLLM
sockets (as vLLM does, first), and one target's relays started and ready; all of it stopped on
leaving the ExitStack it was started in, whatever happens (Ctrl-C included).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.context
import multiprocessing.process
import os
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

from bench.feeder import FeedPlan, feeder_main
from bench.targets import Launch, Target, TrialSite, Worker
from bench.workload import Pool
from kvrelay.testing.natsserver import NatsServer, free_port

WORKER_ID_BASE = 10_000_000_000_000_000_000  # above 2**63, as real instance IDs can be
READY_TIMEOUT = 60.0

SPAWN = multiprocessing.get_context("spawn")


class TrialError(RuntimeError):
    """The trial could not run (a process failed to start, nothing arrived at warm-up, ...)."""


def free_port_run(count: int) -> int:
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


# Set when the bench is interrupted while trials run in threads of their own (`run_trial`'s
# `together`): each of them stops waiting, tears down what it started and raises TrialError.
STOP = threading.Event()
STOP_POLL = 0.2  # seconds between two looks at STOP while waiting


def stopping() -> None:
    if STOP.is_set():
        raise TrialError("interrupted")


def expect(conn: Connection, reply: str, timeout: float, who: str) -> tuple[Any, ...]:
    deadline = time.monotonic() + timeout
    while not conn.poll(min(STOP_POLL, max(0.0, deadline - time.monotonic()))):
        stopping()
        if time.monotonic() >= deadline:
            raise TrialError(f"{who} did not answer within {timeout:.0f}s")
    message: tuple[Any, ...] = conn.recv()
    if message[0] == "error":
        raise TrialError(message[1])
    if message[0] != reply:
        raise TrialError(f"{who} said {message[0]!r}, expected {reply!r}")
    return message


class Relays:
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
                                     f"{tail(launch.log)}")
                if time.monotonic() > deadline:
                    raise TrialError(f"{launch.name} not ready after {timeout:.0f}s:\n"
                                     f"{tail(launch.log)}")
                stopping()
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


def tail(log: Path, size: int = 3000) -> str:
    return log.read_bytes()[-size:].decode(errors="replace") if log.exists() else "<no log>"


def stop_process(proc: multiprocessing.process.BaseProcess, conn: Connection) -> None:
    with contextlib.suppress(BrokenPipeError, OSError):
        conn.send(("stop",))
    proc.join(3)
    if proc.is_alive():
        proc.kill()
        proc.join()


MAX_PAYLOAD = 8 << 20
"""The bench's nats-server max_payload (the server's own default is 1 MiB)."""


@dataclass(frozen=True)
class Running:
    """A site with its feeder bound and the target's relays ready."""

    server: NatsServer
    site: TrialSite
    shm: SharedMemory  # the feeder's batch timestamps, `capacity` per publisher
    feeder: multiprocessing.process.BaseProcess
    feeder_conn: Connection
    relays: Relays
    build: str  # what the relay processes loaded (Target.build)

    @property
    def relay_pids(self) -> list[int]:
        return [p.pid for p in self.relays.procs]


def start_site(stack: contextlib.ExitStack, target: Target, pools: list[Pool], *,
               capacity: int, workers: int, dp_ranks: int, tick: float = 0.001,
               pub_heartbeat_ms: int = 0) -> Running:
    """Server, feeder (bound), relays (ready), each stopped when `stack` closes."""
    publishers = workers * dp_ranks
    if len(pools) != publishers:
        raise ValueError(f"{len(pools)} pools for {publishers} publishers")
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvrelay-bench-")))
    # Snapshots of workers holding hundreds of thousands of blocks take a few MiB: written,
    # as an operator with such workers would configure the server, not refused as too large.
    conf = tmp / "nats.conf"
    conf.write_text(f"max_payload: {MAX_PAYLOAD}\n")
    server = NatsServer(tmp / "nats", name="bench", extra_args=["-c", str(conf)])
    server.start()
    stack.callback(server.stop)
    shm = SharedMemory(create=True, size=publishers * capacity * 8)
    stack.callback(shm.unlink)
    stack.callback(shm.close)

    site_workers = []
    endpoints = []
    for w in range(workers):
        base = free_port_run(dp_ranks)
        site_workers.append(Worker(w, WORKER_ID_BASE + w, f"tcp://127.0.0.1:{base}",
                                   free_port()))
        endpoints += [f"tcp://127.0.0.1:{base + r}" for r in range(dp_ranks)]
    site = TrialSite(server.url, tmp, site_workers, dp_ranks)

    feeder_conn, child = SPAWN.Pipe()
    feeder = SPAWN.Process(target=feeder_main, name="bench-feeder", daemon=True,
                           args=(child, FeedPlan(endpoints, pools, shm.name, capacity,
                                                 tick, pub_heartbeat_ms)))
    feeder.start()
    stack.callback(stop_process, feeder, feeder_conn)
    expect(feeder_conn, "bound", 30, "feeder")

    relays = Relays(target.launches(site))
    stack.callback(relays.stop)
    relays.start()
    relays.wait_ready(READY_TIMEOUT)
    build = target.build([p.pid for p in relays.procs], relays.launches)
    return Running(server, site, shm, feeder, feeder_conn, relays, build)
