"""Router side of snapshots, writing: the workers' blocks from a consumer's index, into the KV
bucket that `KvConsumer(bootstrap="snapshot")` restores from.

A KvConsumer already applies every batch of its component's workers, in stream order, to its
index; a snapshot written from that index costs only its build, done in a forked child where the
platform can fork (kvrelay/router/forked.py) so the consumer's loop never waits for it. (A relay
keeping its own worker's blocks instead decodes every batch a second time, on the vLLM host:
`kvrelay run --snapshot-interval`.) Each worker rank's snapshot is complete up to the stream
sequence it records, the last one the consumer applied, so one written by any consumer of the
component serves every other; several writers only repeat each other's writes.

Cadence: every `interval` seconds, or once `events` events were applied since the last round,
whichever comes first; a round writes the workers whose state changed since their last write,
and those whose last write is older than `refresh` while the stream moved on, one at a time.
An event-triggered round waits until building the last one has cost at most 1/_SPACING of a
core. A bucket that cannot be opened or created, a build that fails, a snapshot above the
server's max_payload or a write NATS refuses is logged and counted
(`kvrelay_consumer_snapshot_writes_total{outcome}`) and tried again in the next round.
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import TracebackType
from typing import Final

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from kvrelay.ratelimit import RateLimitedLog
from kvrelay.router import forked
from kvrelay.router.consumer import KvConsumer
from kvrelay.router.index import KvIndex, WorkerKey, encode_snapshot
from kvrelay.router.restore import open_bucket, snapshot_key

log = logging.getLogger("kvrelay.snapwriter")

_SPACING: Final = 50.0  # an event-triggered round waits 50x the last round's build CPU
_TICK: Final = 1.0  # seconds between looks at the cadence


class SnapshotWriter:
    """Writes the snapshots of the workers a KvConsumer follows, as they change."""

    def __init__(self, consumer: KvConsumer, *, interval: float = 30.0, events: int = 50_000,
                 refresh: float = 600.0, replicas: int = 1) -> None:
        """`interval`: seconds between rounds (0: none on a timer); `events`: also a round once
        this many events were applied since the last (0: never on a count); `refresh`: an
        unchanged worker's snapshot is written again, with the stream sequence the consumer
        has reached, once it is this many seconds old (see below); `replicas`: of the bucket,
        when this writer creates it.

        Why refresh: once the messages after a snapshot have aged out of the stream, a router
        starting later cannot tell whether any of them was the worker's, and starts it empty;
        an idle worker's snapshot written again keeps up with the stream."""
        if interval < 0 or events < 0 or (interval == 0 and events == 0):
            raise ValueError("a SnapshotWriter needs interval > 0 or events > 0 (neither "
                             "negative)")
        if refresh <= 0:
            raise ValueError("refresh must be positive")
        workers_of = consumer.workers_of
        if workers_of is None:
            raise ValueError("a SnapshotWriter keys snapshots by namespace and component: "
                             "give the KvConsumer those, not a subject")
        self._consumer = consumer
        self._namespace, self._component = workers_of
        self.interval = interval
        self.events = events
        self._replicas = replicas
        self.refresh = refresh
        # per worker, at its last write: (batches, blocks), when, the consumer's stream sequence
        self._written: dict[WorkerKey, tuple[tuple[int, int], float, int]] = {}
        self._kv: KeyValue | None = None
        self._task: asyncio.Task[None] | None = None
        self._not_before = 0.0
        self._warn = RateLimitedLog(log)
        self._count = consumer.metrics.snapshot_writes
        self.written = 0
        """Snapshots written so far."""

    async def __aenter__(self) -> SnapshotWriter:
        self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    def start(self) -> None:
        """Write on the cadence once the consumer has caught up (in a background task)."""
        if self._task is not None:
            raise RuntimeError("SnapshotWriter already started")
        self._task = asyncio.get_running_loop().create_task(self._run(),
                                                            name="kvrelay-snapwriter")

    async def close(self, within: float = 5.0) -> None:
        """Stop the cadence; then, within `within` seconds (0: none), write what changed."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=2.0)  # nats-py may hold a cancellation
        if within <= 0 or not self._consumer.is_ready or not self._consumer.connected:
            return
        try:
            async with asyncio.timeout(within):
                await self.write_changed()
        except TimeoutError:
            log.warning("no time left for the last snapshots")

    async def write_changed(self) -> int:
        """Write every worker whose state changed since its last write; how many were."""
        client = self._consumer.client
        if client is None or not self._consumer.is_ready:
            return 0
        if self._kv is None:
            self._kv = await self._bucket(client.jetstream())
            if self._kv is None:
                return 0
        index = self._consumer.index
        wrote = 0
        cpu = 0.0
        for worker in index.workers():
            status = index.status(worker)
            state = (status.batches, status.blocks)
            last = self._written.get(worker)
            if last is None and status.batches == 0:
                # Restored from its snapshot and nothing since: the bucket holds this already.
                self._written[worker] = (state, time.monotonic(), index.stream_seq)
                continue
            if last is not None and last[0] == state and (
                    time.monotonic() - last[1] < self.refresh or last[2] == index.stream_seq):
                continue  # unchanged, and either written lately or the stream did not move
            built = await self._build(index, worker)
            if built is None:
                continue
            data, spent = built
            cpu += spent
            if await self._put(worker, data, client.max_payload):
                self._written[worker] = (state, time.monotonic(), index.stream_seq)
                wrote += 1
        self._not_before = time.monotonic() + _SPACING * cpu
        return wrote

    async def _run(self) -> None:
        consumer = self._consumer
        try:
            await consumer.ready()
        except Exception:
            return  # the consumer's own failure: ready() raises it to its owner
        # What the consumer applied catching up counts: its snapshots shorten the next start.
        last_round, events_at = time.monotonic(), 0
        while True:
            await asyncio.sleep(_TICK)
            now = time.monotonic()
            timed = self.interval > 0 and now - last_round >= self.interval
            counted = self.events > 0 and consumer.applied_events - events_at >= self.events
            if not timed and not (counted and now >= self._not_before):
                continue
            last_round, events_at = now, consumer.applied_events
            try:
                await self.write_changed()
            except Exception:
                log.exception("a round of snapshots failed; trying again in the next")

    async def _bucket(self, js: JetStreamContext) -> KeyValue | None:
        bucket = self._consumer.snapshot_bucket
        try:
            return await open_bucket(js, bucket, self._replicas)
        except (nats.errors.Error, TimeoutError) as exc:
            self._count.labels("bucket").inc()
            self._warn.warning("bucket", "cannot open or create KV bucket %s for snapshots: "
                               "%s; trying again in the next round", bucket, _why(exc))
            return None

    async def _build(self, index: KvIndex, worker: WorkerKey) -> tuple[bytes, float] | None:
        """The worker's snapshot and the CPU seconds it took; None (counted) if it failed."""
        try:
            if forked.available():
                return await forked.in_child(lambda: encode_snapshot(index.snapshot(worker)))
            started = time.process_time()  # pragma: no cover - platforms without fork
            build = index.snapshot_later(worker)  # pragma: no cover
            data = await asyncio.to_thread(lambda: encode_snapshot(build()))  # pragma: no cover
            return data, time.process_time() - started  # pragma: no cover
        except (OSError, forked.ChildFailed) as exc:
            self._count.labels("build").inc()
            self._warn.warning("build", "cannot build the snapshot of worker %s: %s", worker,
                               _why(exc))
            return None

    async def _put(self, worker: WorkerKey, data: bytes, max_payload: int) -> bool:
        assert self._kv is not None
        key = snapshot_key(self._namespace, self._component, *worker)
        if len(data) > max_payload:
            self._count.labels("too_large").inc()
            self._warn.warning("too-large", "snapshot %s is %d bytes, above the server's "
                               "max_payload %d: not written (raise max_payload)", key,
                               len(data), max_payload)
            return False
        try:
            await self._kv.put(key, data)
        except (nats.errors.Error, TimeoutError) as exc:
            self._count.labels("write").inc()
            self._warn.warning("write", "cannot write snapshot %s: %s", key, _why(exc))
            return False
        self._count.labels("written").inc()
        self.written += 1
        log.debug("snapshot %s written: %d bytes", key, len(data))
        return True


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__

