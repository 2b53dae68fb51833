"""The sequence of one vLLM publisher: batches in, in-order Frames out, with what was lost.

Pure logic, no I/O: the Source reads sockets and runs replays; the Sequencer decides what each
batch means (next in line, a gap to replay, a duplicate, a restart), holds live batches while a
resume or a replay is under way (charged to ingest's one `Budget`, shared with the buffer), and
hands every batch on once, in order, with the `resync`s a consumer must see before it. Every
drop it makes is counted.

A seq below the one expected is a restart or a duplicate (`is_restart`). vLLM's publisher
counts from 0 again when the engine restarts, and the relay, reading all along, sees the new
publisher's first batches within moments: a restart's seq is small against what was passed. A
duplicate (a batch sent again, or a second publisher repeating the stream) sits just behind
what was passed. So seq 0 is a restart, and so is a seq below half of the one expected; any
other seq already passed is a duplicate: dropped, counted, and logged, with no new epoch and no
resync. The first batch read since this relay started, or since the publisher's connection went
away, is a restart whenever it is below the one expected: a duplicate repeats a batch read over
the same connection, and a restarted engine may be well into its count by the time the relay
has connected again (the relay was down, or its reconnection backed off).

A replay's answer and the live batches travel on two sockets, so live copies of what a replay
just delivered can be read after it, however fresh the connection: a live batch repeating,
byte for byte, one the last replay delivered is a duplicate whatever its seq (vLLM's ROUTER sends
the very bytes its PUB sent; a restarted engine's batches carry new timestamps).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from kvrelay.codec import count_events
from kvrelay.ingest.budget import Budget
from kvrelay.ratelimit import RateLimitedLog
from kvrelay.system.metrics import Metrics
from kvrelay.wire.schema import ResumePoint, Resync, ResyncReason

log = logging.getLogger("kvrelay.ingest")


class Frame:
    """One vLLM batch, in order, ready for the codec.

    A plain class rather than a NamedTuple: one is made per batch, and a NamedTuple is made by
    interpreted code even in the compiled build.
    """

    __slots__ = ("counted", "dp_rank", "epoch", "payload", "recv_ts", "resyncs", "seq")

    def __init__(self, dp_rank: int, epoch: int, seq: int, payload: bytes, recv_ts: float,
                 resyncs: tuple[Resync, ...], counted: bool = False) -> None:
        self.dp_rank = dp_rank
        self.epoch = epoch
        self.seq = seq
        self.payload = payload
        self.recv_ts = recv_ts
        self.resyncs = resyncs
        self.counted = counted  # its events are in events_received already (it was held)

    def announcing(self, resyncs: tuple[Resync, ...]) -> Frame:
        """This batch with `resyncs` to announce before its own."""
        return Frame(self.dp_rank, self.epoch, self.seq, self.payload, self.recv_ts,
                     (*resyncs, *self.resyncs), self.counted)

    def __repr__(self) -> str:
        return (f"Frame(dp_rank={self.dp_rank}, epoch={self.epoch}, seq={self.seq}, "
                f"payload=<{len(self.payload)} bytes>, recv_ts={self.recv_ts}, "
                f"resyncs={self.resyncs!r}, counted={self.counted})")


Sink = Callable[[Frame], None]
ReplayRequest = Callable[[int], None]  # start a replay from this seq; answer with `replayed`


def is_restart(seq: int, expected: int) -> bool:
    """Whether `seq`, below the `expected` one, comes from a restarted engine (it counts from 0
    again, and is seen within moments) rather than repeating one just passed: seq 0, or a seq
    far below, under half of `expected`."""
    return seq == 0 or seq < expected // 2


def _missed(resync: Resync) -> str:
    """The range a resync says is missing, for logs."""
    if isinstance(resync.missed_from, int) and isinstance(resync.missed_to, int):
        return f", seqs {resync.missed_from}..{resync.missed_to} missed"
    return ""


class Sequencer:
    """One publisher's (epoch, seq) bookkeeping. Starts holding: nothing is handed on before
    `resume` says where the stream left off."""

    def __init__(self, dp_rank: int, sink: Sink, metrics: Metrics, *,
                 request_replay: ReplayRequest | None = None, budget: Budget | None = None,
                 replay_cooldown: float = 5.0,
                 name: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        """`request_replay` None: there is no replay socket, gaps are announced at once.
        `budget`: what held batches are charged to (None: one of their own, at the defaults of
        --buffer-batches and --buffer-bytes)."""
        self.dp_rank = dp_rank
        self.name = name or f"dp_rank {dp_rank}"
        self._sink = sink
        self._metrics = metrics
        self._request_replay = request_replay
        self._budget = budget if budget is not None else Budget(50_000, 64 << 20)
        self._replay_cooldown = replay_cooldown
        self._clock = clock
        self._warn = RateLimitedLog(log)
        # The next seq expected in `epoch` (None: nothing known yet), and a reason to announce
        # with the next batch even when no seq is missing.
        self.epoch = 0
        self.expected: int | None = None
        self._announce: ResyncReason | None = None
        self._emitted = False
        # Nothing read from the publisher since this relay started or since its connection
        # went away: a seq below the one expected is a restart, never a duplicate.
        self._fresh = True
        self._gap_counted_at: int | None = None  # a gap re-seen after a failed replay is one gap
        # The batch whose gap the replay under way was asked for: if the replay's answer does not
        # reach it, vLLM no longer holds what is missing (or a restarted engine answered), and the
        # gap is announced rather than asked for again.
        self._replay_for: int | None = None
        # While resuming or replaying, live batches wait here (charged to the budget: past it
        # the oldest dropped; the highest seq dropped so the hole is announced as `overflow`).
        self._holding = True
        # (seq, payload, read at, events in it): counted as received when held.
        self._held: deque[tuple[int, bytes, float, int]] = deque()
        self._held_bytes = 0
        self._overflow_upto: int | None = None
        self._cooldown_until = 0.0
        # seq -> payload of what the last replay delivered, for live copies read after it.
        self._replayed: dict[int, bytes] = {}
        self._budget.join(self)

    @property
    def holding(self) -> bool:
        """Live batches wait: a resume or a replay is under way."""
        return self._holding

    @property
    def held(self) -> int:
        """Live batches waiting."""
        return len(self._held)

    # -- live batches --------------------------------------------------------------------------

    def offer_message(self, frames: list[bytes], now: float) -> bool:
        """One ZMQ message as vLLM sends it ([topic, seq, payload]); False (counted, logged)
        if it is not one."""
        if len(frames) != 3:
            self._malformed("frame_count", f"{len(frames)} frames, expected 3")
            return False
        raw_seq = frames[1]
        if len(raw_seq) != 8:
            self._malformed("seq_length", f"seq of {len(raw_seq)} bytes, expected 8")
            return False
        seq = int.from_bytes(raw_seq, "big")
        if seq == self.expected and self._announce is None and self._overflow_upto is None \
                and not self._holding and not self._fresh:
            # The steady state, what `offer` would conclude: next in line.
            self.expected = seq + 1
            self._emitted = True
            self._sink(Frame(self.dp_rank, self.epoch, seq, frames[2], now, ()))
            return True
        self.offer(seq, frames[2], now)
        return True

    def publisher_lost(self) -> None:
        """The publisher's connection went away: the next batch read may be a restarted
        engine's, however far it has counted."""
        self._fresh = True

    def offer(self, seq: int, payload: bytes, now: float) -> None:
        """A live batch: handed on, held, or held while a replay fills what is missing."""
        if self._holding:
            self._hold(seq, payload, now)
        else:
            self._accept(seq, payload, now)

    def _malformed(self, kind: str, detail: str) -> None:
        self._metrics.decode_errors.labels(kind).inc()
        self._warn.warning(kind, "dropped a malformed message from %s: %s", self.name, detail)

    def _hold(self, seq: int, payload: bytes, now: float, events: int | None = None) -> None:
        """Keep a batch until the resume or the replay is done; its events count as received
        now (`events` None), so they show while NATS is away at start."""
        if events is None:
            events = count_events(payload)
            self._metrics.events_received.inc(events)
        self._held.append((seq, payload, now, events))
        self._held_bytes += len(payload)
        self._budget.charge(len(payload))

    def oldest(self) -> float | None:
        """When the oldest batch held was read (None: none held); for the budget."""
        return self._held[0][2] if self._held else None

    def drop_oldest(self) -> None:
        """The budget is over and the oldest batch held is the oldest of ingest: dropped, and
        announced as `overflow` with the next batch handed on."""
        dropped, dropped_payload, _, events = self._held.popleft()
        self._held_bytes -= len(dropped_payload)
        self._budget.release(1, len(dropped_payload))
        self._overflow_upto = max(dropped, self._overflow_upto or dropped)
        self._metrics.drop("overflow", 1, events)

    def _accept(self, seq: int, payload: bytes, now: float, held: int | None = None) -> None:
        """Pass a batch on, drop it as a duplicate, or start a replay for what is missing
        before it."""
        expected = self.expected
        fresh, self._fresh = self._fresh, False
        if expected is not None and seq < expected:
            if self._replayed.get(seq) == payload:
                self._duplicate(seq, expected)  # a live copy of a batch the replay delivered
                return
            if not fresh and not is_restart(seq, expected):
                self._duplicate(seq, expected)
                return
            self._metrics.restarts.inc()
            log.warning("vLLM on %s restarted (seq %d after %d): epoch %d begins",
                        self.name, seq, expected - 1, self.epoch + 1)
            self.epoch += 1
            self.expected = 0
            self._announce = "restart"
            self._gap_counted_at = None  # a seq of the last epoch: a gap now is a new one
        missing_from = 0 if self.expected is None else self.expected
        if seq > missing_from:
            if (self._announce is None and self.expected is not None
                    and self._gap_counted_at != missing_from):
                self._gap_counted_at = missing_from
                self._metrics.gaps.inc()
            asked, self._replay_for = self._replay_for == seq, None
            if (self._request_replay is not None and not asked
                    and self._clock() >= self._cooldown_until):
                self._holding = True
                self._replay_for = seq
                self._hold(seq, payload, now, held)
                self._request_replay(missing_from)
                return
        self._emit(seq, payload, now, held is not None)

    def _duplicate(self, seq: int, expected: int) -> None:
        """A batch repeating a seq already passed (not a restart): dropped, counted, logged."""
        self._metrics.drop("duplicate", 1)
        self._warn.warning("duplicate", "dropped a batch from %s repeating seq %d (expected "
                           "%d): a duplicate, not a restart", self.name, seq, expected)

    def _emit(self, seq: int, payload: bytes, now: float, counted: bool = False) -> None:
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
            self._warn.info("resync:" + resync.reason, "announcing resync (%s%s) on %s before "
                            "seq %d", resync.reason, _missed(resync), self.name, seq)
        if self._overflow_upto is not None and seq > self._overflow_upto:
            self._overflow_upto = None
        self._announce = None
        self._emitted = True
        self.expected = seq + 1
        self._sink(Frame(self.dp_rank, self.epoch, seq, payload, now, tuple(resyncs), counted))

    # -- resume and replay ---------------------------------------------------------------------

    def resume(self, point: ResumePoint | None) -> None:
        """Where the stream left off (None: nothing published yet). With a replay socket the
        Sequencer asks for everything after it; otherwise what was held goes on."""
        if point is not None:
            self.epoch, self.expected = point.epoch, point.seq + 1
            log.info("%s resumes after epoch %d seq %d", self.name, point.epoch, point.seq)
        if self._request_replay is not None:
            self._request_replay(0 if self.expected is None else self.expected)
        else:
            self._release_held(replayed_from=None)

    def replayed(self, start: int, replies: list[tuple[int, bytes]], now: float) -> None:
        """What a replay from `start` returned, in seq order, then the live batches held.

        A replay answers from `start` up, so a reply below what was passed is a duplicate, never
        a restart."""
        delivered: dict[int, bytes] = {}
        for seq, payload in replies:
            if self.expected is not None and seq < self.expected:
                self._duplicate(seq, self.expected)
            elif seq >= start:
                self._emit(seq, payload, now)
                delivered[seq] = payload
        self._replayed = delivered
        self._release_held(replayed_from=start)

    def replay_failed(self, start: int, now: float) -> None:
        """The replay from `start` failed: no replay is tried for a while; what is missing is
        announced instead."""
        self._cooldown_until = self._clock() + self._replay_cooldown
        self.replayed(start, [], now)

    def _release_held(self, replayed_from: int | None) -> None:
        """Hand on the live batches held, in the order they came, each checked against the one
        held before it as a live batch is against the one expected (`is_restart`)."""
        held, self._held = self._held, deque()
        self._budget.release(len(held), self._held_bytes)
        self._held_bytes = 0
        self._holding = False
        previous: int | None = None
        for seq, payload, recv_ts, events in held:
            if previous is not None and seq <= previous:
                if not is_restart(seq, previous + 1):
                    self._duplicate(seq, previous + 1)
                    continue
                replayed_from = None  # vLLM restarted meanwhile: these are a new epoch's
            previous = seq
            if (replayed_from is not None and self.expected is not None
                    and replayed_from <= seq < self.expected):
                self._fresh = False  # read in line with what the replay delivered
                continue  # the replay delivered it already
            if self._holding:
                self._hold(seq, payload, recv_ts, events)
            else:
                self._accept(seq, payload, recv_ts, events)
        if not self._holding:
            self._replay_for = None

    def discard_held(self) -> int:
        """Drop what is still held (reading has stopped for good); returns how many, counted
        as dropped at shutdown."""
        lost = len(self._held)
        if lost:
            events = sum(held[3] for held in self._held)
            self._held.clear()
            self._budget.release(lost, self._held_bytes)
            self._held_bytes = 0
            self._metrics.drop("shutdown", lost, events)
        return lost
