"""Ingest: read vLLM's ZMQ PUB stream, keep it in sequence, fill gaps by replay.

One Source per vLLM publisher (endpoint, dp_rank). It hands Frames downstream in seq order, each
once, with the (epoch, seq) that names it on the wire and any `resync` the consumer must see
before it. Payloads stay undecoded here; the codec decodes them at publish time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Literal, NamedTuple, cast

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from kvrelay.config import SourceSpec
from kvrelay.ingest.zmtp import Messages, Subscriber, ping_ttl
from kvrelay.ratelimit import RateLimitedLog
from kvrelay.system.metrics import Metrics
from kvrelay.wire.schema import ResumePoint, Resync, ResyncReason

log = logging.getLogger("kvrelay.ingest")

END_SEQ = b"\xff" * 8  # vLLM's end-of-replay marker: -1 as a signed 64-bit big-endian
RCVHWM = 10_000
DRAIN_LIMIT = 1024  # messages taken per turn of the event loop


class Frame(NamedTuple):
    """One vLLM batch, in order, ready for the codec."""

    dp_rank: int
    epoch: int
    seq: int
    payload: bytes
    recv_ts: float
    resyncs: tuple[Resync, ...]


class ReplayError(Exception):
    """vLLM's replay socket answered something that is not a replay."""


Sink = Callable[[Frame], None]


class Source:
    """One vLLM publisher: SUB socket, sequence tracking, replay through its ROUTER."""

    def __init__(
        self,
        spec: SourceSpec,
        ctx: zmq.asyncio.Context,
        sink: Sink,
        metrics: Metrics,
        *,
        topic: bytes = b"",
        hold_limit: int = 50_000,
        hold_bytes: int = 64 << 20,
        replay_timeout: float = 2.0,
        replay_cooldown: float = 5.0,
        engine: Literal["native", "libzmq"] = "native",
        max_message: int = 64 << 20,
        heartbeat: float = 0.0,
    ) -> None:
        self.spec = spec
        self._engine = engine
        self._max_message = max_message  # native: a larger message is refused, counted
        self._heartbeat = heartbeat  # seconds between PINGs to the publisher; 0: none
        self._ctx = ctx
        self._sink = sink
        self._metrics = metrics
        self._topic = topic
        self._hold_limit = hold_limit
        self._hold_bytes = hold_bytes
        self._replay_timeout = replay_timeout
        self._replay_cooldown = replay_cooldown
        self._warn = RateLimitedLog(log)
        self._received = metrics.batches_received.labels(str(spec.dp_rank))
        self._libzmq_subscribed = False
        self._libzmq_peers = 0
        self._subscriber: Subscriber | None = None
        # Sequence state: the next seq expected in `epoch` (None: nothing known yet), and a
        # reason to announce with the next batch even when no seq is missing.
        self.epoch = 0
        self.expected: int | None = None
        self._announce: ResyncReason | None = None
        self._emitted = False
        self._gap_counted_at: int | None = None  # a gap re-seen after a failed replay is one gap
        # While resuming or replaying, live batches wait here (bounded: oldest dropped; the
        # highest seq dropped so the hole is announced as `overflow`).
        self._holding = True
        self._held: deque[tuple[int, bytes, float]] = deque()
        self._held_bytes = 0
        self._overflow_upto: int | None = None
        self._cooldown_until = 0.0
        self._watcher: asyncio.Task[None] | None = None
        self._failed: asyncio.Future[None] | None = None  # set while run() reads
        self._tasks: set[asyncio.Task[None]] = set()  # resume and replay

    @property
    def name(self) -> str:
        return f"{self.spec.endpoint} (dp_rank {self.spec.dp_rank})"

    @property
    def subscribed(self) -> bool:
        """Bound, or connecting (a vLLM that is not up yet is waited for, not an error)."""
        if self._subscriber is not None:
            return self._subscriber.subscribed
        return self._libzmq_subscribed

    @property
    def peers(self) -> int:
        """vLLM publishers attached right now."""
        return self._subscriber.peers if self._subscriber is not None else self._libzmq_peers

    async def run(self, resume: Awaitable[ResumePoint | None]) -> None:
        """Read until cancelled; batches wait until `resume` says where the stream left off."""
        self._spawn(self._resume(resume))
        loop = asyncio.get_running_loop()
        self._failed = failed = loop.create_future()
        if self._engine == "native":
            await self._run_native(failed)
        else:
            await self._run_libzmq(failed)

    async def _run_native(self, failed: asyncio.Future[None]) -> None:
        """ZMTP on this event loop: each read of the socket hands on every message it holds."""
        subscriber = self._subscriber = Subscriber(
            self.spec.endpoint, self.spec.bind, self._topic, self._take, self.name,
            max_message=self._max_message, heartbeat=self._heartbeat, too_large=self._too_large)
        reading = asyncio.ensure_future(subscriber.run(
            lambda message: self._warn.warning("retry:" + self.name, "%s", message)))
        try:
            await asyncio.wait({failed, reading}, return_when=asyncio.FIRST_COMPLETED)
            if failed.done():
                failed.result()
            reading.result()
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)

    async def _run_libzmq(self, failed: asyncio.Future[None]) -> None:
        """pyzmq: no task wakes per message; a reader callback on the socket's FD drains
        everything waiting without awaiting (awaiting each message costs 4x)."""
        sock = await self._open()
        drain: zmq.Socket[bytes] = zmq.Socket.shadow(sock.underlying)  # same socket, sync
        loop = asyncio.get_running_loop()
        fd = drain.fileno()
        loop.add_reader(fd, self._drain, drain)
        try:
            # ZMQ's FD signals edges: drain once for whatever arrived before the reader was set.
            self._drain(drain)
            await failed
        finally:
            loop.remove_reader(fd)
            if self._watcher is not None:
                self._watcher.cancel()
            sock.close(linger=0)
            self._libzmq_subscribed = False

    def _drain(self, sock: zmq.Socket[bytes]) -> None:
        """Take every message waiting on the socket, up to a turn's worth."""
        failed = self._failed
        if failed is None or failed.done():
            return
        batch: Messages = []
        try:
            recv = sock.recv_multipart
            try:
                while len(batch) < DRAIN_LIMIT:
                    batch.append(recv(zmq.NOBLOCK))
            except zmq.Again:
                pass
            else:
                # More may wait, and the FD will not signal it again: come back, but after
                # publishing and acks had their turn (a flood must not starve them).
                asyncio.get_running_loop().call_soon(self._drain, sock)
        except Exception as exc:  # a callback's exception would only be logged: end run()
            failed.set_exception(exc)
        if batch:
            self._take(batch)

    def _too_large(self, size: int) -> None:
        """A message refused at the socket for its size: a batch lost, counted."""
        self._metrics.drop("too_large", 1)

    def _take(self, messages: Messages) -> None:
        """Sequence-check and hand on messages just read (either engine)."""
        failed = self._failed
        if failed is None or failed.done():
            return
        try:
            now = time.time()
            on_frames = self._on_frames
            self._received.inc(sum([on_frames(frames, now) for frames in messages]))
        except Exception as exc:  # a callback's exception would only be logged: end run()
            failed.set_exception(exc)

    async def settle(self, within: float) -> int:
        """After reading stopped: let a pending resume or replay hand on what is held.

        Returns the number of batches still held when `within` ran out (dropped, counted).
        """
        deadline = time.monotonic() + within
        while self._tasks and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait(set(self._tasks), timeout=left)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        lost = len(self._held)
        if lost:
            self._held.clear()
            self._held_bytes = 0
            self._metrics.drop("shutdown", lost)
        return lost

    async def _open(self) -> zmq.asyncio.Socket:
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, RCVHWM)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, self._topic)
        if self._heartbeat > 0:  # as the native engine: PINGs, a heartbeat to answer, a TTL
            sock.setsockopt(zmq.HEARTBEAT_IVL, round(self._heartbeat * 1000))
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, round(self._heartbeat * 1000))
            sock.setsockopt(zmq.HEARTBEAT_TTL, ping_ttl(self._heartbeat) * 100)
        self._watcher = asyncio.ensure_future(self._watch(sock.get_monitor_socket()))
        delay = 0.1
        try:
            while True:
                try:
                    if self.spec.bind:
                        sock.bind(self.spec.endpoint)
                    else:
                        sock.connect(self.spec.endpoint)
                    break
                except zmq.ZMQError as exc:
                    verb = "bind" if self.spec.bind else "connect to"
                    log.error("cannot %s %s: %s; retrying in %.1fs", verb, self.spec.endpoint,
                              exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
        except BaseException:
            # Stopped while retrying: an open socket would block the context's termination.
            self._watcher.cancel()
            sock.close(linger=0)
            raise
        self._libzmq_subscribed = True
        mode = "bound" if self.spec.bind else "connecting to"
        log.info("ZMQ SUB %s %s (dp_rank %d)", mode, self.spec.endpoint, self.spec.dp_rank)
        return sock

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        """Say when the vLLM publisher comes and goes, and when it cannot be reached."""
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                kind = event["event"]
                if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self._libzmq_peers += 1
                    log.info("vLLM publisher attached on %s", self.name)
                elif kind == zmq.EVENT_DISCONNECTED:
                    self._libzmq_peers = max(0, self._libzmq_peers - 1)
                    log.warning("vLLM publisher went away from %s", self.name)
                elif kind == zmq.EVENT_CONNECT_RETRIED:
                    self._warn.warning("retry:" + self.name,
                                       "no vLLM publisher at %s yet; retrying", self.name)
                elif kind == zmq.EVENT_MONITOR_STOPPED:
                    return
        except asyncio.CancelledError:
            monitor.close(linger=0)
            raise

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- sequence tracking ---------------------------------------------------------------------

    def _on_frames(self, frames: list[bytes], now: float) -> bool:
        """Take one ZMQ message; False if it is not a vLLM batch message."""
        if len(frames) != 3:
            self._malformed("frame_count", f"{len(frames)} frames, expected 3")
            return False
        raw_seq = frames[1]
        if len(raw_seq) != 8:
            self._malformed("seq_length", f"seq of {len(raw_seq)} bytes, expected 8")
            return False
        seq = int.from_bytes(raw_seq, "big")
        if seq == self.expected and self._announce is None and self._overflow_upto is None \
                and not self._holding:
            # The steady state, what `_accept` and `_emit` would conclude: next in line.
            self.expected = seq + 1
            self._emitted = True
            self._sink(Frame(self.spec.dp_rank, self.epoch, seq, frames[2], now, ()))
            return True
        if self._holding:
            self._hold(seq, frames[2], now)
        else:
            self._accept(seq, frames[2], now)
        return True

    def _malformed(self, kind: str, detail: str) -> None:
        self._metrics.decode_errors.labels(kind).inc()
        self._warn.warning(kind, "dropped a malformed message from %s: %s", self.name, detail)

    def _hold(self, seq: int, payload: bytes, now: float) -> None:
        self._held.append((seq, payload, now))
        self._held_bytes += len(payload)
        while len(self._held) > self._hold_limit or (
                self._held_bytes > self._hold_bytes and len(self._held) > 1):
            dropped, dropped_payload, _ = self._held.popleft()
            self._held_bytes -= len(dropped_payload)
            self._overflow_upto = max(dropped, self._overflow_upto or dropped)
            self._metrics.drop("overflow", 1)

    def _accept(self, seq: int, payload: bytes, now: float) -> None:
        """A live batch: pass it on, or start a replay for what is missing before it."""
        if self.expected is not None and seq < self.expected:
            self._metrics.restarts.inc()
            log.warning("vLLM on %s restarted (seq %d after %d): epoch %d begins",
                        self.name, seq, self.expected - 1, self.epoch + 1)
            self.epoch += 1
            self.expected = 0
            self._announce = "restart"
        missing_from = 0 if self.expected is None else self.expected
        if seq > missing_from:
            if (self._announce is None and self.expected is not None
                    and self._gap_counted_at != missing_from):
                self._gap_counted_at = missing_from
                self._metrics.gaps.inc()
            if self.spec.replay and time.monotonic() >= self._cooldown_until:
                self._holding = True
                self._hold(seq, payload, now)
                self._spawn(self._replay(missing_from))
                return
        self._emit(seq, payload, now)

    def _emit(self, seq: int, payload: bytes, now: float) -> None:
        resyncs: list[Resync] = []
        start = 0 if self.expected is None else self.expected
        if seq > start:
            overflowed = self._overflow_upto is not None and self._overflow_upto >= start
            reason = self._announce or (
                "overflow" if overflowed else "gap" if self._emitted else "start")
            resyncs.append(Resync(reason, start, seq - 1))
            self._metrics.missed_batches.inc(seq - start)
        elif self._announce is not None:
            resyncs.append(Resync(self._announce))
        for resync in resyncs:
            self._metrics.resyncs.labels(resync.reason).inc()
        if self._overflow_upto is not None and seq > self._overflow_upto:
            self._overflow_upto = None
        self._announce = None
        self._emitted = True
        self.expected = seq + 1
        self._sink(Frame(self.spec.dp_rank, self.epoch, seq, payload, now, tuple(resyncs)))

    # -- resume and replay ---------------------------------------------------------------------

    async def _resume(self, resume: Awaitable[ResumePoint | None]) -> None:
        point = await resume
        if point is not None:
            self.epoch, self.expected = point.epoch, point.seq + 1
            log.info("%s resumes after epoch %d seq %d", self.name, point.epoch, point.seq)
        if self.spec.replay:
            await self._replay(0 if self.expected is None else self.expected)
        else:
            self._release_held(replayed_from=None)

    async def _replay(self, start: int) -> None:
        """Ask vLLM for every batch from `start`, then merge them with the live ones held."""
        self._metrics.replays.labels("requested").inc()
        try:
            replies = await self._request_replay(start)
        except Exception as exc:  # timeout, garbage, or a socket error: all fall back to resync
            self._metrics.replays.labels("failed").inc()
            self._cooldown_until = time.monotonic() + self._replay_cooldown
            log.warning("replay from seq %d on %s failed (%s); emitting resync instead",
                        start, self.spec.replay, exc or "timed out")
            replies = []
        else:
            # vLLM holds a bounded history; it may no longer have `start`.
            partial = bool(replies) and replies[0][0] > start
            self._metrics.replays.labels("partial" if partial else "succeeded").inc()
        now = time.time()
        for seq, payload in replies:
            if seq >= start and (self.expected is None or seq >= self.expected):
                self._emit(seq, payload, now)
        self._release_held(replayed_from=start)

    def _release_held(self, replayed_from: int | None) -> None:
        held, self._held = self._held, deque()
        self._held_bytes = 0
        self._holding = False
        previous = -1
        for seq, payload, recv_ts in held:
            if seq < previous:
                replayed_from = None  # vLLM restarted meanwhile: these are a new epoch's
            previous = seq
            if (replayed_from is not None and self.expected is not None
                    and replayed_from <= seq < self.expected):
                continue  # the replay delivered it already
            if self._holding:
                self._hold(seq, payload, recv_ts)
            else:
                self._accept(seq, payload, recv_ts)

    async def _request_replay(self, start: int) -> list[tuple[int, bytes]]:
        assert self.spec.replay is not None
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        replies: list[tuple[int, bytes]] = []
        try:
            sock.connect(self.spec.replay)
            await sock.send_multipart([b"", start.to_bytes(8, "big")])
            deadline = time.monotonic() + 10 * self._replay_timeout
            while True:
                wait = min(self._replay_timeout, deadline - time.monotonic())
                if wait <= 0:
                    raise TimeoutError(f"no reply within {self._replay_timeout}s")
                # pyzmq's stubs give the socket's poll the Poller's return type; it is an int
                if not await cast("Awaitable[int]", sock.poll(timeout=int(wait * 1000))):
                    raise TimeoutError(f"no reply within {self._replay_timeout}s")
                frames = await sock.recv_multipart()
                # [b"", seq, payload] up to vLLM 0.25, [b"", topic, seq, payload] since 0.26.
                if len(frames) not in (3, 4) or frames[0] != b"" or len(frames[-2]) != 8:
                    raise ReplayError(f"unexpected reply of {len(frames)} frames")
                if frames[-2] == END_SEQ:
                    return replies
                seq = int.from_bytes(frames[-2], "big")
                if replies and seq <= replies[-1][0]:
                    raise ReplayError(f"replay seq {seq} does not follow {replies[-1][0]}")
                replies.append((seq, frames[-1]))
        finally:
            sock.close(linger=0)
