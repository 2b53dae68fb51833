"""NATS away longer than the buffer holds, frozen, or full: bounded, counted, announced, and
the relay recovers by itself."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import (
    ANY_PORT,
    COMP,
    NS,
    STREAM,
    Received,
    RelayProcess,
    SteadyLoad,
    eventually,
    http_get,
    is_ready,
    join,
    metric,
    nats_client,
    new_instance_id,
    publish,
    running_relay,
    scrape,
    subject_of,
)
from nats.js.api import DiscardPolicy, StorageType, StreamConfig

from fault.accounting import Tally, offered_keys, read_subject, tally
from kvrelay.app import Relay
from kvrelay.jetstream.publisher import Publisher
from kvrelay.testing.natsserver import NatsServer
from kvrelay.testing.synthetic import SyntheticVllm, WorkloadFactory
from kvrelay.wire.schema import Resync

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

Record = Callable[[Tally], Tally]
Procs = Callable[[list[str]], RelayProcess]
MIB = 1 << 20


def rss(pid: int) -> int:
    """Resident memory of a process in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise LookupError("no VmRSS")


async def until_scraped(proc: RelayProcess, name: str, want: Callable[[float], bool],
                        what: str, within: float = 20.0, **labels: str) -> float:
    deadline = time.monotonic() + within
    while not want(value := await scrape(proc.system_port, name, **labels)):
        assert time.monotonic() < deadline, f"{what}: {name} is {value}\n{proc.output()[-3000:]}"
        await asyncio.sleep(0.05)
    return value


async def test_outage_longer_than_the_buffer(fresh_nats: NatsServer, relay_procs: Procs,
                                             record: Record) -> None:
    """NATS gone while 10x the buffer bound arrives: oldest dropped and counted, memory bounded,
    one `resync` overflow naming exactly what went, and the relay carries on by itself."""
    instance = new_instance_id()
    bound = 2 * MIB
    factory = WorkloadFactory(seed=5, blocks=32)
    with SyntheticVllm(ANY_PORT, factory=factory) as vllm:
        proc = relay_procs(["--nats", fresh_nats.url, "--zmq", vllm.address, "--instance-id",
                            str(instance), "--namespace", NS, "--component", COMP,
                            "--buffer-bytes", str(bound)])
        await proc.healthy()
        received = 0.0
        while received == 0:  # beat ZMQ's slow joiner with real batches
            vllm.publish_next()
            await asyncio.sleep(0.05)
            received = await scrape(proc.system_port, "kvrelay_batches_received_total",
                                    dp_rank="0")
        publish(vllm, 100 - vllm.seq)
        async with nats_client(fresh_nats.url) as nc:
            deadline = time.monotonic() + 10
            while len(await read_subject(nc, subject_of(instance))) < 100:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        before = rss(proc.proc.pid)
        fresh_nats.kill()
        # Until the relay has seen NATS go, a batch may still leave into the dead socket: it
        # stays in the window and is sent again later, not dropped, which would move the range.
        deadline = time.monotonic() + 10
        while (await http_get(proc.system_port, "/health"))[0] == 200:
            assert time.monotonic() < deadline, "the relay did not notice NATS going"
            await asyncio.sleep(0.02)
        sent_bytes = 0
        peak_buffer = 0.0
        peak_rss = before
        for _ in range(30):  # in steps the relay keeps up with, so ZMQ itself drops nothing
            for _ in range(400):
                sent_bytes += len(factory_payload := vllm._encode(factory.next_events(), None))
                vllm.publish_payload(factory_payload)
            await until_scraped(proc, "kvrelay_batches_received_total",
                                lambda v: v >= vllm.seq, "the relay to read", dp_rank="0")
            peak_buffer = max(peak_buffer, await scrape(proc.system_port,
                                                        "kvrelay_buffer_bytes"))
            peak_rss = max(peak_rss, rss(proc.proc.pid))
        dropped = await scrape(proc.system_port, "kvrelay_batches_dropped_total",
                               reason="overflow")
        assert sent_bytes > 10 * bound
        assert 0 < peak_buffer <= bound
        assert peak_rss - before < 6 * bound, (before, peak_rss)
        assert dropped > 0
        fresh_nats.start()
        await proc.healthy(within=20)
        publish(vllm, 10)
        total = vllm.seq
        await until_scraped(proc, "kvrelay_buffer_batches", lambda v: v == 0, "a drained buffer")
        await until_scraped(proc, "kvrelay_publish_in_flight", lambda v: v == 0, "all acked")
        async with nats_client(fresh_nats.url) as nc:
            got = await read_subject(nc, subject_of(instance))
        assert await scrape(proc.system_port, "kvrelay_resyncs_total", reason="overflow") == 1
    row = record(tally("NATS away past the buffer bound", got, offered_keys(0, total)))
    assert row.lost == dropped == row.announced
    assert (row.duplicates, row.order_violations, row.resyncs) == (0, 0, 1)
    first_after = 100 + int(dropped)
    assert [(r.batch.seq, e) for r in got for e in r.batch.events if isinstance(e, Resync)] == [
        (first_after, Resync("overflow", 100, first_after - 1))]
    print(f"outage: {sent_bytes / MIB:.1f} MiB offered, buffer peak {peak_buffer / MIB:.2f} MiB "
          f"(bound {bound / MIB:.0f}), RSS {before / MIB:.1f} -> {peak_rss / MIB:.1f} MiB")


async def backpressure(relay: Relay, vllm: SyntheticVllm, batches: int) -> tuple[int, float]:
    """Offer `batches` while JetStream takes nothing; the most held in flight and buffered."""
    assert relay.publisher is not None
    most_in_flight = 0
    most_buffered = 0.0
    for _ in range(batches // 100):
        publish(vllm, 100)
        await eventually(lambda: metric(relay, "kvrelay_batches_received_total", dp_rank="0")
                         >= vllm.seq, "the relay to read")
        most_in_flight = max(most_in_flight, relay.publisher.in_flight)
        most_buffered = max(most_buffered, metric(relay, "kvrelay_buffer_bytes"))
    return most_in_flight, most_buffered


async def drained(relay: Relay, instance: int, url: str) -> list[Received]:
    assert relay.publisher is not None
    publisher = relay.publisher
    await eventually(lambda: not relay.buffer and publisher.in_flight == 0, "a drained relay",
                     within=30)
    async with nats_client(url) as nc:
        return await read_subject(nc, subject_of(instance))


async def test_frozen_server_backpressure(fresh_nats: NatsServer, record: Record) -> None:
    """A SIGSTOPped nats-server: in-flight and buffer stay within their bounds, the oldest go
    (counted, announced), and after SIGCONT the rest arrives once, in order."""
    instance = new_instance_id()
    with SyntheticVllm(ANY_PORT) as vllm:
        async with running_relay(nats=fresh_nats.url, instance_id=instance, zmq=[vllm.address],
                                 max_in_flight=50, buffer_batches=300, ack_timeout=1.0,
                                 drain_timeout=10.0) as relay:
            await eventually(lambda: is_ready(relay), "relay ready")
            await join(vllm, relay)
            async with SteadyLoad(vllm):
                await eventually(lambda: metric(relay, "kvrelay_batches_published_total") >= 50,
                                 "50 acknowledged")
            fresh_nats.pause()
            try:
                most_in_flight, _ = await backpressure(relay, vllm, 1000)
                assert relay.buffer is not None
                assert len(relay.buffer) <= 300
                assert most_in_flight <= 50  # messages; each may be a pack
                assert isinstance(relay.publisher, Publisher)
                dropped = metric(relay, "kvrelay_batches_dropped_total", reason="overflow")
                assert dropped >= 1000 - 300 - relay.publisher.in_flight_batches
                await asyncio.sleep(1.5)  # frozen past the ack timeout, so acks are given up on
            finally:
                fresh_nats.resume()
            publish(vllm, 10)
            total = vllm.seq
            got = await drained(relay, instance, fresh_nats.url)
            dropped = metric(relay, "kvrelay_batches_dropped_total", reason="overflow")
    row = record(tally("nats-server frozen (SIGSTOP)", got, offered_keys(0, total)))
    assert row.lost == dropped == row.announced
    assert (row.duplicates, row.order_violations) == (0, 0)


async def test_full_stream_discard_new(fresh_nats: NatsServer, record: Record) -> None:
    """A stream out of room (max-bytes, discard new) refuses every batch: the relay backs off,
    stays bounded, announces what it had to drop, and goes on once room is made."""
    instance = new_instance_id()
    async with nats_client(fresh_nats.url) as nc:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=STREAM, subjects=["kv.>"], max_bytes=32 * 1024,
                                         discard=DiscardPolicy.NEW, storage=StorageType.FILE))
        with SyntheticVllm(ANY_PORT) as vllm:
            async with running_relay(nats=fresh_nats.url, instance_id=instance,
                                     zmq=[vllm.address], max_in_flight=50, buffer_batches=300,
                                     drain_timeout=10.0) as relay:
                await eventually(lambda: is_ready(relay), "relay ready")
                await join(vllm, relay)
                most_in_flight, _ = await backpressure(relay, vllm, 1000)
                stored = (await js.stream_info(STREAM)).state.messages
                assert 0 < stored < 1000
                assert most_in_flight <= 50
                assert relay.buffer is not None
                assert len(relay.buffer) <= 300
                publisher = relay.publisher
                assert publisher is not None
                await eventually(lambda: "maximum bytes exceeded" in publisher.last_error,
                                 "the refusal heard")  # acks are read in groups
                await js.update_stream(StreamConfig(  # the operator makes room
                    name=STREAM, subjects=["kv.>"], max_bytes=64 * MIB,
                    discard=DiscardPolicy.NEW, storage=StorageType.FILE))
                publish(vllm, 10)
                total = vllm.seq
                got = await drained(relay, instance, fresh_nats.url)
                # The buffer's drops, and a message refused for room while a smaller one after
                # it fit (a pack, most often): it can no longer go in order.
                dropped = sum(metric(relay, "kvrelay_batches_dropped_total", reason=reason)
                              for reason in ("overflow", "out_of_order"))
    row = record(tally("stream full (max-bytes, discard new)", got,
                       offered_keys(0, total)))
    assert row.lost == row.announced == dropped > 0
    assert (row.duplicates, row.order_violations) == (0, 0)
