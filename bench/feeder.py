"""The feeder process: synthetic vLLM publishers sending pooled batches at a paced rate.

Each publisher is one vLLM DP rank: a socket bound where the relay connects, sending vLLM's
three frames (topic, 8-byte seq, msgpack batch). The socket is an XPUB, which is a PUB on the
wire but tells the feeder when a subscription arrives, so the first batch is never sent into
the void. Batches go out in bursts on a short tick (the loop sends what is due, then sleeps),
round-robin across publishers; the time each batch was stamped with goes into shared memory
for the consumer's lag measurement.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Final

import zmq

from bench.workload import Pool, shared_floats, ts_field

TOPIC: Final = b"kv-events"
PUB_HWM: Final = 100_000  # vLLM's default
MAX_BURST: Final = 256  # batches per burst when sending as fast as possible
PREFILL_RATE: Final = 1000.0  # warm-up batches/s over all publishers (a pre-fill: 64 blocks each)


@dataclass(frozen=True)
class FeedPlan:
    """What one feeder process publishes: one endpoint and pool per publisher."""

    endpoints: list[str]
    pools: list[Pool]
    shm_name: str
    capacity: int  # batches per publisher the shared timestamp array holds
    tick: float = 0.001
    heartbeat_ms: int = 0  # the PUBs' ZMQ_HEARTBEAT_IVL (timeout 3x, TTL 5x); 0: none


@dataclass(frozen=True)
class FeedResult:
    sent_batches: list[int]  # per publisher, warm-up included
    sent_events: list[int]
    started: float  # wall clock of the first timed batch
    finished: float
    capacity_reached: bool


class Feeder:
    """Owns the sockets; `warm_up` then `run` once; `close` always."""

    def __init__(self, plan: FeedPlan) -> None:
        self.plan = plan
        self._ctx = zmq.Context()
        self._socks: list[zmq.Socket[bytes]] = []
        self._shm = SharedMemory(name=plan.shm_name)
        self._ts = shared_floats(self._shm)
        self._next = [0] * len(plan.endpoints)
        self._events = [0] * len(plan.endpoints)
        for endpoint in plan.endpoints:
            sock = self._ctx.socket(zmq.XPUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, PUB_HWM)
            if plan.heartbeat_ms:  # vLLM's socket with heartbeats on: PINGs to answer
                sock.setsockopt(zmq.HEARTBEAT_IVL, plan.heartbeat_ms)
                sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * plan.heartbeat_ms)
                sock.setsockopt(zmq.HEARTBEAT_TTL, 5 * plan.heartbeat_ms)
            self._socks.append(sock)
            sock.bind(endpoint)

    def wait_subscribed(self, timeout: float) -> None:
        """Block until every socket has a subscriber."""
        deadline = time.monotonic() + timeout
        for endpoint, sock in zip(self.plan.endpoints, self._socks, strict=True):
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no subscriber on {endpoint} within {timeout:.0f}s")
                if sock.poll(int(left * 1000), zmq.POLLIN) and sock.recv()[:1] == b"\x01":
                    break

    def _send(self, p: int, ts: float, ts_bytes: bytes) -> bool:
        b = self._next[p]
        if b >= self.plan.capacity:
            return False
        pool = self.plan.pools[p]
        self._ts[p * self.plan.capacity + b] = ts
        self._socks[p].send_multipart([TOPIC, b.to_bytes(8, "big"), pool.payload(b, ts_bytes)])
        self._next[p] = b + 1
        self._events[p] += pool.events_of(b)
        return True

    def warm_up(self) -> None:
        """Send each publisher's warm-up batches, round-robin: seq 0, or its pool's prefix (the
        pre-fill of --live-blocks) at PREFILL_RATE, which the relays absorb untimed."""
        counts = [pool.warm_batches for pool in self.plan.pools]
        order = [p for b in range(max(counts)) for p, n in enumerate(counts) if b < n]
        sent = 0
        t0 = time.perf_counter()
        while sent < len(order):
            due = min(int((time.perf_counter() - t0) * PREFILL_RATE) + 1, len(order)) - sent
            if due <= 0:
                time.sleep(self.plan.tick)
                continue
            ts = time.time()
            ts_bytes = ts_field(ts)
            for p in order[sent:sent + due]:
                self._send(p, ts, ts_bytes)
            sent += due

    def run(self, rate: float | None, duration: float) -> FeedResult:
        """Send at `rate` batches/s in total (None: as fast as possible) for `duration` s."""
        n = len(self._socks)
        tick = self.plan.tick
        p = 0
        sent = 0
        full = False
        started = time.time()
        t0 = time.perf_counter()
        while not full:
            elapsed = time.perf_counter() - t0
            if elapsed >= duration:
                break
            if rate is None:
                due = MAX_BURST
            else:
                due = int(elapsed * rate) + 1 - sent
                if due <= 0:
                    time.sleep(tick)  # sleep a whole tick: the next wake-up sends a burst
                    continue
            ts = time.time()
            ts_bytes = ts_field(ts)
            for _ in range(due):
                if not self._send(p, ts, ts_bytes):
                    full = True
                    break
                p = p + 1 if p + 1 < n else 0
            sent += due
        return FeedResult(list(self._next), list(self._events), started, time.time(), full)

    def close(self) -> None:
        self._ts.release()
        self._shm.close()
        for sock in self._socks:
            sock.close(linger=0)
        self._ctx.term()


def feeder_main(conn: Connection, plan: FeedPlan) -> None:
    """Process entry: bind, then obey the orchestrator's commands on `conn`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the orchestrator tears down on Ctrl-C
    try:
        feeder = Feeder(plan)
    except Exception as exc:
        conn.send(("error", f"feeder cannot bind: {exc!r}"))
        return
    try:
        conn.send(("bound",))
        while True:
            command: tuple[Any, ...] = conn.recv()
            if command[0] == "await_subscribers":  # the relays connected; nothing is sent
                try:
                    feeder.wait_subscribed(command[1])
                except TimeoutError as exc:
                    conn.send(("error", str(exc)))
                    continue
                conn.send(("subscribed",))
            elif command[0] == "warm_up":
                try:
                    feeder.wait_subscribed(command[1])
                except TimeoutError as exc:
                    conn.send(("error", str(exc)))
                    continue
                feeder.warm_up()
                conn.send(("warmed",))
            elif command[0] == "run":
                conn.send(("done", feeder.run(command[1], command[2])))
            elif command[0] == "stop":
                return
    except (EOFError, BrokenPipeError):
        return
    finally:
        feeder.close()
