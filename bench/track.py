"""The consumer's check of one publisher: where its sequence stands and what arrived.

A publisher sends its pool's batches in order: the pool's prefix once (the warm-up's pre-fill
with --live-blocks, none otherwise), then the rest in a cycle, for ever. Every event received
is matched to its global position in that sequence, by the batch seq the output carries or, when
it carries none, by content (the next position holding that fingerprint), so events lost,
repeated or out of order are counted, not guessed from totals. Lag is measured per batch, from
the time the feeder stamped it with (shared memory, indexed by seq) to the receipt of its last
event.
"""

from __future__ import annotations

from array import array

from bench.workload import WARM_BATCHES, Fingerprint


class Track:
    """One publisher (worker, dp_rank): where its sequence stands and what arrived."""

    def __init__(self, index: int, fingerprints: list[list[Fingerprint]], ts: memoryview[float],
                 capacity: int, lags: array[float], prefix: int = 0) -> None:
        if not 0 <= prefix < len(fingerprints):
            raise ValueError(f"a prefix of {prefix} batches leaves no cycle of "
                             f"{len(fingerprints)}")
        self.index = index
        self._flat: list[Fingerprint] = []
        self._last_of: list[int] = []  # pool batch index when the event ends its batch, else -1
        self._start: list[int] = []  # flat position of each pool batch's first event
        for b, fps in enumerate(fingerprints):
            self._start.append(len(self._flat))
            self._flat.extend(fps)
            self._last_of.extend([-1] * (len(fps) - 1) + [b])
        self._where: dict[Fingerprint, list[int]] = {}
        for pos, fp in enumerate(self._flat):
            self._where.setdefault(fp, []).append(pos)
        self._prefix = prefix  # batches sent once before the cycle
        self._prefix_events = self._start[prefix]
        self._cycle = len(self._flat) - self._prefix_events  # events in one cycle
        self._batches = len(fingerprints) - prefix  # batches in one cycle
        self.warm = prefix or WARM_BATCHES  # batches sent before the timed phase
        self._ts = ts
        self._base = index * capacity
        self._capacity = capacity
        self.untimed = 0  # batches past what the feeder stamped (a content match far ahead)
        self._lags = lags
        self.next = 0  # global position of the next expected event
        self.matched = 0
        self.batches = 0  # batches whose last event arrived
        self.timed_events = 0
        self.duplicates = 0
        self.corrupt = 0
        self.out_of_order = 0
        self.last_key: tuple[int, int] | None = None

    def _flat_index(self, at: int) -> int:
        """Where global position `at` sits in the pool's events."""
        if at < self._prefix_events:
            return at
        return self._prefix_events + (at - self._prefix_events) % self._cycle

    def position(self, seq: int, index: int = 0) -> int:
        """Global position of event `index` of batch `seq`."""
        if seq < self._prefix:
            return self._start[seq] + index
        cycles, b = divmod(seq - self._prefix, self._batches)
        return cycles * self._cycle + self._start[self._prefix + b] + index

    def _seq(self, at: int, pool_batch: int) -> int:
        """The seq of the batch pool batch `pool_batch` is when sent at global position `at`."""
        if pool_batch < self._prefix:
            return pool_batch
        cycles = (at - self._prefix_events) // self._cycle
        return cycles * self._batches + pool_batch

    def order(self, key: tuple[int, int], expected: tuple[int, int],
              announced: bool = False) -> None:
        """Count an order key (seq or event id) that does not follow the previous one. After a
        loss the output announces (a resync), a jump forward is in order."""
        if self.last_key is not None and key != expected and not (
                announced and key > self.last_key):
            self.out_of_order += 1
        self.last_key = key

    def event(self, fp: Fingerprint, now: float, at: int | None = None) -> None:
        """An event arrived: at global position `at` if the output says, else found by content."""
        if at is None:
            at = self._find(fp)
            if at is None:
                self.duplicates += 1
                return
        if at < self.next:
            self.duplicates += 1
            return
        i = self._flat_index(at)
        if self._flat[i] != fp:
            self.corrupt += 1
            return
        self.next = at + 1
        self.matched += 1
        pool_batch = self._last_of[i]
        if pool_batch < 0:
            return
        self.batches += 1
        b = self._seq(at, pool_batch)
        if b >= self._capacity:
            self.untimed += 1
        elif b >= self.warm:
            sent = self._ts[self._base + b]
            if sent > 0.0:
                self._lags.append(now - sent)
            else:  # matched to a batch the feeder has not sent: no send time to time it by
                self.untimed += 1

    def expects(self, fp: Fingerprint) -> bool:
        """Whether `fp` is the event that comes next."""
        return self._flat[self._flat_index(self.next)] == fp

    def _find(self, fp: Fingerprint) -> int | None:
        """The first global position from `next` on that holds `fp`, or None."""
        best: int | None = None
        pe = self._prefix_events
        for p in self._where.get(fp, ()):
            if p < pe:  # in the prefix: sent once
                at = p if p >= self.next else None
            elif self.next <= p:
                at = p
            else:
                at = self.next + (p - self._flat_index(self.next)) % self._cycle
            if at is not None and (best is None or at < best):
                best = at
        return best
