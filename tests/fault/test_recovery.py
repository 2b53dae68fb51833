"""The publisher's failure path against a real nats-server, with the fault placed exactly.

A refused publish whose successor was stored must not be stored after it (the old go-back-N
resend did that), and batches stored whose acks were lost must not be stored again once the
duplicate window has passed (the old resend relied on dedup for that).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest
from harness import COMP, NS, STREAM, eventually, nats_client, new_instance_id
from nats.js.api import StorageType, StreamConfig

from fault.accounting import Tally, offered_keys, read_subject, tally
from kvrelay.config import Config
from kvrelay.ingest.budget import Budget
from kvrelay.ingest.buffer import Buffer
from kvrelay.ingest.sequencer import Frame
from kvrelay.jetstream.publisher import Publisher
from kvrelay.system.metrics import Metrics
from kvrelay.testing.natsserver import NatsServer
from kvrelay.testing.synthetic import WorkloadFactory, encode_batch
from kvrelay.wire.names import Worker
from kvrelay.wire.schema import Resync

pytestmark = pytest.mark.integration

Record = Callable[[Tally], Tally]


@pytest.fixture
async def publisher(fresh_nats: NatsServer) -> AsyncIterator[Publisher]:
    """A connected publisher for one new instance, its stream deduplicating for 0.5 s."""
    async with nats_client(fresh_nats.url) as nc:
        await nc.jetstream().add_stream(StreamConfig(
            name=STREAM, subjects=["kv.>"], storage=StorageType.FILE, duplicate_window=0.5))
    config = Config.load({"nats": fresh_nats.url, "namespace": NS, "component": COMP}, {})
    metrics = Metrics()
    worker = Worker(NS, COMP, new_instance_id())
    publisher = Publisher(worker, config.nats, config.publish, config.stream,
                          Buffer(Budget(100, 1 << 20), metrics), metrics)
    await publisher.connect([0])
    assert await publisher.resume_point(0) is None
    try:
        yield publisher
    finally:
        await publisher.close()


def frame(seq: int, factory: WorkloadFactory) -> Frame:
    now = time.time()
    return Frame(0, 0, seq, encode_batch(factory.next_events(), now), now, ())


def dropped(publisher: Publisher, reason: str) -> float:
    value = publisher.metrics.registry.get_sample_value(
        "kvrelay_batches_dropped_total", {"reason": reason})
    return value or 0.0


async def test_refused_batch_is_not_stored_after_its_successor(
        publisher: Publisher, fresh_nats: NatsServer, record: Record) -> None:
    """seq 0 refused, seq 1 stored: 0 is announced as a gap with seq 2, never stored after 1."""
    factory = WorkloadFactory(seed=3)
    subject = publisher.subject(0)
    async with nats_client(fresh_nats.url) as nc:
        js = nc.jetstream()
        await js.update_stream(StreamConfig(name=STREAM, subjects=["elsewhere.>"],
                                            duplicate_window=0.5))
        await publisher.send(frame(0, factory))  # nobody takes kv.> now: refused (503)
        await eventually(lambda: publisher.retry_due, "the refusal")
        await js.update_stream(StreamConfig(name=STREAM, subjects=["kv.>"],
                                            duplicate_window=0.5))
        await publisher.send(frame(1, factory))  # already on its way when 0 was refused
        await eventually(lambda: publisher.in_flight == 1, "seq 1 acknowledged")
        publisher.buffer.put(frame(2, factory))
        assert await publisher.recover()
        assert publisher.in_flight == 0
        await publisher.send(publisher.buffer.pop())
        await eventually(lambda: publisher.in_flight == 0, "seq 2 acknowledged")
        got = await read_subject(nc, subject)
    assert dropped(publisher, "out_of_order") == 1
    assert [(r.batch.seq, [e for e in r.batch.events if isinstance(e, Resync)]) for r in got] \
        == [(1, []), (2, [Resync("gap", 0, 0)])]
    row = record(tally("refused batch, successor stored", got, offered_keys(0, 3)))
    assert (row.lost, row.announced, row.duplicates, row.order_violations) == (1, 1, 0, 0)


async def test_a_refused_batch_passes_on_what_it_announced(
        publisher: Publisher, fresh_nats: NatsServer, record: Record) -> None:
    """seq 3 carries the announcement of 0..2 (lost before it) and is refused while seq 4 is
    stored: seq 5 announces both, the earlier loss and 3's own, so nothing goes unannounced."""
    factory = WorkloadFactory(seed=5)
    subject = publisher.subject(0)
    publisher.buffer.lose("overflow", 0, (0, 1, 2))
    async with nats_client(fresh_nats.url) as nc:
        js = nc.jetstream()
        await js.update_stream(StreamConfig(name=STREAM, subjects=["elsewhere.>"],
                                            duplicate_window=0.5))
        await publisher.send(frame(3, factory))  # claims 0..2; nobody takes kv.> now: refused
        await eventually(lambda: publisher.retry_due, "the refusal")
        await js.update_stream(StreamConfig(name=STREAM, subjects=["kv.>"],
                                            duplicate_window=0.5))
        await publisher.send(frame(4, factory))
        await eventually(lambda: publisher.in_flight == 1, "seq 4 acknowledged")
        publisher.buffer.put(frame(5, factory))
        assert await publisher.recover()
        await publisher.send(publisher.buffer.pop())
        await eventually(lambda: publisher.in_flight == 0, "seq 5 acknowledged")
        got = await read_subject(nc, subject)
    assert [(r.batch.seq, [e for e in r.batch.events if isinstance(e, Resync)]) for r in got] \
        == [(4, []), (5, [Resync("overflow", 0, 2), Resync("gap", 3, 3)])]
    row = record(tally("refused batch carrying an announcement", got, offered_keys(0, 6)))
    assert (row.lost, row.announced, row.duplicates, row.order_violations) == (4, 4, 0, 0)


async def test_batches_stored_with_lost_acks_are_not_stored_again(
        publisher: Publisher, fresh_nats: NatsServer, record: Record) -> None:
    """Acks lost, duplicate window passed: the stream is read back, nothing is sent twice."""
    factory = WorkloadFactory(seed=4)
    inbox = publisher._inbox
    publisher._inbox = "_INBOX.kvrelay-nobody-listens."  # the acks go nowhere
    for seq in range(5):
        await publisher.send(frame(seq, factory))
    publisher._inbox = inbox
    async with nats_client(fresh_nats.url) as nc:
        deadline = time.monotonic() + 5
        while len(await read_subject(nc, publisher.subject(0))) < 5:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # twice the duplicate window: dedup no longer knows them
        assert publisher.in_flight == 5
        assert await publisher.recover()
        assert publisher.in_flight == 0
        got = await read_subject(nc, publisher.subject(0))
    row = record(tally("acks lost past the duplicate window", got, offered_keys(0, 5)))
    assert (row.delivered, row.duplicates, row.order_violations, row.resyncs) == (5, 0, 0, 0)
    assert publisher.metrics.registry.get_sample_value("kvrelay_batches_published_total") == 5
