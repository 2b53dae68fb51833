"""Router side of snapshots: read a component's worker snapshots from the NATS KV bucket,
judge each against the stream, restore the usable ones into a KvIndex, and say where in the
stream to read on from. Routers write them (kvrelay/router/snapwriter.py; a relay asked to,
kvrelay/jetstream/snapshot.py), keyed by `<namespace>.<component>.<instance_id>.<dp_rank>`, in
the bucket `open_bucket` opens or creates.

A snapshot older than the stream (deleted and created again) is ignored. One whose following
messages the stream no longer holds (aged out or purged past it), while the worker has nothing
later there, is restored empty and not exact, as for a gap: what it missed may have removed
blocks. Otherwise the index's own (epoch, seq) checks find any loss after it.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import logging
from collections.abc import Callable
from typing import NamedTuple

import msgspec
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType, StreamInfo
from nats.js.kv import KeyValue

from kvrelay.router.index import KvIndex, WorkerKey, decode_snapshot
from kvrelay.wire.names import SUBJECT_PREFIX, worker_subjects
from kvrelay.wire.schema import WorkerSnapshot

log = logging.getLogger("kvrelay.restore")

def snapshot_key(namespace: str, component: str, instance_id: int, dp_rank: int) -> str:
    """The KV key of one worker rank's snapshot (its subject without the `kv.` prefix)."""
    return f"{namespace}.{component}.{instance_id}.{dp_rank}"


async def open_bucket(js: JetStreamContext, bucket: str, replicas: int) -> KeyValue:
    """The snapshot bucket, created (history 1, file storage, `replicas`) when missing; the
    writers' one way to it. NATS errors go to the caller."""
    try:
        return await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        kv = await js.create_key_value(KeyValueConfig(
            bucket=bucket, history=1, storage=StorageType.FILE, replicas=replicas,
            description="kvrelay: each worker rank's KV blocks"))
        log.info("created KV bucket %s for snapshots", bucket)
        return kv


class Found(NamedTuple):
    """A snapshot read from the bucket: None when the value is not one."""

    key: str
    snapshot: WorkerSnapshot | None
    written_at: datetime.datetime | None


class Verdict(enum.Enum):
    RESTORED = "restored"
    TAIL_MISSING = "tail_missing"  # restored empty and not exact
    STALE = "stale"  # ignored: older than the stream


async def read_snapshots(js: JetStreamContext, bucket: str, keys: str) -> list[Found] | None:
    """The latest value of every key matching `keys`; None when the bucket does not exist.

    Read from the bucket's stream directly: the keys it holds (stream info, filtered), then the
    last message of each. nats-py's KV watcher can say it has delivered the current values
    before a value already on its way reaches it, and a router then restores nothing.
    """
    stream, prefix = f"KV_{bucket}", f"$KV.{bucket}."
    try:  # the bucket's stream, as nats-py's key_value() would look it up
        info = await js.stream_info(stream, subjects_filter=prefix + keys)
    except nats.js.errors.NotFoundError:
        return None
    found: list[Found] = []
    for subject in sorted(info.state.subjects or {}):
        try:
            msg = await js.get_last_msg(stream, subject)
        except nats.js.errors.NotFoundError:
            continue  # deleted since
        headers = msg.headers or {}
        if headers.get("KV-Operation") in ("DEL", "PURGE") or "Nats-Marker-Reason" in headers:
            continue  # a deleted key (or the server's marker of one)
        key = subject.removeprefix(prefix)
        try:
            snapshot = decode_snapshot(msg.data or b"")
        except ValueError:
            snapshot = None
        if snapshot is not None and key.split(".")[2:] != [
                str(snapshot.instance_id), str(snapshot.dp_rank)]:
            snapshot = None  # a value under another worker's key
        found.append(Found(key, snapshot, msg.time))
    return found


async def judge(js: JetStreamContext, info: StreamInfo, subject: str,
                snapshot: WorkerSnapshot, written_at: datetime.datetime | None) -> Verdict:
    """Whether `snapshot` of the worker on `subject` can be restored and read on from."""
    state = info.state
    if (info.created is not None and written_at is not None and written_at < info.created) \
            or snapshot.stream_seq > state.last_seq:
        return Verdict.STALE
    if state.first_seq <= snapshot.stream_seq + 1:
        return Verdict.RESTORED  # nothing after it has left the stream
    try:  # a later batch of the worker is there: the index's (epoch, seq) check finds a loss
        await js.get_msg(info.config.name or "", seq=snapshot.stream_seq + 1, subject=subject,
                         next=True)
    except nats.js.errors.NotFoundError:
        return Verdict.TAIL_MISSING
    return Verdict.RESTORED


def emptied(snapshot: WorkerSnapshot) -> WorkerSnapshot:
    """What to restore when the messages after a snapshot are lost: nothing, not exact."""
    return msgspec.structs.replace(snapshot, epoch=None, seq=None, exact=False, tiers=[])


async def restore_snapshots(js: JetStreamContext, index: KvIndex, *, stream: str, bucket: str,
                            namespace: str, component: str, instance_id: int | None,
                            count: Callable[[str], None],
                            subject_prefix: str = SUBJECT_PREFIX) -> int | None:
    """Restore the component's usable snapshots into `index`; returns the stream sequence to
    read from (the lowest that a restored worker or a worker without a snapshot needs), None
    for the stream's start. `count(outcome)` hears of each snapshot's fate."""
    subjects = worker_subjects(namespace, component, instance_id, subject_prefix)
    keys = subjects.removeprefix(f"{subject_prefix}.")
    found = await read_snapshots(js, bucket, keys)
    if not found:
        log.info("no snapshots of %s in bucket %s: reading the stream from its start", keys,
                 bucket)
        return None
    try:  # after the snapshots: the stream then holds at least what each covers
        info = await js.stream_info(stream, subjects_filter=subjects)
    except nats.js.errors.NotFoundError:
        return None
    starts: dict[WorkerKey, int] = {}
    for entry in found:
        snapshot = entry.snapshot
        if snapshot is None:
            count("undecodable")
            log.warning("snapshot %s in bucket %s is not a worker snapshot; ignored",
                        entry.key, bucket)
            continue
        verdict = await judge(js, info, f"{subject_prefix}.{entry.key}", snapshot, entry.written_at)
        if verdict is Verdict.STALE:
            count(verdict.value)
            log.warning("snapshot %s is older than stream %s; ignored", entry.key, stream)
            continue
        if verdict is Verdict.TAIL_MISSING:
            log.warning("stream %s no longer holds what followed snapshot %s (stream sequence "
                        "%d); the worker starts empty", stream, entry.key, snapshot.stream_seq)
            snapshot = emptied(snapshot)
        try:
            index.restore(snapshot)
        except ValueError as exc:
            count("undecodable")
            log.warning("snapshot %s: %s; ignored", entry.key, exc)
            continue
        count(verdict.value)
        starts[(snapshot.instance_id, snapshot.dp_rank)] = snapshot.stream_seq + 1
    if not starts:
        return None
    for subject in info.state.subjects or {}:
        worker = _worker_of(subject)
        if worker is not None and worker not in starts:  # no snapshot: from its first message
            with contextlib.suppress(nats.js.errors.NotFoundError):
                first = await js.get_msg(stream, seq=1, subject=subject, next=True)
                starts[worker] = first.seq or 1
    return min(starts.values())


def _worker_of(subject: str) -> WorkerKey | None:
    parts = subject.split(".")
    try:
        return int(parts[-2]), int(parts[-1])
    except (IndexError, ValueError):
        return None
