"""The bounded buffer between ingest and publish, and the one place losses past ingest go.

ZMQ cannot be paused without vLLM dropping on its side, so the relay keeps reading while NATS is
slow or away, up to a bound in batches and in bytes: the one `Budget` of everything ingest
holds, shared with the batches the sequencers hold during a resume or a replay. Past the bound
the oldest batch goes.

Every batch lost after ingest handed it on (overflow here; malformed, too large, refused or out
of order in a publisher) goes through `lose`: counted as dropped by its reason, and announced
with the next batch of its (instance, dp_rank) as a `resync` range. Announcements are counted
when a batch takes them on (`pop`, `claim`). Ingest announces what it finds missing in vLLM's
own stream in-band, on the batch after the hole.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Sequence

from kvrelay.ingest.budget import Budget
from kvrelay.ingest.sequencer import Frame
from kvrelay.ratelimit import RateLimitedLog
from kvrelay.system.metrics import Metrics
from kvrelay.wire.schema import Resync, ResyncReason

log = logging.getLogger("kvrelay.buffer")


def merge_resyncs(owed: Iterable[Resync], new: Iterable[Resync]) -> tuple[Resync, ...]:
    """Resyncs owed to consumers, with a run of the same reason folded into one range.

    Announcements pile up while nothing can be sent; folding keeps them (and the batch that
    finally carries them) small however long that lasts.
    """
    merged: list[Resync] = list(owed)
    for resync in new:
        last = merged[-1] if merged else None
        if (last is not None and last.reason == resync.reason
                and isinstance(last.missed_from, int) and isinstance(resync.missed_to, int)):
            merged[-1] = Resync(resync.reason, last.missed_from, resync.missed_to)
        elif last is None or last != resync:
            merged.append(resync)
    return tuple(merged)


class Buffer:
    """FIFO of Frames, charged to `budget`: past its bound the oldest batch held goes."""

    def __init__(self, budget: Budget, metrics: Metrics) -> None:
        self._budget = budget
        self._metrics = metrics
        self._frames: deque[Frame] = deque()
        self._bytes = 0
        # dp_rank -> resyncs owed to consumers, announced with the next frame of that rank.
        self._owed: dict[int, tuple[Resync, ...]] = {}
        self._log = RateLimitedLog(log)
        # Read at scrape time: right while nothing is published, and free on the hot path.
        # Everything ingest holds: the buffer and the batches held while the stream's resume
        # point (NATS away at start) or a replay is awaited.
        metrics.buffer_batches.set_function(lambda: budget.batches)
        metrics.buffer_bytes.set_function(lambda: budget.nbytes)
        budget.join(self)

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def put(self, frame: Frame) -> None:
        self._frames.append(frame)
        size = len(frame.payload)
        self._bytes += size
        self._budget.charge(size)

    def lose(self, reason: str, dp_rank: int, seqs: Sequence[int], events: int = 0,
             carried: tuple[Resync, ...] = ()) -> None:
        """Batches `seqs` of `dp_rank` will not be delivered: count them as dropped for
        `reason`, and have the rank's next frame announce them (`overflow` for the buffer's own
        drops, `gap` for any other), after the resyncs they `carried` themselves."""
        self._metrics.drop(reason, len(seqs), events)
        kind: ResyncReason = "overflow" if reason == "overflow" else "gap"
        self._owe(dp_rank, (*carried, *(Resync(kind, seq, seq) for seq in seqs)))

    def _owe(self, dp_rank: int, resyncs: Iterable[Resync]) -> None:
        """Have the next frame of `dp_rank` announce `resyncs` (a loss it comes after)."""
        self._owed[dp_rank] = merge_resyncs(self._owed.get(dp_rank, ()), resyncs)

    def owes(self, dp_rank: int) -> bool:
        """Whether the next frame of `dp_rank` has resyncs to carry (it must come through
        `pop`)."""
        return dp_rank in self._owed

    def pop(self) -> Frame:
        """The oldest frame, with the resyncs owed to its rank prepended."""
        frame = self._frames.popleft()
        size = len(frame.payload)
        self._bytes -= size
        self._budget.release(1, size)
        if frame.dp_rank not in self._owed:
            return frame
        return frame.announcing(self.claim(frame.dp_rank))

    def pop_upto(self, limit: int) -> list[Frame]:
        """The oldest frames, at most `limit`, each as `pop` gives it."""
        return [self.pop() for _ in range(min(limit, len(self._frames)))]

    def restore(self, frames: list[Frame]) -> None:
        """Frames popped and not sent after all, back at the front in their order (with the
        resyncs they claimed)."""
        self._frames.extendleft(reversed(frames))
        for frame in frames:
            size = len(frame.payload)
            self._bytes += size
            self._budget.charge(size)

    def claim(self, dp_rank: int) -> tuple[Resync, ...]:
        """The resyncs owed to `dp_rank`, handed to a caller that announces them now."""
        owed = self._owed.pop(dp_rank, ())
        for resync in owed:
            self._metrics.resyncs.labels(resync.reason).inc()
            self._log.info("resync:" + resync.reason, "announcing resync (%s, seqs %s..%s "
                           "lost after ingest) on dp_rank %d", resync.reason,
                           resync.missed_from, resync.missed_to, dp_rank)
        return owed

    def drain_all(self) -> list[Frame]:
        """Everything left, for counting at shutdown."""
        frames = list(self._frames)
        self._frames.clear()
        self._budget.release(len(frames), self._bytes)
        self._bytes = 0
        return frames

    def oldest(self) -> float | None:
        """When the oldest frame was read (None: empty); for the budget."""
        return self._frames[0].recv_ts if self._frames else None

    def drop_oldest(self) -> None:
        """The budget is over and this frame is the oldest held: dropped as `overflow`."""
        frame = self._frames.popleft()
        size = len(frame.payload)
        self._bytes -= size
        self._budget.release(1, size)
        # What the dropped frame had to announce, then its own loss; a run of drops folds
        # into one `overflow` range, and a restart among them breaks the run as it should.
        self.lose("overflow", frame.dp_rank, (frame.seq,), carried=frame.resyncs)
