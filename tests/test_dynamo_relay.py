"""`--format dynamo` end to end without Dynamo: real ZMQ sockets, a real nats-server, a core NATS
subscriber reading what a Dynamo router would read, and the discovery files on disk."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from dynamo_support import (
    ANY_PORT,
    COMP,
    NS,
    KvEventReader,
    eventually,
    kv_event_reader,
    publisher,
    running_dynamo_relay,
)
from harness import is_ready, join, metric

from kvrelay.app import EXIT_CONFIG, Relay
from kvrelay.config import Config
from kvrelay.dynamo.records import FileStore, Registration
from kvrelay.dynamo.wire import DynamoEventData, DynamoStoreData, RouterEvent
from kvrelay.ingest.sequencer import Frame
from kvrelay.testing.natsserver import NatsServer
from kvrelay.testing.synthetic import SyntheticVllm, WorkloadFactory, encode_batch

pytestmark = pytest.mark.integration

VECTORS = Path(__file__).resolve().parent.parent / "schemas" / "vectors"
BUCKETS = ("v1/instances", "v1/mdc", "v1/event_channels", "v1/event_sources")
_instance_ids = iter(range(2**63 + 5001, 2**64))


def files(root: Path) -> dict[str, Path]:
    """Every record file under the discovery directory, by bucket/file name."""
    return {f"{p.parent.relative_to(root)}/{p.name}": p for p in root.rglob("*") if p.is_file()}


def event_ids(reader: KvEventReader, publisher_id: int) -> list[int]:
    return [e.event.event_id for e in reader.events(publisher_id)]


def first_block(event: RouterEvent) -> int:
    data = event.event.data
    assert isinstance(data, DynamoEventData)
    assert isinstance(data.stored, DynamoStoreData)
    return data.stored.blocks[0].block_hash


def assert_contiguous(ids: list[int], last: int) -> None:
    """Event ids as a router sees them: repeats allowed (it ignores them), holes not."""
    seen = 0
    for event_id in ids:
        assert event_id <= seen + 1, f"event_id {event_id} after {seen}: a hole"
        seen = max(seen, event_id)
    assert seen == last


@pytest.mark.parametrize("name", ["vllm-0.32-int-hashes", "vllm-0.32-bytes-hashes",
                                  "vllm-0.32-dp1"])
async def test_real_vllm_frames_become_the_golden_dynamo_messages(
        nats_server: NatsServer, tmp_path: Path, name: str) -> None:
    """Real vLLM 0.32 frames reach the Dynamo subject as the golden vectors say, one message
    per batch (--dynamo-batches-per-message 1), sequence from 0 and event_id from 1 without
    holes, under the publisher the event source record names."""
    frames = msgspec.msgpack.decode((VECTORS / "input" / f"{name}.msgpack").read_bytes())
    rows = json.loads((VECTORS / "dynamo" / f"{name}.json").read_text())
    rank = rows[0]["dp_rank"]
    worker = next(_instance_ids)
    async with kv_event_reader(nats_server.url) as reader:
        with SyntheticVllm(ANY_PORT) as vllm:
            async with running_dynamo_relay(tmp_path, nats=nats_server.url, instance_id=worker,
                                            zmq=[vllm.address], dp_rank_start=rank,
                                            dynamo_batches_per_message=1) as relay:
                await eventually(lambda: is_ready(relay), "relay ready")
                await join(vllm, relay)
                for _, _, payload in frames:
                    vllm.publish_payload(payload)
                pid = publisher(relay).publisher_id(rank)
                await eventually(lambda: len([m for m in reader.messages
                                              if m.publisher_id == pid]) >= len(frames),
                                 "every batch on the Dynamo subject")
                await eventually(lambda: metric(relay, "kvrelay_batches_published_total")
                                 == len(frames), "every message confirmed")
                source = json.loads(FileStore(tmp_path).items("v1/event_sources")[0][1])
    got = [m for m in reader.messages if m.publisher_id == pid]
    assert source["publisher_id"] == pid
    assert source["metadata"]["worker"] == {"worker_id": worker, "dp_rank": rank}
    assert [m.sequence for m in got] == list(range(len(frames)))
    assert all(abs(m.published_at / 1000 - time.time()) < 60 for m in got)
    for message, row in zip(got, rows, strict=True):
        expected = row["expected_message"]["payload"]
        for event in expected:
            event["worker_id"] = worker
        assert msgspec.to_builtins(message.events) == expected
    assert_contiguous(event_ids(reader, pid), rows[-1]["expected_message"]["payload"][-1][
        "event"]["event_id"])


async def test_discovery_records_appear_stay_fresh_and_vanish(
        nats_server: NatsServer, tmp_path: Path) -> None:
    """While the relay runs its records are in Dynamo's file backend and touched before they
    expire; a record deleted meanwhile comes back; a clean stop removes them all."""
    worker = next(_instance_ids)
    with SyntheticVllm(ANY_PORT) as vllm0, SyntheticVllm(ANY_PORT) as vllm1:
        async with running_dynamo_relay(tmp_path, nats=nats_server.url, instance_id=worker,
                                        zmq=[vllm0.address, vllm1.address],
                                        dp_rank_start=4, dynamo_model="m") as relay:
            await eventually(lambda: is_ready(relay), "relay ready")
            assert relay.readiness()["dynamo_records"] == "ok"
            dynamo = publisher(relay)
            expected = {(r.bucket, r.key) for r in Registration(
                NS, COMP, "generate", worker, {4: dynamo.publisher_id(4),
                                               5: dynamo.publisher_id(5)}, 16, "m",
                True).records()}
            store = FileStore(tmp_path)
            assert {(b, k) for b in BUCKETS for k, _ in store.items(b)} == expected
            card = json.loads(store.items("v1/mdc")[0][1])
            assert card["card_json"]["runtime_config"]["data_parallel_start_rank"] == 4
            assert card["card_json"]["runtime_config"]["data_parallel_size"] == 2
            written = {name: path.stat().st_mtime for name, path in files(tmp_path).items()}
            gone = next(p for n, p in files(tmp_path).items() if n.startswith("v1/mdc/"))
            gone.unlink()
            await eventually(lambda: gone.is_file() and all(
                p.stat().st_mtime > written[n] for n, p in files(tmp_path).items()),
                "every record touched and the deleted one written back", within=10)
    assert files(tmp_path) == {}


async def test_gap_becomes_cleared_first(nats_server: NatsServer, tmp_path: Path) -> None:
    """A gap vLLM's replay cannot fill reaches Dynamo as `cleared` at the head of the next
    batch's message (one per batch here), so the router forgets what it may have wrong; event
    ids stay without holes."""
    worker = next(_instance_ids)
    async with kv_event_reader(nats_server.url) as reader:
        with SyntheticVllm(ANY_PORT, factory=WorkloadFactory(seed=3)) as vllm:
            async with running_dynamo_relay(tmp_path, nats=nats_server.url, instance_id=worker,
                                            zmq=[vllm.address],
                                            dynamo_batches_per_message=1) as relay:
                await eventually(lambda: is_ready(relay), "relay ready")
                await join(vllm, relay)
                vllm.publish_next()
                vllm.skip(3)
                vllm.publish_next()
                pid = publisher(relay).publisher_id(0)
                await eventually(lambda: len([m for m in reader.messages
                                              if m.publisher_id == pid]) == 2, "two messages")
                assert metric(relay, "kvrelay_resyncs_total", reason="gap") == 1
    first, second = [m for m in reader.messages if m.publisher_id == pid]
    assert first.events[0].event.data != "cleared"
    assert second.events[0].event.data == "cleared"
    assert second.events[0].event.event_id == first.events[-1].event.event_id + 1


@pytest.mark.parametrize("per_message", [1, 32])
async def test_batches_in_hand_go_as_one_message_with_a_drop_announced_in_place(
        nats_server: NatsServer, tmp_path: Path, per_message: int) -> None:
    """Batches of a rank taken in one turn go as one message (up to
    --dynamo-batches-per-message), in order; a malformed one among them is counted and
    announced by a `cleared` right where it was, and event ids stay without holes."""
    factory = WorkloadFactory(seed=21, remove_probability=0.0)
    payloads = [encode_batch(factory.next_events(), 1000.0 + i) for i in range(4)]
    payloads[2] = b"\xc1not msgpack"
    worker = next(_instance_ids)
    async with kv_event_reader(nats_server.url) as reader:
        with SyntheticVllm(ANY_PORT) as vllm:
            async with running_dynamo_relay(tmp_path, nats=nats_server.url, instance_id=worker,
                                            zmq=[vllm.address],
                                            dynamo_batches_per_message=per_message) as relay:
                await eventually(lambda: is_ready(relay), "relay ready")
                await join(vllm, relay)
                for seq, payload in enumerate(payloads):  # all in this one turn of the loop
                    publisher(relay).take(Frame(0, 0, seq, payload, time.time(), ()))
                await eventually(lambda: metric(relay, "kvrelay_batches_published_total")
                                 == 3, "three batches confirmed")
                pid = publisher(relay).publisher_id(0)
                assert metric(relay, "kvrelay_batches_dropped_total", reason="malformed") == 1
    messages = [m for m in reader.messages if m.publisher_id == pid]
    assert len(messages) == (1 if per_message > 1 else 3)
    assert [m.sequence for m in messages] == list(range(len(messages)))
    kinds = ["cleared" if e.event.data == "cleared" else "stored"
             for m in messages for e in m.events]
    assert kinds == ["stored", "stored", "cleared", "stored"]
    assert [e.event.event_id for m in messages for e in m.events] == [1, 2, 3, 4]
    stored_hashes = [first_block(e) for m in messages for e in m.events
                     if e.event.data != "cleared"]
    firsts = [msgspec.msgpack.decode(p)[1][0]["block_hashes"][0]
              for i, p in enumerate(payloads) if i != 2]
    assert stored_hashes == firsts


async def test_paused_nats_gets_the_unconfirmed_again_without_holes(
        fresh_nats: NatsServer, tmp_path: Path) -> None:
    """Messages NATS does not confirm within the ack timeout are published again, in order:
    the router's view has every event id, repeats it ignores and no holes."""
    worker = next(_instance_ids)
    async with kv_event_reader(fresh_nats.url) as reader:
        with SyntheticVllm(ANY_PORT, factory=WorkloadFactory(seed=4)) as vllm:
            async with running_dynamo_relay(tmp_path, nats=fresh_nats.url, instance_id=worker,
                                            zmq=[vllm.address], ack_timeout=0.3) as relay:
                await eventually(lambda: is_ready(relay), "relay ready")
                await join(vllm, relay)
                for _ in range(5):
                    vllm.publish_next()
                await eventually(lambda: metric(relay, "kvrelay_batches_published_total")
                                 == 5, "first batches confirmed")
                fresh_nats.pause()
                try:
                    for _ in range(20):
                        vllm.publish_next()
                    await eventually(lambda: 0 < publisher(relay).in_flight <= metric(
                        relay, "kvrelay_dynamo_republished_total"),
                        "the unconfirmed window published again")
                finally:
                    fresh_nats.resume()
                await eventually(lambda: metric(relay, "kvrelay_batches_published_total")
                                 == 25, "every batch confirmed")
                pid = publisher(relay).publisher_id(0)
                last = publisher(relay).last_event_id(0)
                await eventually(lambda: max(event_ids(reader, pid), default=0) == last,
                                 "the last event at the reader")
    ids = event_ids(reader, pid)
    assert_contiguous(ids, last)
    assert len(ids) > len(set(ids))  # the repeats arrived too; the router ignores them


@pytest.mark.parametrize("engine", ["direct", "public"])
async def test_nats_restart_loses_nothing(fresh_nats: NatsServer, tmp_path: Path,
                                          engine: str) -> None:
    """NATS killed mid-stream and restarted: the relay buffers, reconnects, publishes again
    what was not confirmed and then the rest; everything is confirmed, nothing dropped, and a
    reader sees the event ids without holes up to the last (either --nats-engine)."""
    worker = next(_instance_ids)
    with SyntheticVllm(ANY_PORT, factory=WorkloadFactory(seed=5)) as vllm:
        async with running_dynamo_relay(tmp_path, nats=fresh_nats.url, instance_id=worker,
                                        zmq=[vllm.address], reconnect_wait_max=0.2,
                                        nats_engine=engine) as relay:
            await eventually(lambda: is_ready(relay), "relay ready")
            await join(vllm, relay)
            for _ in range(10):
                vllm.publish_next()
            fresh_nats.kill()
            for _ in range(10):
                vllm.publish_next()
            await eventually(lambda: not is_ready(relay), "relay not ready without NATS")
            fresh_nats.start()
            async with kv_event_reader(fresh_nats.url) as reader:
                for _ in range(10):
                    vllm.publish_next()
                await eventually(lambda: metric(relay, "kvrelay_batches_published_total")
                                 == 30, "every batch confirmed", within=20)
                pid = publisher(relay).publisher_id(0)
                last = publisher(relay).last_event_id(0)
                await eventually(lambda: max(event_ids(reader, pid), default=0) == last,
                                 "the last event at the reader")
            assert metric(relay, "kvrelay_nats_reconnects_total") >= 1
            assert metric(relay, "kvrelay_batches_dropped_total", reason="overflow") == 0
    ids = event_ids(reader, pid)
    assert_contiguous([i - ids[0] + 1 for i in ids], last - ids[0] + 1)


async def test_restarted_relay_replays_under_new_publishers(
        nats_server: NatsServer, tmp_path: Path) -> None:
    """A relay that restarts announces new publishers (the router starts those ranks afresh)
    and, with --replay, publishes again what vLLM still holds, the same events from event 1."""
    worker = next(_instance_ids)
    runs: list[int] = []
    async with kv_event_reader(nats_server.url) as reader:
        with SyntheticVllm(ANY_PORT, replay_endpoint=ANY_PORT,
                           factory=WorkloadFactory(seed=7)) as vllm:
            for run in range(2):
                async with running_dynamo_relay(tmp_path, nats=nats_server.url,
                                                instance_id=worker, zmq=[vllm.address],
                                                replay=[vllm.replay_address]) as relay:
                    await eventually(lambda: is_ready(relay), "relay ready")
                    if run == 0:
                        await join(vllm, relay)
                        for _ in range(5):
                            vllm.publish_next()
                    await eventually(lambda: metric(relay, "kvrelay_batches_published_total")
                                     == 5, "five batches confirmed")
                    runs.append(publisher(relay).publisher_id(0))
                    await eventually(lambda: max(event_ids(reader, runs[-1]), default=0)
                                     == publisher(relay).last_event_id(0),
                                     "the last event at the reader")
    first, second = ([msgspec.to_builtins(e) for e in reader.events(pid)] for pid in runs)
    assert runs[0] != runs[1]
    assert second == first
    assert vllm.replay_requests == 2


async def test_stop_drains_then_unregisters(nats_server: NatsServer, tmp_path: Path) -> None:
    """A stop right after vLLM sent publishes every buffered batch before the records go."""
    worker = next(_instance_ids)
    async with kv_event_reader(nats_server.url) as reader:
        with SyntheticVllm(ANY_PORT, factory=WorkloadFactory(seed=6)) as vllm:
            async with running_dynamo_relay(tmp_path, nats=nats_server.url, instance_id=worker,
                                            zmq=[vllm.address]) as relay:
                await eventually(lambda: is_ready(relay), "relay ready")
                await join(vllm, relay)
                for _ in range(200):
                    vllm.publish_next()
                await eventually(lambda: metric(relay, "kvrelay_batches_received_total",
                                                dp_rank="0") == 200, "every batch read")
                pid = publisher(relay).publisher_id(0)
            assert metric(relay, "kvrelay_batches_published_total") == 200
            last = publisher(relay).last_event_id(0)
    assert_contiguous(event_ids(reader, pid), last)
    assert len(event_ids(reader, pid)) == last  # each once: nothing was published again
    assert files(tmp_path) == {}


async def test_unwritable_discovery_directory_exits_2(
        nats_server: NatsServer, tmp_path: Path) -> None:
    """A discovery directory that cannot be written is a start-up error naming it."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    config = Config.load({"format": "dynamo", "dynamo_file_kv": str(blocker / "kv"),
                          "nats": nats_server.url, "instance_id": next(_instance_ids),
                          "system_port": 0, "system_host": "127.0.0.1"}, {})
    relay = Relay(config, env={})
    assert await asyncio.wait_for(relay.serve(), timeout=15) == EXIT_CONFIG


def test_cli_flags_reach_the_config(tmp_path: Path) -> None:
    """Every --format dynamo setting has a flag and a KVRELAY_ variable."""
    from kvrelay.ops.cli import build_parser

    args = build_parser().parse_args([
        "run", "--format", "dynamo", "--dynamo-endpoint", "prefill", "--dynamo-register",
        "events", "--dynamo-model", "llama", "--kv-block-size", "32", "--dynamo-file-kv",
        str(tmp_path)])
    flags: dict[str, Any] = {k: v for k, v in vars(args).items() if k != "command"}
    config = Config.load(flags, {"KVRELAY_DYNAMO_DISCOVERY": "file"})
    dynamo = config.dynamo
    assert (dynamo.dynamo_endpoint, dynamo.dynamo_register, dynamo.dynamo_model,
            dynamo.kv_block_size, dynamo.dynamo_file_kv) == (
        "prefill", "events", "llama", 32, str(tmp_path))
