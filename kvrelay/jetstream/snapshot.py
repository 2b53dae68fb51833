"""Relay side of snapshots: this worker's blocks in a NATS KV bucket, so a router that starts
late restores them and reads only the stream's tail after them instead of hours of history.

Per DP rank a KvIndex, fed with every batch JetStream stored (its payload, as routers read it),
once each and in its subject's order, with its stream sequence. The relay runs this in a
process of its own (kvrelay/jetstream/snapshotproc.py), so keeping the index and building
snapshots never takes the publishing loop's time. The index takes them in runs of `_RUN` batches
or `_RUN_ITEMS` events and block hashes, whichever comes first, and before every snapshot: a
run applied in one go costs a fraction of the same batches applied one per wake-up of a quiet
relay, whose caches have gone cold in between. A task writes the ranks whose index changed every
`--snapshot-interval` seconds or `--snapshot-events` events, one write at a time, building the
snapshot in a forked child so publishing never waits for it; a final one is written after the
drain.
At start each rank's index is rebuilt from its last snapshot and the subject's messages after it
(the whole subject without one), so snapshots stay complete across relay restarts. Snapshots
are an optimisation: a bucket that cannot be created or written is logged and counted, and
readiness does not depend on it. Batches the relay could not pass on (`gap`) make the rank's
index rebuilt the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from kvrelay.config import NatsSettings, SnapshotSettings, StreamSettings
from kvrelay.jetstream.reports import Reports
from kvrelay.natsio.options import nats_options
from kvrelay.ratelimit import RateLimitedLog
from kvrelay.router import forked
from kvrelay.router.consumer import KvConsumer
from kvrelay.router.index import KvIndex, WorkerKey, encode_snapshot
from kvrelay.router.restore import (
    Verdict,
    emptied,
    judge,
    open_bucket,
    read_snapshots,
    snapshot_key,
)
from kvrelay.wire.names import Worker
from kvrelay.wire.relaybatch import decode_relay_batches
from kvrelay.wire.schema import RelayBatch, Removed, Stored, WorkerSnapshot

log = logging.getLogger("kvrelay.snapshot")

_RETRY_MAX: Final = 60.0
_QUEUE: Final = 1000  # batches stored during a rebuild kept for going live
_SPACING: Final = 50.0  # an event-triggered snapshot waits 50x the last build's CPU time
_RUN: Final = 64  # stored batches the index takes in one go
_RUN_ITEMS: Final = 4096  # events and block hashes in a run past which it is taken at once


@dataclass(eq=False)
class _Rank:
    dp_rank: int
    subject: str
    key: str
    worker: WorkerKey
    queue: deque[tuple[RelayBatch, int]]  # the newest stored while the index is rebuilt
    run: list[tuple[RelayBatch, int]] = field(default_factory=list)  # stored, not applied yet
    run_items: int = 0  # events and block hashes the run holds (its memory)
    dropped_seq: int = 0  # the newest stream sequence the queue let go
    index: KvIndex = field(default_factory=lambda: KvIndex(queries=False))
    ready: bool = False
    stream_seq: int = 0  # the highest stream sequence in the index
    written_seq: int = -1  # the stream sequence of the last snapshot written
    written_at: float = 0.0
    events: int = 0  # applied since the last snapshot
    too_large_at: int = 0  # blocks held when a snapshot came out above max_payload (0: none)


class Snapshotter:
    """Keeps this relay's ranks' blocks and writes them to the KV bucket."""

    def __init__(self, worker: Worker, dp_ranks: list[int], config: SnapshotSettings,
                 nats: NatsSettings, stream: StreamSettings, reports: Reports) -> None:
        self._config = config
        self._nats = nats
        self._stream = stream
        self._reports = reports
        self._warn = RateLimitedLog(log)
        self._ranks = {
            rank: _Rank(rank, worker.subject(rank), snapshot_key(*worker[:3], rank),
                        (worker.instance_id, rank), deque(maxlen=_QUEUE))
            for rank in dp_ranks}
        self._due = asyncio.Event()
        self._nc: Client | None = None
        self._kv: KeyValue | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._not_before = 0.0  # no event-triggered snapshot before (CPU budget)
        self._stale: set[int] = set()  # ranks whose stored batches did not all arrive
        self._live = asyncio.Event()  # every rank rebuilt and following

    def stored(self, dp_rank: int, payload: bytes, stream_seq: int) -> None:
        """The publisher's hook: JetStream stored the batch `payload` at `stream_seq`."""
        rank = self._ranks.get(dp_rank)
        if rank is None:
            return
        try:
            batches = decode_relay_batches(payload)
        except ValueError:  # never sent unless it was one: a rebuild reads what was stored
            self._reports.failed("index")
            self._warn.warning("undecodable", "a stored batch of %s could not be read back; "
                               "its blocks are rebuilt", rank.subject)
            self.gap(dp_rank)
            return
        if not rank.ready:
            for batch in batches:
                if len(rank.queue) == rank.queue.maxlen:  # the oldest goes: the rebuild reads it
                    rank.dropped_seq = rank.queue[0][1]
                rank.queue.append((batch, stream_seq))
            return
        run = rank.run
        for batch in batches:
            run.append((batch, stream_seq))
            self._count(rank, len(batch.events))
            rank.run_items += len(batch.events)
            for event in batch.events:
                if type(event) is Stored or type(event) is Removed:
                    rank.run_items += len(event.block_hashes)
        if len(run) >= _RUN or rank.run_items >= _RUN_ITEMS:
            self._apply_run(rank)

    def gap(self, dp_rank: int) -> None:
        """Stored batches of the rank were not all heard of: rebuild its blocks (from its last
        snapshot and the stream) before its next snapshot."""
        rank = self._ranks.get(dp_rank)
        if rank is None or dp_rank in self._stale:
            return
        self._stale.add(dp_rank)
        self._live.clear()
        rank.ready, rank.run, rank.run_items = False, [], 0
        rank.queue.clear()
        rank.dropped_seq = 0
        self._due.set()

    def _apply_run(self, rank: _Rank) -> None:
        """Apply what was stored since the last run, in order."""
        run, rank.run, rank.run_items = rank.run, [], 0
        for batch, stream_seq in run:
            self._apply(rank, batch, stream_seq)

    def _apply(self, rank: _Rank, batch: RelayBatch, stream_seq: int) -> None:
        try:
            rank.index.apply(batch, stream_seq)
        except Exception:  # never into the publisher's ack path; start over, not exact
            self._reports.failed("index")
            log.exception("the blocks of %s could not take a batch; they start over",
                          rank.subject)
            rank.index, rank.written_seq = KvIndex(queries=False), -1
            return
        rank.stream_seq = max(rank.stream_seq, stream_seq)

    def _count(self, rank: _Rank, events: int) -> None:
        """`events` more for the rank's next snapshot: one is due at --snapshot-events."""
        rank.events += events
        limit = self._config.snapshot_events
        if limit and rank.events >= limit:
            self._due.set()

    def index(self, dp_rank: int) -> KvIndex:
        """The rank's index (what the next snapshot will hold), with every batch stored."""
        rank = self._ranks[dp_rank]
        self._apply_run(rank)
        return rank.index

    def ready(self, dp_rank: int) -> bool:
        """Whether the rank's index was rebuilt and follows what is stored."""
        return self._ranks[dp_rank].ready

    def start(self, stream_ready: asyncio.Event) -> None:
        """Rebuild the ranks' blocks once the stream exists, then write snapshots."""
        self._task = asyncio.ensure_future(self._run(stream_ready))

    async def final(self, within: float) -> None:
        """Stop the task and write what changed since the last snapshot if NATS is up,
        within `within` seconds."""
        deadline = time.monotonic() + within
        if not all(rank.ready for rank in self._ranks.values()) and self._task is not None:
            # Still rebuilding (a relay stopped soon after it started): finish, then write.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._live.wait(), timeout=within)
        if not await self._stop_task(max(0.0, deadline - time.monotonic())) and within > 0:
            log.warning("no final snapshot: the snapshot task did not stop in time")
            return
        left = deadline - time.monotonic()
        if self._nc is None or not self._nc.is_connected or self._kv is None or left <= 0:
            return
        try:
            async with asyncio.timeout(left):
                await self._write_changed()
        except TimeoutError:
            log.warning("no time left for the final snapshot (drain timeout)")
        except Exception:
            log.exception("the final snapshot failed")

    async def close(self) -> None:
        await self._stop_task(0.0)
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.close(), timeout=2.0)
        await self._stop_task(2.0)  # a write the closed connection ended

    async def _stop_task(self, within: float) -> bool:
        """Stop the task; whether it ended within `within` seconds. (nats-py can swallow a
        cancellation in flight, so the task also checks `_stopping`, and is woken.)"""
        self._stopping = True
        self._due.set()
        task = self._task
        if task is None or task.done():
            return True
        task.cancel()
        if within > 0:
            await asyncio.wait({task}, timeout=within)
        return task.done()

    # -- the task ------------------------------------------------------------------------------

    async def _run(self, stream_ready: asyncio.Event) -> None:
        try:
            # A connection of its own: a large write or a rebuild never queues before publishes.
            self._nc = await nats.connect(**{**nats_options(self._nats),
                                             "name": "kvrelay-snapshots"},
                                          error_cb=self._on_error)
            js = self._nc.jetstream()
            await stream_ready.wait()
            self._kv = await self._bucket(js)  # without it, tried again below
            for rank in self._ranks.values():
                await self._rebuild(js, rank)
            interval = self._config.snapshot_interval
            backoff = 1.0
            while not self._stopping:
                if self._kv is None:
                    self._kv = await self._bucket(js)
                    if self._kv is None:
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, _RETRY_MAX)
                        continue
                for dp_rank in sorted(self._stale):
                    self._stale.discard(dp_rank)
                    await self._rebuild(js, self._ranks[dp_rank])
                await self._write_changed()
                if self._stale:
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._due.wait(), timeout=interval or None)
                    # An event count came due: within the CPU budget, unless stopping.
                    wait = self._not_before - time.monotonic()
                    if wait > 0 and not self._stopping:
                        await asyncio.sleep(wait)  # stopping cancels it
                self._due.clear()
        except Exception:
            if not self._stopping:
                log.exception("snapshots stopped (publishing goes on)")

    async def _on_error(self, exc: Exception) -> None:
        self._warn.warning("nats", "snapshots: NATS: %s", _why(exc))

    async def _bucket(self, js: JetStreamContext) -> KeyValue | None:
        """Open the bucket or create it; None (logged, counted) when neither works."""
        name = self._config.snapshot_bucket
        try:
            return await open_bucket(js, name, self._stream.stream_replicas)
        except (nats.errors.Error, TimeoutError) as exc:
            self._reports.failed("bucket")
            self._warn.warning("bucket", "cannot open or create KV bucket %s for snapshots: %s; "
                               "trying again with the next snapshot (publishing is not "
                               "affected)", name, _why(exc))
            return None

    async def _rebuild(self, js: JetStreamContext, rank: _Rank) -> None:
        """The rank's index, from empty, from its last snapshot and the subject after it, then
        live."""
        delay = 1.0
        while True:
            if self._stopping:
                return
            rank.index = KvIndex(queries=False)  # each attempt starts over
            rank.stream_seq, rank.written_seq = 0, -1
            try:
                how = await self._read_subject(js, rank)
                break
            except (nats.errors.Error, TimeoutError, ValueError, RuntimeError) as exc:
                self._reports.failed("bootstrap")
                self._warn.warning("bootstrap", "cannot rebuild the blocks of %s from bucket %s "
                                   "and the stream: %s; retrying", rank.subject,
                                   self._config.snapshot_bucket, _why(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX)
        log.info("blocks of %s rebuilt %s; following from stream sequence %d", rank.subject, how,
                 rank.stream_seq)

    async def _read_subject(self, js: JetStreamContext, rank: _Rank) -> str:
        """Restore the rank's snapshot if usable, read the subject after it and go live;
        says how."""
        config = self._config
        found = await read_snapshots(js, config.snapshot_bucket, rank.key)
        start: int | None = None
        if found and found[0].snapshot is None:
            self._reports.failed("undecodable")
            log.warning("snapshot %s in bucket %s is not a worker snapshot; rebuilding from the "
                        "stream", rank.key, config.snapshot_bucket)
        elif found and (snapshot := found[0].snapshot) is not None:
            info = await js.stream_info(self._stream.name)
            verdict = await judge(js, info, rank.subject, snapshot, found[0].written_at)
            if verdict is Verdict.STALE:
                self._reports.failed("stale")
                log.warning("snapshot %s is older than stream %s; rebuilding from the stream",
                            rank.key, self._stream.name)
            else:
                if verdict is Verdict.TAIL_MISSING:
                    self._reports.failed("tail_missing")
                    log.warning("stream %s no longer holds what followed snapshot %s; the "
                                "blocks start empty", self._stream.name, rank.key)
                    snapshot = emptied(snapshot)
                try:
                    rank.index.restore(snapshot)
                except ValueError as exc:
                    self._reports.failed("undecodable")
                    log.warning("snapshot %s: %s; rebuilding from the stream", rank.key, exc)
                else:
                    start = snapshot.stream_seq + 1
                    rank.stream_seq = snapshot.stream_seq
                    if verdict is Verdict.RESTORED:
                        rank.written_seq = snapshot.stream_seq
        assert self._nc is not None
        reader = KvConsumer(client=self._nc, subject=rank.subject, stream=self._stream.name,
                            start_sequence=start, index=rank.index)
        async with reader:
            await reader.ready()
            # The queue keeps only the newest stored batches: read on past what it let go.
            while reader.stream_seq < rank.dropped_seq:
                if not reader.running:
                    raise RuntimeError("the stream reader stopped")
                await asyncio.sleep(0.02)
            read = rank.index.status(rank.worker).batches \
                if rank.worker in rank.index.workers() else 0
            self._go_live(rank, reader.stream_seq)
        # Until closed the reader may apply a batch the publisher reports too: the index
        # skips the second by its (epoch, seq).
        return (f"from snapshot at stream sequence {start - 1} and {read} batches after it"
                if start is not None else f"from the stream's start ({read} batches)")

    def _go_live(self, rank: _Rank, read_to: int) -> None:
        """Apply what was stored past what the reader applied; from now on the hook does."""
        rank.stream_seq = max(rank.stream_seq, read_to)
        for batch, stream_seq in rank.queue:
            if stream_seq > read_to:
                self._apply(rank, batch, stream_seq)
                self._count(rank, len(batch.events))
        rank.queue.clear()
        rank.ready = True
        self._reports.live(rank.dp_rank, rank.stream_seq)
        if all(r.ready for r in self._ranks.values()):
            self._live.set()

    async def _write_changed(self) -> None:
        for rank in self._ranks.values():
            self._apply_run(rank)
            if rank.ready and rank.stream_seq != rank.written_seq \
                    and rank.worker in rank.index.workers():
                await self._write(rank)

    async def _built(self, rank: _Rank) -> tuple[int, bytes]:
        """The rank's snapshot (stream sequence and bytes), built in a forked child where the
        platform can fork, else in a thread from a copy; the next event-triggered snapshot
        waits long enough that building uses at most 1/_SPACING of a core."""
        if forked.available():
            framed, cpu = await forked.in_child(lambda: _framed(rank.index, rank.worker))
            seq, data = int.from_bytes(framed[:8], "big"), framed[8:]
        else:  # pragma: no cover - platforms without fork
            started = time.process_time()
            seq, data = await asyncio.to_thread(_encoded, rank.index.snapshot_later(rank.worker))
            cpu = time.process_time() - started
        self._reports.built(cpu)
        self._not_before = time.monotonic() + _SPACING * cpu
        return seq, data

    async def _write(self, rank: _Rank) -> None:
        assert self._kv is not None
        assert self._nc is not None
        rank.events = 0  # tried, written or not: the next one on the cadence
        blocks = rank.index.block_count(rank.worker)
        if rank.too_large_at and blocks >= rank.too_large_at:
            # No fewer blocks than a snapshot that did not fit: not built again for nothing.
            self._too_large(rank, None)
            return
        try:
            seq, data = await self._built(rank)
        except (OSError, forked.ChildFailed) as exc:
            self._reports.failed("build")
            self._warn.warning("build", "cannot build snapshot %s: %s", rank.key, _why(exc))
            return
        if len(data) > self._nc.max_payload:
            rank.too_large_at = blocks
            self._too_large(rank, len(data))
            return
        rank.too_large_at = 0
        try:
            await self._kv.put(rank.key, data)
        except (nats.errors.Error, TimeoutError) as exc:
            self._reports.failed("write")
            self._warn.warning("write", "cannot write snapshot %s: %s", rank.key, _why(exc))
            return
        log.debug("snapshot %s written: stream sequence %d, %d bytes", rank.key, seq, len(data))
        rank.written_seq = seq
        rank.written_at = time.time()
        self._reports.written(rank.dp_rank, seq, len(data), rank.written_at)

    def _too_large(self, rank: _Rank, size: int | None) -> None:
        """A snapshot above the server's max_payload (`size` None: not built again, the worker
        holds at least as many blocks as when one last did not fit): counted and logged."""
        assert self._nc is not None
        self._reports.failed("too_large")
        what = f"is {size} bytes" if size is not None else "would be again"
        self._warn.warning("too-large", "snapshot of %s %s, above the server's max_payload %d: "
                           "not written (raise max_payload)", rank.subject, what,
                           self._nc.max_payload)


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _encoded(build: Callable[[], WorkerSnapshot]) -> tuple[int, bytes]:
    snapshot = build()
    return snapshot.stream_seq, encode_snapshot(snapshot)


def _framed(index: KvIndex, worker: WorkerKey) -> bytes:
    """The child's answer: the snapshot's stream sequence (8 bytes), then the snapshot."""
    seq, data = _encoded(lambda: index.snapshot(worker))
    return seq.to_bytes(8, "big") + data
