"""The consumer process: reads what a relay published and checks it against what was sent.

Every event received is matched to its place in its publisher's sequence (by the batch seq the
output carries, or by content when it carries none; bench/track.py), so events lost, repeated
or out of order are counted, not guessed from totals. Lag is measured per batch, from the
timestamp the feeder stamped it with (in shared memory) to the receipt of its last event here.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Literal

import msgspec
import nats
import uvloop
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from bench.track import Track
from bench.workload import (
    CLEARED,
    REMOVED,
    STORED,
    Fingerprint,
    fingerprint,
    shared_floats,
)

OutputKind = Literal["relaybatch", "naive", "dynamo"]

# -- what each kind of output looks like, decoded only as far as the check needs ----------------


class _Stored(msgspec.Struct, tag="stored", tag_field="type"):
    block_hashes: list[int | bytes]


class _Removed(msgspec.Struct, tag="removed", tag_field="type"):
    block_hashes: list[int | bytes]


class _Cleared(msgspec.Struct, tag="cleared", tag_field="type"):
    pass


class _Resync(msgspec.Struct, tag="resync", tag_field="type"):
    reason: str


class _Unknown(msgspec.Struct, tag="unknown", tag_field="type"):
    tag: str


class _RelayBatch(msgspec.Struct):
    instance_id: int
    dp_rank: int
    seq: int
    events: list[_Stored | _Removed | _Cleared | _Resync | _Unknown]


class _DynamoEnvelope(msgspec.Struct):
    publisher_id: int
    sequence: int
    payload: bytes


class _DynamoEvent(msgspec.Struct):
    event_id: int
    data: Any
    dp_rank: int = 0


class _RouterEvent(msgspec.Struct):
    worker_id: int
    event: _DynamoEvent


_RELAY_BATCH = msgspec.msgpack.Decoder(_RelayBatch | list[_RelayBatch])  # a pack: a list
_DYNAMO_ENVELOPE = msgspec.msgpack.Decoder(_DynamoEnvelope)
_ROUTER_EVENTS = msgspec.msgpack.Decoder(list[_RouterEvent])
_NAIVE = msgspec.msgpack.Decoder(tuple[float, int, int, Any])


def dynamo_fingerprint(data: Any) -> Fingerprint:
    """Fingerprint of a Dynamo RouterEvent's `data`."""
    if data == "cleared":
        return CLEARED, None
    if isinstance(data, dict):
        if "stored" in data:
            blocks = data["stored"]["blocks"]
            return STORED, blocks[0]["block_hash"] if blocks else None
        if "removed" in data:
            hashes = data["removed"]["block_hashes"]
            return REMOVED, hashes[0] if hashes else None
    raise ValueError(f"not a RouterEvent payload: {data!r}")


@dataclass
class ConsumerResult:
    matched_events: list[int]
    matched_batches: list[int]
    duplicates: int
    corrupt: int
    out_of_order: int
    resyncs: int
    unknown_events: int
    lags: list[float]  # p50, p99, p99.9, max in seconds (empty when nothing was timed)
    lag_samples: int
    last_receipt: float
    notes: list[str] = field(default_factory=list)


def percentiles(values: array[float], points: tuple[float, ...]) -> list[float]:
    """Nearest-rank percentiles of `values` (sorted copy), then the maximum."""
    if not values:
        return []
    ordered = sorted(values)
    n = len(ordered)
    return [ordered[min(n - 1, max(0, math.ceil(p / 100 * n) - 1))] for p in points] + [ordered[-1]]


@dataclass(frozen=True)
class ConsumePlan:
    kind: OutputKind
    nats_url: str
    subject: str
    stream: str | None  # JetStream stream, None for core NATS
    publishers: dict[tuple[int, int], int]  # (worker_id, dp_rank) -> publisher index
    fingerprints: list[list[list[Fingerprint]]]
    prefixes: list[int]  # per publisher, batches of its pool sent once before the cycle
    shm_name: str
    capacity: int


class Consumer:
    def __init__(self, plan: ConsumePlan) -> None:
        self.plan = plan
        self._shm = SharedMemory(name=plan.shm_name)
        self._ts = shared_floats(self._shm)
        self.lags: array[float] = array("d")
        self.tracks = [Track(i, fps, self._ts, plan.capacity, self.lags, prefix)
                       for i, (fps, prefix) in enumerate(zip(plan.fingerprints, plan.prefixes,
                                                             strict=True))]
        self.resyncs = 0
        self.unknown = 0
        self.strays = 0  # messages from a publisher nobody sent as
        self.last_receipt = 0.0
        self.progress = asyncio.Event()
        handlers: dict[OutputKind, Callable[[Msg], None]] = {
            "relaybatch": self._relay_batch, "naive": self._naive, "dynamo": self._dynamo}
        self._handle = handlers[plan.kind]

    def warmed(self) -> bool:
        return all(t.batches >= t.warm for t in self.tracks)

    async def on_msg(self, msg: Msg) -> None:
        self._handle(msg)
        self.last_receipt = time.time()
        self.progress.set()

    def _track(self, worker_id: int, dp_rank: int) -> Track | None:
        index = self.plan.publishers.get((worker_id, dp_rank))
        if index is None:
            self.strays += 1
            return None
        return self.tracks[index]

    def _relay_batch(self, msg: Msg) -> None:
        now = time.time()
        decoded = _RELAY_BATCH.decode(msg.data)
        for batch in decoded if isinstance(decoded, list) else (decoded,):
            self._one_batch(batch, now)

    def _one_batch(self, batch: _RelayBatch, now: float) -> None:
        track = self._track(batch.instance_id, batch.dp_rank)
        if track is None:
            return
        last = track.last_key
        announced = any(isinstance(event, _Resync) for event in batch.events)
        track.order((batch.seq, 0), (last[0] + 1, 0) if last else (0, 0), announced)
        at = track.position(batch.seq)
        for event in batch.events:
            if isinstance(event, _Stored):
                track.event((STORED, event.block_hashes[0] if event.block_hashes else None),
                            now, at)
            elif isinstance(event, _Removed):
                track.event((REMOVED, event.block_hashes[0] if event.block_hashes else None),
                            now, at)
            elif isinstance(event, _Cleared):
                track.event((CLEARED, None), now, at)
            else:
                if isinstance(event, _Resync):
                    self.resyncs += 1
                else:
                    self.unknown += 1
                continue
            at += 1

    def _naive(self, msg: Msg) -> None:
        now = time.time()
        _, worker, rank = msg.subject.rsplit(".", 2)
        track = self._track(int(worker), int(rank))
        if track is None:
            return
        _ts, seq, index, event = _NAIVE.decode(msg.data)
        last = track.last_key
        expected = (0, 0) if last is None else (last[0], last[1] + 1)
        if index == 0 and last is not None:
            expected = (last[0] + 1, 0)
        track.order((seq, index), expected)
        track.event(fingerprint(event), now, track.position(seq, index))

    def _dynamo(self, msg: Msg) -> None:
        now = time.time()
        envelope = _DYNAMO_ENVELOPE.decode(msg.data)
        for router_event in _ROUTER_EVENTS.decode(envelope.payload):
            event = router_event.event
            track = self._track(router_event.worker_id, event.dp_rank)
            if track is None:
                continue
            last = track.last_key
            track.order((event.event_id, 0), (last[0] + 1, 0) if last else (1, 0))
            try:
                fp = dynamo_fingerprint(event.data)
            except ValueError:
                self.unknown += 1
                continue
            if fp[0] == CLEARED and not track.expects(fp):
                # Dynamo's plane has no resync: a relay announces a gap with a `cleared` of its
                # own, which matches no vLLM event here.
                self.resyncs += 1
                continue
            track.event(fp, now)

    def result(self) -> ConsumerResult:
        lags = percentiles(self.lags, (50.0, 99.0, 99.9))
        notes = [f"{self.strays} messages from unknown publishers"] if self.strays else []
        untimed = sum(t.untimed for t in self.tracks)
        if untimed:
            notes.append(f"{untimed} batches matched past the feeder's timestamps (not timed)")
        return ConsumerResult(
            matched_events=[t.matched for t in self.tracks],
            matched_batches=[t.batches for t in self.tracks],
            duplicates=sum(t.duplicates for t in self.tracks),
            corrupt=sum(t.corrupt for t in self.tracks),
            out_of_order=sum(t.out_of_order for t in self.tracks),
            resyncs=self.resyncs, unknown_events=self.unknown, lags=lags,
            lag_samples=len(self.lags), last_receipt=self.last_receipt, notes=notes)

    def close(self) -> None:
        self._ts.release()
        self._shm.close()


async def _consume(conn: Connection, plan: ConsumePlan) -> None:
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

    def readable() -> None:
        try:
            commands.put_nowait(conn.recv())
        except EOFError:
            loop.remove_reader(conn.fileno())
            commands.put_nowait(("stop",))

    loop.add_reader(conn.fileno(), readable)
    consumer = Consumer(plan)
    nc = None
    try:
        while True:
            command = await commands.get()
            if command[0] == "subscribe":
                nc = await nats.connect(plan.nats_url, max_reconnect_attempts=-1)
                if plan.stream is None:
                    await nc.subscribe(plan.subject, cb=consumer.on_msg,
                                       pending_msgs_limit=-1, pending_bytes_limit=-1)
                else:
                    await nc.jetstream().subscribe(
                        plan.subject, stream=plan.stream, cb=consumer.on_msg,
                        ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
                await nc.flush()  # the server has the subscription before anything is sent
                conn.send(("subscribed",))
            elif command[0] == "await_warm":
                deadline = time.monotonic() + command[1]
                while not consumer.warmed() and time.monotonic() < deadline:
                    consumer.progress.clear()
                    await _wait_for(consumer.progress, deadline - time.monotonic())
                conn.send(("warmed",) if consumer.warmed() else
                          ("error", "the warm-up batches did not all arrive"))
            elif command[0] == "expect":
                sent: list[int] = command[1]
                idle, deadline = command[2], time.monotonic() + command[3]
                while time.monotonic() < deadline and any(
                        t.batches < n for t, n in zip(consumer.tracks, sent, strict=True)):
                    consumer.progress.clear()
                    if not await _wait_for(consumer.progress,
                                           min(idle, deadline - time.monotonic())):
                        break
                conn.send(("result", consumer.result()))
            elif command[0] == "stop":
                return
    finally:
        loop.remove_reader(conn.fileno())
        if nc is not None:
            await nc.close()
        consumer.close()


async def _wait_for(event: asyncio.Event, seconds: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), max(0.0, seconds))
    except TimeoutError:
        return False
    return True


def consumer_main(conn: Connection, plan: ConsumePlan) -> None:
    """Process entry: consume until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the orchestrator tears down on Ctrl-C
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_consume(conn, plan))
    except Exception as exc:
        with contextlib.suppress(BrokenPipeError, OSError):
            conn.send(("error", f"consumer failed: {exc!r}"))
