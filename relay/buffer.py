"""The bounded buffer between ingest and publish.

ZMQ cannot be paused without vLLM dropping on its side, so the relay keeps reading while NATS is
slow or away, up to a bound in batches and in bytes. Past the bound the oldest batch goes, is
counted, and the next batch of its (instance, dp_rank) carries a `resync` for what went.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable

from relay.ingest import Frame
from relay.metrics import Metrics
from relay.schema import Resync


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
    """FIFO of Frames, drop-oldest past `max_batches` or `max_bytes`."""

    def __init__(self, max_batches: int, max_bytes: int, metrics: Metrics) -> None:
        self.max_batches = max_batches
        self.max_bytes = max_bytes
        self._metrics = metrics
        self._frames: deque[Frame] = deque()
        self._bytes = 0
        # dp_rank -> (epoch, first seq dropped, last seq dropped, resyncs the dropped carried),
        # all announced with the next frame of that rank.
        self._dropped: dict[int, tuple[int, int, int, tuple[Resync, ...]]] = {}
        self.readable = asyncio.Event()

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def put(self, frame: Frame) -> None:
        self._frames.append(frame)
        self._bytes += len(frame.payload)
        while len(self._frames) > self.max_batches or (
            self._bytes > self.max_bytes and len(self._frames) > 1
        ):
            self._drop_oldest()
        self.readable.set()

    def pop(self) -> Frame:
        """The oldest frame, with a `resync` prepended if batches of its rank were dropped."""
        frame = self._frames.popleft()
        self._bytes -= len(frame.payload)
        if not self._frames:
            self.readable.clear()
        dropped = self._dropped.pop(frame.dp_rank, None)
        if dropped is None:
            return frame
        _, first, last, carried = dropped
        self._metrics.resyncs.labels("overflow").inc()
        resyncs = (*carried, Resync("overflow", first, last), *frame.resyncs)
        return frame._replace(resyncs=resyncs)

    def drain_all(self) -> list[Frame]:
        """Everything left, for counting at shutdown."""
        frames = list(self._frames)
        self._frames.clear()
        self._bytes = 0
        self.readable.clear()
        return frames

    def _drop_oldest(self) -> None:
        frame = self._frames.popleft()
        self._bytes -= len(frame.payload)
        self._metrics.drop("overflow", 1)
        previous = self._dropped.get(frame.dp_rank)
        first, carried = frame.seq, frame.resyncs
        if previous is not None:
            carried = merge_resyncs(previous[3], frame.resyncs)
            if previous[0] == frame.epoch:
                first = previous[1]
        self._dropped[frame.dp_rank] = (frame.epoch, first, frame.seq, carried)
