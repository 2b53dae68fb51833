"""Router side: follow every worker's RelayBatches in JetStream and keep a KvIndex of them.

    async with KvConsumer("nats://nats:4222", "dynamo", "backend") as consumer:
        await consumer.ready()  # caught up with what the stream held at start
        scores = consumer.index.overlap(block_hashes)

One subscription on the component's wildcard subject (`kv.<ns>.<component>.>`), an ordered
consumer by default: nats-py recreates it from the last stream sequence seen when heartbeats stop
(a NATS restart or a lost consumer), so nothing is skipped or repeated across outages. With
`durable=` a named consumer keeps the position on the server across router restarts instead;
messages are acknowledged once applied. Each message is decoded once, applied to the index
(which checks every worker's (epoch, seq) and reports gaps the relay did not announce), and,
with `deliveries=N`, handed to `batches()` for routers that keep their own state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, Literal, NamedTuple

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from prometheus_client import CollectorRegistry

from kvrelay.ratelimit import RateLimitedLog
from kvrelay.router.index import Gap, KvIndex, Outcome
from kvrelay.router.metrics import ConsumerMetrics
from kvrelay.router.restore import restore_snapshots
from kvrelay.wire.names import (
    BUCKET_RULE,
    NAME_RULE,
    SNAPSHOT_BUCKET,
    SUBJECT_PREFIX,
    worker_subjects,
)
from kvrelay.wire.relaybatch import decode_relay_batches
from kvrelay.wire.schema import RelayBatch, Resync, Unknown

log = logging.getLogger("kvrelay.consumer")

_CONNECT_DEFAULTS: Final[dict[str, Any]] = {
    "name": "kvrelay-consumer",
    "allow_reconnect": True,
    "max_reconnect_attempts": -1,  # a router outlives NATS outages, at start too
    "reconnect_time_wait": 0.5,
    "connect_timeout": 2,
    "ping_interval": 5,  # find a dead or frozen server in seconds
    "max_outstanding_pings": 3,
}
_DURABLE_RULE: Final = re.compile(r"^[A-Za-z0-9_-]+$")


class Delivery(NamedTuple):
    """One applied batch, for routers that keep their own state."""

    subject: str
    stream_seq: int
    batch: RelayBatch
    gap: Gap | None  # batches of this worker lost before this one: drop its state, as for resync


class StreamNotFound(LookupError):
    """The stream does not exist and the consumer was told not to wait for it."""


class KvConsumer:
    """Subscribes to a component's workers, applies their batches to `index`, counts trouble."""

    def __init__(
        self,
        servers: str | Sequence[str] = "nats://127.0.0.1:4222",
        namespace: str = "dynamo",
        component: str = "backend",
        *,
        instance_id: int | None = None,
        subject: str | None = None,
        stream: str = "KV_EVENTS",
        durable: str | None = None,
        start_sequence: int | None = None,
        bootstrap: Literal["stream", "snapshot"] = "stream",
        snapshot_bucket: str = SNAPSHOT_BUCKET,
        index: KvIndex | None = None,
        on_gap: Callable[[Gap], None] | None = None,
        deliveries: int = 0,
        registry: CollectorRegistry | None = None,
        connect_options: Mapping[str, Any] | None = None,
        client: Client | None = None,
        idle_heartbeat: float = 1.0,
        wait_for_stream: bool = True,
        subject_prefix: str = SUBJECT_PREFIX,
    ) -> None:
        """`servers`: URL(s), comma-separated or a list; `subject` overrides the subject built
        from namespace, component (and instance_id); `start_sequence`: first stream sequence to
        read (default: the stream's first), e.g. a snapshot's stream_seq + 1 with `index`
        restored from it; `bootstrap="snapshot"`: restore the workers' snapshots from the KV
        bucket `snapshot_bucket` first and read the stream only from where they need it;
        `deliveries`: queue size for `batches()` (0: no iteration);
        `connect_options` go to nats.connect; `client`: an existing connection (not closed
        here); `idle_heartbeat`: seconds between the server's heartbeats, an ordered consumer
        is recreated after two missed ones; `wait_for_stream`: False makes a missing stream an
        error of `ready()` instead of a wait; `subject_prefix`: the relays' --subject-prefix."""
        for name, value in (("namespace", namespace), ("component", component)):
            if subject is None and not NAME_RULE.match(value):
                raise ValueError(f"{name} {value!r} must match {NAME_RULE.pattern}")
        if durable is not None and not _DURABLE_RULE.match(durable):
            raise ValueError(f"durable name {durable!r} must match {_DURABLE_RULE.pattern}")
        if start_sequence is not None and start_sequence < 1:
            raise ValueError("start_sequence counts from 1")
        if bootstrap not in ("stream", "snapshot"):
            raise ValueError(f"bootstrap {bootstrap!r} is neither 'stream' nor 'snapshot'")
        if bootstrap == "snapshot" and (subject, durable, start_sequence) != (None,) * 3:
            raise ValueError("bootstrap='snapshot' chooses where to start: it goes with "
                             "neither subject=, durable= nor start_sequence=")
        if not BUCKET_RULE.match(snapshot_bucket):
            raise ValueError(f"snapshot_bucket {snapshot_bucket!r} must match "
                             f"{BUCKET_RULE.pattern}")
        if idle_heartbeat <= 0:
            raise ValueError("idle_heartbeat must be positive")
        self._explicit_subject = subject is not None
        self.subject = subject or worker_subjects(namespace, component, instance_id,
                                                  subject_prefix)
        self.subject_prefix = subject_prefix
        self._workers = (namespace, component, instance_id)
        self.bootstrap = bootstrap
        self.snapshot_bucket = snapshot_bucket
        self.stream = stream
        self.durable = durable
        self.start_sequence = start_sequence
        self.index = index if index is not None else KvIndex()
        self.metrics = ConsumerMetrics(registry)
        self.stream_seq = (start_sequence or 1) - 1
        """JetStream sequence of the last message handled."""
        self.gaps = 0
        self.undecodable = 0
        self.applied_events = 0
        """Events in the batches applied so far (a snapshot writer's cadence counts them)."""
        self._on_gap = on_gap
        self._servers = ([s.strip() for s in servers.split(",") if s.strip()]
                         if isinstance(servers, str) else list(servers))
        self._connect_options = dict(connect_options or {})
        self._client = client
        self._owns_client = client is None
        self._idle_heartbeat = idle_heartbeat
        self._wait_for_stream = wait_for_stream
        self._deliveries: asyncio.Queue[Delivery | None] | None = (
            asyncio.Queue(deliveries) if deliveries > 0 else None)
        self._caught_up = asyncio.Event()
        self._target = 0
        self._task: asyncio.Task[None] | None = None
        self._sub: JetStreamContext.PushSubscription | None = None
        self._warn = RateLimitedLog(log)
        self._closing = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> KvConsumer:
        self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    def start(self) -> None:
        """Connect and follow the stream in a background task; `ready()` says when caught up."""
        if self._task is not None:
            raise RuntimeError("KvConsumer already started")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="kvrelay-consumer")

    async def ready(self) -> None:
        """Wait until every message the stream held for our subject at start is applied, or
        raise what stopped the consumer (bound the wait with `asyncio.timeout`)."""
        task = self._task
        if task is None:
            raise RuntimeError("KvConsumer not started")
        waiter = asyncio.ensure_future(self._caught_up.wait())
        try:
            await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if self._caught_up.is_set():
            return
        failure = None if task.cancelled() else task.exception()
        raise failure or RuntimeError("KvConsumer stopped")

    @property
    def is_ready(self) -> bool:
        return self._caught_up.is_set()

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.is_connected

    @property
    def client(self) -> Client | None:
        """The NATS connection (None until connected)."""
        return self._client

    @property
    def workers_of(self) -> tuple[str, str] | None:
        """(namespace, component) of the workers followed; None when a `subject` was given
        instead."""
        namespace, component, _ = self._workers
        return None if self._explicit_subject else (namespace, component)

    @property
    def running(self) -> bool:
        """False once the consumer stopped: closed, or failed (`ready()` raises why)."""
        return self._task is not None and not self._task.done()


    async def close(self) -> None:
        """Stop following; closes the connection when this consumer opened it."""
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._sub is not None and self._client is not None and self._client.is_connected:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await self._sub.unsubscribe()
        self._sub = None
        if self._owns_client and self._client is not None:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await self._client.close()
            self._client = None
        self._end_deliveries()

    def _end_deliveries(self) -> None:
        queue = self._deliveries
        if queue is None:
            return
        while queue.full():  # nobody is reading: make room for the end marker
            queue.get_nowait()
            queue.task_done()
        queue.put_nowait(None)

    async def batches(self) -> AsyncIterator[Delivery]:
        """Every applied batch in stream order (duplicates and skipped ones left out); ends
        when the consumer closes, raising what stopped it, if anything did."""
        if self._deliveries is None:
            raise RuntimeError("construct KvConsumer with deliveries=N to iterate its batches")
        queue = self._deliveries
        while True:
            item = await queue.get()
            if item is None:
                queue.task_done()
                queue.put_nowait(None)  # for any other iterator
                task = self._task
                if task is not None and task.done() and not task.cancelled():
                    failure = task.exception()
                    if failure is not None:
                        raise failure
                return
            try:
                yield item
            finally:
                queue.task_done()

    async def delivered(self) -> None:
        """Wait until `batches()` handed out every batch applied so far and its reader came
        back for the next one (so whatever it does with a batch is done)."""
        if self._deliveries is not None:
            await self._deliveries.join()

    # -- following the stream ------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            if self._client is None:
                self._client = await nats.connect(**self._options())
            js = self._client.jetstream()
            if self.bootstrap == "snapshot":
                await self._restore(js)
            self._sub = await self._subscribe(js)
            self._target = await self._last_sequence(js)
            if self.stream_seq >= self._target or await self._nothing_pending():
                self._caught_up.set()
            log.info("following %s on stream %s from %s", self.subject, self.stream,
                     f"sequence {self.start_sequence}" if self.start_sequence else "the start")
            async for msg in self._sub.messages:
                await self._handle(msg)
        finally:
            self._end_deliveries()

    def _options(self) -> dict[str, Any]:
        options = {**_CONNECT_DEFAULTS, **self._connect_options, "servers": self._servers}
        for name, ours in (("error_cb", self._on_error),
                           ("disconnected_cb", self._on_disconnected),
                           ("reconnected_cb", self._on_reconnected)):
            options[name] = _chain(ours, options.get(name))
        return options

    async def _subscribe(self, js: JetStreamContext) -> JetStreamContext.PushSubscription:
        delay = 0.1
        while True:
            config = ConsumerConfig()
            policy = DeliverPolicy.ALL
            if self.start_sequence is not None:
                policy, config.opt_start_seq = DeliverPolicy.BY_START_SEQUENCE, self.start_sequence
            try:
                if self.durable is None:
                    return await js.subscribe(self.subject, stream=self.stream, config=config,
                                              deliver_policy=policy, ordered_consumer=True,
                                              idle_heartbeat=self._idle_heartbeat)
                config.ack_policy = AckPolicy.EXPLICIT
                return await js.subscribe(self.subject, stream=self.stream, config=config,
                                          deliver_policy=policy, durable=self.durable,
                                          manual_ack=True)
            except nats.js.errors.NotFoundError:
                if not self._wait_for_stream:
                    raise StreamNotFound(f"no stream {self.stream}") from None
                self._warn.warning("stream", "stream %s not found; waiting for a relay to "
                                   "create it", self.stream)
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError,
                    nats.js.errors.ServiceUnavailableError) as exc:
                self._warn.warning("subscribe", "cannot subscribe to %s on %s: %r; retrying",
                                   self.subject, self.stream, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _restore(self, js: JetStreamContext) -> None:
        """Restore the workers' snapshots; read the stream from where they need it."""
        namespace, component, instance_id = self._workers
        delay = 0.1
        while True:
            try:
                start = await restore_snapshots(
                    js, self.index, stream=self.stream, bucket=self.snapshot_bucket,
                    namespace=namespace, component=component, instance_id=instance_id,
                    count=lambda outcome: self.metrics.snapshots.labels(outcome).inc(),
                    subject_prefix=self.subject_prefix)
                break
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError,
                    nats.js.errors.ServiceUnavailableError) as exc:
                self._warn.warning("restore", "cannot read snapshots from bucket %s: %r; "
                                   "retrying", self.snapshot_bucket, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        if start is not None:
            self.start_sequence = start
            self.stream_seq = start - 1

    async def _last_sequence(self, js: JetStreamContext) -> int:
        """The stream sequence of the last message for our subject now: ready once past it."""
        while True:
            try:
                return int((await js.get_last_msg(self.stream, self.subject)).seq or 0)
            except nats.js.errors.NotFoundError:
                return 0
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
                self._warn.warning("last", "cannot read the last message of %s: %r; retrying",
                                   self.subject, exc)
                await asyncio.sleep(0.5)

    async def _nothing_pending(self) -> bool:
        """True when a durable consumer resumes with nothing to deliver or acknowledge (its
        position may be past the last message)."""
        if self._sub is None or self.durable is None:
            return False
        try:
            info = await self._sub.consumer_info()
        except (nats.errors.Error, TimeoutError):
            return False  # the first message will tell
        return info.num_pending == 0 and info.num_ack_pending == 0

    async def _handle(self, msg: Msg) -> None:
        meta = msg.metadata
        stream_seq = meta.sequence.stream
        try:
            batches = decode_relay_batches(msg.data)
        except (ValueError, RecursionError) as exc:
            self.undecodable += 1
            self.metrics.undecodable.inc()
            self._warn.warning("undecodable", "dropped stream message %d on %s: not a "
                               "RelayBatch (%s)", stream_seq, msg.subject, exc)
        else:
            # A pack's batches all apply before anything awaits: a snapshot sees the message
            # whole or not at all.
            delivered: list[Delivery] = []
            deliveries = self._deliveries
            for batch in batches:
                outcome, gap = self.index.apply(batch, stream_seq)
                if outcome is Outcome.DUPLICATE:
                    self.metrics.duplicates.inc()
                elif outcome is Outcome.APPLIED:
                    self._count(batch)
                    if gap is not None:
                        self._report(gap)
                    if deliveries is not None:
                        delivered.append(Delivery(msg.subject, stream_seq, batch, gap))
            if deliveries is not None:
                for delivery in delivered:
                    await deliveries.put(delivery)
        self.stream_seq = stream_seq
        self.metrics.stream_seq.set(stream_seq)
        if not self._caught_up.is_set() and (stream_seq >= self._target
                                             or meta.num_pending == 0):
            log.info("caught up with %s at stream sequence %d", self.stream, stream_seq)
            self._caught_up.set()
        if self.durable is not None:
            await msg.ack()

    def _count(self, batch: RelayBatch) -> None:
        self.metrics.batches.inc()
        self.metrics.events.inc(len(batch.events))
        self.applied_events += len(batch.events)
        for event in batch.events:
            if isinstance(event, Resync):
                self.metrics.resyncs.labels(event.reason).inc()
            elif isinstance(event, Unknown):
                self.metrics.unknown_events.inc()

    def _report(self, gap: Gap) -> None:
        self.gaps += 1
        self.metrics.gaps.inc()
        log.warning("gap in the stream: %s; its blocks are dropped until it stores again",
                    gap.describe())
        if self._on_gap is not None:
            try:
                self._on_gap(gap)
            except Exception:
                log.exception("on_gap callback failed")

    # -- connection events ---------------------------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        self._warn.warning(type(exc).__name__, "NATS: %r", exc)

    async def _on_disconnected(self) -> None:
        if not self._closing:
            log.warning("disconnected from NATS; reconnecting")

    async def _on_reconnected(self) -> None:
        self.metrics.nats_reconnects.inc()
        log.info("reconnected to NATS")


def _chain(ours: Callable[..., Any], theirs: Callable[..., Any] | None) -> Callable[..., Any]:
    """A nats-py callback calling ours, then the one the caller passed in connect_options."""
    if theirs is None:
        return ours

    async def both(*args: Any) -> None:
        await ours(*args)
        await theirs(*args)

    return both
