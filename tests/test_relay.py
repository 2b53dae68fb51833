"""End-to-end behaviour of the relay: real ZMQ sockets, a real nats-server, JetStream read back.

In-process relays (`Relay.serve()`) unless the behaviour needs a process (SIGKILL, SIGTERM, exit
codes). Tests on the shared session server use their own instance ID (above 2**63, as real
worker IDs can be), so each reads only its own subjects of the one `kv.>` stream.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from harness import (
    ANY_PORT,
    COMP,
    CONTRACT_METRICS,
    NS,
    RelayProcess,
    as_output,
    batch_id,
    consecutive_ports,
    dead_replay_endpoint,
    eventually,
    http_get,
    is_ready,
    join,
    last_seq,
    load_vector,
    metric,
    nats_client,
    new_instance_id,
    plain,
    publish,
    publish_then_crash_nats,
    read_stream,
    resyncs,
    run_cli,
    running_relay,
    scrape,
    seqs,
    subject_of,
)

from kvrelay.app import Relay
from kvrelay.config import Config
from kvrelay.testing.natsserver import NatsServer, free_port
from kvrelay.testing.synthetic import SyntheticVllm, WorkloadFactory, block_stored, encode_batch
from kvrelay.wire.schema import SCHEMA_VERSION, Resync, Unknown

pytestmark = pytest.mark.integration

# -- 1. real vLLM frames, both formats -------------------------------------------------------------

VECTORS = [
    ("vllm-0.32-int-hashes.msgpack", 0),
    ("vllm-0.32-bytes-hashes.msgpack", 0),
    ("vllm-0.32-dp1.msgpack", 1),
]


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
@pytest.mark.parametrize(("vector", "dp_rank"), VECTORS, ids=["int", "bytes", "dp1"])
async def test_real_vllm_frames_arrive_complete_in_order(
        nc: Any, nats_server: NatsServer, vector: str, dp_rank: int, fmt: str) -> None:
    """Real vLLM 0.32 frames are published once each, in order, every event passed through."""
    frames = load_vector(vector)
    instance = new_instance_id()
    with SyntheticVllm(ANY_PORT) as vllm:
        async with running_relay(nats=nats_server.url, zmq=[vllm.address], format=fmt,
                                 instance_id=instance, dp_rank_start=dp_rank) as relay:
            await join(vllm, relay)
            for message in frames:
                vllm.send_raw(message)
            got = await read_stream(nc, subject_of(instance, dp_rank), len(frames))
            assert metric(relay, "kvrelay_decode_errors_total", kind="msgpack") == 0
            assert metric(relay, "kvrelay_unknown_events_total") == 0
            total_events = sum(len(msgspec.msgpack.decode(m[2])[1]) for m in frames)
            await eventually(lambda: metric(relay, "kvrelay_events_published_total")
                             == total_events, "events_published to count every event")
            assert metric(relay, "kvrelay_batches_published_total") == len(frames)
    assert len(got) == len(frames)
    for (_, raw_seq, payload), received in zip(frames, got, strict=True):
        seq = int.from_bytes(raw_seq, "big")
        ts, events, rank = msgspec.msgpack.decode(payload)
        batch = received.batch
        assert received.subject == subject_of(instance, dp_rank)
        assert batch_id(received) == f"{instance}.{dp_rank}.0.{seq}"
        assert received.headers["Kvrelay-Schema"] == str(SCHEMA_VERSION)
        assert (batch.v, batch.instance_id, batch.dp_rank, batch.epoch, batch.seq) == (
            SCHEMA_VERSION, instance, rank, 0, seq)
        assert batch.ts == ts
        assert [plain(e) for e in batch.events] == [as_output(e) for e in events]
        if fmt == "json":
            wire = msgspec.json.decode(received.data)
            mine = next(b for b in (wire if isinstance(wire, list) else [wire])
                        if b["seq"] == seq)  # a pack holds its batches in an array
            first = mine["events"][0]
            if "block_hashes" in first:
                raw_hash = events[0]["block_hashes"][0]
                assert first["block_hashes"][0] == (
                    raw_hash.hex() if isinstance(raw_hash, bytes) else raw_hash)
        else:
            assert received.data[:1] not in (b"{", b"[")


# -- 2. ZMQ modes and DP ranks ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["connect", "bind"])
async def test_zmq_connect_and_bind_modes(nc: Any, nats_server: NatsServer, mode: str) -> None:
    """--zmq connects to a binding PUB, --zmq-bind binds for a connecting PUB; both deliver."""
    instance = new_instance_id()
    if mode == "connect":
        vllm = SyntheticVllm(ANY_PORT).start()
        flags: dict[str, Any] = {"zmq": [vllm.address]}
    else:
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        flags = {"zmq_bind": [endpoint]}
        vllm = SyntheticVllm(endpoint)  # no * in it: vLLM's PUB connects
    try:
        async with running_relay(nats=nats_server.url, instance_id=instance, **flags) as relay:
            await eventually(lambda: is_ready(relay), "relay ready")
            if mode == "bind":
                vllm.start()
            await join(vllm, relay)
            publish(vllm, 10)
            got = await read_stream(nc, subject_of(instance), 10)
    finally:
        vllm.close()
    assert seqs(got) == [(0, s) for s in range(10)]
    assert resyncs(got) == []


async def test_dp_ranks_expand_to_consecutive_ports(nc: Any, nats_server: NatsServer) -> None:
    """--dp-ranks 2 reads base and base+1 (and replay ports alike), one subject per rank."""
    instance = new_instance_id()
    pub_base, replay_base = consecutive_ports(2), consecutive_ports(2)
    vllms = [SyntheticVllm(f"tcp://*:{pub_base + r}", dp_rank=r,
                           replay_endpoint=f"tcp://127.0.0.1:{replay_base + r}",
                           factory=WorkloadFactory(seed=r)) for r in range(2)]
    try:
        for vllm in vllms:
            vllm.start()
        async with running_relay(nats=nats_server.url, instance_id=instance, dp_ranks=2,
                                 zmq=[f"tcp://127.0.0.1:{pub_base}"],
                                 replay=[f"tcp://127.0.0.1:{replay_base}"]) as relay:
            assert [s["endpoint"] for s in relay.source_states()] == [
                f"tcp://127.0.0.1:{pub_base}", f"tcp://127.0.0.1:{pub_base + 1}"]
            await eventually(lambda: is_ready(relay), "relay ready")
            for _ in range(8):
                for vllm in vllms:
                    vllm.publish_next()
                await asyncio.sleep(0.01)
            got = [await read_stream(nc, subject_of(instance, r), 8) for r in range(2)]
            assert metric(relay, "kvrelay_resyncs_total", reason="start") == 0
    finally:
        for vllm in vllms:
            vllm.close()
    for rank in range(2):
        assert seqs(got[rank]) == [(0, s) for s in range(8)]
        assert {r.batch.dp_rank for r in got[rank]} == {rank}
        assert {r.subject for r in got[rank]} == {subject_of(instance, rank)}
        expected = WorkloadFactory(seed=rank)
        for received in got[rank]:
            assert [plain(e) for e in received.batch.events] == [
                as_output(e) for e in expected.next_events()]
    assert vllms[1].replay_requests >= 1  # rank 1's replay port was asked, not rank 0's only


# -- 3. gaps, replay, resync -----------------------------------------------------------------------


async def test_gap_filled_by_replay(nc: Any, nats_server: NatsServer) -> None:
    """Batches vLLM skipped on the PUB come back through replay: every seq once, in order."""
    instance = new_instance_id()
    with SyntheticVllm(ANY_PORT, replay_endpoint=ANY_PORT,
                       factory=WorkloadFactory(seed=11)) as vllm:
        assert vllm.replay_address is not None
        async with running_relay(nats=nats_server.url, instance_id=instance,
                                 zmq=[vllm.address], replay=[vllm.replay_address]) as relay:
            await eventually(lambda: is_ready(relay), "relay ready")
            await join(vllm, relay)
            publish(vllm, 5)
            await read_stream(nc, subject_of(instance), 5, settle=0)
            requests = vllm.replay_requests
            vllm.skip(3)  # seq 5..7 go to the replay buffer only
            publish(vllm, 2)
            await read_stream(nc, subject_of(instance), 10, settle=0)
            vllm.skip(2)  # and a second gap: 10, 11
            publish(vllm, 4)
            got = await read_stream(nc, subject_of(instance), 16)
            assert vllm.replay_requests >= requests + 2
            assert metric(relay, "kvrelay_replays_total", outcome="failed") == 0
            assert metric(relay, "kvrelay_replays_total", outcome="succeeded") >= 1
            assert metric(relay, "kvrelay_gaps_total") == 2
            assert metric(relay, "kvrelay_missed_batches_total") == 0
            for reason in ("gap", "start", "restart", "overflow"):
                assert metric(relay, "kvrelay_resyncs_total", reason=reason) == 0
    assert seqs(got) == [(0, s) for s in range(16)]
    assert resyncs(got) == []
    expected = WorkloadFactory(seed=11)
    for received in got:  # the replayed payload is the one of its seq
        assert [plain(e) for e in received.batch.events] == [
            as_output(e) for e in expected.next_events()]


async def test_replay_with_nothing_missing_counts_as_succeeded(
        nc: Any, nats_server: NatsServer) -> None:
    """A start-up replay that finds nothing to fill is a successful replay, not a partial one."""
    with SyntheticVllm(ANY_PORT, replay_endpoint=ANY_PORT) as vllm:
        assert vllm.replay_address is not None
        async with running_relay(nats=nats_server.url, instance_id=new_instance_id(),
                                 zmq=[vllm.address], replay=[vllm.replay_address]) as relay:

            def outcomes() -> float:
                return sum(metric(relay, "kvrelay_replays_total", outcome=o)
                           for o in ("succeeded", "partial", "failed"))

            await eventually(lambda: outcomes() == 1, "the start-up replay to finish")
            assert metric(relay, "kvrelay_replays_total", outcome="partial") == 0
            assert metric(relay, "kvrelay_replays_total", outcome="succeeded") == 1


@pytest.mark.parametrize("kind", ["absent", "silent"])
async def test_gap_without_working_replay_emits_resync(
        nc: Any, nats_server: NatsServer, kind: str) -> None:
    """A gap replay cannot fill becomes a `resync` gap with the missed range; counters agree."""
    instance = new_instance_id()
    with dead_replay_endpoint(kind) as replay, SyntheticVllm(ANY_PORT) as vllm:
        async with running_relay(nats=nats_server.url, instance_id=instance, zmq=[vllm.address],
                                 replay=[replay], replay_timeout=0.3,
                                 replay_cooldown=0.2) as relay:
            await eventually(lambda: metric(relay, "kvrelay_replays_total", outcome="failed")
                             == 1, "the start-up replay to fail")
            await join(vllm, relay)
            publish(vllm, 5)
            await read_stream(nc, subject_of(instance), 5, settle=0)
            await asyncio.sleep(0.25)  # past the replay cooldown, so the gap tries a replay
            vllm.skip(3)  # 5..7 never reach the relay
            publish(vllm, 4)
            got = await read_stream(nc, subject_of(instance), 9)
            assert metric(relay, "kvrelay_replays_total", outcome="failed") == 2
            assert metric(relay, "kvrelay_replays_total", outcome="succeeded") == 0
            assert metric(relay, "kvrelay_resyncs_total", reason="gap") == 1
            assert metric(relay, "kvrelay_missed_batches_total") == 3
    assert seqs(got) == [(0, s) for s in [0, 1, 2, 3, 4, 8, 9, 10, 11]]
    assert resyncs(got) == [(8, Resync("gap", 5, 7))]
    assert isinstance(got[5].batch.events[0], Resync)  # first, before vLLM's own events


async def test_failed_replay_counts_the_gap_once(nc: Any, nats_server: NatsServer) -> None:
    """One gap that replay cannot fill is one kvrelay_gaps_total, not two."""
    instance = new_instance_id()
    with dead_replay_endpoint("absent") as replay, SyntheticVllm(ANY_PORT) as vllm:
        async with running_relay(nats=nats_server.url, instance_id=instance, zmq=[vllm.address],
                                 replay=[replay], replay_timeout=0.3,
                                 replay_cooldown=0.2) as relay:
            await eventually(lambda: metric(relay, "kvrelay_replays_total", outcome="failed")
                             == 1, "the start-up replay to fail")
            await join(vllm, relay)
            publish(vllm, 2)
            await read_stream(nc, subject_of(instance), 2, settle=0)
            await asyncio.sleep(0.25)
            vllm.skip(2)
            publish(vllm, 1)
            await read_stream(nc, subject_of(instance), 3, settle=0)
            assert metric(relay, "kvrelay_replays_total", outcome="failed") == 2
            assert metric(relay, "kvrelay_gaps_total") == 1


# -- 4. engine restart -----------------------------------------------------------------------------


@pytest.mark.parametrize("with_replay", [False, True], ids=["no-replay", "replay"])
async def test_engine_restart_starts_new_epoch(
        nc: Any, nats_server: NatsServer, with_replay: bool) -> None:
    """seq going back starts a new epoch led by `resync` restart; with replay nothing is lost."""
    instance = new_instance_id()
    endpoint = f"tcp://*:{free_port('0.0.0.0')}"
    replay = f"tcp://127.0.0.1:{free_port()}" if with_replay else None
    relay_endpoint = endpoint.replace("*", "127.0.0.1")
    flags: dict[str, Any] = {"nats": nats_server.url, "instance_id": instance,
                             "zmq": [relay_endpoint]}
    if replay:
        flags["replay"] = [replay]
    first = SyntheticVllm(endpoint, replay_endpoint=replay).start()
    second: SyntheticVllm | None = None
    try:
        async with running_relay(**flags) as relay:
            await eventually(lambda: is_ready(relay), "relay ready")
            await join(first, relay)
            publish(first, 20)
            await read_stream(nc, subject_of(instance), 20, settle=0)
            first.close()
            await eventually(lambda: relay.source_states()[0]["peers"] == 0,
                             "the relay to see the engine go")
            second = SyntheticVllm(endpoint, replay_endpoint=replay).start()
            if with_replay:
                # Sent before the relay's SUB is back: only replay can bring these.
                publish(second, 5)
                received = metric(relay, "kvrelay_batches_received_total", dp_rank="0")
                while metric(relay, "kvrelay_batches_received_total",
                             dp_rank="0") == received:
                    assert second.seq < 15, "the relay never read the restarted engine"
                    second.publish_next()
                    await asyncio.sleep(0.05)
            else:
                await join(second, relay)
                publish(second, 5)
            count = second.seq
            got = await read_stream(nc, subject_of(instance), 20 + count)
            assert metric(relay, "kvrelay_engine_restarts_total") == 1
            assert metric(relay, "kvrelay_resyncs_total", reason="restart") == 1
            assert metric(relay, "kvrelay_resyncs_total", reason="gap") == 0
            if with_replay:
                assert second.replay_requests >= 1
    finally:
        first.close()
        if second is not None:
            second.close()
    assert seqs(got) == [(0, s) for s in range(20)] + [(1, s) for s in range(count)]
    assert [batch_id(r) for r in got[20:]] == [
        f"{instance}.0.1.{s}" for s in range(count)]
    assert resyncs(got) == [(0, Resync("restart"))]
    assert isinstance(got[20].batch.events[0], Resync)


async def test_engine_restart_while_relay_down(nc: Any, nats_server: NatsServer) -> None:
    """An engine that restarted while no relay ran is a new epoch for the next relay too."""
    instance = new_instance_id()
    endpoint = f"tcp://*:{free_port('0.0.0.0')}"
    replay = f"tcp://127.0.0.1:{free_port()}"
    flags: dict[str, Any] = {"nats": nats_server.url, "instance_id": instance,
                             "zmq": [endpoint.replace("*", "127.0.0.1")], "replay": [replay]}
    with SyntheticVllm(endpoint, replay_endpoint=replay) as first:
        async with running_relay(**flags) as relay:
            await eventually(lambda: is_ready(relay), "relay ready")
            publish(first, 30)
            await read_stream(nc, subject_of(instance), 30, settle=0)
    with SyntheticVllm(endpoint, replay_endpoint=replay) as second:
        publish(second, 10)  # while no relay runs
        async with running_relay(**flags) as relay:
            await eventually(lambda: is_ready(relay), "relay ready")
            await eventually(lambda: relay.source_states()[0]["next_seq"] == 30,
                             "the relay to resume after seq 29")
            for _ in range(5):
                second.publish_next()
                await asyncio.sleep(0.02)
            got = await read_stream(nc, subject_of(instance), 45)
            assert metric(relay, "kvrelay_engine_restarts_total") == 1
    assert seqs(got) == [(0, s) for s in range(30)] + [(1, s) for s in range(15)]
    assert resyncs(got) == [(0, Resync("restart"))]


@pytest.mark.parametrize("engine", ["native", "libzmq"])
@pytest.mark.parametrize("with_replay", [False, True], ids=["no-replay", "replay"])
async def test_restart_read_late_is_a_restart_after_the_connection_went_away(
        nc: Any, nats_server: NatsServer, with_replay: bool, engine: str) -> None:
    """A restarted engine first read at seq 15, with 20 passed (above half: alone it would be a
    duplicate), is a restart: its predecessor's connection went away. A new epoch led by one
    `resync` restart; with replay it is complete from seq 0."""
    instance = new_instance_id()
    endpoint = f"tcp://*:{free_port('0.0.0.0')}"
    replay = f"tcp://127.0.0.1:{free_port()}" if with_replay else None
    flags: dict[str, Any] = {"nats": nats_server.url, "instance_id": instance,
                             "zmq": [endpoint.replace("*", "127.0.0.1")], "zmq_engine": engine}
    if replay:
        flags["replay"] = [replay]
    async with running_relay(**flags) as relay:
        await eventually(lambda: is_ready(relay), "relay ready")
        with SyntheticVllm(endpoint, replay_endpoint=replay) as first:
            await join(first, relay)
            publish(first, 20)
            await read_stream(nc, subject_of(instance), 20, settle=0)
        await eventually(lambda: relay.source_states()[0]["peers"] == 0,
                         "the relay to see the engine go")
        with SyntheticVllm(endpoint, replay_endpoint=replay) as second:
            await join(second, relay)
            second.skip(15)  # sent before the relay was back: replay alone has them
            publish(second, 3)
            got = await read_stream(nc, subject_of(instance), 20 + (18 if replay else 3))
        assert metric(relay, "kvrelay_engine_restarts_total") == 1
        assert metric(relay, "kvrelay_resyncs_total", reason="restart") == 1
        assert metric(relay, "kvrelay_batches_dropped_total", reason="duplicate") == 0
    again = range(18) if replay else range(15, 18)
    assert seqs(got) == [(0, s) for s in range(20)] + [(1, s) for s in again]
    assert resyncs(got) == ([(0, Resync("restart"))] if replay
                            else [(15, Resync("restart", 0, 14))])


@pytest.mark.parametrize("with_replay", [False, True], ids=["no-replay", "replay"])
async def test_repeated_batches_are_dropped_as_duplicates(
        nc: Any, nats_server: NatsServer, with_replay: bool) -> None:
    """A vLLM that sends its last batch again, or one a few behind, has not restarted: the
    repeats are dropped and counted, the stream stays in epoch 0, every batch once and in order,
    with no resync and no replay asked for."""
    instance = new_instance_id()
    with SyntheticVllm(ANY_PORT, replay_endpoint=ANY_PORT if with_replay else None) as vllm:
        flags: dict[str, Any] = {"nats": nats_server.url, "instance_id": instance,
                                 "zmq": [vllm.address]}
        if with_replay:
            assert vllm.replay_address is not None
            flags["replay"] = [vllm.replay_address]
        async with running_relay(**flags) as relay:
            await eventually(lambda: is_ready(relay), "relay ready")
            await join(vllm, relay)
            publish(vllm, 10)
            assert vllm.resend() == 9
            assert vllm.resend(4) == 6
            publish(vllm, 5)
            got = await read_stream(nc, subject_of(instance), 15)
            await eventually(lambda: metric(relay, "kvrelay_batches_received_total",
                                            dp_rank="0") == 17, "every batch sent to be read")
            assert metric(relay, "kvrelay_batches_dropped_total", reason="duplicate") == 2
            assert metric(relay, "kvrelay_engine_restarts_total") == 0
            assert metric(relay, "kvrelay_missed_batches_total") == 0
            for reason in ("gap", "start", "restart", "overflow"):
                assert metric(relay, "kvrelay_resyncs_total", reason=reason) == 0
            requests = vllm.replay_requests
    assert seqs(got) == [(0, s) for s in range(15)]
    assert resyncs(got) == []
    assert requests == (1 if with_replay else 0)  # the start-up replay alone


async def test_restart_and_a_gap_after_it_each_announced_once(
        nc: Any, nats_server: NatsServer) -> None:
    """An engine that restarts (seq from 0 again, through a new connection) and then skips a
    batch: one `resync` restart for the restart, one `resync` gap for the batch, each counted
    once, and the new epoch's batches stored once each."""
    instance = new_instance_id()
    endpoint = f"tcp://127.0.0.1:{free_port()}"  # the relay binds, vLLM connects
    async with running_relay(nats=nats_server.url, instance_id=instance,
                             zmq_bind=[endpoint]) as relay:
        await eventually(lambda: is_ready(relay), "relay ready")
        with SyntheticVllm(endpoint) as first:
            await join(first, relay)
            publish(first, 20)
            await read_stream(nc, subject_of(instance), 20, settle=0)
        with SyntheticVllm(endpoint) as second:
            await join(second, relay)
            publish(second, 2)
            second.skip(1)
            publish(second, 2)
            got = await read_stream(nc, subject_of(instance), 24)
        assert metric(relay, "kvrelay_engine_restarts_total") == 1
        assert metric(relay, "kvrelay_resyncs_total", reason="restart") == 1
        assert metric(relay, "kvrelay_resyncs_total", reason="gap") == 1
        assert metric(relay, "kvrelay_gaps_total") == 1
        assert metric(relay, "kvrelay_missed_batches_total") == 1
    assert seqs(got) == [(0, s) for s in range(20)] + [(1, s) for s in (0, 1, 3, 4)]
    assert resyncs(got) == [(0, Resync("restart")), (3, Resync("gap", 2, 2))]
    assert [sum(isinstance(e, Resync) for e in r.batch.events) for r in got[20:]] == [1, 0, 1, 0]


# -- 5. relay restart ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
async def test_relay_sigkill_and_restart_loses_nothing(
        nc: Any, nats_server: NatsServer,
        relay_procs: Callable[[list[str]], RelayProcess], fmt: str) -> None:
    """A relay SIGKILLed mid-stream and started again: every seq exactly once, in order."""
    instance = new_instance_id()
    subject = subject_of(instance)
    with SyntheticVllm(ANY_PORT, replay_endpoint=ANY_PORT) as vllm:
        assert vllm.replay_address is not None
        args = ["--nats", nats_server.url, "--zmq", vllm.address, "--replay",
                vllm.replay_address, "--instance-id", str(instance), "--namespace", NS,
                "--component", COMP, "--format", fmt]
        stop = asyncio.Event()

        async def keep_publishing() -> None:
            while not stop.is_set():
                vllm.publish_next()
                await asyncio.sleep(0.004)

        publisher = asyncio.ensure_future(keep_publishing())
        try:
            first = relay_procs(args)
            await first.healthy()
            deadline = time.monotonic() + 10
            while (await last_seq(nc, subject) or 0) < 40:
                assert time.monotonic() < deadline, first.output()
                await asyncio.sleep(0.02)
            first.proc.kill()
            assert await first.exited(5) == -signal.SIGKILL
            killed_at = vllm.seq
            await asyncio.sleep(0.3)  # vLLM keeps going while no relay listens
            second = relay_procs(args)
            await second.healthy()
            await eventually(lambda: vllm.seq > killed_at + 100, "more batches")
            stop.set()
            await publisher
            total = vllm.seq
            got = await read_stream(nc, subject, total, within=10)
            assert await scrape(second.system_port, "kvrelay_replays_total",
                                outcome="succeeded") >= 1
            assert await scrape(second.system_port, "kvrelay_resyncs_total", reason="start") == 0
        finally:
            stop.set()
            await publisher
        assert second.proc.poll() is None, second.output()
    assert seqs(got) == [(0, s) for s in range(total)], second.output()[-3000:]
    assert resyncs(got) == []
    assert {r.data[:1] in (b"{", b"[") for r in got} == {fmt == "json"}
    assert "resumes after epoch 0 seq" in second.output()


# -- 6. NATS away ----------------------------------------------------------------------------------


async def test_nats_down_at_start_then_up(fresh_nats: NatsServer) -> None:
    """NATS absent at start: /health says why it is not ready, nothing is lost once it comes."""
    fresh_nats.stop()
    instance = new_instance_id()
    with SyntheticVllm(ANY_PORT) as vllm:
        async with running_relay(nats=fresh_nats.url, instance_id=instance,
                                 zmq=[vllm.address]) as relay:
            assert relay.system is not None
            await join(vllm, relay)
            publish(vllm, 20)
            status, body = await http_get(relay.system.port, "/health")
            health = msgspec.json.decode(body)
            assert status == 503
            assert health["status"] == "not ready"
            assert health["parts"]["nats"] not in ("ok", "")
            assert health["parts"]["stream"] != "ok"
            assert health["parts"]["zmq"] == "ok"
            assert metric(relay, "kvrelay_ready") == 0
            fresh_nats.start()
            deadline = time.monotonic() + 8
            while (await http_get(relay.system.port, "/health"))[0] != 200:
                assert time.monotonic() < deadline, relay.readiness()
                await asyncio.sleep(0.05)
            publish(vllm, 5)
            async with nats_client(fresh_nats.url) as client:
                got = await read_stream(client, subject_of(instance), 25)
            assert metric(relay, "kvrelay_batches_dropped_total", reason="overflow") == 0
    assert seqs(got) == [(0, s) for s in range(25)]
    assert resyncs(got) == []


@pytest.mark.parametrize("engine", ["direct", "public"])
async def test_nats_killed_mid_stream_and_restarted(fresh_nats: NatsServer, engine: str) -> None:
    """NATS crashes and comes back: the relay buffers, reconnects and loses nothing, with
    either --nats-engine."""
    instance = new_instance_id()
    with SyntheticVllm(ANY_PORT) as vllm:
        async with running_relay(nats=fresh_nats.url, instance_id=instance,
                                 zmq=[vllm.address], nats_engine=engine) as relay:
            await publish_then_crash_nats(relay, vllm, fresh_nats, instance, 20)
            publisher = relay.publisher
            assert publisher is not None
            received = metric(relay, "kvrelay_batches_received_total", dp_rank="0")
            publish(vllm, 10)  # some may be written into the dying connection
            await eventually(lambda: not publisher.connected, "the relay to see NATS gone")
            publish(vllm, 10)
            await eventually(lambda: metric(relay, "kvrelay_batches_received_total",
                                            dp_rank="0") == received + 20, "the relay to read 20")
            assert not is_ready(relay)
            fresh_nats.start()
            publish(vllm, 20)
            async with nats_client(fresh_nats.url) as client:
                got = await read_stream(client, subject_of(instance), 60)
            assert metric(relay, "kvrelay_nats_reconnects_total") >= 1
            for reason in ("overflow", "rejected", "shutdown"):
                assert metric(relay, "kvrelay_batches_dropped_total", reason=reason) == 0
    assert seqs(got) == [(0, s) for s in range(60)]
    assert resyncs(got) == []


async def test_buffer_bound_drops_oldest_and_resyncs(fresh_nats: NatsServer) -> None:
    """Past --buffer-batches the oldest go, are counted, and a `resync` overflow says which."""
    instance = new_instance_id()
    with SyntheticVllm(ANY_PORT) as vllm:
        async with running_relay(nats=fresh_nats.url, instance_id=instance,
                                 zmq=[vllm.address], buffer_batches=50) as relay:
            await publish_then_crash_nats(relay, vllm, fresh_nats, instance, 10)
            publisher = relay.publisher
            assert publisher is not None
            await eventually(lambda: not publisher.connected, "the relay to see NATS gone")
            publish(vllm, 80)  # seq 10..89; 50 fit
            await eventually(lambda: metric(relay, "kvrelay_batches_dropped_total",
                                            reason="overflow") == 30, "30 overflow drops")
            buffer = relay.buffer
            assert buffer is not None
            assert len(buffer) == 50
            assert metric(relay, "kvrelay_buffer_batches") == 50
            assert metric(relay, "kvrelay_buffer_bytes") == buffer.nbytes > 0
            fresh_nats.start()
            async with nats_client(fresh_nats.url) as client:
                got = await read_stream(client, subject_of(instance), 60)
            assert metric(relay, "kvrelay_resyncs_total", reason="overflow") == 1
    assert seqs(got) == [(0, s) for s in [*range(10), *range(40, 90)]]
    assert resyncs(got) == [(40, Resync("overflow", 10, 39))]
    assert isinstance(got[10].batch.events[0], Resync)


async def test_buffer_bound_at_start_resyncs_overflow(fresh_nats: NatsServer) -> None:
    """NATS away from the start, 80 batches into a bound of 50: `resync` overflow 0..29."""
    fresh_nats.stop()
    instance = new_instance_id()
    with SyntheticVllm(ANY_PORT) as vllm:
        async with running_relay(nats=fresh_nats.url, instance_id=instance,
                                 zmq=[vllm.address], buffer_batches=50) as relay:
            await join(vllm, relay)
            publish(vllm, 80)
            await eventually(lambda: metric(relay, "kvrelay_batches_dropped_total",
                                            reason="overflow") == 30, "30 overflow drops")
            fresh_nats.start()
            async with nats_client(fresh_nats.url) as client:
                got = await read_stream(client, subject_of(instance), 50)
            assert seqs(got) == [(0, s) for s in range(30, 80)]
            assert resyncs(got) == [(30, Resync("overflow", 0, 29))]
            assert metric(relay, "kvrelay_resyncs_total", reason="overflow") == 1


# -- 7. SIGTERM drain ------------------------------------------------------------------------------


async def _stall_nats_with_pending(
        fresh_nats: NatsServer, relay_procs: Callable[[list[str]], RelayProcess],
        vllm: SyntheticVllm, instance: int, drain_timeout: float) -> RelayProcess:
    """A relay process that published 10 batches and holds 20 more while NATS is paused."""
    assert vllm.replay_address is not None
    proc = relay_procs(["--nats", fresh_nats.url, "--zmq", vllm.address, "--replay",
                        vllm.replay_address, "--instance-id", str(instance), "--namespace", NS,
                        "--component", COMP, "--log-level", "debug", "--ack-timeout", "1",
                        "--drain-timeout",
                        str(drain_timeout)])
    await proc.healthy()
    for _ in range(10):
        vllm.publish_next()
        await asyncio.sleep(0.01)
    async with nats_client(fresh_nats.url) as client:
        await read_stream(client, subject_of(instance), 10, settle=0)
    received = await scrape(proc.system_port, "kvrelay_batches_received_total", dp_rank="0")
    fresh_nats.pause()
    publish(vllm, 20)
    deadline = time.monotonic() + 5
    while await scrape(proc.system_port, "kvrelay_batches_received_total",
                       dp_rank="0") < received + 20:
        assert time.monotonic() < deadline, proc.output()
        await asyncio.sleep(0.05)
    return proc


async def test_sigterm_drains_buffer_when_nats_resumes(
        fresh_nats: NatsServer, relay_procs: Callable[[list[str]], RelayProcess]) -> None:
    """SIGTERM with NATS stalled: the relay waits, publishes all once NATS answers, exits 0."""
    instance = new_instance_id()
    with SyntheticVllm(ANY_PORT, replay_endpoint=ANY_PORT) as vllm:
        proc = await _stall_nats_with_pending(fresh_nats, relay_procs, vllm, instance, 10.0)
        proc.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(1.0)
        assert proc.proc.poll() is None, "exited without draining:\n" + proc.output()
        fresh_nats.resume()
        assert await proc.exited(10) == 0, proc.output()
        publish(vllm, 3)  # read no more: intake stopped
    async with nats_client(fresh_nats.url) as client:
        got = await read_stream(client, subject_of(instance), 30)
    assert seqs(got) == [(0, s) for s in range(30)]
    assert resyncs(got) == []
    assert "not delivered" not in proc.output()


async def test_second_signal_exits_at_once(
        fresh_nats: NatsServer, relay_procs: Callable[[list[str]], RelayProcess]) -> None:
    """A second SIGTERM during a drain stops the relay at once, not after the drain timeout."""
    instance = new_instance_id()
    with SyntheticVllm(ANY_PORT, replay_endpoint=ANY_PORT) as vllm:
        proc = await _stall_nats_with_pending(fresh_nats, relay_procs, vllm, instance, 60.0)
        proc.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        assert proc.proc.poll() is None, "exited without draining:\n" + proc.output()
        proc.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = await proc.exited(5)
        assert time.monotonic() - started < 3
        assert code >= 0, f"killed by signal {-code} instead of handling it"
    assert "second signal" in proc.output()


async def test_stop_before_nats_came_publishes_held_batches(fresh_nats: NatsServer) -> None:
    """Batches read while NATS was still away at start are drained on stop, not lost."""
    fresh_nats.stop()
    instance = new_instance_id()
    with SyntheticVllm(ANY_PORT) as vllm:
        relay = Relay(Config.load({"nats": fresh_nats.url, "instance_id": instance,
                                   "zmq": [vllm.address], "system_port": 0,
                                   "system_host": "127.0.0.1", "namespace": NS,
                                   "component": COMP, "drain_timeout": 5.0}, {}), env={})
        served = asyncio.ensure_future(relay.serve())
        try:
            await eventually(relay.started.is_set, "relay start-up")
            await join(vllm, relay)
            publish(vllm, 10)
            await eventually(lambda: metric(relay, "kvrelay_batches_received_total",
                                            dp_rank="0") >= 10, "the relay to read 10")
        finally:
            relay.handle_exit()
            fresh_nats.start()  # back well within the drain timeout
            code = await asyncio.wait_for(served, timeout=15)
    assert code == 0
    lost = metric(relay, "kvrelay_batches_dropped_total", reason="shutdown")
    async with nats_client(fresh_nats.url) as client:
        got = await read_stream(client, subject_of(instance), 10, within=3)
    assert (seqs(got), lost) == ([(0, s) for s in range(10)], 0)


# -- 8. bad input ----------------------------------------------------------------------------------


async def test_bad_frames_counted_and_stream_continues(nc: Any, nats_server: NatsServer) -> None:
    """Malformed frames are counted by kind and skipped; the stream goes on after each."""
    instance = new_instance_id()
    unknown = {"type": "BlockFrobnicated", "block_hashes": [7], "answer": 42}
    stored = block_stored([123, 456], None, list(range(32)))
    with SyntheticVllm(ANY_PORT) as vllm:
        async with running_relay(nats=nats_server.url, instance_id=instance,
                                 zmq=[vllm.address]) as relay:
            await join(vllm, relay)

            def errors(kind: str) -> float:
                return metric(relay, "kvrelay_decode_errors_total", kind=kind)

            frame_count = errors("frame_count")
            vllm.publish_next()  # seq 0
            vllm.send_raw([vllm.topic, (1).to_bytes(8, "big")])  # 2 frames
            vllm.send_raw([vllm.topic, b"\x00" * 4, b"\x00" * 4, b"x", b"y"])  # 5 frames
            vllm.send_raw([vllm.topic, (1).to_bytes(7, "big"), encode_batch([], 1.0)])
            vllm.publish_payload(b"\xc1 not msgpack")  # seq 1
            vllm.publish_next()  # seq 2
            vllm.publish_payload(msgspec.msgpack.encode("not a batch"))  # seq 3
            vllm.publish([unknown, stored])  # seq 4
            vllm.publish_next()  # seq 5
            got = await read_stream(nc, subject_of(instance), 4)
            assert errors("frame_count") == frame_count + 2
            assert errors("seq_length") == 1
            assert errors("msgpack") == 1
            assert errors("batch_shape") == 1
            assert metric(relay, "kvrelay_unknown_events_total") == 1
            assert metric(relay, "kvrelay_batches_dropped_total", reason="malformed") == 2
            assert metric(relay, "kvrelay_resyncs_total", reason="gap") == 2
    assert seqs(got) == [(0, 0), (0, 2), (0, 4), (0, 5)]
    assert resyncs(got) == [(2, Resync("gap", 1, 1)), (4, Resync("gap", 3, 3))]
    events = got[2].batch.events
    assert events[0] == Resync("gap", 3, 3)
    assert events[1] == Unknown(tag="BlockFrobnicated", raw=unknown)
    assert plain(events[2]) == as_output(stored)


# -- 9. configuration errors -----------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["run", "--namespace", "Bad.NS"], "--namespace must match ^[a-z0-9-_]+$ (got 'Bad.NS')"),
    (["run", "--no-such-flag", "1"], "unrecognized arguments: --no-such-flag"),
], ids=["namespace", "unknown-flag"])
def test_config_errors_exit_2(args: list[str], message: str) -> None:
    """Invalid settings stop the relay at start with exit code 2 and say what is wrong."""
    result = run_cli(args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


async def test_stream_not_covering_subjects_exits_2(
        nc: Any, nats_server: NatsServer,
        relay_procs: Callable[[list[str]], RelayProcess]) -> None:
    """A pre-existing stream whose subjects do not cover kv.> is a start-up error, exit 2."""
    name = f"NOT_KV_{new_instance_id()}"
    js = nc.jetstream()
    await js.add_stream(name=name, subjects=[f"other.{name.lower()}.>"])
    try:
        proc = relay_procs(["--nats", nats_server.url, "--stream", name, "--zmq",
                            f"tcp://127.0.0.1:{free_port()}", "--instance-id", "7"])
        assert await proc.exited(10) == 2, proc.output()
        assert f"stream {name} has subjects" in proc.output()
        assert "do not cover" in proc.output()
    finally:
        await js.delete_stream(name)


# -- 10. system port -------------------------------------------------------------------------------


async def test_system_port_live_health_metrics(nc: Any, nats_server: NatsServer) -> None:
    """/live, /health and /metrics answer; the metrics hold every name the contract lists."""
    instance = new_instance_id()
    with SyntheticVllm(ANY_PORT) as vllm:
        async with running_relay(nats=nats_server.url, instance_id=instance,
                                 zmq=[vllm.address]) as relay:
            assert relay.system is not None
            port = relay.system.port
            assert port != 0
            await eventually(lambda: is_ready(relay), "relay ready")
            await join(vllm, relay)
            publish(vllm, 3)
            await read_stream(nc, subject_of(instance), 3, settle=0)
            status, body = await http_get(port, "/live")
            assert status == 200
            assert msgspec.json.decode(body) == {"status": "live"}
            status, body = await http_get(port, "/health")
            assert status == 200
            assert msgspec.json.decode(body) == {
                "status": "ready", "parts": {"nats": "ok", "stream": "ok", "zmq": "ok"},
                "vllm": {f"{vllm.address} (dp_rank 0)": "attached"}}
            await eventually(lambda: metric(relay, "kvrelay_batches_published_total") == 3,
                             "3 acks")
            status, body = await http_get(port, "/metrics")
            assert status == 200
            text = body.decode()
            missing = [name for name in CONTRACT_METRICS if f"\n{name}" not in text]
            assert missing == []
            assert f'kvrelay_instance_info{{instance_id="{instance}"' in text
            assert "kvrelay_ready 1.0" in text
            assert (await http_get(port, "/nope"))[0] == 404
