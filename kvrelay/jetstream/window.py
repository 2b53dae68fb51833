"""The JetStream publisher's window: publishes awaiting their ack, as pure bookkeeping.

No I/O: the publisher sends, reads acks and reads the stream; the window keeps what is in
flight, what each subject has stored, and the order in which batches settle. Acks can come out
of order after a failure, so per subject the sent batches stay in send order until they and all
before them are settled (stored or dropped); `settled_at` is the stream sequence of the last one
stored in that order, so an unsettled batch, if stored, lies after it: where recovery starts
reading the stream. Stored batches are reported to `on_stored` once each, in stream order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from kvrelay.ingest.sequencer import Frame
from kvrelay.wire.schema import ResumePoint, Resync

OnStored = Callable[[int, bytes, int], None]
"""`on_stored(dp_rank, payload, stream_seq)`: JetStream stored the batch `payload` at
`stream_seq`."""


class Pending:
    """One message in the window: a batch, or a pack of consecutive batches of one subject and
    epoch (`seqs`, the last one's frame given), with the resyncs its batches carry (`resyncs`:
    announced again if the message is dropped)."""

    __slots__ = ("dp_rank", "epoch", "events", "kept", "msg_id", "payload", "resyncs",
                 "sent_at", "seq", "seqs", "stored_at", "subject", "token", "ts")

    def __init__(self, frame: Frame, subject: str, msg_id: str, payload: bytes,
                 ts: float, events: int, token: int, seqs: tuple[int, ...] = (),
                 resyncs: tuple[Resync, ...] = ()) -> None:
        self.kept = b""  # the payload once stored, until on_stored hears of it
        self.token = token
        self.stored_at = 0  # stream sequence once JetStream stored it
        self.dp_rank = frame.dp_rank
        self.epoch = frame.epoch
        self.seq = frame.seq  # the last batch's
        self.seqs = seqs or (frame.seq,)
        self.resyncs = resyncs
        self.subject = subject
        self.msg_id = msg_id
        self.payload = payload
        self.ts = ts
        self.events = events
        self.sent_at = 0.0


class Window:
    """Publishes awaiting JetStream's ack, by token (the reply subject's last token)."""

    def __init__(self, on_stored: OnStored | None = None) -> None:
        self._entries: dict[int, Pending] = {}
        self._acked_at: dict[str, int] = {}  # latest stream seq known stored (ack or resume)
        self._unsettled: dict[str, deque[Pending]] = {}
        self._settled_at: dict[str, int] = {}
        self._on_stored = on_stored
        self._next_token = 0
        self.nbytes = 0  # payload bytes in flight

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def batches(self) -> int:
        """Batches in flight (a pack counts all its own)."""
        return sum(len(p.seqs) for p in self._entries.values())

    def __contains__(self, token: int) -> bool:
        return token in self._entries

    def get(self, token: int) -> Pending | None:
        return self._entries.get(token)

    def oldest(self) -> Pending | None:
        return next(iter(self._entries.values()), None)

    def pending(self) -> list[tuple[int, Pending]]:
        """What is in flight, in send order (a copy)."""
        return list(self._entries.items())

    def acked_at(self, subject: str) -> int:
        """The stream sequence of the latest message known stored on `subject` (0: none)."""
        return self._acked_at.get(subject, 0)

    def settled_at(self, subject: str) -> int:
        """The stream sequence of the last batch stored with none unsettled before it."""
        return self._settled_at.get(subject, 0)

    def resumed(self, subject: str, stream_seq: int) -> None:
        """The stream already holds `subject` up to `stream_seq` (read at start-up)."""
        self._acked_at[subject] = max(stream_seq, self.acked_at(subject))
        self._settled_at[subject] = max(stream_seq, self.settled_at(subject))

    def last_is(self, subject: str, stream_seq: int) -> None:
        """The stream says its last message on `subject` is `stream_seq` (0: none)."""
        self._acked_at[subject] = stream_seq

    def add(self, frame: Frame, subject: str, msg_id: str, payload: bytes, ts: float,
            events: int, seqs: tuple[int, ...] = (),
            resyncs: tuple[Resync, ...] = ()) -> tuple[int, Pending]:
        """A message sent: `frame`'s batch, or the pack of `seqs` ending with it, carrying
        `resyncs`."""
        token = self._next_token
        self._next_token += 1
        pending = Pending(frame, subject, msg_id, payload, ts, events, token, seqs, resyncs)
        self._entries[token] = pending
        self.nbytes += len(payload)
        self._unsettled.setdefault(subject, deque()).append(pending)
        return token, pending

    def stored(self, token: int, stream_seq: int) -> Pending | None:
        """JetStream stored the batch at `stream_seq` (its ack); None if it had already left
        the window (an earlier attempt's ack came first)."""
        pending = self._entries.pop(token, None)
        if pending is None:
            return None
        self.nbytes -= len(pending.payload)
        if stream_seq > self.acked_at(pending.subject):
            self._acked_at[pending.subject] = stream_seq
        self._mark_stored(pending, stream_seq)
        return pending

    def dropped(self, token: int) -> Pending | None:
        """The batch leaves the window unstored (refused, too large, out of order)."""
        pending = self._entries.pop(token, None)
        if pending is not None:
            self.nbytes -= len(pending.payload)
            self._settle_in_order(pending.subject)
        return pending

    def found(self, subject: str, messages: Iterable[tuple[int, ResumePoint | None]]
              ) -> tuple[list[Pending], list[Pending]]:
        """What the stream holds on `subject` after `settled_at`, in order, as (stream seq,
        the point of the message's last batch, or None when not one of ours), settles the
        window: returns the messages found stored, and those that can no longer be stored in
        order (older than one found stored), which leave the window."""
        waiting = {(p.epoch, p.seq): t for t, p in self._entries.items() if p.subject == subject}
        last = self.acked_at(subject)
        newest: tuple[int, int] | None = None
        stored: list[Pending] = []
        for stream_seq, point in messages:
            last = max(last, stream_seq)
            if point is None:
                continue
            newest = (point.epoch, point.seq)
            token = waiting.get(newest)
            pending = self._entries.pop(token, None) if token is not None else None
            if pending is not None:
                self.nbytes -= len(pending.payload)
                self._mark_stored(pending, stream_seq)
                stored.append(pending)
        self._acked_at[subject] = last
        late: list[Pending] = []
        if newest is not None:
            for key, token in waiting.items():
                if key < newest and (pending := self._entries.pop(token, None)) is not None:
                    self.nbytes -= len(pending.payload)
                    late.append(pending)
            self._settle_in_order(subject)
        return stored, late

    def clear(self) -> tuple[int, int]:
        """Empty the window (shutdown); returns the batches and events it held."""
        batches, events = self.batches, sum(p.events for p in self._entries.values())
        self._entries.clear()
        self.nbytes = 0
        for subject in self._unsettled:
            self._settle_in_order(subject)
        return batches, events

    def _mark_stored(self, pending: Pending, stream_seq: int) -> None:
        pending.stored_at = stream_seq
        if self._on_stored is not None:
            pending.kept = pending.payload
        pending.payload = b""  # out of the window: never sent again
        self._settle_in_order(pending.subject)

    def _settle_in_order(self, subject: str) -> None:
        """Pass over the subject's batches settled with none unsettled before them; report
        the stored ones to on_stored."""
        queue = self._unsettled.get(subject)
        entries, report = self._entries, self._on_stored
        while queue and (queue[0].stored_at or queue[0].token not in entries):
            pending = queue.popleft()
            if pending.stored_at:
                if pending.stored_at > self.settled_at(subject):
                    self._settled_at[subject] = pending.stored_at
                if report is not None:
                    report(pending.dp_rank, pending.kept, pending.stored_at)
                    pending.kept = b""
