"""Ingest: read vLLM's ZMQ PUB stream, keep it in sequence, fill gaps by replay.

One Source per vLLM publisher (endpoint, dp_rank). It hands Frames downstream in seq order, each
once, with the (epoch, seq) that names it on the wire and any `resync` the consumer must see
before it. Payloads stay undecoded here; the codec decodes them at publish time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Literal

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from kvrelay.config import SourceSpec
from kvrelay.ingest.budget import Budget
from kvrelay.ingest.sequencer import Sequencer, Sink
from kvrelay.ingest.subscriber import Subscriber
from kvrelay.ingest.zmtp import Messages
from kvrelay.ingest.zmtpwire import ping_ttl
from kvrelay.ratelimit import RateLimitedLog
from kvrelay.system.metrics import Metrics
from kvrelay.wire.schema import ResumePoint

log = logging.getLogger("kvrelay.ingest")

END_SEQ = b"\xff" * 8  # vLLM's end-of-replay marker: -1 as a signed 64-bit big-endian
RCVHWM = 10_000
DRAIN_LIMIT = 1024  # messages taken per turn of the event loop


class ReplayError(Exception):
    """vLLM's replay socket answered something that is not a replay."""


class ReplayCut(ReplayError):
    """The replay connection closed before the replay ended."""


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
        budget: Budget | None = None,
        replay_timeout: float = 2.0,
        replay_cooldown: float = 5.0,
        engine: Literal["native", "libzmq"] = "native",
        max_batch_bytes: int = 4 << 20,
        heartbeat: float = 0.0,
        turn: tuple[Callable[[], None], Callable[[], None]] | None = None,
    ) -> None:
        """`budget`: what batches held during a resume or a replay are charged to (shared with
        the buffer); `max_batch_bytes`: the largest message read, live or replayed; `turn`:
        called before and after a read's messages are handed to `sink` (which may then send
        what it took, together, without waiting for another turn of the loop)."""
        self.spec = spec
        self._engine = engine
        self._max_batch_bytes = max_batch_bytes
        self._heartbeat = heartbeat  # seconds between PINGs to the publisher; 0: none
        self._turn = turn
        self._ctx = ctx
        self._metrics = metrics
        self._topic = topic
        self._replay_timeout = replay_timeout
        self._warn = RateLimitedLog(log)
        self._received = metrics.batches_received.labels(str(spec.dp_rank))
        self._libzmq_subscribed = False
        self._libzmq_peers = 0
        self._libzmq_attachments = 0
        self._subscriber: Subscriber | None = None
        self.sequencer = Sequencer(
            spec.dp_rank, sink, metrics, request_replay=self._start_replay if spec.replay else None,
            budget=budget, replay_cooldown=replay_cooldown, name=self.name)
        self._watcher: asyncio.Task[None] | None = None
        self._failed: asyncio.Future[None] | None = None  # set while run() reads
        self._tasks: set[asyncio.Task[None]] = set()  # resume and replay
        rank = str(spec.dp_rank)
        metrics.vllm_attached.labels(rank).set_function(lambda: 1 if self.ever_attached else 0)
        metrics.vllm_publishers.labels(rank).set_function(lambda: self.peers)

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

    @property
    def ever_attached(self) -> bool:
        """Whether a vLLM publisher has attached since the relay started."""
        if self._subscriber is not None:
            return self._subscriber.attachments > 0
        return self._libzmq_attachments > 0

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
            max_message=self._max_batch_bytes, heartbeat=self._heartbeat, refused=self._refused,
            went_away=self.sequencer.publisher_lost)
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

    def _refused(self, size: int) -> None:
        """A message skipped unread for its size; it goes on in line as `REFUSED`, to be
        counted as dropped (`too_large`) and announced where batches are decoded."""
        self._warn.warning("too_large", "dropped a message of %d bytes from %s unread: above "
                           "--max-batch-bytes (%d)", size, self.name, self._max_batch_bytes)

    def _take(self, messages: Messages) -> None:
        """Sequence-check and hand on messages just read (either engine)."""
        failed = self._failed
        if failed is None or failed.done():
            return
        turn = self._turn
        if turn is not None:
            turn[0]()
        try:
            now = time.time()
            offer = self.sequencer.offer_message
            self._received.inc(sum([offer(frames, now) for frames in messages]))
        except Exception as exc:  # a callback's exception would only be logged: end run()
            failed.set_exception(exc)
        finally:
            if turn is not None:
                turn[1]()

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
        return self.sequencer.discard_held()

    async def _open(self) -> zmq.asyncio.Socket:
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, RCVHWM)
        sock.setsockopt(zmq.LINGER, 0)
        # A larger frame makes libzmq drop the connection unread (a gap, once reconnected).
        sock.setsockopt(zmq.MAXMSGSIZE, self._max_batch_bytes)
        sock.setsockopt(zmq.SUBSCRIBE, self._topic)
        if self._heartbeat > 0:  # as the native engine: PINGs, a heartbeat to answer, a TTL
            sock.setsockopt(zmq.HEARTBEAT_IVL, round(self._heartbeat * 1000))
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, round(self._heartbeat * 1000))
            sock.setsockopt(zmq.HEARTBEAT_TTL, ping_ttl(self._heartbeat) * 100)
        self._watcher = asyncio.ensure_future(self._watch(sock, sock.get_monitor_socket()))
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

    async def _watch(self, sock: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket) -> None:
        """Say when the vLLM publisher comes and goes, and when it cannot be reached; connect
        again when libzmq would not."""
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                kind = event["event"]
                if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self._libzmq_peers += 1
                    self._libzmq_attachments += 1
                    log.info("vLLM publisher attached on %s", self.name)
                elif kind == zmq.EVENT_DISCONNECTED:
                    self._libzmq_peers = max(0, self._libzmq_peers - 1)
                    # Messages of that connection still queued may come after this: then the
                    # next one read takes the hint, and seqs go by `is_restart` alone.
                    self.sequencer.publisher_lost()
                    log.warning("vLLM publisher went away from %s (or sent a message above "
                                "--max-batch-bytes: libzmq drops the connection)", self.name)
                    if not self.spec.bind:
                        # After a protocol error (a message above ZMQ_MAXMSGSIZE is one)
                        # libzmq gives the endpoint up for good; after any other loss it would
                        # connect again itself. A new connection either way.
                        with contextlib.suppress(zmq.ZMQError):
                            sock.disconnect(self.spec.endpoint)
                        sock.connect(self.spec.endpoint)
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

    # -- resume and replay ---------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self.sequencer.epoch

    @property
    def expected(self) -> int | None:
        """The next seq expected from this publisher (None: nothing known yet)."""
        return self.sequencer.expected

    async def _resume(self, resume: Awaitable[ResumePoint | None]) -> None:
        self.sequencer.resume(await resume)

    def _start_replay(self, start: int) -> None:
        self._spawn(self._replay(start))

    async def _replay(self, start: int) -> None:
        """Ask vLLM for every batch from `start`; the sequencer merges them with those held."""
        self._metrics.replays.labels("requested").inc()
        log.debug("asking vLLM's replay socket %s for the batches from seq %d (%s)",
                  self.spec.replay, start, self.name)
        try:
            replies = await self._request_replay(start)
        except Exception as exc:  # timeout, garbage, or a socket error: all fall back to resync
            self._metrics.replays.labels("failed").inc()
            log.warning("replay from seq %d on %s failed (%s); emitting resync instead",
                        start, self.spec.replay, exc or "timed out")
            self.sequencer.replay_failed(start, time.time())
            return
        self._received.inc(len(replies))  # read from vLLM as live batches are
        # vLLM holds a bounded history; it may no longer have `start`.
        partial = bool(replies) and replies[0][0] > start
        self._metrics.replays.labels("partial" if partial else "succeeded").inc()
        log.info("vLLM replayed %d batches from seq %d on %s%s", len(replies), start,
                 self.name, " (it no longer held the first)" if partial else "")
        self.sequencer.replayed(start, replies, time.time())

    async def _request_replay(self, start: int) -> list[tuple[int, bytes]]:
        assert self.spec.replay is not None
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # A reply above the bound makes libzmq drop the connection unread; the monitor says so
        # at once, rather than after the timeout.
        sock.setsockopt(zmq.MAXMSGSIZE, self._max_batch_bytes)
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        poller = zmq.asyncio.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        replies: list[tuple[int, bytes]] = []
        try:
            sock.connect(self.spec.replay)
            await sock.send_multipart([b"", start.to_bytes(8, "big")])
            deadline = time.monotonic() + 10 * self._replay_timeout
            while True:
                wait = min(self._replay_timeout, deadline - time.monotonic())
                ready = dict(await poller.poll(timeout=int(wait * 1000))) if wait > 0 else {}
                if sock not in ready:
                    if monitor in ready:
                        after = f"seq {replies[-1][0]}" if replies else "none"
                        raise ReplayCut(
                            f"the connection closed mid-replay (last reply: {after}): a reply "
                            f"above --max-batch-bytes ({self._max_batch_bytes}), which libzmq "
                            "drops unread, or vLLM went away")
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
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
