"""The discovery records Dynamo's router needs before it accepts `--format dynamo` events.

Dynamo's router applies KV events only from a publisher registered in its discovery store: an
EventChannel and an EventSource record per publisher (one per DP rank here) naming the worker
and rank, and, unless the worker registers itself (`--dynamo-register events`), the worker's
endpoint instance and model card, whose runtime config lists its DP ranks.

Both of Dynamo's key-value backends keep the same (bucket, key) pairs; the registrar writes
them through a `KeyValueStore`:
- file (`DYN_DISCOVERY_BACKEND=file`, directory `DYN_FILE_KV`): one directory per bucket, one
  file per key, the key URL-encoded with every character but ASCII letters and digits escaped;
  files are written whole (temp file, then rename) and expire 10 s after their last
  modification, so the owner touches them every few seconds and deletes them on a clean stop;
- etcd (`DYN_DISCOVERY_BACKEND=etcd`): the key `<bucket>/<key>`, attached to a lease that
  is kept alive and revoked on a clean stop (kvrelay/dynamo/etcd.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import tempfile
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final, NamedTuple, Protocol

import msgspec
from msgspec import Struct

from kvrelay.dynamo.wire import KV_EVENTS_TOPIC

log = logging.getLogger("kvrelay.dynamo")

FILE_KV_TTL: Final = 10.0  # Dynamo's lease: a record untouched this long is gone
KEEP_ALIVE: Final = 3.0  # touch well inside the TTL, as Dynamo does (TTL / 3)
TEMP_PREFIX: Final = ".tmp_"  # Dynamo's watchers skip files named so


def default_file_kv() -> str:
    """Dynamo's default directory for the file backend: $TMPDIR/dynamo_store_kv."""
    return str(Path(tempfile.gettempdir()) / "dynamo_store_kv")


def escape_key(key: str) -> str:
    """A key as Dynamo's file backend names its file: all but ASCII alphanumerics escaped."""
    return "".join(chr(b) if chr(b).isascii() and chr(b).isalnum() else f"%{b:02X}"
                   for b in key.encode())


def new_publisher_id() -> int:
    """A fresh publisher ID, like Dynamo's: random, non-zero, below 2**53."""
    return secrets.randbits(53) or 1


# -- records ------------------------------------------------------------------------------------


class EndpointRef(Struct, gc=False):
    namespace: str
    component: str
    name: str


class EndpointScope(Struct, kw_only=True, gc=False):
    kind: str = "endpoint"
    endpoint: EndpointRef


class NatsConfig(Struct, gc=False):
    subject_prefix: str


class NatsChannel(Struct, kw_only=True, gc=False):
    kind: str = "Nats"
    config: NatsConfig


class EventChannel(Struct, tag="EventChannel", tag_field="type", gc=False):
    """Where a publisher's events travel: core NATS under the endpoint's subject prefix."""

    scope: EndpointScope
    topic: str
    instance_id: int
    transport: NatsChannel


class WorkerRank(Struct, gc=False):
    worker_id: int
    dp_rank: int


class SourceMetadata(Struct, gc=False):
    kv_state_endpoint: EndpointRef
    worker: WorkerRank
    publisher_id: int


class EventSource(Struct, tag="EventSource", tag_field="type", gc=False):
    """Which worker and DP rank a publisher speaks for; the router binds the two."""

    scope: EndpointScope
    topic: str
    publisher_id: int
    metadata: SourceMetadata


class EndpointInstance(Struct, tag="Endpoint", tag_field="type", gc=False):
    """The worker's endpoint instance: the router's list of live workers."""

    component: str
    endpoint: str
    namespace: str
    instance_id: int
    transport: dict[str, str]


class RuntimeConfig(Struct, gc=False):
    data_parallel_start_rank: int
    data_parallel_size: int
    enable_local_indexer: bool = False  # nothing here answers the router's recovery queries


class ModelCard(Struct, kw_only=True, gc=False):
    display_name: str
    slug: str
    kv_cache_block_size: int
    migration_limit: int = 0
    model_type: str = "Chat | Completions"
    model_input: str = "Tokens"
    worker_type: str = "aggregated"
    runtime_config: RuntimeConfig


class ModelRecord(Struct, tag="Model", tag_field="type", gc=False):
    """The worker's model card; the router reads the worker's DP ranks from it."""

    namespace: str
    component: str
    endpoint: str
    instance_id: int
    card_json: ModelCard


_JSON: Final = msgspec.json.Encoder()


def slug(name: str) -> str:
    """Dynamo's slug of a model name: lower case, anything but [a-z0-9_-] made `_`."""
    return re.sub(r"[^a-z0-9_-]", "_", name.lower())


class Record(NamedTuple):
    bucket: str
    key: str
    value: bytes


class Registration(NamedTuple):
    """Who the relay announces: one worker, its endpoint and one publisher per DP rank."""

    namespace: str
    component: str
    endpoint: str
    worker_id: int
    publishers: Mapping[int, int]  # dp_rank -> publisher_id
    kv_block_size: int
    model: str
    register_worker: bool

    def records(self) -> list[Record]:
        """Every record, the worker's before its event sources (the router's order of need)."""
        ns, comp, ep = self.namespace, self.component, self.endpoint
        ref = EndpointRef(ns, comp, ep)
        scope = EndpointScope(endpoint=ref)
        prefix = f"namespace.{ns}.component.{comp}.endpoint.{ep}"
        out: list[Record] = []
        if self.register_worker:
            key = f"{ns}/{comp}/{ep}/{self.worker_id:x}"
            # The relay serves no requests: the request-plane address is a placeholder.
            address = f"127.0.0.1:0/{self.worker_id:x}/{ns}/{comp}/{ep}"
            out.append(Record("v1/instances", key, _JSON.encode(EndpointInstance(
                comp, ep, ns, self.worker_id, {"tcp": address}))))
            ranks = sorted(self.publishers)
            card = ModelCard(display_name=self.model, slug=slug(self.model),
                             kv_cache_block_size=self.kv_block_size,
                             runtime_config=RuntimeConfig(ranks[0], len(ranks)))
            out.append(Record("v1/mdc", key, _JSON.encode(ModelRecord(
                ns, comp, ep, self.worker_id, card))))
        for rank, publisher in sorted(self.publishers.items()):
            key = (f"namespace/{ns}/component/{comp}/endpoint/{ep}/topic/{KV_EVENTS_TOPIC}"
                   f"/{publisher:x}")
            out.append(Record("v1/event_channels", key, _JSON.encode(EventChannel(
                scope, KV_EVENTS_TOPIC, publisher, NatsChannel(config=NatsConfig(prefix))))))
            out.append(Record("v1/event_sources", key, _JSON.encode(EventSource(
                scope, KV_EVENTS_TOPIC, publisher,
                SourceMetadata(ref, WorkerRank(self.worker_id, rank), publisher)))))
        return out


# -- the store ----------------------------------------------------------------------------------


class KeyValueStore(Protocol):
    """What registration needs of a Dynamo discovery backend."""

    @property
    def where(self) -> str:
        """Where the records go, for messages."""

    @property
    def ttl(self) -> float:
        """Seconds a record outlives the relay's last keep-alive."""

    async def put(self, record: Record) -> None: ...

    async def keep_alive(self, records: Sequence[Record]) -> int:
        """Push the records' expiry back; write back any gone or changed. How many were."""

    async def delete(self, bucket: str, key: str) -> bool: ...
    async def items(self, bucket: str) -> list[tuple[str, bytes]]: ...

    async def close(self) -> None:
        """Release what the store holds (etcd: revoke the lease, so its records go)."""


class FileStore:
    """Dynamo's file discovery backend: DYN_FILE_KV/<bucket>/<escaped key>."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, bucket: str, key: str) -> Path:
        return self.root / bucket / escape_key(key)

    def put(self, bucket: str, key: str, value: bytes) -> None:
        """Write the whole file under a temporary name, then rename it into place."""
        target = self.path(bucket, key)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.parent / f"{TEMP_PREFIX}{secrets.randbits(64):016x}"
        try:
            temp.write_bytes(value)
            os.replace(temp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise

    def refresh(self, bucket: str, key: str, value: bytes) -> bool:
        """Push the expiry back; write the record again if it is gone or not ours. False if it
        had to be written."""
        target = self.path(bucket, key)
        try:
            if target.read_bytes() == value:
                os.utime(target)
                return True
        except FileNotFoundError:
            pass
        self.put(bucket, key, value)
        return False

    def delete(self, bucket: str, key: str) -> bool:
        try:
            self.path(bucket, key).unlink()
            return True
        except FileNotFoundError:
            return False

    def items(self, bucket: str) -> list[tuple[str, bytes]]:
        """(key, value) of every record in the bucket; temp files skipped."""
        out = []
        with contextlib.suppress(FileNotFoundError):
            for entry in (self.root / bucket).iterdir():
                if entry.name.startswith(TEMP_PREFIX) or not entry.is_file():
                    continue
                with contextlib.suppress(FileNotFoundError):
                    out.append((urllib.parse.unquote(entry.name), entry.read_bytes()))
        return out


class FileBackend:
    """`FileStore` as a `KeyValueStore`: its file operations off the event loop."""

    def __init__(self, store: FileStore) -> None:
        self.store = store

    @property
    def where(self) -> str:
        return str(self.store.root)

    @property
    def ttl(self) -> float:
        return FILE_KV_TTL

    async def put(self, record: Record) -> None:
        await asyncio.to_thread(self.store.put, *record)

    async def keep_alive(self, records: Sequence[Record]) -> int:
        return await asyncio.to_thread(
            lambda: sum(not self.store.refresh(*record) for record in records))

    async def delete(self, bucket: str, key: str) -> bool:
        return await asyncio.to_thread(self.store.delete, bucket, key)

    async def items(self, bucket: str) -> list[tuple[str, bytes]]:
        return await asyncio.to_thread(self.store.items, bucket)

    async def close(self) -> None:
        """Nothing held: the records are deleted one by one."""


class _SourceWorker(Struct, gc=False):
    worker_id: int
    dp_rank: int = 0


class _SourceMeta(Struct, gc=False):
    worker: _SourceWorker


class _AnySource(Struct, gc=False):
    scope: EndpointScope
    publisher_id: int
    metadata: _SourceMeta


_SOURCE_DECODER: Final = msgspec.json.Decoder(_AnySource)


class Registrar:
    """Writes the records, keeps them alive while the relay runs, removes them at the end."""

    def __init__(self, store: KeyValueStore, registration: Registration,
                 keep_alive: float = KEEP_ALIVE) -> None:
        self.store = store
        self.registration = registration
        self.keep_alive = keep_alive
        self.records = registration.records()
        self.registered = False  # the records are in place as far as we know
        self.written = False  # they were written once, so they are ours to remove
        self.last_error = "discovery records not written yet"

    async def register(self) -> None:
        """Replace what an earlier run of this worker left behind, then write every record."""
        stale = await self._stale_sources()
        for key in stale:
            await self.store.delete("v1/event_sources", key)
            await self.store.delete("v1/event_channels", key)
        if stale:
            log.warning("removed %d event source(s) of worker %d left by an earlier run that "
                        "did not stop cleanly (Dynamo's router ignores a rank with two sources)",
                        len(stale), self.registration.worker_id)
        for record in self.records:
            await self.store.put(record)
        self.registered = self.written = True
        log.info("registered worker %d (dp_ranks %s, publishers %s) in Dynamo discovery (%s)",
                 self.registration.worker_id, sorted(self.registration.publishers),
                 ", ".join(f"{p:x}" for _, p in sorted(self.registration.publishers.items())),
                 self.store.where)

    async def _stale_sources(self) -> list[str]:
        """Keys of event sources for our worker and endpoint that are not ours."""
        reg = self.registration
        ours = set(reg.publishers.values())
        stale = []
        for key, data in await self.store.items("v1/event_sources"):
            try:
                source = _SOURCE_DECODER.decode(data)
            except msgspec.DecodeError:
                continue
            endpoint = source.scope.endpoint
            if (source.metadata.worker.worker_id == reg.worker_id
                    and (endpoint.namespace, endpoint.component, endpoint.name)
                    == (reg.namespace, reg.component, reg.endpoint)
                    and source.publisher_id not in ours):
                stale.append(key)
        return stale

    async def run(self) -> None:
        """Keep the records alive every `keep_alive` seconds, writing back any that vanished."""
        while True:
            await asyncio.sleep(self.keep_alive)
            started = time.monotonic()
            try:
                rewritten = await self.store.keep_alive(self.records)
            except OSError as exc:
                self.registered = False
                self.last_error = f"discovery records not refreshed: {exc}"
                log.error("%s; retrying", self.last_error)
                continue
            self.registered = True
            if rewritten:
                log.warning("wrote back %d Dynamo discovery record(s) that had expired or "
                            "changed (the relay or %s was away for over %.0fs?)", rewritten,
                            self.store.where, self.store.ttl)
            log.debug("refreshed discovery records in %.3fs", time.monotonic() - started)

    async def unregister(self) -> None:
        """Delete every record written (the router then drops the worker's ranks), then
        release the store."""
        written, self.registered, self.written = self.written, False, False
        try:
            if written:
                for bucket, key, _ in reversed(self.records):  # sources before the worker
                    await self.store.delete(bucket, key)
                log.info("removed worker %d from Dynamo discovery",
                         self.registration.worker_id)
        finally:
            await self.store.close()
