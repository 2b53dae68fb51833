"""The router side: KvConsumer against a real nats-server, fed by real relays or by batches
published straight to the stream (to produce what a relay never would: gaps, garbage)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import nats
import nats.errors
import pytest
from harness import (
    consecutive_ports,
    eventually,
    join,
    metric,
    new_instance_id,
    running_relay,
)

from kvrelay.codec import Codec
from kvrelay.config import Config
from kvrelay.jetstream.stream import ensure_stream
from kvrelay.router.consumer import Delivery, KvConsumer, StreamNotFound
from kvrelay.router.index import Gap, KvIndex, WorkerKey, decode_snapshot, encode_snapshot
from kvrelay.testing.natsserver import NatsServer
from kvrelay.testing.synthetic import (
    SyntheticVllm,
    WorkloadFactory,
    all_blocks_cleared,
    block_removed,
    block_stored,
)
from kvrelay.wire.schema import BlockHash, RelayBatch, RelayEvent, Removed, Resync, Stored

pytestmark = pytest.mark.integration

COMP = "worker"
SHARED: list[BlockHash] = [0xA1, 0xA2, 0xA3, 0xA4]  # a prompt prefix every worker caches
_namespaces = iter(range(10**6))


def new_namespace() -> str:
    """A namespace of its own, so a test on the shared server reads only its subjects."""
    return f"consumertest-{next(_namespaces)}"


def sample(consumer: KvConsumer, name: str, **labels: str) -> float:
    value = consumer.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# -- ground truth from what synthetic workers publish ------------------------------------------


class Worker:
    """A synthetic vLLM DP rank and what its cache holds, computed from the events it sent."""

    def __init__(self, instance: int, rank: int, endpoint: str, replay: str, seed: int) -> None:
        self.key: WorkerKey = (instance, rank)
        self.endpoint, self.replay, self.seed = endpoint, replay, seed
        self.epoch = 0
        self.cache: dict[BlockHash, BlockHash | None] = {}
        self.vllm = self._engine()

    def _engine(self) -> SyntheticVllm:
        factory = WorkloadFactory(seed=self.seed + 1000 * self.epoch)
        return SyntheticVllm(self.endpoint, replay_endpoint=self.replay, dp_rank=self.key[1],
                             factory=factory).start()

    def publish(self, events: list[Any]) -> None:
        self.vllm.publish(events)
        for event in events:
            if event["type"] == "BlockStored":
                parent = event["parent_block_hash"]
                for block in event["block_hashes"]:
                    self.cache[block] = parent
                    parent = block
            elif event["type"] == "BlockRemoved":
                for block in event["block_hashes"]:
                    self.cache.pop(block, None)
            else:
                self.cache.clear()

    def steps(self, n: int) -> None:
        for _ in range(n):
            self.publish(self.vllm.factory.next_events())

    def store_shared(self, count: int = len(SHARED)) -> None:
        self.publish([block_stored(SHARED[:count], None, [1] * 16 * count)])

    def restart(self) -> None:
        """The engine restarts: seq from 0 again, an empty cache."""
        self.vllm.close()
        self.epoch += 1
        self.cache = {}
        self.vllm = self._engine()

    @property
    def last(self) -> tuple[int, int]:
        return self.epoch, self.vllm.seq - 1


def caught_up(consumer: KvConsumer, workers: list[Worker]) -> bool:
    index = consumer.index
    return all(w.key in index.workers() and (index.status(w.key).epoch,
                                             index.status(w.key).seq) == w.last for w in workers)


async def test_index_equals_what_workers_hold_through_restart_and_outage(
        fresh_nats: NatsServer) -> None:
    """Two workers with two DP ranks each, relayed by real relays: after stores, removes,
    clears, an engine restart and a NATS crash, the consumer's index holds exactly the blocks
    (and parents) each rank's cache holds, every rank exact, no gap."""
    instances = [new_instance_id(), new_instance_id()]
    workers: list[Worker] = []
    for i, instance in enumerate(instances):
        pub, replay = consecutive_ports(2), consecutive_ports(2)
        workers += [Worker(instance, rank, f"tcp://*:{pub + rank}",
                           f"tcp://127.0.0.1:{replay + rank}", seed=10 * i + rank)
                    for rank in range(2)]
    gaps: list[Gap] = []
    # Before any relay: the consumer waits for the stream to appear.
    consumer = KvConsumer(fresh_nats.url, "kvtest", COMP, on_gap=gaps.append,
                          connect_options={"reconnect_time_wait": 0.2})
    try:
        async with consumer, running_relay(
                nats=fresh_nats.url, instance_id=instances[0], dp_ranks=2,
                zmq=[workers[0].endpoint.replace("*", "127.0.0.1")],
                replay=[workers[0].replay]) as relay0, running_relay(
                nats=fresh_nats.url, instance_id=instances[1], dp_ranks=2,
                zmq=[workers[2].endpoint.replace("*", "127.0.0.1")],
                replay=[workers[2].replay]) as relay1:
            relays = {instances[0]: relay0, instances[1]: relay1}
            for w in workers:
                await join(w.vllm, relays[w.key[0]])
            for w in workers:
                w.store_shared()
                w.steps(8)
                w.publish([block_removed([next(iter(w.cache.keys() - set(SHARED)))])])
            workers[1].publish([all_blocks_cleared()])
            workers[1].steps(3)
            workers[1].store_shared(2)
            await eventually(lambda: caught_up(consumer, workers), "the consumer to catch up",
                             within=20)
            await consumer.ready()

            # NATS crashes; the relays buffer, the workers go on.
            await asyncio.sleep(0.2)  # let nats-server's store flush before the crash
            fresh_nats.kill()
            received = {w.key: metric(relays[w.key[0]], "kvrelay_batches_received_total",
                                      dp_rank=str(w.key[1])) for w in workers}
            for w in workers:
                w.steps(6)
            await eventually(lambda: all(
                metric(relays[w.key[0]], "kvrelay_batches_received_total",
                       dp_rank=str(w.key[1])) == received[w.key] + 6 for w in workers),
                "the relays to read what was sent during the outage")
            fresh_nats.start()

            # Worker 1's rank 0 engine restarts.
            restarted = workers[2]
            relay = relays[restarted.key[0]]
            restarted.vllm.close()
            await eventually(lambda: relay.source_states()[0]["peers"] == 0,
                             "the relay to see the engine go")
            restarted.restart()
            restarted.store_shared()
            restarted.steps(5)
            sent = metric(relay, "kvrelay_batches_received_total", dp_rank="0")
            while metric(relay, "kvrelay_batches_received_total", dp_rank="0") == sent:
                assert restarted.vllm.seq < 40, "the relay never read the restarted engine"
                restarted.steps(1)
                await asyncio.sleep(0.05)

            for w in workers:
                w.steps(3)
            workers[3].publish([block_removed(SHARED[2:])])
            await eventually(lambda: caught_up(consumer, workers),
                             "the consumer to apply everything", within=30)

        index = consumer.index
        for w in workers:
            assert index.blocks(w.key) == w.cache, f"worker {w.key}"
            status = index.status(w.key)
            assert status.exact, f"worker {w.key}"
            assert status.resyncs == ({"restart": 1} if w is restarted else {})
        assert (gaps, consumer.gaps, consumer.undecodable) == ([], 0, 0)
        assert index.overlap([*SHARED, 0xB1]) == {
            w.key: 4 if w in (workers[0], workers[2]) else 2 for w in workers}
        assert sample(consumer, "kvrelay_consumer_nats_reconnects_total") >= 1
        assert sample(consumer, "kvrelay_consumer_gaps_total") == 0
    finally:
        for w in workers:
            w.vllm.close()


# -- batches published straight to the stream ---------------------------------------------------


def relay_batch(worker: WorkerKey, seq: int, *events: RelayEvent, epoch: int = 0,
                relay_ts: float = 1.0, ts: float | None = None) -> RelayBatch:
    return RelayBatch(instance_id=worker[0], dp_rank=worker[1], epoch=epoch, seq=seq,
                      ts=relay_ts if ts is None else ts, relay_ts=relay_ts, events=list(events))


def stored(*hashes: BlockHash, parent: BlockHash | None = None) -> Stored:
    return Stored(list(hashes), parent, [0] * len(hashes), 1, medium="GPU")


class Stream:
    """Publishes RelayBatches (or any bytes) on a namespace's worker subjects, as a relay does."""

    def __init__(self, nc: Any, namespace: str) -> None:
        self.js = nc.jetstream()
        self.namespace = namespace
        self._codec = Codec("msgpack")

    def subject(self, worker: WorkerKey) -> str:
        return f"kv.{self.namespace}.{COMP}.{worker[0]}.{worker[1]}"

    async def publish(self, *batches: RelayBatch) -> None:
        await ensure_stream(self.js, Config.load({}, {}).stream, [self.subject((0, 0))])
        for b in batches:
            worker = (b.instance_id, b.dp_rank)
            # The relay's id, made unique per namespace: tests reuse worker IDs.
            await self.js.publish(self.subject(worker), self._codec.encode(b), headers={
                "Nats-Msg-Id": f"{self.namespace}.{worker[0]}.{worker[1]}.{b.epoch}.{b.seq}"})

    async def publish_raw(self, worker: WorkerKey, data: bytes) -> None:
        await self.js.publish(self.subject(worker), data)


@pytest.fixture
async def stream(nats_server: NatsServer) -> AsyncIterator[Stream]:
    """A namespace of its own on the session server, with a client to publish into it."""
    nc = await nats.connect(nats_server.url)
    try:
        yield Stream(nc, new_namespace())
    finally:
        await nc.close()


def consumer_of(server: NatsServer, stream: Stream, **options: Any) -> KvConsumer:
    return KvConsumer(server.url, stream.namespace, COMP, **options)


A: WorkerKey = (21, 0)
B: WorkerKey = (21, 1)
C: WorkerKey = (2**64 - 5, 0)


async def test_ready_means_history_applied(nats_server: NatsServer, stream: Stream) -> None:
    """ready() returns once every batch the stream held at start is in the index."""
    history = [relay_batch(w, seq, stored(100 * seq + i, parent=100 * (seq - 1) + i or None))
               for seq in range(30) for i, w in enumerate((A, B, C))]
    await stream.publish(*history)
    async with consumer_of(nats_server, stream) as consumer:
        await asyncio.wait_for(consumer.ready(), 10)
        assert consumer.stream_seq >= len(history)
        for w in (A, B, C):
            assert consumer.index.status(w).seq == 29
            assert consumer.index.status(w).blocks == 30
        assert sample(consumer, "kvrelay_consumer_batches_total") == 90


async def test_empty_stream_is_ready_at_once(nats_server: NatsServer, stream: Stream) -> None:
    """With nothing for our subject in the stream, ready() returns without waiting."""
    await stream.publish()
    async with consumer_of(nats_server, stream) as consumer:
        await asyncio.wait_for(consumer.ready(), 5)
        assert consumer.index.workers() == []


async def test_unannounced_gap_is_reported(nats_server: NatsServer, stream: Stream,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """A seq jump the relay did not announce: logged, counted, passed to on_gap, and the
    worker's blocks dropped as for a resync; other workers keep theirs."""
    gaps: list[Gap] = []
    async with consumer_of(nats_server, stream, on_gap=gaps.append) as consumer:
        await stream.publish(relay_batch(A, 0, stored(1, 2)), relay_batch(A, 1, stored(3)),
                             relay_batch(B, 0, stored(1, 2)))
        await asyncio.wait_for(consumer.ready(), 5)
        await eventually(lambda: consumer.stream_seq >= 3, "three batches")
        with caplog.at_level(logging.WARNING, logger="kvrelay.consumer"):
            await stream.publish(relay_batch(A, 4, stored(7)))
            await eventually(lambda: gaps != [], "the gap to be reported")
    assert gaps == [Gap(A, (0, 1), (0, 4))]
    assert "seq 2..3 of epoch 0 missing" in caplog.text
    assert (consumer.gaps, sample(consumer, "kvrelay_consumer_gaps_total")) == (1, 1)
    assert consumer.index.blocks(A) == {7: None}
    assert consumer.index.overlap([1, 2]) == {B: 2}
    assert consumer.index.status(A).exact is False


async def test_epoch_going_back_is_reported(nats_server: NatsServer, stream: Stream) -> None:
    """A worker's epoch going back is reported as a gap with no missed range."""
    gaps: list[Gap] = []
    await stream.publish(relay_batch(A, 0, stored(1), epoch=2),
                         relay_batch(A, 1, stored(2), epoch=1))
    async with consumer_of(nats_server, stream, on_gap=gaps.append) as consumer:
        await asyncio.wait_for(consumer.ready(), 5)
    assert [(g.epoch_back, g.missed) for g in gaps] == [(True, None)]
    assert consumer.index.blocks(A) == {2: None}


async def test_announced_loss_is_a_resync_not_a_gap(nats_server: NatsServer,
                                                     stream: Stream) -> None:
    """A jump covered by the relay's resync counts as a resync (by reason), not a gap."""
    await stream.publish(relay_batch(A, 0, stored(1)),
                         relay_batch(A, 5, Resync("overflow", 1, 4), stored(2)))
    async with consumer_of(nats_server, stream) as consumer:
        await asyncio.wait_for(consumer.ready(), 5)
    assert consumer.gaps == 0
    assert sample(consumer, "kvrelay_consumer_resyncs_total", reason="overflow") == 1
    assert consumer.index.blocks(A) == {2: None}


async def test_duplicates_and_garbage_are_counted_and_skipped(
        nats_server: NatsServer, stream: Stream) -> None:
    """A batch already applied (stored twice past dedup) is skipped; a message that is not a
    RelayBatch is counted and dropped; the batches after both still apply."""
    await stream.publish(relay_batch(A, 0, stored(1)), relay_batch(A, 1, Removed([1])))
    await stream.publish_raw(A, Codec().encode(relay_batch(A, 0, stored(1))))  # no msg id
    await stream.publish_raw(A, b"\xc1 not msgpack")
    await stream.publish_raw(A, msgspec.json.encode({"events": "nope"}))
    await stream.publish(relay_batch(A, 2, stored(2)))
    async with consumer_of(nats_server, stream) as consumer:
        await asyncio.wait_for(consumer.ready(), 5)
    assert consumer.index.blocks(A) == {2: None}
    assert sample(consumer, "kvrelay_consumer_duplicates_total") == 1
    assert (consumer.undecodable, sample(consumer, "kvrelay_consumer_undecodable_total")) == (2, 2)
    assert consumer.gaps == 0
    assert consumer.index.status(A).duplicates == 1


async def test_batches_iterator(nats_server: NatsServer, stream: Stream) -> None:
    """batches() yields each applied batch in stream order with its gap, skips duplicates,
    and ends when the consumer closes."""
    await stream.publish(relay_batch(A, 0, stored(1)), relay_batch(B, 0, stored(2)),
                         relay_batch(A, 3, stored(3)))
    await stream.publish_raw(A, Codec().encode(relay_batch(A, 3, stored(3))))
    consumer = consumer_of(nats_server, stream, deliveries=2)
    got: list[Delivery] = []

    async def read() -> None:
        async for delivery in consumer.batches():
            got.append(delivery)

    reader = asyncio.ensure_future(read())
    async with consumer:
        await asyncio.wait_for(consumer.ready(), 5)
        await asyncio.wait_for(consumer.delivered(), 5)
        assert [(d.batch.dp_rank, d.batch.seq) for d in got] == [(0, 0), (1, 0), (0, 3)]
    await asyncio.wait_for(reader, 5)  # ended by close
    assert [d.gap for d in got] == [None, None, Gap(A, (0, 0), (0, 3))]
    assert [d.stream_seq for d in got] == sorted(d.stream_seq for d in got)
    assert got[0].subject == stream.subject(A)


async def test_bootstrap_from_snapshots_then_tail(nats_server: NatsServer,
                                                  stream: Stream) -> None:
    """Snapshots taken at stream sequence S, restored into a new index, plus the messages
    after S: the same index as reading everything, having applied only the tail."""
    await stream.publish(*[relay_batch(w, seq, stored(10 * seq + i, parent=10 * (seq - 1) + i),
                                       Removed([10 * (seq - 2) + i]))
                           for seq in range(12) for i, w in enumerate((A, B))])
    async with consumer_of(nats_server, stream) as first:
        await asyncio.wait_for(first.ready(), 5)
        snapshots = [encode_snapshot(first.index.snapshot(w)) for w in first.index.workers()]
    covered = decode_snapshot(snapshots[0]).stream_seq
    tail = [relay_batch(A, 12, stored(999, parent=110)), relay_batch(C, 0, stored(5)),
            relay_batch(B, 12, Removed([111]))]
    await stream.publish(*tail)

    index = KvIndex()
    for data in snapshots:
        index.restore(decode_snapshot(data))
    async with consumer_of(nats_server, stream, index=index,
                           start_sequence=covered + 1) as resumed, \
            consumer_of(nats_server, stream) as full:
        await asyncio.wait_for(asyncio.gather(resumed.ready(), full.ready()), 10)
    assert sample(resumed, "kvrelay_consumer_batches_total") == len(tail)
    assert resumed.gaps == 0
    for w in (A, B, C):
        assert resumed.index.blocks(w) == full.index.blocks(w)
        assert resumed.index.status(w).seq == full.index.status(w).seq
    assert resumed.index.blocks(A)[999] == 110


async def test_durable_consumer_resumes_where_it_left(nats_server: NatsServer,
                                                      stream: Stream) -> None:
    """With a durable name, a consumer started again (with the index it kept) continues after
    the last message it applied: nothing twice, no gap; with nothing new it is ready at once."""
    durable = f"router-{stream.namespace}"
    await stream.publish(*[relay_batch(A, seq, stored(seq)) for seq in range(10)])
    index = KvIndex()
    async with consumer_of(nats_server, stream, durable=durable, index=index) as consumer:
        await asyncio.wait_for(consumer.ready(), 5)
    await stream.publish(*[relay_batch(A, seq, stored(seq)) for seq in range(10, 15)])
    async with consumer_of(nats_server, stream, durable=durable, index=index) as again:
        await asyncio.wait_for(again.ready(), 5)
        await eventually(lambda: index.status(A).seq == 14, "the new batches")
    assert sample(again, "kvrelay_consumer_batches_total") == 5
    assert sample(again, "kvrelay_consumer_duplicates_total") == 0
    assert (again.gaps, set(index.blocks(A))) == (0, set(range(15)))
    async with consumer_of(nats_server, stream, durable=durable, index=index) as idle:
        await asyncio.wait_for(idle.ready(), 5)  # nothing new: ready all the same
        assert sample(idle, "kvrelay_consumer_batches_total") == 0
    await stream.js.delete_consumer("KV_EVENTS", durable)


async def test_waits_for_the_stream(fresh_nats: NatsServer) -> None:
    """Started before any relay created the stream, the consumer waits and then follows it;
    told not to wait, ready() raises StreamNotFound."""
    async with KvConsumer(fresh_nats.url, "late", COMP, wait_for_stream=False) as impatient:
        with pytest.raises(StreamNotFound, match="no stream KV_EVENTS"):
            await asyncio.wait_for(impatient.ready(), 5)
    async with KvConsumer(fresh_nats.url, "late", COMP) as consumer:
        await asyncio.sleep(0.3)
        assert not consumer.is_ready
        nc = await nats.connect(fresh_nats.url)
        try:
            late = Stream(nc, "late")
            await late.publish(relay_batch(A, 0, stored(1)))
            await asyncio.wait_for(consumer.ready(), 10)
            await eventually(lambda: consumer.index.workers() == [A], "the batch")
        finally:
            await nc.close()


async def test_unreachable_nats_fails_ready(fresh_nats: NatsServer) -> None:
    """With reconnects bounded and no server, ready() raises the connection error."""
    fresh_nats.stop()
    consumer = KvConsumer(fresh_nats.url, connect_options={
        "max_reconnect_attempts": 1, "reconnect_time_wait": 0.05, "connect_timeout": 0.5})
    async with consumer:
        with pytest.raises(nats.errors.NoServersError):
            await asyncio.wait_for(consumer.ready(), 10)
        assert not consumer.running


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"namespace": "Bad.NS"}, "namespace 'Bad.NS' must match"),
    ({"durable": "a.b"}, "durable name 'a.b' must match"),
    ({"start_sequence": 0}, "start_sequence counts from 1"),
    ({"idle_heartbeat": 0}, "idle_heartbeat must be positive"),
])
def test_bad_arguments_are_clear_errors(kwargs: dict[str, Any], message: str) -> None:
    """Arguments that cannot work are refused at construction, saying which and why."""
    with pytest.raises(ValueError, match=message):
        KvConsumer(**kwargs)


def test_subject_of_a_component_or_an_instance() -> None:
    """The consumer follows every worker of a component, or every rank of one instance."""
    assert KvConsumer(namespace="ns", component="c").subject == "kv.ns.c.>"
    assert KvConsumer(namespace="ns", component="c", instance_id=7).subject == "kv.ns.c.7.*"
    assert KvConsumer(subject="kv.>").subject == "kv.>"


async def test_gap_callback_errors_do_not_stop_the_consumer(
        nats_server: NatsServer, stream: Stream, caplog: pytest.LogCaptureFixture) -> None:
    """An on_gap callback that raises is logged; the consumer goes on applying batches."""

    def broken(gap: Gap) -> None:
        raise RuntimeError("router bug")

    await stream.publish(relay_batch(A, 0), relay_batch(A, 2), relay_batch(A, 3, stored(9)))
    async with consumer_of(nats_server, stream, on_gap=broken) as consumer:
        await asyncio.wait_for(consumer.ready(), 5)
    assert "on_gap callback failed" in caplog.text
    assert consumer.index.blocks(A) == {9: None}

