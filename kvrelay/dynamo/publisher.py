"""Publish `--format dynamo`: Dynamo KV event messages on core NATS, in order, each confirmed.

Dynamo's KV event plane is core NATS, which has no acks. A message counts as delivered once a
marker published after it on the same connection comes back through the relay's own inbox:
the server handles a connection's messages in order, so it has by then passed the message to
every subscriber (kvrelay/dynamo/confirm.py; nats-py's flush() cannot say this: its PING can
overtake publishes still queued in the client). Until then a message stays in a window. When
the connection drops, or a marker does not come back within the ack timeout, the whole window
is published again, in order; Dynamo's router ignores event_ids it has already applied, so a
repeat changes nothing and nothing goes missing. The discovery records that make the router
listen are written before the first message and removed after the last
(kvrelay/dynamo/records.py).

In the steady state a message is sent in the producer's turn of the event loop, through the
link (kvrelay/natsio/link.py), as the JetStream publisher does; markers go the same way, so the
order on the wire is the order of the calls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable
from pathlib import Path
from typing import Final

import nats.errors

from kvrelay.codec import Codec
from kvrelay.config import DynamoSettings, NatsSettings, PublishSettings
from kvrelay.discovery.etcd import EtcdGateway, EtcdRefused
from kvrelay.dynamo.confirm import Markers
from kvrelay.dynamo.etcd import EtcdStore
from kvrelay.dynamo.records import (
    FileBackend,
    FileStore,
    KeyValueStore,
    Registrar,
    Registration,
    default_file_kv,
    new_publisher_id,
)
from kvrelay.dynamo.translate import EventStream, Translator
from kvrelay.dynamo.wire import Translated, kv_events_subject
from kvrelay.ingest.buffer import Buffer
from kvrelay.ingest.sequencer import Frame
from kvrelay.publish.base import Output
from kvrelay.publish.common import SEND_SLICE, group_frames, read_frame
from kvrelay.system.metrics import Metrics
from kvrelay.wire.names import Worker
from kvrelay.wire.schema import ResumePoint, Resync

log = logging.getLogger("kvrelay.dynamo")


class DiscoveryError(Exception):
    """The discovery records cannot be written where configured."""


# A message carries the vLLM batches of a rank in hand at once, up to --dynamo-batches-per-message
# and (past the first) input bytes up to this share of the server's max_payload, which the
# message then stays well under (Dynamo's form of an event is at most a few times vLLM's).
GROUP_SHARE: Final = 8


class _Sent:
    """One message in the window: the batches it carries, from the oldest one's `ts` on."""

    __slots__ = ("batches", "events", "payload", "sent_at", "ts")

    def __init__(self, payload: bytes, ts: float, batches: int, events: int) -> None:
        self.payload = payload
        self.ts = ts
        self.batches = batches
        self.events = events
        self.sent_at = 0.0


class DynamoPublisher(Output):
    """Takes Frames from the Buffer and keeps them flowing to Dynamo's router over core NATS."""

    def __init__(self, worker: Worker, nats: NatsSettings, publish: PublishSettings,
                 config: DynamoSettings, buffer: Buffer, metrics: Metrics, *,
                 etcd: list[str] | None = None, lease: int | None = None) -> None:
        """Records go to Dynamo's etcd backend at `etcd` when given, else to its file
        backend; `lease` is the etcd lease discovery took, whose ID is the instance ID."""
        super().__init__(nats, publish, buffer, metrics, log)
        self._config = config
        self._worker = worker
        self._instance_id = worker.instance_id
        self._etcd = etcd
        self._lease = lease
        self._codec = Codec(metrics=metrics)
        self._translator = Translator(config.kv_block_size, metrics)
        self._subject = kv_events_subject(worker.namespace, worker.component,
                                          config.dynamo_endpoint)
        self._streams: dict[int, EventStream] = {}
        self.file_kv = Path(config.dynamo_file_kv or default_file_kv())
        self.registrar: Registrar | None = None
        self._window: deque[_Sent] = deque()
        self._window_bytes = 0
        self._markers = Markers[_Sent](self._link, self._online, self._confirm, self._half_full)
        self._resend = False
        self._registered = asyncio.Event()
        metrics.in_flight.set_function(self._window.__len__)  # read at scrape time

    def subject(self, dp_rank: int) -> str:
        return self._subject

    def publisher_id(self, dp_rank: int) -> int:
        return self._streams[dp_rank].publisher_id

    def last_event_id(self, dp_rank: int) -> int:
        """The event_id of the last event numbered for the rank; 0 before the first."""
        return self._streams[dp_rank].event_id - 1

    def messages_sent(self, dp_rank: int) -> int:
        """Messages numbered for the rank so far (each carries one or more vLLM batches)."""
        return self._streams[dp_rank].sequence

    @property
    def in_flight(self) -> int:
        return len(self._window)

    @property
    def in_flight_bytes(self) -> int:
        return self._window_bytes

    def readiness(self) -> dict[str, str]:
        if self.registrar is None:
            return {"dynamo_records": "discovery records not written yet"}
        return {"dynamo_records": "ok" if self.registrar.registered
                else self.registrar.last_error}

    def _unsent(self) -> bool:
        return bool(self._buffer or self._window or self._gathered)

    def _side_tasks(self) -> list[Awaitable[None]]:
        return [self._watch(), self._keep_registered()]

    # -- discovery and connection --------------------------------------------------------------

    async def connect(self, dp_ranks: list[int]) -> None:
        """Register in Dynamo's discovery, then connect to NATS (retrying forever)."""
        # One Dynamo publisher per DP rank, new IDs each run: the router then starts the
        # rank afresh instead of taking our event_ids as ones it has seen.
        self._streams = {rank: EventStream(new_publisher_id(), self._instance_id, rank)
                         for rank in dp_ranks}
        config = self._config
        store: KeyValueStore
        if self._etcd is not None:
            store = EtcdStore(EtcdGateway(self._etcd), lease=self._lease)
            hint = "check --etcd-endpoints (ETCD_ENDPOINTS)"
        else:
            store = FileBackend(FileStore(self.file_kv))
            hint = "set --dynamo-file-kv (DYN_FILE_KV) to a writable directory"
        self.registrar = Registrar(store, Registration(
            namespace=self._worker.namespace, component=self._worker.component,
            endpoint=config.dynamo_endpoint, worker_id=self._instance_id,
            publishers={rank: s.publisher_id for rank, s in self._streams.items()},
            kv_block_size=config.kv_block_size, model=config.dynamo_model,
            register_worker=config.dynamo_register == "worker"))
        try:
            await self.registrar.register()
        except (OSError, EtcdRefused) as exc:
            self.registrar.last_error = str(exc)
            self.fatal.set_result(DiscoveryError(
                f"cannot write Dynamo discovery records to {store.where}: {exc}; {hint}"))
            return
        self._registered.set()
        inbox = await self._connect_nats(self._markers.on_reply, wildcard=False)
        if inbox is None:
            return
        assert self._nc is not None
        self._markers.bind(inbox)
        self.connected = True
        url = self._nc.connected_url
        log.info("connected to NATS at %s; publishing Dynamo KV events on %s",
                 url.netloc if url else "?", self._subject)
        self._wake.set()

    async def resume_point(self, dp_rank: int) -> ResumePoint | None:
        """Core NATS keeps nothing to resume from: every run starts new publishers."""
        return None

    def _connection_lost(self) -> None:
        """What was published but not confirmed may be lost: publish it all again."""
        self._markers.forget()
        if self._window:
            self._resend = True

    # -- the publish loop ----------------------------------------------------------------------

    async def _publish_pending(self, retrying: bool) -> None:
        """Publish the unconfirmed window again when it may have been lost, in order; then
        move frames from the buffer into the window."""
        if self._resend:
            self._resend = False
            for sent in list(self._window):
                self._metrics.republished.inc()
                await self._publish(sent)
                if not self._online() or self._resend:
                    break
        published = 0
        while self._buffer and self._window_open() \
                and not self._resend and self._online():
            groups = self._buffered_groups()
            if self._link.writable():
                super()._send_now(groups)  # what does not fit in the window goes back
                published += sum(map(len, groups))
            else:
                self._buffer.restore([frame for rest in groups[1:] for frame in rest])
                entered = self._enter(groups[0])
                if entered is not None:
                    await self._publish(entered)  # waits for nats-py's flush
            if published >= SEND_SLICE:
                published = 0
                self._markers.follow()
                await asyncio.sleep(0)  # a backlog must not hold up ingest
        if published:
            self._markers.follow()

    async def _keep_registered(self) -> None:
        await self._registered.wait()
        assert self.registrar is not None
        await self.registrar.run()

    def _send_group(self, group: list[Frame]) -> bool:
        sent = self._enter(group)
        if sent is not None:
            self._publish_now(sent)
        return sent is not None

    def _send_now(self, groups: list[list[Frame]]) -> bool:
        published = super()._send_now(groups)
        if published:
            self._markers.follow()
        return published

    def _sending_here(self) -> bool:
        """As for every output, and nothing to publish again."""
        return super()._sending_here() and not self._resend

    def _groups(self, frames: list[Frame]) -> list[list[Frame]]:
        return group_frames(frames, self._config.dynamo_batches_per_message,
                            self._max_payload // GROUP_SHARE)

    def _per_message(self) -> int:
        return self._config.dynamo_batches_per_message

    def _enter(self, frames: list[Frame]) -> _Sent | None:
        """Translate frames of one rank, in order, into the rank's next message and put it in
        the window; None if nothing of them can go (counted)."""
        rank = frames[0].dp_rank
        buffer, metrics = self._buffer, self._metrics
        items: list[Translated] = []
        ts: float | None = None
        carried: list[int] = []  # seqs of the batches this message carries
        announced: list[Resync] = []  # and what they announce
        received = 0
        for frame in frames:
            if buffer.owes(rank):  # one before it was dropped (counted): say so first
                frame = frame.announcing(buffer.claim(rank))
            decoded = read_frame(self._codec.decode_input, frame, buffer, metrics, self._warn)
            if decoded is None:
                continue
            if not frame.counted:  # a held batch's were counted when it was held
                received += len(decoded.events)
            translated = self._translator.translate(frame.resyncs, decoded.events)
            if frame.resyncs:
                announced += frame.resyncs
            if translated:
                items += translated
                carried.append(frame.seq)
                if ts is None:
                    ts = decoded.ts
        if received:
            metrics.events_received.inc(received)
        if ts is None:
            return None  # nothing in these batches that Dynamo's format can carry (counted)
        stream = self._streams[rank]
        payload = stream.encode(items, int(time.time() * 1000))
        if len(payload) > self._max_payload:
            stream.rollback(len(items))
            buffer.lose("too_large", rank, carried, received, tuple(announced))
            log.error("dropped %d batch(es) making a message of %d bytes for dp_rank %d: "
                      "larger than the server's max_payload", len(carried), len(payload), rank)
            return None
        sent = _Sent(payload, ts, len(carried), len(items))
        self._window.append(sent)
        self._arm_watch()
        self._window_bytes += len(payload)
        return sent

    async def _publish(self, sent: _Sent) -> None:
        """Publish through nats-py, which waits while its queue is full."""
        assert self._nc is not None
        sent.sent_at = time.monotonic()
        try:
            await self._link.publish(self._subject, sent.payload)
        except (nats.errors.Error, OSError) as exc:
            self._warn.warning("publish", "publish failed: %r; will publish again", exc)
            self._connection_lost()
            self._schedule_retry()
            return
        self._markers.published(sent)
        self._markers.follow()

    def _publish_now(self, sent: _Sent) -> None:
        """`_publish` without awaiting, for the steady state: only while online and writable.

        The link sends a turn's publishes at once (the direct one skips nats-py's per-call
        checks: the subject is well-formed by construction and the size was checked against
        max_payload)."""
        sent.sent_at = time.monotonic()
        self._link.put(self._subject, sent.payload)
        self._markers.published(sent)

    # -- confirmation --------------------------------------------------------------------------

    def _awaiting_confirmation(self) -> bool:
        return bool(self._window) or self._markers.out

    def _check_confirmations(self) -> None:
        """Publish the window again when a marker has not come back within the ack timeout."""
        if self._markers.out and \
                time.monotonic() - self._markers.sent_at > self._settings.ack_timeout:
            self._warn.warning("confirm", "NATS did not confirm %d messages within %.1fs; "
                               "publishing them again", len(self._window),
                               self._settings.ack_timeout)
            self._connection_lost()
            self._schedule_retry()

    def _confirm(self, mark: _Sent) -> None:
        """A marker came back: the server has passed on everything up to `mark`."""
        self._succeeded()
        now, wall = time.monotonic(), time.time()
        window, metrics = self._window, self._metrics
        batches = events = 0
        while window:
            sent = window.popleft()
            self._window_bytes -= len(sent.payload)
            batches += sent.batches
            events += sent.events
            waited = now - sent.sent_at
            metrics.publish_latency.observe(waited)
            metrics.lag.observe(max(0.0, wall - waited - sent.ts))  # to publishing
            if sent is mark:
                break
        metrics.batches_published.inc(batches)
        metrics.events_published.inc(events)
        if self._buffer and self._window_open():
            self._wake.set()

    # -- shutdown ------------------------------------------------------------------------------

    def abandon(self) -> int:
        """Count what could not be delivered; returns the number of batches."""
        self.send_gathered()  # into the window or the buffer, to be counted with them
        lost = len(self._buffer) + sum(s.batches for s in self._window)
        events = sum(s.events for s in self._window)
        self._buffer.drain_all()
        self._window.clear()
        self._window_bytes = 0
        if lost:
            self._metrics.drop("shutdown", lost, events)
        return lost

    async def close(self) -> None:
        """Leave Dynamo's discovery (the router drops the worker's ranks), then NATS."""
        self.connected = False
        self._markers.cancel()
        if self.registrar is not None:
            try:
                await self.registrar.unregister()
            except (OSError, EtcdRefused) as exc:
                log.error("cannot remove the Dynamo discovery records from %s: %s (they "
                          "expire in %.0fs)", self.registrar.store.where, exc,
                          self.registrar.store.ttl)
        await super().close()
