"""Ingest's sequence logic at its edges, and resync bookkeeping that must stay bounded."""

from __future__ import annotations

import asyncio
import time
from typing import Literal

import pytest
import zmq
import zmq.asyncio

from kvrelay.app import Relay
from kvrelay.config import Config, SourceSpec
from kvrelay.ingest.budget import Budget
from kvrelay.ingest.buffer import Buffer, merge_resyncs
from kvrelay.ingest.sequencer import Frame, Sequencer
from kvrelay.ingest.source import Source
from kvrelay.system.metrics import Metrics
from kvrelay.testing.natsserver import NatsServer, free_port
from kvrelay.wire.schema import ResumePoint, Resync


def test_restart_during_replay_is_not_taken_for_replayed_batches() -> None:
    """Held batches after seq went back belong to a new epoch, even if the replay covered them."""
    frames: list[Frame] = []
    requested: list[int] = []
    sequencer = Sequencer(0, frames.append, Metrics(), request_replay=requested.append)
    sequencer.resume(None)
    assert requested == [0]  # everything from seq 0 is asked for; live batches wait meanwhile
    for seq in (45, 46, 50, 0, 1, 2):  # vLLM restarted after 50
        sequencer.offer(seq, b"live", 0.0)
    assert frames == []
    assert sequencer.held == 6
    sequencer.replayed(0, [(seq, b"old") for seq in range(51)], 0.0)
    after = frames[51:]
    assert [(f.epoch, f.seq) for f in after] == [(1, 0), (1, 1), (1, 2)]
    assert after[0].resyncs == (Resync("restart"),)
    assert all(f.payload == b"live" for f in after)
    assert [f.payload for f in frames[:51]] == [b"old"] * 51


def test_overflow_while_holding_is_announced_as_overflow() -> None:
    """Batches dropped past the hold bound are announced as `overflow` with their range."""
    frames: list[Frame] = []
    metrics = Metrics()
    sequencer = Sequencer(0, frames.append, metrics, budget=Budget(3, 1 << 20))
    for seq in range(6):
        sequencer.offer(seq, b"x", 0.0)
    sequencer.resume(None)
    assert [f.seq for f in frames] == [3, 4, 5]
    assert frames[0].resyncs == (Resync("overflow", 0, 2),)
    assert frames[1].resyncs == ()
    assert sample(metrics, "kvrelay_batches_dropped_total", reason="overflow") == 3


def test_buffer_and_held_batches_share_one_budget() -> None:
    """The buffer and every sequencer's held batches count against one bound, in batches and in
    bytes: past it the oldest batch anywhere goes, whoever adds, counted and announced as
    `overflow` by its holder; what leaves either is released."""
    metrics = Metrics()
    budget = Budget(4, 20)
    buffer = Buffer(budget, metrics)
    frames: list[Frame] = []
    sequencer = Sequencer(1, frames.append, metrics, budget=budget)  # holds until resumed
    buffer.put(Frame(0, 0, 0, b"a", 1.0, ()))
    buffer.put(Frame(0, 0, 1, b"b", 2.0, ()))
    sequencer.offer(0, b"c", 3.0)
    sequencer.offer(1, b"d", 4.0)
    assert (budget.batches, budget.nbytes) == (4, 4)
    sequencer.offer(2, b"e", 5.0)  # one batch too many: the buffer's seq 0 is the oldest
    buffer.put(Frame(0, 0, 2, b"f", 6.0, ()))  # and then its seq 1
    assert (len(buffer), sequencer.held) == (1, 3)
    buffer.put(Frame(0, 0, 3, b"g" * 18, 7.0, ()))  # a batch and 18 bytes: held 0 and 1 go
    assert (len(buffer), sequencer.held, budget.batches, budget.nbytes) == (2, 1, 3, 20)
    assert sample(metrics, "kvrelay_batches_dropped_total", reason="overflow") == 4
    sequencer.resume(None)
    assert [(f.seq, f.resyncs) for f in frames] == [(2, (Resync("overflow", 0, 1),))]
    assert [(f.seq, f.resyncs) for f in buffer.pop_upto(10)] == [
        (2, (Resync("overflow", 0, 1),)), (3, ())]
    assert (budget.batches, budget.nbytes) == (0, 0)


def test_failed_replay_announces_the_gap_and_waits_before_the_next() -> None:
    """A replay that fails announces what is missing as a gap, and no replay is asked for again
    until the cooldown has passed."""
    frames: list[Frame] = []
    requested: list[int] = []
    now = [100.0]
    sequencer = Sequencer(0, frames.append, Metrics(), request_replay=requested.append,
                          replay_cooldown=5.0, clock=lambda: now[0])
    sequencer.resume(ResumePoint(0, 9))
    sequencer.replayed(10, [(10, b"r")], 0.0)
    sequencer.offer(13, b"a", 0.0)  # 11 and 12 missing: a replay is asked for
    assert requested == [10, 11]
    sequencer.replay_failed(11, 0.0)
    assert [(f.seq, f.resyncs) for f in frames] == [(10, ()), (13, (Resync("gap", 11, 12),))]
    sequencer.offer(16, b"b", 0.0)  # within the cooldown: announced at once
    assert requested == [10, 11]
    assert frames[-1].resyncs == (Resync("gap", 14, 15),)
    now[0] += 5.0
    sequencer.offer(20, b"c", 0.0)
    assert requested == [10, 11, 17]


def test_malformed_messages_are_counted_not_sequenced() -> None:
    """A message without vLLM's three frames or an 8-byte seq is dropped and counted by kind."""
    frames: list[Frame] = []
    metrics = Metrics()
    sequencer = Sequencer(0, frames.append, metrics)
    sequencer.resume(None)
    assert not sequencer.offer_message([b"t", b"\x00" * 8], 0.0)
    assert not sequencer.offer_message([b"t", b"\x00" * 4, b"p"], 0.0)
    assert sequencer.offer_message([b"t", (0).to_bytes(8, "big"), b"p"], 0.0)
    assert [f.seq for f in frames] == [0]
    assert sample(metrics, "kvrelay_decode_errors_total", kind="frame_count") == 1
    assert sample(metrics, "kvrelay_decode_errors_total", kind="seq_length") == 1


def test_merge_resyncs_folds_runs_of_the_same_reason() -> None:
    """A long run of gaps becomes one range; different reasons stay separate and in order."""
    owed: tuple[Resync, ...] = ()
    for seq in range(1000):
        owed = merge_resyncs(owed, (Resync("gap", seq, seq),))
    assert owed == (Resync("gap", 0, 999),)
    owed = merge_resyncs(owed, (Resync("restart"), Resync("restart"), Resync("gap", 5, 5)))
    assert owed == (Resync("gap", 0, 999), Resync("restart"), Resync("gap", 5, 5))


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_buffer_hands_owed_resyncs_to_the_ranks_next_frame_once() -> None:
    """What a rank is owed goes with its next frame taken (`pop_upto`), or to a caller that
    claims it; overflows are counted when handed on, and nothing is handed twice."""
    metrics = Metrics()
    buffer = Buffer(Budget(3, 1 << 20), metrics)
    for seq in range(5):  # seqs 0 and 1 of rank 0 overflow
        buffer.put(Frame(0, 0, seq, b"x", 0.0, ()))
    buffer.lose("rejected", 1, (7,), events=3, carried=(Resync("restart"),))
    first, second = buffer.pop_upto(2)
    assert first.resyncs == (Resync("overflow", 0, 1),)
    assert second.resyncs == ()
    assert sample(metrics, "kvrelay_resyncs_total", reason="overflow") == 1
    assert sample(metrics, "kvrelay_batches_dropped_total", reason="overflow") == 2
    assert sample(metrics, "kvrelay_batches_dropped_total", reason="rejected") == 1
    assert sample(metrics, "kvrelay_events_dropped_total", reason="rejected") == 3
    assert sample(metrics, "kvrelay_resyncs_total", reason="gap") == 0  # not announced yet
    assert buffer.claim(1) == (Resync("restart"), Resync("gap", 7, 7))
    assert sample(metrics, "kvrelay_resyncs_total", reason="gap") == 1
    assert buffer.claim(1) == ()
    assert not buffer.owes(1)
    assert [f.seq for f in buffer.pop_upto(10)] == [4]
    assert buffer.pop_upto(10) == []


async def test_stop_while_bind_keeps_failing_does_not_hang(nats_server: NatsServer) -> None:
    """A relay retrying a bind on a taken port still stops promptly when told to."""
    port = free_port()
    ctx = zmq.Context()
    taken = ctx.socket(zmq.PUB)
    taken.bind(f"tcp://127.0.0.1:{port}")
    try:
        config = Config.load({"zmq_bind": [f"tcp://127.0.0.1:{port}"], "nats": nats_server.url,
                              "instance_id": "5", "system_port": "0",
                              "system_host": "127.0.0.1"}, {})
        relay = Relay(config)
        served = asyncio.ensure_future(relay.serve())
        await relay.started.wait()
        await asyncio.sleep(0.3)  # inside the bind retry loop
        assert relay.readiness()["zmq"].startswith("not subscribed")
        began = time.monotonic()
        relay.handle_exit()
        assert await asyncio.wait_for(served, timeout=10) == 0
        assert time.monotonic() - began < 5
    finally:
        taken.close(linger=0)
        ctx.term()


@pytest.mark.parametrize("engine", ["native", "libzmq"])
async def test_queued_messages_do_not_starve_other_tasks(
        engine: Literal["native", "libzmq"]) -> None:
    """With messages already waiting, the reader yields between turns so publishing can run
    (libzmq: every 1,024 messages; native: every socket read, of at most a few hundred KiB)."""
    port = free_port()
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.bind(f"tcp://127.0.0.1:{port}")
    ticks = 0
    ticks_at: list[int] = []  # the ticker's count as each frame arrived
    flood_read = asyncio.Event()
    expected = 0

    def deliver(frame: Frame) -> None:
        ticks_at.append(ticks)
        if expected and len(ticks_at) >= expected:
            flood_read.set()

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    spec = SourceSpec(f"tcp://127.0.0.1:{port}", False, None, 0)
    source = Source(spec, zmq.asyncio.Context.instance(), deliver, Metrics(), engine=engine)
    resumed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    resumed.set_result(None)
    reading = asyncio.ensure_future(source.run(resumed))
    ticking = asyncio.ensure_future(ticker())
    try:
        seq = 0
        while not ticks_at:  # until the subscription is up
            pub.send_multipart([b"", seq.to_bytes(8, "big"), b"x"])
            seq += 1
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        first = len(ticks_at)
        # Queue a flood while the loop is blocked here, so every message is already waiting.
        for _ in range(1500):  # 1.5 MiB: more than one read of the socket
            pub.send_multipart([b"", seq.to_bytes(8, "big"), bytes(1024)])
            seq += 1
        time.sleep(0.3)  # noqa: ASYNC251 - blocks the loop on purpose, so the flood queues up
        expected = first + 1500
        await asyncio.wait_for(flood_read.wait(), 10)
        flood = ticks_at[first:first + 1500]
        assert flood[-1] > flood[0], "no other task ran while queued messages were read"
    finally:
        reading.cancel()
        ticking.cancel()
        await asyncio.gather(reading, ticking, return_exceptions=True)
        pub.close(linger=0)
        ctx.term()
