"""Bounded memory: a vLLM batch over --max-batch-bytes, live or replayed, on either ZMQ engine,
and the relay process's resident memory after the largest inputs and a full buffer.

The process tests run the relay as it ships (`python -m kvrelay run`) and read its VmRSS and
VmHWM from /proc; the rest run relays in this process against a real nats-server and real ZMQ.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from harness import (
    ANY_PORT,
    COMP,
    NS,
    RelayProcess,
    eventually,
    is_ready,
    join,
    metric,
    nats_client,
    new_instance_id,
    publish,
    read_stream,
    resyncs,
    running_relay,
    scrape,
    seqs,
    subject_of,
)

from bench.memory import proc_status, shape_payload, typical_payload
from kvrelay.ingest.sequencer import Frame
from kvrelay.testing.natsserver import NatsServer
from kvrelay.testing.synthetic import SyntheticVllm, block_stored
from kvrelay.wire.schema import Resync

pytestmark = pytest.mark.integration

BOUND = 64 << 10  # --max-batch-bytes in the in-process tests
BIG = shape_payload("stored", 1 << 20)  # a well-formed vLLM batch of 1 MiB: over the bound
LIMIT = 150_000_000  # bytes of resident memory a relay stays under (the pod's limit: 256 MiB)


@pytest.mark.parametrize("with_replay", [False, True], ids=["no-replay", "replay"])
async def test_a_batch_over_the_bound_is_dropped_unread_and_announced(
        nc: Any, nats_server: NatsServer, caplog: pytest.LogCaptureFixture,
        with_replay: bool) -> None:
    """A vLLM batch above --max-batch-bytes is dropped before it is decoded: counted as
    too_large, logged with its source, size and the bound, and announced with the next batch as
    a resync gap for its seq, which no replay is asked for; the batches after it are relayed."""
    instance = new_instance_id()
    caplog.set_level(logging.WARNING, "kvrelay.ingest")
    with SyntheticVllm(ANY_PORT, replay_endpoint=ANY_PORT if with_replay else None) as vllm:
        replay = [vllm.replay_address] if vllm.replay_address else []
        async with running(nats_server, instance, vllm, replay=replay) as relay:
            if with_replay:
                await eventually(lambda: metric(relay, "kvrelay_replays_total",
                                                outcome="succeeded") == 1, "start-up replay")
            await join(vllm, relay)
            publish(vllm, 2)
            vllm.publish_payload(BIG)  # seq 2
            publish(vllm, 2)
            got = await read_stream(nc, subject_of(instance), 4)
            assert metric(relay, "kvrelay_batches_dropped_total", reason="too_large") == 1
            assert metric(relay, "kvrelay_events_dropped_total", reason="too_large") == 0
            assert metric(relay, "kvrelay_decode_errors_total", kind="msgpack") == 0
            assert metric(relay, "kvrelay_resyncs_total", reason="gap") == 1
            assert metric(relay, "kvrelay_replays_total", outcome="requested") == int(
                with_replay)  # the start-up replay only
            source = relay._sources[0].name
    assert seqs(got) == [(0, 0), (0, 1), (0, 3), (0, 4)]
    assert resyncs(got) == [(3, Resync("gap", 2, 2))]
    assert (f"dropped a message of {len(BIG) + len(vllm.topic) + 8} bytes from {source} "
            f"unread: above --max-batch-bytes ({BOUND})") in caplog.text


async def test_a_replayed_batch_over_the_bound_is_announced_not_replayed_again(
        nc: Any, nats_server: NatsServer, caplog: pytest.LogCaptureFixture) -> None:
    """A gap whose replay holds a batch above the bound: libzmq drops the replay connection at
    that reply unread, the replay fails at once (not after --replay-timeout) and says why, the
    gap is announced as a resync, no replay is asked for again, and what follows is relayed."""
    instance = new_instance_id()
    big = block_stored(list(range(2000)), None, list(range(32_000)))  # about 100 KB
    with SyntheticVllm(ANY_PORT, replay_endpoint=ANY_PORT) as vllm:
        assert vllm.replay_address is not None
        async with running(nats_server, instance, vllm, replay=[vllm.replay_address],
                           replay_timeout=5.0) as relay:
            await eventually(lambda: metric(relay, "kvrelay_replays_total",
                                            outcome="succeeded") == 1, "start-up replay")
            await join(vllm, relay)
            publish(vllm, 2)
            await read_stream(nc, subject_of(instance), 2, settle=0)
            vllm.skip(events_per_batch=[[big]])  # seq 2: only in vLLM's replay buffer
            began = time.monotonic()
            publish(vllm, 1)  # seq 3: the gap asks for a replay from 2
            await eventually(lambda: metric(relay, "kvrelay_replays_total", outcome="failed")
                             == 1, "the replay to fail")
            assert time.monotonic() - began < 2.0
            publish(vllm, 2)
            got = await read_stream(nc, subject_of(instance), 5)
            assert vllm.replay_requests == 2  # at start-up and for the gap: no loop
            assert metric(relay, "kvrelay_missed_batches_total") == 1
    assert seqs(got) == [(0, s) for s in (0, 1, 3, 4, 5)]
    assert resyncs(got) == [(3, Resync("gap", 2, 2))]
    assert f"a reply above --max-batch-bytes ({BOUND})" in caplog.text


async def test_libzmq_engine_drops_a_batch_over_the_bound_with_the_connection(
        nc: Any, nats_server: NatsServer) -> None:
    """With --zmq-engine libzmq the bound is ZMQ_MAXMSGSIZE: libzmq drops the publisher's
    connection at a message above it, unread, and reconnects; what follows is relayed after a
    resync gap naming the batch (and any sent while it reconnected)."""
    instance = new_instance_id()
    with SyntheticVllm(ANY_PORT) as vllm:
        async with running(nats_server, instance, vllm, zmq_engine="libzmq") as relay:
            await join(vllm, relay)
            publish(vllm, 2)
            await read_stream(nc, subject_of(instance), 2, settle=0)
            await eventually(lambda: metric(relay, "kvrelay_batches_published_total") == 2,
                             "the first two acknowledged")  # acks are read in groups
            vllm.publish_payload(BIG)  # seq 2
            published = 2.0
            while published == 2:  # batches sent before the reconnection are lost too
                vllm.publish_next()
                await asyncio.sleep(0.05)
                published = metric(relay, "kvrelay_batches_published_total")
            got = await read_stream(nc, subject_of(instance), 3)
    first = got[2].batch.seq
    assert first > 2
    assert seqs(got)[:3] == [(0, 0), (0, 1), (0, first)]
    assert resyncs(got)[0] == (first, Resync("gap", 2, first - 1))


async def test_rss_stays_bounded_after_a_50_mb_batch(
        nats_server: NatsServer, relay_procs: Callable[[list[str]], RelayProcess]) -> None:
    """A relay process as it ships, given a 50 MB vLLM batch (4.6 million block hashes): the
    batch is dropped unread and the resident memory of the process and its snapshot process,
    now and at its peak, stays under 150 MB; the batch after it is relayed."""
    payload = shape_payload("removed", 50_000_000)
    instance = new_instance_id()
    with SyntheticVllm(ANY_PORT) as vllm:
        proc = relay_procs(["--nats", nats_server.url, "--zmq", vllm.address, "--instance-id",
                            str(instance), "--namespace", NS, "--component", COMP])
        await proc.healthy()
        port = proc.system_port

        async def published() -> float:
            return await scrape(port, "kvrelay_batches_published_total")

        deadline = time.monotonic() + 10
        while await published() == 0:  # ZMQ's slow joiner
            assert time.monotonic() < deadline, proc.output()
            vllm.publish_next()
            await asyncio.sleep(0.05)
        before = vllm.seq
        vllm.publish_payload(payload)
        vllm.publish_next()
        deadline = time.monotonic() + 30
        while await published() < before + 1:
            assert time.monotonic() < deadline, proc.output()
            await asyncio.sleep(0.05)
        assert await scrape(port, "kvrelay_batches_dropped_total", reason="too_large") == 1
        status = proc_status(proc.proc.pid)
    assert status["VmRSS"] < LIMIT, status
    assert status["VmHWM"] < LIMIT, status


@pytest.mark.parametrize("arrival", ["zmq", "one turn"])
async def test_in_flight_bytes_stay_within_their_bound(fresh_nats: NatsServer,
                                                       arrival: str) -> None:
    """With JetStream hung (SIGSTOP), publishes awaiting an ack stop at --max-in-flight-bytes
    (one publish may cross it), the rest waits in the buffer, in order, and all arrive once it
    answers: batches read from ZMQ, and a burst handed to the output all in one turn of the
    loop (as one read of the socket may hold)."""
    instance = new_instance_id()
    payloads = [typical_payload(seed) for seed in range(8)] * 5  # about 33 KB each
    bound = 100_000
    with SyntheticVllm(ANY_PORT) as vllm:
        async with running(fresh_nats, instance, vllm, max_in_flight_bytes=bound,
                           ack_timeout=30.0) as relay:
            publisher = relay.publisher
            assert publisher is not None
            await eventually(lambda: is_ready(relay), "relay ready")
            if arrival == "zmq":
                await join(vllm, relay)
            fresh_nats.pause()
            try:
                if arrival == "zmq":
                    for payload in payloads:
                        vllm.publish_payload(payload)
                    await eventually(lambda: metric(relay, "kvrelay_batches_received_total",
                                                    dp_rank="0") == 40, "the relay to read")
                else:
                    for seq, payload in enumerate(payloads):
                        publisher.take(Frame(0, 0, seq, payload, time.time(), ()))
                await asyncio.sleep(0.2)
                assert 1 < publisher.in_flight <= 4
                assert publisher.in_flight_bytes < bound + max(map(len, payloads)) * 1.1
                assert len(relay.buffer or ()) == 40 - publisher.in_flight
            finally:
                fresh_nats.resume()
            async with nats_client(fresh_nats.url) as client:
                got = await read_stream(client, subject_of(instance), 40)
    assert seqs(got) == [(0, s) for s in range(40)]


async def test_rss_stays_bounded_through_a_nats_outage_with_the_buffer_full(
        fresh_nats: NatsServer, relay_procs: Callable[[list[str]], RelayProcess]) -> None:
    """A relay process as it ships (buffer bound 64 MiB) while NATS is away: vLLM steps of 512
    blocks until the buffer overflows, then NATS back and everything held published; resident
    memory stays under 150 MB with the buffer full and at its peak through the drain.
    Snapshots are off: these steps store a million blocks and remove none, a worker state
    whose index (the snapshot process's, about 130 MB) is not what the buffer bound is about;
    the 50 MB batch test above keeps them on, its process counted."""
    payloads = [typical_payload(seed) for seed in range(64)]
    instance = new_instance_id()
    with SyntheticVllm(ANY_PORT) as vllm:
        proc = relay_procs(["--nats", fresh_nats.url, "--zmq", vllm.address, "--instance-id",
                            str(instance), "--namespace", NS, "--component", COMP,
                            "--snapshot-interval", "0", "--snapshot-events", "0"])
        await proc.healthy()
        port = proc.system_port

        async def until(name: str, want: Callable[[float], bool], **labels: str) -> None:
            deadline = time.monotonic() + 30
            while not want(await scrape(port, name, **labels)):
                assert time.monotonic() < deadline, f"{name}\n{proc.output()[-3000:]}"
                await asyncio.sleep(0.05)

        while await scrape(port, "kvrelay_batches_published_total") == 0:  # slow joiner
            vllm.publish_payload(payloads[0])
            await asyncio.sleep(0.05)
        fresh_nats.stop()
        await until("kvrelay_ready", lambda ready: ready == 0)
        while await scrape(port, "kvrelay_batches_dropped_total", reason="overflow") == 0:
            for payload in payloads:  # in steps the relay keeps up with: ZMQ drops nothing
                vllm.publish_payload(payload)
            await until("kvrelay_batches_received_total", lambda n: n >= vllm.seq,
                        dp_rank="0")
        full = proc_status(proc.proc.pid)
        assert await scrape(port, "kvrelay_buffer_bytes") > 60 << 20
        fresh_nats.start()
        await until("kvrelay_buffer_batches", lambda n: n == 0)
        await until("kvrelay_publish_in_flight", lambda n: n == 0)
        drained = proc_status(proc.proc.pid)
    assert full["VmRSS"] < LIMIT, full
    assert drained["VmHWM"] < LIMIT, drained


def running(nats_server: NatsServer, instance: int, vllm: SyntheticVllm,
            **flags: Any) -> Any:
    """An in-process relay of `instance` reading `vllm`, bounded at BOUND bytes a batch."""
    return running_relay(nats=nats_server.url, instance_id=instance, zmq=[vllm.address],
                         max_batch_bytes=BOUND, **flags)
