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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client

from kvrelay.codec import Codec, MalformedPayload
from kvrelay.config import Config
from kvrelay.ingest.buffer import Buffer
from kvrelay.ingest.source import Frame
from kvrelay.jetstream.api import ApiError, PubAck
from kvrelay.jetstream.stream import (
    StreamMismatch,
    ensure_stream,
    last_published,
    last_stored,
    stored_from,
)
from kvrelay.natsio.link import NatsPyIncompatible, new_link
from kvrelay.natsio.options import nats_options
from kvrelay.publish.common import (
    SEND_SLICE,
    NatsRefused,
    drop_malformed,
    read_frame,
    refusal,
    wait_until_sent,
)
from kvrelay.ratelimit import RateLimitedLog
from kvrelay.system.metrics import Metrics
from kvrelay.wire.names import rank_subject
from kvrelay.wire.schema import SCHEMA_VERSION, RelayBatch, ResumePoint, Resync

log = logging.getLogger("kvrelay.publish")

WRONG_LAST_SEQUENCE = 10071  # JetStream: Nats-Expected-Last-Subject-Sequence did not hold


_ACK = msgspec.json.Decoder(PubAck)

_SCHEMA = str(SCHEMA_VERSION)


def _headers(pending: _Pending) -> dict[str, str]:
    """A batch's headers."""
    return {"Nats-Msg-Id": pending.msg_id, "Kvrelay-Schema": _SCHEMA}


class _Pending:
    __slots__ = ("batch", "dp_rank", "epoch", "events", "msg_id", "payload", "sent_at", "seq",
                 "stored_at", "subject", "token", "ts")

    def __init__(self, frame: Frame, subject: str, msg_id: str, payload: bytes,
                 ts: float, events: int, token: int, batch: RelayBatch | None) -> None:
        self.batch = batch  # kept for on_stored only
        self.token = token
        self.stored_at = 0  # stream sequence once JetStream stored it
        self.dp_rank = frame.dp_rank
        self.epoch = frame.epoch
        self.seq = frame.seq
        self.subject = subject
        self.msg_id = msg_id
        self.payload = payload
        self.ts = ts
        self.events = events
        self.sent_at = 0.0


class Publisher:
    """Takes Frames from the Buffer, encodes them and keeps them flowing into JetStream."""

    def __init__(self, config: Config, instance_id: int, buffer: Buffer, metrics: Metrics,
                 on_stored: Callable[[RelayBatch, int], None] | None = None) -> None:
        """`on_stored(batch, stream_seq)` hears of every batch JetStream stored, once each,
        in the order of its subject's stream."""
        self._config = config
        self._instance_id = instance_id
        self._buffer = buffer
        self._metrics = metrics
        self._codec = Codec(config.format, metrics)
        self._warn = RateLimitedLog(log)
        self._worker = (config.namespace, config.component, instance_id)
        self._subjects: dict[int, str] = {}
        self._nc: Client | None = None
        self._link = new_link(config.nats_engine)
        self._inbox = ""
        self._inbox_bytes = b""
        self._window: dict[int, _Pending] = {}
        metrics.in_flight.set_function(lambda: len(self._window))  # read at scrape time
        # subject -> stream sequence of the latest message known stored on it (ack or resume).
        self._acked_at: dict[str, int] = {}
        # Per subject, sent batches in send order until they and all before them are settled
        # (stored or dropped): acks can come out of order after a failure. `_settled_at` is the
        # stream sequence of the last one stored in that order, so an unsettled batch, if
        # stored, lies after it: where the failure path starts reading the stream.
        self._unsettled: dict[str, deque[_Pending]] = {}
        self._settled_at: dict[str, int] = {}
        self._on_stored = on_stored
        self._next_token = 0
        self._wake = asyncio.Event()
        self._parked = False  # the publish loop waits for work: notify() may send directly
        self._retry_at: float | None = None
        self._backoff = 0.05
        self.connected = False
        self.stream_ready = asyncio.Event()
        # A configuration NATS or the stream will never accept: the relay exits (code 2).
        self.fatal: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()
        self._connected_once = False
        self.last_error = "not connected yet"

    def _online(self) -> bool:
        # nats-py's own state flips before our callback runs; trust it for sending.
        return self.connected and self._nc is not None and self._nc.is_connected

    def subject(self, dp_rank: int) -> str:
        subject = self._subjects.get(dp_rank)
        if subject is None:
            subject = self._subjects[dp_rank] = rank_subject(*self._worker, dp_rank)
        return subject

    @property
    def in_flight(self) -> int:
        return len(self._window)

    # -- connection and stream -----------------------------------------------------------------

    async def connect(self, dp_ranks: list[int]) -> None:
        """Connect (retrying forever), then create or verify the stream."""
        options = nats_options(self._config)
        log.info("connecting to NATS at %s", self._config.redacted()["nats"])
        self._nc = await self._link.connect(options, self._on_error, self._on_disconnected,
                                            self._on_reconnected)
        try:
            self._inbox = await self._link.open_inbox(self._on_ack, wildcard=True)
        except NatsPyIncompatible as exc:
            self.last_error = str(exc)
            await self._nc.close()
            if not self.fatal.done():
                self.fatal.set_result(exc)
            return
        self._inbox_bytes = self._inbox.encode()
        self.connected = True
        self._connected_once = True
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
                log.info("%s", await ensure_stream(self._nc.jetstream(), self._config, subjects))
                self.stream_ready.set()
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
                    self.last_error = f"stream {self._config.stream} not usable: {exc!r}"
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
                stored = await last_published(self._nc.jetstream(), self._config.stream, subject)
            except (nats.errors.Error, TimeoutError) as exc:
                self._warn.warning("resume", "cannot read the last message on %s: %r; retrying",
                                   subject, exc)
                await asyncio.sleep(0.5)
                continue
            if stored is None:
                return None
            self._acked_at[subject] = max(stored.stream_seq, self._acked_at.get(subject, 0))
            self._settled_at[subject] = max(stored.stream_seq, self._settled_at.get(subject, 0))
            return stored.point

    async def _on_error(self, exc: Exception) -> None:
        self._metrics.nats_errors.inc()
        self.last_error = f"NATS: {exc!r}"
        if not self._connected_once and (reason := refusal(exc, self._config)) is not None:
            # Refused before ever connecting: misconfigured, not unreachable. (Once connected,
            # a refusal while reconnecting is retried: the buffer is worth keeping.)
            if not self.fatal.done():
                self.fatal.set_result(NatsRefused(reason))
            return
        self._warn.warning("nats", "NATS at %s: %r (the relay keeps buffering and retrying)",
                           self._config.redacted()["nats"], exc)

    async def _on_disconnected(self) -> None:
        if self.connected:
            log.warning("disconnected from NATS; buffering until it is back")
        self.connected = False
        self.last_error = "disconnected from NATS"
        # nats-py would send the commands it had not written yet right after reconnecting,
        # before our ordered resend of the whole window, so later batches could land before
        # earlier ones lost with the old socket. The window holds them all: forget nats-py's
        # copy and let the resend put them back in order.
        self._link.discard()

    async def _on_reconnected(self) -> None:
        self._metrics.nats_reconnects.inc()
        self.connected = True
        log.info("reconnected to NATS; resending %d unacknowledged publishes", len(self._window))
        self._schedule_retry(0.0)

    # -- the publish loop ----------------------------------------------------------------------

    async def run(self) -> None:
        """Move frames from the buffer into the window until cancelled."""
        watchdog = asyncio.ensure_future(self._watch_acks())
        try:
            while True:
                self._parked = True
                await self._wake.wait()
                self._parked = False
                self._wake.clear()
                if not self._online() or not self.stream_ready.is_set():
                    continue
                if self._retry_at is not None:
                    if time.monotonic() < self._retry_at:
                        continue
                    self._retry_at = None
                    if not await self._recover():
                        self._schedule_retry()
                        continue
                sent = 0
                while self._buffer and len(self._window) < self._config.max_in_flight:
                    if self._link.writable():
                        entry = self._enter(self._buffer.pop())
                        if entry is not None:
                            self._publish_now(*entry)
                        sent += 1
                        if sent % SEND_SLICE == 0:
                            await asyncio.sleep(0)  # a backlog must not hold up acks and ingest
                    else:
                        await self._send(self._buffer.pop())  # waits for nats-py's flush
                    if not self._online():
                        break
        finally:
            self._parked = False
            watchdog.cancel()

    def take(self, frame: Frame) -> None:
        """Ingest's hand-off, each frame in order. In the steady state (nothing buffered or owed
        before it, this loop idle, room in the window, NATS up) the frame is published right
        here; anything else goes through the buffer and `notify`."""
        buffer = self._buffer
        if not buffer and not buffer.owes(frame.dp_rank) and self._sending_here() \
                and self._room():
            entry = self._enter(frame)
            if entry is not None:
                self._publish_now(*entry)
            return
        buffer.put(frame)
        self.notify()

    def notify(self) -> None:
        """Called by the buffer's producer: there is something to send.

        In the steady state (this loop idle, nothing queued before, room in the window, NATS
        up) the frame is sent right here, in the producer's turn of the event loop: no wake-up
        of the publish task per batch. Anything else is left to the publish loop, in order.
        """
        if self._sending_here():
            while self._buffer and self._room():
                entry = self._enter(self._buffer.pop())
                if entry is not None:
                    self._publish_now(*entry)
            if not self._buffer:
                return
        self._wake.set()

    def _sending_here(self) -> bool:
        """The publish loop idle with nothing to retry, NATS and the stream up: a producer's
        turn may publish itself."""
        return self._parked and self._retry_at is None and self._online() \
            and self.stream_ready.is_set()

    def _room(self) -> bool:
        return len(self._window) < self._config.max_in_flight and self._link.writable()

    async def _send(self, frame: Frame) -> None:
        entry = self._enter(frame)
        if entry is not None:
            await self._publish(*entry)

    def _enter(self, frame: Frame) -> tuple[int, _Pending] | None:
        """Encode a frame and put it in the window; None if it was dropped (counted)."""
        decoded = read_frame(self._codec.decode, frame, self._metrics, self._warn, self._owe)
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
            drop_malformed(frame, exc, self._metrics, self._warn, self._owe)
            return None
        self._metrics.events_received.inc(len(decoded.events))
        msg_id = f"{self._instance_id}.{frame.dp_rank}.{frame.epoch}.{frame.seq}"
        token = self._next_token
        self._next_token += 1
        pending = _Pending(frame, self.subject(frame.dp_rank), msg_id,
                           payload, decoded.ts, len(decoded.events), token,
                           batch if self._on_stored is not None else None)
        self._window[token] = pending
        self._unsettled.setdefault(pending.subject, deque()).append(pending)
        return token, pending

    def _owe(self, dp_rank: int, resyncs: tuple[Resync, ...]) -> None:
        """Announce a loss with the next batch of `dp_rank` that is sent."""
        self._metrics.resyncs.labels("gap").inc()
        self._buffer.owe(dp_rank, resyncs)

    async def _publish(self, token: int, pending: _Pending) -> None:
        pending.sent_at = time.monotonic()
        try:
            await self._link.publish(pending.subject, pending.payload,
                                     reply=f"{self._inbox}{token}", headers=_headers(pending))
        except nats.errors.MaxPayloadError:
            del self._window[token]
            self._metrics.drop("too_large", 1, pending.events)
            self._owe(pending.dp_rank, (Resync("gap", pending.seq, pending.seq),))
            self._settle_in_order(pending.subject)
            log.error("dropped a batch of %d bytes on %s: larger than the server's max_payload",
                      len(pending.payload), pending.subject)
        except (nats.errors.Error, OSError) as exc:
            self._warn.warning("publish", "publish failed: %r; will resend", exc)
            self._schedule_retry()

    def _publish_now(self, token: int, pending: _Pending) -> None:
        """`_publish` without awaiting, for the steady state: only while online and writable.

        The link sends all of a turn's publishes at once (kvrelay/natsio/link.py).
        """
        nc = self._nc
        assert nc is not None
        pending.sent_at = time.monotonic()
        if len(pending.payload) > nc.max_payload:
            del self._window[token]
            self._metrics.drop("too_large", 1, pending.events)
            self._owe(pending.dp_rank, (Resync("gap", pending.seq, pending.seq),))
            log.error("dropped a batch of %d bytes on %s: larger than the server's max_payload",
                      len(pending.payload), pending.subject)
            return
        self._link.put(pending.subject, pending.payload, f"{self._inbox}{token}",
                       _headers(pending))

    # -- the failure path ----------------------------------------------------------------------

    async def _recover(self) -> bool:
        """Settle the window with the stream, then resend it one at a time, in order.

        Returns False (to be tried again after a backoff) while the stream cannot take it.
        """
        try:
            for subject in {p.subject for p in self._window.values()}:
                await self._settle(subject)
            for token, pending in list(self._window.items()):
                while token in self._window:
                    if not self._online() or not await self._resend(token, pending):
                        return False
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            self._warn.warning("recover", "cannot settle unacknowledged publishes with stream "
                               "%s yet: %r; retrying", self._config.stream, exc)
            return False
        self._backoff = 0.05
        return True

    async def _settle(self, subject: str) -> None:
        """Take what the stream holds on `subject` since the last ack out of the window.

        A pending batch older than one found stored can no longer be stored in order: it is
        dropped (`out_of_order`) and announced with a `resync` gap instead.
        """
        assert self._nc is not None
        js = self._nc.jetstream()
        waiting = {(p.epoch, p.seq): t for t, p in self._window.items() if p.subject == subject}
        last = self._acked_at.get(subject, 0)
        newest: tuple[int, int] | None = None
        # From the last message settled in order (a later one may have been acked while an
        # earlier one, stored too, lost its ack): it says where the subject's batches stand.
        async for stored in stored_from(js, self._config.stream, subject,
                                        self._settled_at.get(subject, 0)):
            last = max(last, stored.stream_seq)
            if stored.point is None:
                continue
            newest = (stored.point.epoch, stored.point.seq)
            token = waiting.get(newest)
            pending = self._window.pop(token, None) if token is not None else None
            if pending is not None:
                self._published(pending, False, stored.stream_seq)
        self._acked_at[subject] = last
        if newest is None:
            return
        for point, token in waiting.items():
            pending = self._window.get(token)
            if pending is not None and point < newest:
                del self._window[token]
                self._metrics.drop("out_of_order", 1, pending.events)
                self._owe(pending.dp_rank, (Resync("gap", pending.seq, pending.seq),))
                self._warn.warning("out-of-order", "batch epoch %d seq %d on %s was refused "
                                   "while a later one was stored; announced as a gap",
                                   pending.epoch, pending.seq, subject)
        self._settle_in_order(subject)

    async def _resend(self, token: int, pending: _Pending) -> bool:
        """Publish one batch expecting its predecessor last on the subject; False: not now."""
        assert self._nc is not None
        expected = self._acked_at.get(pending.subject, 0)
        headers = {**_headers(pending), "Nats-Expected-Last-Subject-Sequence": str(expected)}
        pending.sent_at = time.monotonic()
        try:
            reply = await self._link.request(pending.subject, pending.payload, headers,
                                             self._config.ack_timeout)
        except nats.errors.NoRespondersError:
            self.last_error = f"stream {self._config.stream} did not answer (no responders)"
            return False
        try:
            ack = _ACK.decode(reply.data)
        except msgspec.DecodeError:
            return False
        if token not in self._window:
            return True  # an earlier attempt's ack came meanwhile
        if ack.error is None:
            del self._window[token]
            self._acked_at[pending.subject] = max(ack.seq, expected)
            self._published(pending, ack.duplicate, ack.seq)
            return True
        if ack.error.err_code == WRONG_LAST_SEQUENCE:
            # Stored since we looked (a late earlier attempt) or the last one aged out.
            stored = await last_stored(self._nc.jetstream(), self._config.stream,
                                       pending.subject)
            if stored is not None and stored.stream_seq > expected:
                await self._settle(pending.subject)
            else:
                self._acked_at[pending.subject] = 0 if stored is None else stored.stream_seq
            return True
        if ack.error.code == 503 or ack.error.code == 0:
            self.last_error = f"stream {self._config.stream}: {ack.error.description}"
            return False
        self._reject(token, pending, ack.error)
        return True

    def _schedule_retry(self, delay: float | None = None) -> None:
        if delay is None:
            delay = self._backoff
            self._backoff = min(self._backoff * 2, self._config.reconnect_wait_max)
        if self._retry_at is None:
            self._retry_at = time.monotonic() + delay
        self._wake.set()

    async def _watch_acks(self) -> None:
        """Resend the window when its oldest publish has waited longer than the ack timeout."""
        period = min(self._config.ack_timeout / 4, 0.25)
        while True:
            await asyncio.sleep(period)
            if self._retry_at is not None and time.monotonic() >= self._retry_at:
                self._wake.set()
            if not self._window or not self._online():
                continue
            oldest = next(iter(self._window.values()))
            if oldest.sent_at and time.monotonic() - oldest.sent_at > self._config.ack_timeout:
                self._warn.warning("ack-timeout", "no JetStream ack within %.1fs for %d "
                                   "publishes; sending them again", self._config.ack_timeout,
                                   len(self._window))
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
        del self._window[token]
        if ack.seq > self._acked_at.get(pending.subject, 0):
            self._acked_at[pending.subject] = ack.seq
        self._backoff = 0.05
        self._published(pending, ack.duplicate, ack.seq)
        if self._buffer and len(self._window) < self._config.max_in_flight:
            self._wake.set()

    def _published(self, pending: _Pending, duplicate: bool, stream_seq: int) -> None:
        pending.stored_at = stream_seq
        pending.payload = b""  # out of the window: never sent again
        self._settle_in_order(pending.subject)
        if duplicate:
            self._metrics.duplicates.inc()
        self._metrics.batches_published.inc()
        self._metrics.events_published.inc(pending.events)
        self._metrics.publish_latency.observe(time.monotonic() - pending.sent_at)
        self._metrics.lag.observe(max(0.0, time.time() - pending.ts))

    def _reject(self, token: int, pending: _Pending, error: ApiError) -> None:
        del self._window[token]
        self._metrics.drop("rejected", 1, pending.events)
        self._owe(pending.dp_rank, (Resync("gap", pending.seq, pending.seq),))
        self._settle_in_order(pending.subject)
        self._warn.warning("rejected", "JetStream rejected a publish on %s: %s (code %d)",
                           pending.subject, error.description, error.code)

    def _settle_in_order(self, subject: str) -> None:
        """Pass over the subject's batches settled with none unsettled before them; report
        the stored ones to on_stored."""
        queue = self._unsettled.get(subject)
        window, report = self._window, self._on_stored
        while queue and (queue[0].stored_at or queue[0].token not in window):
            pending = queue.popleft()
            if pending.stored_at:
                if pending.stored_at > self._settled_at.get(subject, 0):
                    self._settled_at[subject] = pending.stored_at
                if report is not None and pending.batch is not None:
                    report(pending.batch, pending.stored_at)

    # -- shutdown ------------------------------------------------------------------------------

    async def flush(self, within: float) -> bool:
        """Wait until the buffer and the window are empty; False if `within` seconds pass."""
        flushed = await wait_until_sent(lambda: bool(self._buffer or self._window), self._wake,
                                        within)
        return flushed

    def abandon(self) -> int:
        """Count what could not be delivered; returns the number of batches."""
        lost = len(self._buffer) + len(self._window)
        events = sum(p.events for p in self._window.values())
        self._buffer.drain_all()
        self._window.clear()
        for subject in self._unsettled:
            self._settle_in_order(subject)
        if lost:
            self._metrics.drop("shutdown", lost, events)
        return lost

    async def close(self) -> None:
        self.connected = False
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.close()
