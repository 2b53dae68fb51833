"""Snapshots: relays write their workers' blocks to a NATS KV bucket, rebuild them across their
own restarts, and a router bootstraps from them plus the stream's tail into the same index as one
that read the whole stream. Real nats-server, real relays, synthetic vLLM engines."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.js.errors
import pytest
from harness import (
    COMP,
    STREAM,
    consecutive_ports,
    eventually,
    is_ready,
    join,
    metric,
    nats_client,
    new_instance_id,
    publish,
    read_stream,
    running_relay,
)
from nats.js.api import KeyValueConfig, StorageType, StreamConfig

from kvrelay.app import Relay
from kvrelay.codec import Codec
from kvrelay.config import Config
from kvrelay.ingest.budget import Budget
from kvrelay.ingest.buffer import Buffer
from kvrelay.ingest.sequencer import Frame
from kvrelay.jetstream.publisher import Publisher
from kvrelay.jetstream.reports import Reports
from kvrelay.jetstream.snapshot import Snapshotter
from kvrelay.router.consumer import KvConsumer
from kvrelay.router.index import KvIndex, WorkerKey, decode_snapshot, encode_snapshot
from kvrelay.router.restore import snapshot_key
from kvrelay.system.metrics import Metrics
from kvrelay.testing.natsserver import NatsServer
from kvrelay.testing.synthetic import (
    SyntheticVllm,
    WorkloadFactory,
    all_blocks_cleared,
    encode_batch,
)
from kvrelay.wire.names import Worker
from kvrelay.wire.relaybatch import decode_resume_point
from kvrelay.wire.schema import RelayBatch, Removed, Stored, WorkerSnapshot

pytestmark = pytest.mark.integration

BUCKET = "KV_SNAPSHOTS"
_namespaces = itertools.count()


def new_namespace() -> str:
    """A namespace of its own: a test reads only its workers' subjects and snapshots."""
    return f"snaptest-{os.getpid()}-{next(_namespaces)}"


async def bucket_snapshot(nc: Any, key: str) -> WorkerSnapshot | None:
    """The snapshot stored under `key`, None when there is none (or no bucket)."""
    try:
        kv = await nc.jetstream().key_value(BUCKET)
        entry = await kv.get(key)
    except (nats.js.errors.BucketNotFoundError, nats.js.errors.KeyNotFoundError):
        return None
    return decode_snapshot(entry.value or b"")


async def last_stream_seq(nc: Any, subject: str) -> int:
    return int((await nc.jetstream().get_last_msg(STREAM, subject)).seq or 0)


def held(snapshot: WorkerSnapshot) -> set[Any]:
    """The blocks a snapshot holds (every tier)."""
    index = KvIndex()
    index.restore(snapshot)
    worker = (snapshot.instance_id, snapshot.dp_rank)
    return {block for tier in index.tiers(worker) for block in index.blocks(worker, tier)}


def sample(registry_owner: Relay | KvConsumer, name: str, **labels: str) -> float:
    value = registry_owner.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def without_stream_seq(snapshot: WorkerSnapshot) -> bytes:
    """Snapshot bytes with the stream sequence left out: a relay's is its subject's last
    message, a router's the last message of every worker it reads."""
    return encode_snapshot(msgspec.structs.replace(snapshot, stream_seq=0))


class Engine:
    """A synthetic vLLM DP rank; `restart()` brings a new engine (seq 0, empty cache) up on the
    same sockets, as a restarted vLLM does."""

    def __init__(self, instance: int, rank: int, endpoint: str, replay: str | None,
                 seed: int) -> None:
        self.key: WorkerKey = (instance, rank)
        self.endpoint, self.replay, self.seed = endpoint, replay, seed
        self.epoch = 0
        self.vllm = self._engine()

    def _engine(self) -> SyntheticVllm:
        factory = WorkloadFactory(seed=self.seed + 1000 * self.epoch)
        return SyntheticVllm(self.endpoint, replay_endpoint=self.replay, dp_rank=self.key[1],
                             factory=factory).start()

    def steps(self, n: int) -> None:
        publish(self.vllm, n)

    def restart(self) -> None:
        self.vllm.close()
        self.epoch += 1
        self.vllm = self._engine()

    @property
    def connect_to(self) -> str:
        return self.endpoint.replace("*", "127.0.0.1")

    @property
    def blocks(self) -> frozenset[Any]:
        return self.vllm.factory.stored_blocks

    @property
    def last(self) -> tuple[int, int]:
        return self.epoch, self.vllm.seq - 1


def metric_is(relay: Relay, name: str, value: float, **labels: str) -> bool:
    return metric(relay, name, **labels) == value


def own_index_ready(relay: Relay, dp_rank: int = 0) -> bool:
    """The relay's snapshot process rebuilt the rank's blocks and follows what is stored."""
    return relay.snapshotter is not None and relay.snapshotter.ready(dp_rank)


async def stored(nc: Any, ns: str, worker: WorkerKey, last: tuple[int, int],
                 within: float = 10.0) -> None:
    """Wait until the worker's subject ends with the batch `last` (epoch, seq)."""
    subject = f"kv.{ns}.{COMP}.{worker[0]}.{worker[1]}"
    deadline = time.monotonic() + within
    while True:
        try:
            msg = await nc.jetstream().get_last_msg(STREAM, subject)
            point = decode_resume_point(msg.data)  # a pack's last batch
            if (point.epoch, point.seq) == last:
                return
        except nats.js.errors.NotFoundError:
            pass
        assert time.monotonic() < deadline, f"{subject} never stored {last}"
        await asyncio.sleep(0.02)


class Workers:
    """History for one worker published straight into the stream, as its relay would have."""

    def __init__(self, namespace: str, instance: int) -> None:
        self.subject = f"kv.{namespace}.{COMP}.{instance}.0"
        self.instance = instance
        self.factory = WorkloadFactory(seed=99)
        self.codec = Codec("msgpack")

    async def publish(self, js: Any, batches: int) -> None:
        acks = []
        for seq in range(batches):
            now = time.time()
            decoded = self.codec.decode(encode_batch(self.factory.next_events(), now))
            payload = self.codec.encode(RelayBatch(
                instance_id=self.instance, dp_rank=0, epoch=0, seq=seq, ts=now, relay_ts=now,
                events=list(decoded.events)))
            acks.append(await js.publish_async(self.subject, payload))
        await asyncio.gather(*acks)


# -- the relay's snapshots ------------------------------------------------------------------------


async def test_snapshots_follow_the_cadence_and_hold_the_worker_blocks(
        nats_server: NatsServer, nc: Any) -> None:
    """On a count of events, a snapshot is written once that many were stored, not before; on a
    timer, once per interval while something changed and never while idle; each holds exactly
    the blocks the engine holds, exact, at the subject's last stream sequence."""
    ns, instance = new_namespace(), new_instance_id()
    key = snapshot_key(ns, COMP, instance, 0)
    subject = f"kv.{ns}.{COMP}.{instance}.0"
    with SyntheticVllm("tcp://127.0.0.1:*", factory=WorkloadFactory(seed=5)) as vllm:
        async with running_relay(nats=nats_server.url, namespace=ns, instance_id=instance,
                                 zmq=[vllm.address], snapshot_interval=0,
                                 snapshot_events=40) as relay:
            await eventually(lambda: own_index_ready(relay), "the index rebuilt")
            await join(vllm, relay)
            sent = 0
            while metric(relay, "kvrelay_events_published_total") < 40:
                assert metric(relay, "kvrelay_snapshots_written_total") == 0
                vllm.publish_next()
                sent += 1
                await eventually(partial(metric_is, relay, "kvrelay_batches_published_total",
                                         sent), "the batch stored")
            await eventually(lambda: metric(relay, "kvrelay_snapshots_written_total") == 1,
                             "a snapshot once 40 events were stored")
            snapshot = await bucket_snapshot(nc, key)
            assert snapshot is not None
            assert snapshot.stream_seq == await last_stream_seq(nc, subject)
            assert (snapshot.epoch, snapshot.seq, snapshot.exact) == (0, sent - 1, True)
            assert held(snapshot) == vllm.factory.stored_blocks
            assert metric(relay, "kvrelay_snapshot_stream_sequence", dp_rank="0") \
                == snapshot.stream_seq
            assert metric(relay, "kvrelay_snapshot_bytes", dp_rank="0") > 0

    instance = new_instance_id()
    key = snapshot_key(ns, COMP, instance, 0)
    with SyntheticVllm("tcp://127.0.0.1:*", factory=WorkloadFactory(seed=6)) as vllm:
        async with running_relay(nats=nats_server.url, namespace=ns, instance_id=instance,
                                 zmq=[vllm.address], snapshot_interval=0.3,
                                 snapshot_events=0) as relay:
            await join(vllm, relay)
            began = time.monotonic()
            for round_ in range(1, 3):
                publish(vllm, 10)
                await stored(nc, ns, (instance, 0), (0, vllm.seq - 1))
                last = await last_stream_seq(nc, f"kv.{ns}.{COMP}.{instance}.0")
                await eventually(
                    partial(metric_is, relay, "kvrelay_snapshot_stream_sequence", last,
                            dp_rank="0"), f"the timed snapshot of round {round_}")
                snapshot = await bucket_snapshot(nc, key)
                assert snapshot is not None
                assert held(snapshot) == vllm.factory.stored_blocks
                assert snapshot.seq == vllm.seq - 1
            written = metric(relay, "kvrelay_snapshots_written_total")
            assert 2 <= written <= (time.monotonic() - began) / 0.3 + 1  # at most one a tick
            await asyncio.sleep(1.0)  # three intervals with nothing stored
            assert metric(relay, "kvrelay_snapshots_written_total") == written
            assert 0 <= metric(relay, "kvrelay_snapshot_age_seconds", dp_rank="0") < 60


async def test_final_snapshot_at_shutdown(nats_server: NatsServer, nc: Any) -> None:
    """With a timer that never fires, the snapshot is written after the drain at shutdown and
    holds everything the relay stored."""
    ns, instance = new_namespace(), new_instance_id()
    key = snapshot_key(ns, COMP, instance, 0)
    with SyntheticVllm("tcp://127.0.0.1:*", factory=WorkloadFactory(seed=7)) as vllm:
        async with running_relay(nats=nats_server.url, namespace=ns, instance_id=instance,
                                 zmq=[vllm.address], snapshot_interval=3600,
                                 snapshot_events=0) as relay:
            snapshotter = relay.snapshotter
            assert snapshotter is not None
            await eventually(lambda: snapshotter.ready(0), "the index rebuilt")
            await join(vllm, relay)
            publish(vllm, 25)
            await eventually(lambda: metric(relay, "kvrelay_batches_published_total") == 25,
                             "the batches stored")
            assert await bucket_snapshot(nc, key) is None
        assert metric(relay, "kvrelay_snapshots_written_total") == 1
        snapshot = await bucket_snapshot(nc, key)
        assert snapshot is not None
        assert snapshot.stream_seq == await last_stream_seq(nc, f"kv.{ns}.{COMP}.{instance}.0")
        assert (snapshot.seq, snapshot.exact) == (24, True)
        assert held(snapshot) == vllm.factory.stored_blocks


@pytest.mark.parametrize("history", ["snapshot and tail", "stream only"])
async def test_relay_restart_keeps_snapshots_complete(
        nats_server: NatsServer, nc: Any, history: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """A relay that starts where another stopped rebuilds its blocks from the last snapshot and
    the messages after it (or, without a snapshot, from every message of its subject) and
    writes at once a snapshot equal to what the engine holds."""
    ns, instance = new_namespace(), new_instance_id()
    key = snapshot_key(ns, COMP, instance, 0)
    subject = f"kv.{ns}.{COMP}.{instance}.0"
    on = {"snapshot_interval": 3600, "snapshot_events": 0}
    off = {"snapshot_interval": 0, "snapshot_events": 0}
    runs = [on, off] if history == "snapshot and tail" else [off]
    with SyntheticVllm("tcp://127.0.0.1:*", factory=WorkloadFactory(seed=8)) as vllm:
        for flags in runs:
            async with running_relay(nats=nats_server.url, namespace=ns, instance_id=instance,
                                     zmq=[vllm.address], **flags) as relay:
                await join(vllm, relay)
                publish(vllm, 20)
                await eventually(lambda: metric(relay, "kvrelay_batches_published_total")
                                 == 20, "the batches stored")
        before = await bucket_snapshot(nc, key)
        assert (before is not None) == (history == "snapshot and tail")
        capfd.readouterr()
        async with running_relay(nats=nats_server.url, namespace=ns, instance_id=instance,
                                 zmq=[vllm.address], **on) as relay:
            last = await last_stream_seq(nc, subject)
            await eventually(lambda: metric(relay, "kvrelay_snapshot_stream_sequence",
                                            dp_rank="0") == last, "the rebuilt snapshot")
            snapshot = await bucket_snapshot(nc, key)
            assert snapshot is not None
            assert (snapshot.seq, snapshot.exact) == (vllm.seq - 1, True)
            assert held(snapshot) == vllm.factory.stored_blocks
            await join(vllm, relay)
            publish(vllm, 5)
            await stored(nc, ns, (instance, 0), (0, vllm.seq - 1))
        after = await bucket_snapshot(nc, key)
        assert after is not None
        assert (after.seq, after.exact) == (vllm.seq - 1, True)
        assert held(after) == vllm.factory.stored_blocks
    how = (f"from snapshot at stream sequence {before.stream_seq} and 20 batches after it"
           if before is not None else "from the stream's start (20 batches)")
    assert f"blocks of {subject} rebuilt {how}" in capfd.readouterr().err  # the process's log


async def test_batches_stored_during_a_long_rebuild_are_not_lost(
        fresh_nats: NatsServer) -> None:
    """A relay rebuilding from a long subject while its engine publishes more than it keeps
    aside meanwhile reads the rest from the stream: its blocks then equal what the engine holds
    and what a router reading everything holds."""
    ns, instance = new_namespace(), new_instance_id()
    worker = (instance, 0)
    history = Workers(ns, instance)
    async with nats_client(fresh_nats.url) as client:
        js = client.jetstream()
        await js.add_stream(StreamConfig(name=STREAM, subjects=["kv.>"], max_bytes=-1))
        await history.publish(js, 40_000)
    with SyntheticVllm("tcp://127.0.0.1:*", factory=WorkloadFactory(seed=12)) as vllm:
        async with running_relay(nats=fresh_nats.url, namespace=ns, instance_id=instance,
                                 zmq=[vllm.address], snapshot_interval=30,
                                 snapshot_events=50_000) as relay:
            await join(vllm, relay)
            assert relay.snapshotter is not None
            assert not relay.snapshotter.ready(0), "the rebuild ended too soon to test this"
            publish(vllm, 1500)  # a new engine: epoch 1 from seq 0
            async with nats_client(fresh_nats.url) as client:
                await stored(client, ns, worker, (1, 1499), within=30)
            # More were stored during the rebuild than the process keeps aside meanwhile.
            assert not relay.snapshotter.ready(0), "the rebuild ended too soon to test this"
            await eventually(lambda: own_index_ready(relay), "the rebuild", within=60)
        async with KvConsumer(fresh_nats.url, ns, COMP) as full:
            await asyncio.wait_for(full.ready(), 30)
        async with nats_client(fresh_nats.url) as client:
            final = await bucket_snapshot(client, snapshot_key(ns, COMP, *worker))
    assert final is not None
    assert (final.epoch, final.seq, final.exact) == (1, 1499, True)
    assert held(final) == vllm.factory.stored_blocks
    assert without_stream_seq(final) == without_stream_seq(full.index.snapshot(worker))


async def test_unusable_bucket_does_not_hurt_publishing(tmp_path: Path) -> None:
    """JetStream refusing the bucket (the account's stream limit) is logged and counted while
    every batch is published and the relay stays ready; once the limit allows it, the bucket is
    created and the snapshot written, complete."""
    conf = tmp_path / "nats.conf"
    account = ("accounts {{ APP {{ jetstream {{ max_streams: {} }}\n"
               "users = [{{user: app, password: secret}}] }} }}\n")
    conf.write_text(account.format(1))
    server = NatsServer(tmp_path / "nats", extra_args=["-c", str(conf)])  # no --name: reloads
    server.start()
    ns, instance = new_namespace(), new_instance_id()
    try:
        with SyntheticVllm("tcp://127.0.0.1:*", factory=WorkloadFactory(seed=9)) as vllm:
            async with running_relay(nats=server.url, nats_user="app", nats_password="secret",
                                     namespace=ns, instance_id=instance, zmq=[vllm.address],
                                     snapshot_interval=0.2) as relay:
                await eventually(lambda: is_ready(relay), "the relay ready")
                await join(vllm, relay)
                publish(vllm, 30)
                async with nats_client(server.url.replace("//", "//app:secret@")) as client:
                    got = await read_stream(client, f"kv.{ns}.{COMP}.{instance}.0", 30,
                                            settle=0)
                assert [r.batch.seq for r in got] == list(range(30))
                await eventually(lambda: metric(relay, "kvrelay_snapshot_failures_total",
                                                reason="bucket") >= 1, "the refusal counted")
                assert is_ready(relay)
                assert metric(relay, "kvrelay_snapshots_written_total") == 0

                conf.write_text(account.format(2))
                assert server._proc is not None
                os.kill(server._proc.pid, signal.SIGHUP)  # nats-server reloads its config
                await eventually(lambda: metric(relay, "kvrelay_snapshots_written_total") >= 1,
                                 "the snapshot once the bucket could be created", within=20)
                async with nats_client(server.url.replace("//", "//app:secret@")) as client:
                    snapshot = await bucket_snapshot(client, snapshot_key(ns, COMP, instance, 0))
                assert snapshot is not None
                assert held(snapshot) == vllm.factory.stored_blocks
    finally:
        server.stop()


async def test_snapshot_above_max_payload_is_counted(tmp_path: Path) -> None:
    """A snapshot larger than the server's max_payload is not written: counted as too_large,
    logged, and publishing goes on."""
    conf = tmp_path / "nats.conf"
    conf.write_text("max_payload: 4096\n")
    server = NatsServer(tmp_path / "nats", extra_args=["-c", str(conf)])
    server.start()
    ns, instance = new_namespace(), new_instance_id()
    try:
        with SyntheticVllm("tcp://127.0.0.1:*",
                           factory=WorkloadFactory(seed=4, remove_probability=0)) as vllm:
            async with running_relay(nats=server.url, namespace=ns, instance_id=instance,
                                     zmq=[vllm.address], snapshot_interval=0,
                                     snapshot_events=150) as relay:
                await join(vllm, relay)
                publish(vllm, 200)  # one event of 4 blocks each: 600 blocks at the trigger
                await eventually(lambda: metric(relay, "kvrelay_batches_published_total")
                                 == 200, "every batch stored")
                await eventually(lambda: metric(relay, "kvrelay_snapshot_failures_total",
                                                reason="too_large") >= 1, "too_large counted")
                assert metric(relay, "kvrelay_snapshots_written_total") == 0
                assert metric(relay, "kvrelay_batches_published_total") == 200
                # More blocks than a snapshot that did not fit: counted, not built again.
                built = metric(relay, "kvrelay_snapshot_build_cpu_seconds_total")
                failed = metric(relay, "kvrelay_snapshot_failures_total", reason="too_large")
                publish(vllm, 200)
                await eventually(lambda: metric(relay, "kvrelay_snapshot_failures_total",
                                                reason="too_large") > failed, "counted again")
                assert metric(relay, "kvrelay_snapshot_build_cpu_seconds_total") == built
                # Fewer blocks (vLLM reset its cache, 150 times: the event count): built again,
                # and written.
                for _ in range(150):
                    vllm.publish([all_blocks_cleared()])
                await eventually(lambda: metric(relay, "kvrelay_snapshots_written_total") >= 1,
                                 "a snapshot that fits is written")
                assert metric(relay, "kvrelay_snapshot_build_cpu_seconds_total") > built
    finally:
        server.stop()


# -- routers bootstrapping from snapshots ---------------------------------------------------------


async def test_bootstrap_equals_reading_everything(nats_server: NatsServer, nc: Any) -> None:
    """Three worker ranks of two relays, through an engine restart (replayed: exact) and a gap
    without replay (a resync: not exact), relays stopped and started again: a router restoring
    the snapshots and reading only the tail holds byte for byte the index of one that read the
    whole stream, and so does each relay's own index."""
    ns = new_namespace()
    i1, i2 = new_instance_id(), new_instance_id()
    pub1, replay1, pub2 = consecutive_ports(2), consecutive_ports(2), consecutive_ports(1)
    engines = [Engine(i1, 0, f"tcp://*:{pub1}", f"tcp://127.0.0.1:{replay1}", seed=1),
               Engine(i1, 1, f"tcp://*:{pub1 + 1}", f"tcp://127.0.0.1:{replay1 + 1}", seed=2),
               Engine(i2, 0, f"tcp://*:{pub2}", None, seed=3)]
    restarted, gapped = engines[0], engines[2]
    base = {"nats": nats_server.url, "namespace": ns, "snapshot_interval": 3600,
            "snapshot_events": 0}

    def relays() -> Any:
        return running_relay(**base, instance_id=i1, dp_ranks=2,
                             zmq=[engines[0].connect_to],
                             replay=[f"tcp://127.0.0.1:{replay1}"]), \
            running_relay(**base, instance_id=i2, zmq=[gapped.connect_to])

    try:
        first, second = relays()
        async with first as r1, second as r2:
            by_instance = {i1: r1, i2: r2}
            for e in engines:
                await join(e.vllm, by_instance[e.key[0]])
                e.steps(15)
            restarted.vllm.close()
            await eventually(lambda: r1.source_states()[0]["peers"] == 0, "the engine gone")
            restarted.restart()
            received = metric(r1, "kvrelay_batches_received_total", dp_rank="0")
            while metric(r1, "kvrelay_batches_received_total", dp_rank="0") == received:
                assert restarted.vllm.seq < 40, "the relay never read the restarted engine"
                restarted.steps(1)
                await asyncio.sleep(0.05)
            gapped.vllm.skip(3)
            for e in engines:
                e.steps(6)
            for e in engines:
                await stored(nc, ns, e.key, e.last, within=20)
        for e in engines:  # the final snapshots cover each subject
            snapshot = await bucket_snapshot(nc, snapshot_key(ns, COMP, *e.key))
            assert snapshot is not None
            assert snapshot.stream_seq == await last_stream_seq(nc, f"kv.{ns}.{COMP}.{e.key[0]}"
                                                                     f".{e.key[1]}")

        first, second = relays()
        async with first as r1, second as r2:
            by_instance = {i1: r1, i2: r2}
            # Rebuilt before the tail is published: the tail is then after the snapshots.
            await eventually(lambda: all(own_index_ready(by_instance[e.key[0]], e.key[1])
                                         for e in engines), "the relays' blocks rebuilt")
            for e in engines:
                await join(e.vllm, by_instance[e.key[0]])
                e.steps(7)
            for e in engines:
                await stored(nc, ns, e.key, e.last, within=20)
            async with KvConsumer(nats_server.url, ns, COMP, bootstrap="snapshot") as boot, \
                    KvConsumer(nats_server.url, ns, COMP) as full:
                await asyncio.wait_for(asyncio.gather(boot.ready(), full.ready()), 20)
            keys = [e.key for e in engines]
            assert boot.index.workers() == full.index.workers() == sorted(keys)
            for w in keys:
                assert encode_snapshot(boot.index.snapshot(w)) \
                    == encode_snapshot(full.index.snapshot(w)), f"worker {w}"
            assert sample(boot, "kvrelay_consumer_batches_total") == 3 * 7
            assert sample(full, "kvrelay_consumer_batches_total") > 3 * 7 + 40
            assert sample(boot, "kvrelay_consumer_snapshots_total", outcome="restored") == 3
            assert (boot.gaps, full.gaps) == (0, 0)
            for e in engines:
                status = full.index.status(e.key)
                assert status.exact == (e is not gapped), f"worker {e.key}"
                if e is not gapped:
                    assert set(full.index.blocks(e.key)) == e.blocks
            assert full.index.status(restarted.key).resyncs == {"restart": 1}
            assert full.index.status(gapped.key).resyncs == {"gap": 1}

        for w in keys:  # the relays' final snapshots: their own blocks, as a router reads them
            final = await bucket_snapshot(nc, snapshot_key(ns, COMP, *w))
            assert final is not None
            assert without_stream_seq(final) == without_stream_seq(full.index.snapshot(w)), \
                f"relay of worker {w}"
        async with KvConsumer(nats_server.url, ns, COMP, bootstrap="snapshot") as late:
            await asyncio.wait_for(late.ready(), 20)
        assert sample(late, "kvrelay_consumer_batches_total") == 0
        for w in keys:
            assert without_stream_seq(late.index.snapshot(w)) \
                == without_stream_seq(full.index.snapshot(w))
    finally:
        for e in engines:
            e.vllm.close()


# -- snapshots the stream has moved past ----------------------------------------------------------


def batch(worker: WorkerKey, seq: int, *blocks: int) -> RelayBatch:
    return RelayBatch(instance_id=worker[0], dp_rank=worker[1], epoch=0, seq=seq, ts=1.0,
                      relay_ts=1.0, events=[Stored(list(blocks), None, [0] * len(blocks), 1)])


class Direct:
    """RelayBatches published straight into a stream of its own, and snapshots written as a
    relay writes them: for what a running relay never leaves behind."""

    def __init__(self, nc: Any, namespace: str) -> None:
        self.js = nc.jetstream()
        self.namespace = namespace
        self.codec = Codec("msgpack")

    def subject(self, worker: WorkerKey) -> str:
        return f"kv.{self.namespace}.{COMP}.{worker[0]}.{worker[1]}"

    async def create_stream(self) -> None:
        await self.js.add_stream(StreamConfig(name=STREAM, subjects=["kv.>"],
                                              storage=StorageType.FILE))

    async def publish(self, *batches: RelayBatch) -> None:
        for b in batches:
            await self.js.publish(self.subject((b.instance_id, b.dp_rank)),
                                  self.codec.encode(b))

    async def write_snapshots(self, index: KvIndex) -> None:
        kv = await self.js.create_key_value(KeyValueConfig(bucket=BUCKET, history=1))
        for w in index.workers():
            await kv.put(snapshot_key(self.namespace, COMP, *w),
                         encode_snapshot(index.snapshot(w)))


@pytest.fixture
async def direct(fresh_nats: NatsServer) -> AsyncIterator[Direct]:
    async with nats_client(fresh_nats.url) as client:
        d = Direct(client, new_namespace())
        await d.create_stream()
        yield d


A: WorkerKey = (31, 0)
B: WorkerKey = (32, 0)


async def test_snapshot_whose_tail_left_the_stream(fresh_nats: NatsServer,
                                                   direct: Direct) -> None:
    """Stream purged past the snapshots: a worker with later batches there is restored and
    checked by (epoch, seq) (its loss shows as a gap, its blocks dropped); a worker with none
    is restored empty and not exact, counted as tail_missing."""
    ns = direct.namespace
    await direct.publish(*[batch(w, seq, 100 * w[0] + seq) for seq in range(5) for w in (A, B)])
    async with KvConsumer(fresh_nats.url, ns, COMP) as writer:
        await asyncio.wait_for(writer.ready(), 10)
        await direct.write_snapshots(writer.index)
    await direct.publish(batch(A, 5, 9005), batch(B, 5, 9105), batch(A, 6, 9006))
    await direct.js.purge_stream(STREAM, seq=13)  # keeps only A's seq 6
    async with KvConsumer(fresh_nats.url, ns, COMP, bootstrap="snapshot") as boot:
        await asyncio.wait_for(boot.ready(), 10)
    assert sample(boot, "kvrelay_consumer_snapshots_total", outcome="restored") == 1
    assert sample(boot, "kvrelay_consumer_snapshots_total", outcome="tail_missing") == 1
    assert boot.gaps == 1  # A: seq 5 is gone
    assert (boot.index.blocks(A), boot.index.status(A).exact) == ({9006: None}, False)
    assert (boot.index.blocks(B), boot.index.status(B).exact) == ({}, False)


async def test_snapshot_older_than_the_stream_is_ignored(fresh_nats: NatsServer,
                                                         direct: Direct) -> None:
    """After the stream is deleted and created again, old snapshots are ignored (counted
    stale) and the worker is read from the new stream's start."""
    ns = direct.namespace
    await direct.publish(*[batch(A, seq, seq) for seq in range(8)])
    async with KvConsumer(fresh_nats.url, ns, COMP) as writer:
        await asyncio.wait_for(writer.ready(), 10)
        await direct.write_snapshots(writer.index)
    await direct.js.delete_stream(STREAM)
    await direct.create_stream()
    await direct.publish(batch(A, 0, 50), batch(A, 1, 51))
    async with KvConsumer(fresh_nats.url, ns, COMP, bootstrap="snapshot") as boot:
        await asyncio.wait_for(boot.ready(), 10)
    assert sample(boot, "kvrelay_consumer_snapshots_total", outcome="stale") == 1
    assert set(boot.index.blocks(A)) == {50, 51}
    assert (boot.index.status(A).seq, boot.gaps) == (1, 0)


async def test_undecodable_snapshot_is_ignored(fresh_nats: NatsServer, direct: Direct) -> None:
    """A value in the bucket that is not a worker snapshot is counted and ignored: that worker
    is read from its first message, the others restored."""
    await direct.publish(batch(A, 0, 1), batch(B, 0, 2), batch(A, 1, 3))
    async with KvConsumer(fresh_nats.url, direct.namespace, COMP) as writer:
        await asyncio.wait_for(writer.ready(), 10)
        await direct.write_snapshots(writer.index)
    kv = await direct.js.key_value(BUCKET)
    await kv.put(snapshot_key(direct.namespace, COMP, *A), b"\xc1 not a snapshot")
    await direct.publish(batch(B, 1, 4))
    async with KvConsumer(fresh_nats.url, direct.namespace, COMP,
                          bootstrap="snapshot") as boot, \
            KvConsumer(fresh_nats.url, direct.namespace, COMP) as full:
        await asyncio.wait_for(asyncio.gather(boot.ready(), full.ready()), 10)
    assert sample(boot, "kvrelay_consumer_snapshots_total", outcome="undecodable") == 1
    assert sample(boot, "kvrelay_consumer_snapshots_total", outcome="restored") == 1
    for w in (A, B):
        assert encode_snapshot(boot.index.snapshot(w)) == encode_snapshot(full.index.snapshot(w))


async def test_without_bucket_bootstrap_reads_the_stream(fresh_nats: NatsServer,
                                                         direct: Direct) -> None:
    """No snapshot bucket at all: bootstrap='snapshot' reads the whole stream instead."""
    await direct.publish(batch(A, 0, 1), batch(A, 1, 2))
    async with KvConsumer(fresh_nats.url, direct.namespace, COMP,
                          bootstrap="snapshot") as boot:
        await asyncio.wait_for(boot.ready(), 10)
    assert set(boot.index.blocks(A)) == {1, 2}
    assert sample(boot, "kvrelay_consumer_batches_total") == 2


async def test_worker_without_snapshot_is_read_from_its_first_message(
        fresh_nats: NatsServer, direct: Direct) -> None:
    """One worker has a snapshot, another has none: the router reads from the other's first
    message, skipping what the snapshot covers, and holds both completely."""
    await direct.publish(*[batch(A, seq, seq) for seq in range(4)])
    async with KvConsumer(fresh_nats.url, direct.namespace, COMP) as writer:
        await asyncio.wait_for(writer.ready(), 10)
        await direct.write_snapshots(writer.index)
    await direct.publish(batch(B, 0, 70), batch(A, 4, 4), batch(B, 1, 71))
    async with KvConsumer(fresh_nats.url, direct.namespace, COMP,
                          bootstrap="snapshot") as boot, \
            KvConsumer(fresh_nats.url, direct.namespace, COMP) as full:
        await asyncio.wait_for(asyncio.gather(boot.ready(), full.ready()), 10)
    for w in (A, B):
        assert encode_snapshot(boot.index.snapshot(w)) == encode_snapshot(full.index.snapshot(w))
    assert boot.start_sequence == 5  # B's first message; A's snapshot covers 1..4
    assert sample(boot, "kvrelay_consumer_batches_total") == 3


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"bootstrap": "disk"}, "neither 'stream' nor 'snapshot'"),
    ({"bootstrap": "snapshot", "durable": "r"}, "goes with neither"),
    ({"bootstrap": "snapshot", "start_sequence": 5}, "goes with neither"),
    ({"snapshot_bucket": "a.b"}, "snapshot_bucket 'a.b' must match"),
])
def test_bad_bootstrap_arguments(kwargs: dict[str, Any], message: str) -> None:
    """Bootstrap arguments that cannot work are refused at construction."""
    with pytest.raises(ValueError, match=message):
        KvConsumer(**kwargs)


def test_snapshot_later_is_the_state_when_taken() -> None:
    """A snapshot built later from `snapshot_later` (as the relay does in a thread) is the
    index's state when it was taken, whatever was applied since."""
    index = KvIndex()
    index.apply(batch(A, 0, 1, 2), 1)
    build = index.snapshot_later(A)
    taken = encode_snapshot(index.snapshot(A))
    index.apply(batch(A, 1, 3), 2)
    assert encode_snapshot(build()) == taken
    assert encode_snapshot(index.snapshot_later(A)()) == encode_snapshot(index.snapshot(A))


# -- the publisher's report of what was stored ----------------------------------------------------


async def test_stored_batches_reported_in_stream_order_after_lost_acks(
        fresh_nats: NatsServer) -> None:
    """seq 0 stored but its ack lost, seq 1 acknowledged: the hook hears 1 only after the
    recovery found 0 in the stream, so it hears 0 then 1, each once, with their sequences."""
    heard: list[tuple[int, int]] = []
    config = Config.load({"nats": fresh_nats.url, "namespace": "ordered", "component": COMP},
                         {})
    metrics = Metrics()
    publisher = Publisher(Worker("ordered", COMP, new_instance_id()), config.nats,
                          config.publish, config.stream, Buffer(Budget(100, 1 << 20), metrics),
                          metrics,
                          lambda rank, payload, stream_seq: heard.append(
                              (decode_resume_point(payload).seq, stream_seq)))
    await publisher.connect([0])
    factory = WorkloadFactory(seed=2)
    try:
        inbox = publisher._inbox
        publisher._inbox = "_INBOX.kvrelay-nobody-listens."  # seq 0's ack goes nowhere
        now = time.time()
        await publisher.send(Frame(0, 0, 0, encode_batch(factory.next_events(), now), now, ()))
        publisher._inbox = inbox
        await publisher.send(Frame(0, 0, 1, encode_batch(factory.next_events(), now), now, ()))
        await eventually(lambda: publisher.in_flight == 1, "seq 1 acknowledged")
        assert heard == []
        assert await publisher.recover()
        async with nats_client(fresh_nats.url) as client:
            last = await last_stream_seq(client, publisher.subject(0))
        assert heard == [(0, last - 1), (1, last)]
        assert metrics.registry.get_sample_value(
            "kvrelay_batches_dropped_total", {"reason": "out_of_order"}) == 0
    finally:
        await publisher.close()


def test_the_index_takes_stored_batches_in_bounded_runs() -> None:
    """Stored batches reach the snapshot index in runs: 64 small batches, or at once when a
    run holds 4,096 events and block hashes, stored or removed (a run never holds much), and
    every one of them before the index is read for a snapshot."""
    config = Config()
    worker = Worker("ns", "comp", 7)
    snapshotter = Snapshotter(worker, [0], config.snapshot, config.nats, config.stream,
                              Reports())
    rank = snapshotter._ranks[0]
    rank.ready = True
    seqs = itertools.count()

    def store(blocks: int) -> None:
        seq = next(seqs)
        hashes: list[int | bytes] = [seq * 10_000 + i + 1 for i in range(blocks)]
        event = Stored(hashes, None, list(range(16 * blocks)), 16, medium="GPU")
        snapshotter.stored(0, msgspec.msgpack.encode(RelayBatch(
            instance_id=7, dp_rank=0, epoch=0, seq=seq, ts=0.0, relay_ts=0.0, events=[event])),
            seq + 1)

    def applied() -> int:
        return rank.index.block_count((7, 0)) if (7, 0) in rank.index.workers() else 0

    for _ in range(63):
        store(4)
    assert (applied(), len(rank.run)) == (0, 63)
    store(4)
    assert (applied(), len(rank.run)) == (64 * 4, 0)
    store(4)
    store(5000)  # a large batch: the run it ends is taken at once
    assert (applied(), len(rank.run)) == (65 * 4 + 5000, 0)
    store(4)
    assert snapshotter.index(0).block_count((7, 0)) == 66 * 4 + 5000
    assert rank.run == []
    gone: list[int | bytes] = list(range(1, 4097))  # a large removal counts as much
    snapshotter.stored(0, msgspec.msgpack.encode(RelayBatch(
        instance_id=7, dp_rank=0, epoch=0, seq=next(seqs), ts=0.0, relay_ts=0.0,
        events=[Removed(gone, medium="GPU")])), 1000)
    assert rank.run == []
