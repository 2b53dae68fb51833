"""Publish: RelayBatches into NATS JetStream, many in flight, in order, each stored once.

The publisher owns the NATS connection. It keeps a window of publishes awaiting their JetStream
ack (core publish with a reply inbox, not one await per message). Every message carries
`Nats-Msg-Id` = instance.dp_rank.epoch.seq.

When a publish fails or its outcome is unknown (ack timeout, error, reconnect, a leader change
in a clustered stream), the window is not simply sent again: a later batch may already be stored
after an earlier one was refused, and what was stored may have left the duplicate window. The
publisher stops taking new batches, reads what the stream holds past the last batch of each
subject settled in send order, settles what is there, announces what can no longer go in order,
and resends the rest one at a time, each expecting the subject's last sequence to be its
predecessor's (`Nats-Expected-Last-Subject-Sequence`), so nothing is stored twice or out of
order. Stored batches are reported to `on_stored` once each, in their subject's stream order.

A batch alone in its loop turn is its own message. Batches of a rank in hand together (read in
one turn, or waiting in the buffer) go out packed: consecutive batches of one subject and
epoch, up to `batches_per_message`, in one message (an array of RelayBatches) with
`Nats-Msg-Id` instance.dp_rank.epoch.first-last, stored, deduplicated, settled and resent as
one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.errors

from kvrelay.codec import Codec, MalformedPayload
from kvrelay.config import NatsSettings, PublishSettings, StreamSettings
from kvrelay.ingest.buffer import Buffer
from kvrelay.ingest.sequencer import Frame
from kvrelay.jetstream.api import ApiError, PubAck
from kvrelay.jetstream.stream import (
    StreamMismatch,
    ensure_stream,
    last_published,
    last_stored,
    stored_from,
    stream_refusal,
)
from kvrelay.jetstream.window import OnStored, Pending, Window
from kvrelay.publish.base import Output
from kvrelay.publish.common import SEND_SLICE, drop_malformed, group_frames, read_frame
from kvrelay.system.metrics import Metrics
from kvrelay.wire.names import Worker
from kvrelay.wire.relaybatch import pack
from kvrelay.wire.schema import SCHEMA_VERSION, RelayBatch, ResumePoint, Resync

log = logging.getLogger("kvrelay.publish")

WRONG_LAST_SEQUENCE = 10071  # JetStream: Nats-Expected-Last-Subject-Sequence did not hold


_ACK = msgspec.json.Decoder(PubAck)

_SCHEMA = str(SCHEMA_VERSION)
_SCHEMA_HEADER = f"Kvrelay-Schema: {_SCHEMA}\r\n"
PACK_BYTES = 256 << 10  # a pack stops growing past this many payload bytes


def _headers(pending: Pending) -> dict[str, str]:
    """A batch's headers."""
    return {"Nats-Msg-Id": pending.msg_id, "Kvrelay-Schema": _SCHEMA}


class Publisher(Output):
    """Takes Frames from the Buffer, encodes them and keeps them flowing into JetStream."""

    def __init__(self, worker: Worker, nats: NatsSettings, publish: PublishSettings,
                 stream: StreamSettings, buffer: Buffer, metrics: Metrics,
                 on_stored: OnStored | None = None) -> None:
        """`on_stored(dp_rank, payload, stream_seq)` hears of every batch JetStream stored,
        once each, in the order of its subject's stream."""
        super().__init__(nats, publish, buffer, metrics, log)
        self._stream = stream
        self._instance_id = worker.instance_id
        self._codec = Codec(publish.format, metrics)
        self._worker = worker
        self._subjects: dict[int, str] = {}
        self._inbox = ""
        self._inbox_bytes = b""
        self._window = Window(on_stored)
        metrics.in_flight.set_function(self._window.__len__)  # read at scrape time
        self.stream_ready = asyncio.Event()
        self._stream_ok = False
        self._stream_problem = ""  # why the stream could not be created or verified yet

    def subject(self, dp_rank: int) -> str:
        subject = self._subjects.get(dp_rank)
        if subject is None:
            subject = self._subjects[dp_rank] = self._worker.subject(dp_rank)
        return subject

    @property
    def in_flight(self) -> int:
        return len(self._window)

    @property
    def in_flight_batches(self) -> int:
        """Batches in the window's messages."""
        return self._window.batches

    @property
    def in_flight_bytes(self) -> int:
        return self._window.nbytes

    def readiness(self) -> dict[str, str]:
        return {"stream": "ok" if self.stream_ready.is_set() else (
            self._stream_problem or f"stream {self._stream.name} not verified yet")}

    def _can_publish(self) -> bool:
        return self._stream_ok  # stream_ready, as a plain bool: asked per message

    def _unsent(self) -> bool:
        return bool(self._buffer or self._window or self._gathered)

    def _side_tasks(self) -> list[Awaitable[None]]:
        return [self._watch()]

    def _connection_lost(self) -> None:
        """Nothing to do now: the window is settled with the stream once NATS is back."""

    def _connection_back(self) -> None:
        self._schedule_retry(0.0)  # settle the window with the stream, then resend it

    # -- connection and stream -----------------------------------------------------------------

    async def connect(self, dp_ranks: list[int]) -> None:
        """Connect (retrying forever), then create or verify the stream."""
        inbox = await self._connect_nats(self._on_ack, wildcard=True)
        if inbox is None:
            return
        assert self._nc is not None
        self._inbox, self._inbox_bytes = inbox, inbox.encode()
        self.connected = True
        url = self._nc.connected_url
        # host:port only: the URL may carry a user and password.
        log.info("connected to NATS at %s:%s", url.hostname if url else "?",
                 url.port if url else "?")
        await self._ensure_stream([self.subject(rank) for rank in dp_ranks])
        self._wake.set()

    async def _ensure_stream(self, subjects: list[str]) -> None:
        assert self._nc is not None
        delay = 0.1
        while True:
            try:
                log.info("%s", await ensure_stream(self._nc.jetstream(), self._stream, subjects))
                self.stream_ready.set()
                self._stream_ok = True
                return
            except StreamMismatch as exc:
                self.last_error = str(exc)
                if not self.fatal.done():
                    self.fatal.set_result(exc)
                return
            except (nats.errors.Error, TimeoutError) as exc:
                if isinstance(exc, nats.js.errors.ServiceUnavailableError
                              | nats.errors.NoRespondersError):
                    self.last_error = "JetStream is not enabled or not available on this server"
                else:
                    self.last_error = stream_refusal(self._stream, exc)
                self._stream_problem = self.last_error
                self._warn.warning("stream", "%s; retrying", self.last_error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def resume_point(self, dp_rank: int) -> ResumePoint | None:
        """The last (epoch, seq) published on this rank's subject, None if it has none."""
        await self.stream_ready.wait()
        assert self._nc is not None
        subject = self.subject(dp_rank)
        while True:
            try:
                stored = await last_published(self._nc.jetstream(), self._stream.name, subject)
            except (nats.errors.Error, TimeoutError) as exc:
                self._warn.warning("resume", "cannot read the last message on %s: %r; retrying",
                                   subject, exc)
                await asyncio.sleep(0.5)
                continue
            if stored is None:
                return None
            self._window.resumed(subject, stored.stream_seq)
            return stored.point

    # -- the publish loop ----------------------------------------------------------------------

    async def _publish_pending(self, retrying: bool) -> None:
        """After a failure settle and resend the window first; then move frames from the
        buffer into the window."""
        if retrying and not await self.recover():
            self._schedule_retry()
            return
        sent = 0
        while self._buffer and self._window_open():
            if self._link.writable():
                groups = self._buffered_groups()
                self._send_now(groups)
                sent += sum(len(group) for group in groups)
                if sent >= SEND_SLICE:
                    sent = 0
                    await asyncio.sleep(0)  # a backlog must not hold up acks and ingest
            else:
                await self.send(self._buffer.pop())  # waits for nats-py's flush
            if not self._online():
                break

    def _per_message(self) -> int:
        return self._settings.batches_per_message

    def _groups(self, frames: list[Frame]) -> list[list[Frame]]:
        return group_frames(frames, self._settings.batches_per_message, self._pack_bytes())

    def _pack_bytes(self) -> int:
        """A pack's payload bound: PACK_BYTES, within the server's max_payload, and at most a
        quarter of --max-in-flight-bytes, so the window holds several messages."""
        return min(PACK_BYTES, self._max_in_flight_bytes // 4, self._max_payload)

    def _send_group(self, group: list[Frame]) -> bool:
        entries = self._enter_run(group)
        for entry in entries:
            self._publish_now(*entry)
        return bool(entries)

    async def send(self, frame: Frame) -> None:
        """Publish one frame now, through nats-py (waiting while its queue is full), after
        whatever was put before it; what the loop does when the link is not writable."""
        entry = self._enter(frame)
        if entry is not None:
            await self._publish(*entry)

    def _encode(self, frame: Frame) -> tuple[bytes, float, int] | None:
        """A frame's RelayBatch, encoded, with vLLM's ts and its event count; None if it was
        dropped (counted)."""
        decoded = read_frame(self._codec.decode, frame, self._buffer, self._metrics, self._warn)
        if decoded is None:
            return None
        events: list[Any] = ([*frame.resyncs, *decoded.events] if frame.resyncs
                             else decoded.events)
        batch = RelayBatch(
            instance_id=self._instance_id, dp_rank=frame.dp_rank, epoch=frame.epoch,
            seq=frame.seq, ts=decoded.ts, relay_ts=frame.recv_ts, events=events,
        )
        try:
            payload = self._codec.encode(batch)
        except MalformedPayload as exc:
            drop_malformed(frame, exc, self._buffer, self._metrics, self._warn)
            return None
        if not frame.counted:  # a held batch's were counted when it was held
            self._metrics.events_received.inc(len(decoded.events))
        return payload, decoded.ts, len(decoded.events)

    def _enter(self, frame: Frame) -> tuple[int, Pending] | None:
        """Encode a frame and put it in the window; None if it was dropped (counted)."""
        entries = self._enter_run([frame])
        return entries[0] if entries else None

    def _enter_run(self, frames: list[Frame]) -> list[tuple[int, Pending]]:
        """Encode frames of one rank, in order, and put them in the window as packs (a frame
        alone as a single batch): a pack ends at an epoch change or past `_pack_bytes()`."""
        buffer, entries = self._buffer, []
        limit = self._pack_bytes()
        parts: list[bytes] = []
        seqs: list[int] = []
        carried: tuple[Resync, ...] = ()  # what the pack's batches announce
        last: Frame | None = None
        ts, events, size = 0.0, 0, 0
        for frame in frames:
            if buffer.owes(frame.dp_rank):  # a batch before it in this run was dropped
                frame = frame.announcing(buffer.claim(frame.dp_rank))
            encoded = self._encode(frame)
            if encoded is None:
                continue
            payload, batch_ts, batch_events = encoded
            if last is not None and (frame.epoch != last.epoch
                                     or size + len(payload) > limit):
                entries.append(self._enter_pack(last, parts, seqs, ts, events, carried))
                parts, seqs, carried, events, size = [], [], (), 0, 0
            if not parts:
                ts = batch_ts
            if frame.resyncs:
                carried = (*carried, *frame.resyncs)
            parts.append(payload)
            seqs.append(frame.seq)
            events += batch_events
            size += len(payload)
            last = frame
        if last is not None and parts:
            entries.append(self._enter_pack(last, parts, seqs, ts, events, carried))
        return entries

    def _enter_pack(self, last: Frame, parts: list[bytes], seqs: list[int], ts: float,
                    events: int, carried: tuple[Resync, ...]) -> tuple[int, Pending]:
        """Put a pack (or a single batch) in the window; `ts` is its first batch's."""
        self._arm_watch()
        subject = self.subject(last.dp_rank)
        prefix = f"{self._instance_id}.{last.dp_rank}.{last.epoch}"
        if len(parts) == 1:
            return self._window.add(last, subject, f"{prefix}.{last.seq}", parts[0], ts, events,
                                    resyncs=carried)
        body = pack(parts, self._codec.format == "json")
        return self._window.add(last, subject, f"{prefix}.{seqs[0]}-{last.seq}", body, ts,
                                events, tuple(seqs), carried)

    def _drop(self, token: int, reason: str) -> Pending | None:
        """A batch of the window that will not be stored: out of it, counted and announced
        (`Buffer.lose`) after what it announced itself."""
        pending = self._window.dropped(token)
        if pending is not None:
            self._buffer.lose(reason, pending.dp_rank, pending.seqs, pending.events,
                              pending.resyncs)
        return pending

    async def _publish(self, token: int, pending: Pending) -> None:
        assert self._nc is not None
        pending.sent_at = time.monotonic()
        try:
            await self._link.publish(pending.subject, pending.payload,
                                     reply=f"{self._inbox}{token}", headers=_headers(pending))
        except nats.errors.MaxPayloadError:
            self._drop(token, "too_large")
            log.error("dropped a batch of %d bytes on %s: larger than the server's max_payload",
                      len(pending.payload), pending.subject)
        except (nats.errors.Error, OSError) as exc:
            self._warn.warning("publish", "publish failed: %r; will resend", exc)
            self._schedule_retry()

    def _publish_now(self, token: int, pending: Pending) -> None:
        """`_publish` without awaiting, for the steady state: only while online and writable.

        The link sends all of a turn's publishes at once (kvrelay/natsio/link.py); the direct
        one skips nats-py's per-call subject and header validation: ours are well-formed by
        construction.
        """
        pending.sent_at = time.monotonic()
        if len(pending.payload) > self._max_payload:
            self._drop(token, "too_large")
            log.error("dropped a batch of %d bytes on %s: larger than the server's max_payload",
                      len(pending.payload), pending.subject)
            return
        # `_headers` as a ready block: built once here, written as it is.
        head = f"NATS/1.0\r\nNats-Msg-Id: {pending.msg_id}\r\n{_SCHEMA_HEADER}\r\n".encode()
        self._link.put(pending.subject, pending.payload, f"{self._inbox}{token}", head)

    # -- the failure path ----------------------------------------------------------------------

    async def recover(self) -> bool:
        """Settle the window with the stream, then resend it one at a time, in order.

        Returns False (to be tried again after a backoff) while the stream cannot take it.
        """
        try:
            for subject in {p.subject for _, p in self._window.pending()}:
                await self._settle(subject)
            for token, pending in self._window.pending():
                while token in self._window:
                    if not self._online() or not await self._resend(token, pending):
                        return False
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            self._warn.warning("recover", "cannot settle unacknowledged publishes with stream "
                               "%s yet: %r; retrying", self._stream.name, exc)
            return False
        self._succeeded()
        return True

    async def _settle(self, subject: str) -> None:
        """Take what the stream holds on `subject` since the last ack out of the window.

        A pending batch older than one found stored can no longer be stored in order: it is
        dropped (`out_of_order`) and announced with a `resync` gap instead.
        """
        assert self._nc is not None
        js = self._nc.jetstream()
        # From the last message settled in order (a later one may have been acked while an
        # earlier one, stored too, lost its ack): it says where the subject's batches stand.
        messages = [(s.stream_seq, s.point) async for s in stored_from(
            js, self._stream.name, subject, self._window.settled_at(subject))]
        stored, late = self._window.found(subject, messages)
        for pending in stored:
            self._published(pending, False)
        for pending in late:
            self._buffer.lose("out_of_order", pending.dp_rank, pending.seqs, pending.events,
                              pending.resyncs)
            self._warn.warning("out-of-order", "batch epoch %d seq %d on %s was refused while a "
                               "later one was stored; announced as a gap",
                               pending.epoch, pending.seq, subject)

    async def _resend(self, token: int, pending: Pending) -> bool:
        """Publish one batch expecting its predecessor last on the subject; False: not now."""
        assert self._nc is not None
        expected = self._window.acked_at(pending.subject)
        headers = {**_headers(pending), "Nats-Expected-Last-Subject-Sequence": str(expected)}
        pending.sent_at = time.monotonic()
        try:
            reply = await self._link.request(pending.subject, pending.payload, headers,
                                             self._settings.ack_timeout)
        except nats.errors.NoRespondersError:
            self.last_error = f"stream {self._stream.name} did not answer (no responders)"
            return False
        try:
            ack = _ACK.decode(reply.data)
        except msgspec.DecodeError:
            return False
        if token not in self._window:
            return True  # an earlier attempt's ack came meanwhile
        if ack.error is None:
            if self._window.stored(token, ack.seq) is not None:
                self._published(pending, ack.duplicate)
            return True
        if ack.error.err_code == WRONG_LAST_SEQUENCE:
            # Stored since we looked (a late earlier attempt) or the last one aged out.
            stored = await last_stored(self._nc.jetstream(), self._stream.name,
                                       pending.subject)
            if stored is not None and stored.stream_seq > expected:
                await self._settle(pending.subject)
            else:
                self._window.last_is(pending.subject, 0 if stored is None else stored.stream_seq)
            return True
        if ack.error.code == 503 or ack.error.code == 0:
            self.last_error = f"stream {self._stream.name}: {ack.error.description}"
            return False
        self._reject(token, pending, ack.error)
        return True

    def _awaiting_confirmation(self) -> bool:
        return bool(self._window)

    def _check_confirmations(self) -> None:
        """Resend the window when its oldest publish has waited longer than the ack timeout."""
        oldest = self._window.oldest()
        timeout = self._settings.ack_timeout
        if oldest is not None and oldest.sent_at and time.monotonic() - oldest.sent_at > timeout:
            self._warn.warning("ack-timeout", "no JetStream ack within %.1fs for %d publishes; "
                               "sending them again", timeout, len(self._window))
            oldest.sent_at = time.monotonic()
            self._schedule_retry(0.0)

    def _on_ack(self, subject: bytes, data: bytes) -> None:
        try:
            token = int(subject[len(self._inbox_bytes):])
        except ValueError:
            return
        pending = self._window.get(token)
        if pending is None:
            return  # the ack of an earlier attempt already came
        if not data:
            # A status message (503: no responders) - the stream is not there right now.
            self._warn.warning("no-responders", "JetStream did not answer a publish on %s; "
                               "retrying", pending.subject)
            self._schedule_retry()
            return
        try:
            ack = _ACK.decode(data)
        except msgspec.DecodeError:
            ack = PubAck(error=ApiError(description=f"unreadable ack {data[:80]!r}"))
        if ack.error is not None:
            if ack.error.code == 503 or ack.error.code == 0:
                self._warn.warning("ack-error", "JetStream could not store a publish on %s: %s; "
                                   "retrying", pending.subject, ack.error.description)
                self._schedule_retry()
                return
            self._reject(token, pending, ack.error)
            return
        self._window.stored(token, ack.seq)
        self._succeeded()
        self._published(pending, ack.duplicate)
        if self._buffer and self._window_open():
            self._wake.set()

    def _published(self, pending: Pending, duplicate: bool) -> None:
        """Count a batch JetStream stored (the window has already let it go)."""
        batches = len(pending.seqs)
        if duplicate:
            self._metrics.duplicates.inc(batches)
        self._metrics.batches_published.inc(batches)
        self._metrics.events_published.inc(pending.events)
        waited = time.monotonic() - pending.sent_at
        self._metrics.publish_latency.observe(waited)
        self._metrics.lag.observe(max(0.0, time.time() - waited - pending.ts))  # to publishing

    def _reject(self, token: int, pending: Pending, error: ApiError) -> None:
        self._drop(token, "rejected")
        self._warn.warning("rejected", "JetStream rejected a publish on %s: %s (code %d)",
                           pending.subject, error.description, error.code)

    # -- shutdown ------------------------------------------------------------------------------

    def abandon(self) -> int:
        """Count what could not be delivered; returns the number of batches."""
        self.send_gathered()  # into the window or the buffer, to be counted with them
        in_window, events = self._window.clear()
        lost = len(self._buffer) + in_window
        self._buffer.drain_all()
        if lost:
            self._metrics.drop("shutdown", lost, events)
        return lost

