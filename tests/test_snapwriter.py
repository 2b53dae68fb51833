"""The router side's snapshot writer (kvrelay/router/snapwriter.py) against a real nats-server:
it writes what a consumer's index holds, worker by worker, on its cadence and when it closes;
a consumer that starts later restores those snapshots and ends up where one that read the whole
stream is; failures are counted, never raised into the consumer."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from kvrelay.codec import Codec
from kvrelay.config import Config
from kvrelay.jetstream.stream import ensure_stream
from kvrelay.router.consumer import KvConsumer
from kvrelay.router.index import decode_snapshot
from kvrelay.router.snapwriter import SnapshotWriter
from kvrelay.testing.natsserver import NatsServer
from kvrelay.wire.names import SNAPSHOT_BUCKET
from kvrelay.wire.schema import BlockHash, RelayBatch, Removed, Stored

NS, COMP, BS = "snapwrite", "backend", 4
CODEC = Codec("msgpack")


def stored(instance: int, seq: int, first: int, blocks: int) -> RelayBatch:
    """`blocks` blocks chained after block `first - 1` (none when first is 0)."""
    hashes: list[BlockHash] = list(range(first + 1, first + blocks + 1))
    parent = first if first else None
    tokens = list(range(first * BS, (first + blocks) * BS))
    return RelayBatch(instance_id=instance, dp_rank=0, epoch=0, seq=seq, ts=1.0,
                      relay_ts=time.time(), events=[Stored(hashes, parent, tokens, BS)])


async def publish(nc: Client, batch: RelayBatch) -> None:
    await nc.jetstream().publish(f"kv.{NS}.{COMP}.{batch.instance_id}.{batch.dp_rank}",
                                 CODEC.encode(batch))


async def until(check: object, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest.fixture
async def stream_nc(fresh_nats: NatsServer) -> Client:
    nc = await nats.connect(fresh_nats.url)
    await ensure_stream(nc.jetstream(), Config.load({}, {}).stream, ["kv.>"])
    return nc


async def test_writes_on_the_event_count_and_a_late_consumer_restores_them(
        fresh_nats: NatsServer, stream_nc: Client) -> None:
    """With `events=3`, a round follows three applied events: every worker is written with
    the blocks the consumer holds; a worker that did not change is not written again; a
    consumer starting later from the snapshots holds exactly
    what the writer's consumer holds, reading the stream only after the snapshots; a writer of
    its own does not write again what it restored unchanged."""
    nc = stream_nc
    try:
        for seq in range(3):
            await publish(nc, stored(1, seq, seq * 2, 2))
        await publish(nc, stored(2, 0, 0, 1))
        async with KvConsumer(fresh_nats.url, NS, COMP, bootstrap="snapshot") as consumer, \
                SnapshotWriter(consumer, interval=0, events=3) as writer:
            await consumer.ready()
            await until(lambda: writer.written == 2)
            kv = await nc.jetstream().key_value(SNAPSHOT_BUCKET)
            for worker in consumer.index.workers():
                entry = await kv.get(f"{NS}.{COMP}.{worker[0]}.{worker[1]}")
                assert entry.value is not None
                assert decode_snapshot(entry.value) == consumer.index.snapshot(worker)
            # worker 2 changes, worker 1 does not: one more write
            await publish(nc, RelayBatch(instance_id=2, dp_rank=0, epoch=0, seq=1, ts=1.0,
                                         relay_ts=time.time(), events=[Removed([1])] * 3))
            await until(lambda: writer.written == 3)
            await asyncio.sleep(1.5)  # a further round would find nothing changed
            assert writer.written == 3
            held = {w: consumer.index.snapshot(w) for w in consumer.index.workers()}
        async with KvConsumer(fresh_nats.url, NS, COMP, bootstrap="snapshot") as late:
            await late.ready()
            assert {w: late.index.snapshot(w) for w in late.index.workers()} == held
            assert late.metrics.snapshots.labels("restored")._value.get() == 2
            # each worker was restored and applied nothing after its snapshot (the only later
            # message, worker 2's, is one its snapshot covers): its own writer rewrites none
            assert await SnapshotWriter(late, interval=3600, events=0).write_changed() == 0
            # it read the stream only after the older snapshot, worker 1's, written unchanged
            entry = await kv.get(f"{NS}.{COMP}.1.0")
            assert entry.value is not None
            assert late.start_sequence == decode_snapshot(entry.value).stream_seq + 1 \
                < held[(1, 0)].stream_seq + 1
    finally:
        await nc.close()


async def test_an_idle_workers_snapshot_is_refreshed(fresh_nats: NatsServer,
                                                    stream_nc: Client) -> None:
    """An unchanged worker's snapshot is written again once `refresh` old, at the stream
    sequence the consumer reached (and not while the stream stands still): with every message
    up to there purged, a late consumer restores the idle worker whole, where a snapshot whose
    tail left the stream is restored empty."""
    nc = stream_nc
    try:
        for seq in range(3):
            await publish(nc, stored(1, seq, seq * 2, 2))
        await publish(nc, stored(2, 0, 0, 1))
        kv_key = f"{NS}.{COMP}.1.0"
        async with KvConsumer(fresh_nats.url, NS, COMP) as consumer, \
                SnapshotWriter(consumer, interval=0.5, events=0, refresh=1.5) as writer:
            await consumer.ready()
            await until(lambda: writer.written == 2)
            await publish(nc, stored(2, 1, 1, 1))  # only worker 2 changes
            await until(lambda: consumer.stream_seq == 5)
            kv = await nc.jetstream().key_value(SNAPSHOT_BUCKET)

            async def worker_1_seq() -> int:
                entry = await kv.get(kv_key)
                assert entry.value is not None
                return decode_snapshot(entry.value).stream_seq

            assert await worker_1_seq() == 4
            deadline = time.monotonic() + 10
            while await worker_1_seq() != 5:
                assert time.monotonic() < deadline, "worker 1's snapshot was not refreshed"
                await asyncio.sleep(0.1)
            written = writer.written
            await asyncio.sleep(2.5)  # past `refresh`, but the stream did not move: no writes
            assert writer.written == written
            held = {w: consumer.index.snapshot(w) for w in consumer.index.workers()}
        await nc.jetstream().purge_stream("KV_EVENTS", seq=6)
        async with KvConsumer(fresh_nats.url, NS, COMP, bootstrap="snapshot") as late:
            await late.ready()
            assert late.metrics.snapshots.labels("tail_missing")._value.get() == 0
            assert late.metrics.snapshots.labels("restored")._value.get() == 2
            assert {w: late.index.snapshot(w) for w in late.index.workers()} == held
    finally:
        await nc.close()


async def test_close_writes_what_changed(fresh_nats: NatsServer, stream_nc: Client) -> None:
    """A writer on a long interval writes nothing until it closes; closing writes every worker
    the consumer holds."""
    nc = stream_nc
    try:
        await publish(nc, stored(7, 0, 0, 3))
        async with KvConsumer(fresh_nats.url, NS, COMP) as consumer:
            writer = SnapshotWriter(consumer, interval=3600, events=0)
            writer.start()
            await consumer.ready()
            await asyncio.sleep(1.2)
            assert writer.written == 0
            await writer.close()
            assert writer.written == 1
            snapshot = consumer.index.snapshot((7, 0))
        kv = await nc.jetstream().key_value(SNAPSHOT_BUCKET)
        entry = await kv.get(f"{NS}.{COMP}.7.0")
        assert entry.value is not None
        assert decode_snapshot(entry.value) == snapshot
        assert len(snapshot.tiers[0].chains[0]) == 4  # no parent, then the three blocks
    finally:
        await nc.close()


async def test_too_large_is_counted_and_the_consumer_goes_on(tmp_path: Path) -> None:
    """On a server whose max_payload a worker's snapshot exceeds, it is not written: counted
    `too_large` and logged, each round; the consumer keeps applying batches."""
    config = tmp_path / "small.conf"
    config.write_text("max_payload: 4096\n")
    with NatsServer(tmp_path / "nats", extra_args=["-c", str(config)]) as server:
        nc = await nats.connect(server.url)
        try:
            await ensure_stream(nc.jetstream(), Config.load({}, {}).stream, ["kv.>"])
            for seq in range(8):  # 400 blocks: a snapshot of some 7 KB
                await publish(nc, stored(3, seq, seq * 50, 50))
            async with KvConsumer(server.url, NS, COMP) as consumer:
                writer = SnapshotWriter(consumer, interval=3600, events=0)
                await consumer.ready()
                assert await writer.write_changed() == 0
                counts = consumer.metrics.snapshot_writes
                assert counts.labels("too_large")._value.get() == 1
                assert counts.labels("written")._value.get() == 0
                await publish(nc, stored(3, 8, 400, 1))
                await until(lambda: consumer.index.status((3, 0)).batches == 9)
                assert await writer.write_changed() == 0
                assert counts.labels("too_large")._value.get() == 2
        finally:
            await nc.close()


async def test_bad_arguments(fresh_nats: NatsServer) -> None:
    """No cadence at all, a negative one, no refresh, or a consumer given a raw subject (no
    namespace and component to key by) is refused at construction."""
    consumer = KvConsumer(fresh_nats.url, NS, COMP)
    with pytest.raises(ValueError, match="interval > 0 or events > 0"):
        SnapshotWriter(consumer, interval=0, events=0)
    with pytest.raises(ValueError, match="interval > 0 or events > 0"):
        SnapshotWriter(consumer, interval=-1, events=10)
    with pytest.raises(ValueError, match="refresh"):
        SnapshotWriter(consumer, refresh=0)
    raw = KvConsumer(fresh_nats.url, subject="kv.x.y.>")
    with pytest.raises(ValueError, match="namespace and component"):
        SnapshotWriter(raw)
