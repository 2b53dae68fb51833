"""Packs: batches of a rank in hand together go out several to a JetStream message.

The wire form is checked against msgspec's own encoder; the relay's packs on a real
nats-server: each batch stored once and in order, the pack's Nats-Msg-Id naming its range, a
batch alone in its turn sent alone, `--batches-per-message 1` keeping one message per batch, a
restarted relay resuming after a pack, and the router's consumer applying every batch of a pack.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgspec
import pytest
from harness import (
    ANY_PORT,
    COMP,
    NS,
    STREAM,
    eventually,
    join,
    metric,
    nats_client,
    new_instance_id,
    publish,
    publish_then_crash_nats,
    read_stream,
    resyncs,
    running_relay,
    seqs,
    subject_of,
)
from nats.js.api import DeliverPolicy

from kvrelay.codec import Codec
from kvrelay.ops.tail import _text_line, as_json_line
from kvrelay.router.consumer import KvConsumer
from kvrelay.testing.natsserver import NatsServer
from kvrelay.testing.synthetic import SyntheticVllm
from kvrelay.wire.relaybatch import (
    decode_relay_batch,
    decode_relay_batches,
    decode_resume_point,
    pack,
)
from kvrelay.wire.schema import SCHEMA_VERSION, RelayBatch, Removed, ResumePoint, Stored


def batches(n: int) -> list[RelayBatch]:
    return [RelayBatch(instance_id=2**64 - 1, dp_rank=1, epoch=3, seq=i, ts=1.5, relay_ts=2.5,
                       events=[Stored(block_hashes=[i, b"\x01" * 32], parent_block_hash=None,
                                      token_ids=[1, 2], block_size=2),
                               Removed(block_hashes=[i])])
            for i in range(n)]


@pytest.mark.parametrize("n", [1, 2, 15, 16, 300])
def test_pack_is_the_msgpack_array_of_its_batches(n: int) -> None:
    """A msgpack pack is byte for byte what msgspec writes for the list of its batches, and
    reads back as them; its resume point is its last batch's."""
    codec = Codec("msgpack")
    want = batches(n)
    data = pack([codec.encode(b) for b in want])
    assert data == msgspec.msgpack.encode(want)
    assert decode_relay_batches(data) == want
    assert decode_resume_point(data) == ResumePoint(3, n - 1)


def test_pack_header_past_65535_batches() -> None:
    """The array header takes its 16- and 32-bit forms where msgpack says."""
    for n in (65_535, 65_536):
        assert pack([b"\xc0"] * n) == msgspec.msgpack.encode([None] * n)


def test_json_pack_is_the_array_of_its_batches() -> None:
    """A JSON pack parses as the array of its batches' JSON (bytes as hex) and reads back."""
    codec = Codec("json")
    want = batches(20)
    parts = [codec.encode(b) for b in want]
    data = pack(parts, json=True)
    assert json.loads(data) == [json.loads(p) for p in parts]
    assert decode_relay_batches(data) == want
    assert decode_resume_point(data) == ResumePoint(3, 19)


@pytest.mark.parametrize("data", [b"\x90", b"[]"], ids=["msgpack", "json"])
def test_an_empty_pack_is_refused(data: bytes) -> None:
    """An empty array holds no batch: a ValueError for readers and for the resume point."""
    with pytest.raises(ValueError, match="empty pack"):
        decode_relay_batches(data)
    with pytest.raises(ValueError, match="empty pack"):
        decode_resume_point(data)


def test_decode_relay_batch_refuses_a_pack() -> None:
    """The single-batch reader says a pack is not one batch instead of dropping batches."""
    data = msgspec.msgpack.encode(batches(2))
    with pytest.raises(ValueError, match="pack of 2"):
        decode_relay_batch(data)


def test_tail_prints_each_batch_of_a_pack() -> None:
    """`kvrelay tail` gives a pack one line per batch, in order, in text and JSON (each with
    the message's stream_seq)."""
    want = batches(3)
    data = msgspec.msgpack.encode(want)
    text = _text_line("kv.a.b.1.1", data).split("\n")
    assert [line.split()[:3] for line in text] == [
        ["kv.a.b.1.1", "epoch=3", f"seq={seq}"] for seq in range(3)]
    lines = [json.loads(line) for line in as_json_line(Codec("json"), "s", 9, data).split("\n")]
    assert [(line["seq"], line["stream_seq"]) for line in lines] == [(0, 9), (1, 9), (2, 9)]


async def stream_messages(nc: Any, subject: str) -> list[Any]:
    """Every message on `subject` as stored (ordered consumer from the start)."""
    sub = await nc.jetstream().subscribe(subject, stream=STREAM, ordered_consumer=True,
                                         deliver_policy=DeliverPolicy.ALL)
    info = await nc.jetstream().stream_info(STREAM, subjects_filter=subject)
    total = (info.state.subjects or {}).get(subject, 0)
    try:
        return [await sub.next_msg(timeout=5) for _ in range(total)]
    finally:
        await sub.unsubscribe()


async def backlog(nats_server: NatsServer, vllm: SyntheticVllm, instance: int, n: int,
                  **flags: Any) -> None:
    """A relay publishes one batch, reads `n` more while NATS is away, then publishes them
    once it is back: `n + 1` in all."""
    async with running_relay(nats=nats_server.url, instance_id=instance, zmq=[vllm.address],
                             **flags) as relay:
        await publish_then_crash_nats(relay, vllm, nats_server, instance, 1)
        publisher = relay.publisher
        assert publisher is not None
        await eventually(lambda: not publisher.connected, "the relay to see NATS gone")
        publish(vllm, n)
        await eventually(lambda: metric(relay, "kvrelay_batches_received_total",
                                        dp_rank="0") == n + 1, f"the relay to read {n}")
        nats_server.start()
        await eventually(lambda: metric(relay, "kvrelay_batches_published_total") == n + 1,
                         f"the relay to publish {n}", within=15)


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
async def test_a_backlog_goes_out_packed_each_batch_once(fresh_nats: NatsServer,
                                                         fmt: str) -> None:
    """Batches held while NATS was away go out as packs of at most --batches-per-message, each named
    by its range; every batch is stored once, in order, with nothing announced lost."""
    instance = new_instance_id()
    with SyntheticVllm(ANY_PORT) as vllm:
        await backlog(fresh_nats, vllm, instance, 300, batches_per_message=50, format=fmt)
    async with nats_client(fresh_nats.url) as nc:
        messages = await stream_messages(nc, subject_of(instance))
        got = await read_stream(nc, subject_of(instance), 301)
    sizes = [len(decode_relay_batches(m.data)) for m in messages]
    assert sum(sizes) == 301
    assert max(sizes) == 50  # packed, never past the bound
    assert len(messages) < 300 // 5
    for message in messages:
        inside = decode_relay_batches(message.data)
        first, last = inside[0].seq, inside[-1].seq
        name = f"{first}-{last}" if len(inside) > 1 else str(first)
        assert message.headers["Nats-Msg-Id"] == f"{instance}.0.0.{name}"
        assert message.headers["Kvrelay-Schema"] == str(SCHEMA_VERSION)
        array = message.data[:1] == b"[" if fmt == "json" else \
            message.data[0] & 0xF0 == 0x90 or message.data[0] == 0xDC
        assert array == (len(inside) > 1)  # a single batch is its map, as in schema 1
    assert seqs(got) == [(0, s) for s in range(301)]
    assert resyncs(got) == []


async def test_a_batch_alone_in_its_turn_goes_alone(nc: Any, nats_server: NatsServer) -> None:
    """At a sidecar's pace nothing waits to be packed: each batch is its own message, a map
    as in schema 1, named by its seq."""
    instance = new_instance_id()
    with SyntheticVllm(ANY_PORT) as vllm:
        async with running_relay(nats=nats_server.url, instance_id=instance,
                                 zmq=[vllm.address]) as relay:
            await join(vllm, relay)
            for _ in range(8):
                publish(vllm, 1)
                await asyncio.sleep(0.05)
            await eventually(lambda: metric(relay, "kvrelay_batches_published_total") == 8,
                             "the relay to publish 8")
    messages = await stream_messages(nc, subject_of(instance))
    assert [(decode_relay_batch(m.data).seq, m.headers["Nats-Msg-Id"]) for m in messages] == [
        (seq, f"{instance}.0.0.{seq}") for seq in range(8)]
    assert all(m.data[0] & 0xF0 == 0x80 for m in messages)  # a msgpack map


async def test_batches_per_message_1_keeps_one_message_per_batch(fresh_nats: NatsServer) -> None:
    """With --batches-per-message 1 a backlog still goes out one batch to a message (schema 1's
    readers)."""
    instance = new_instance_id()
    with SyntheticVllm(ANY_PORT) as vllm:
        await backlog(fresh_nats, vllm, instance, 120, batches_per_message=1)
    async with nats_client(fresh_nats.url) as nc:
        messages = await stream_messages(nc, subject_of(instance))
    assert len(messages) == 121
    assert [decode_relay_batch(m.data).seq for m in messages] == list(range(121))


async def test_a_restarted_relay_resumes_after_the_last_pack(fresh_nats: NatsServer) -> None:
    """The stream's last message is a pack: a restarted relay resumes after its last batch,
    with no resync and no batch twice."""
    instance = new_instance_id()
    with SyntheticVllm(ANY_PORT) as vllm:
        await backlog(fresh_nats, vllm, instance, 200, batches_per_message=64)
        async with nats_client(fresh_nats.url) as nc:
            last = await nc.jetstream().get_last_msg(STREAM, subject_of(instance))
        assert len(decode_relay_batches(last.data)) > 1
        async with running_relay(nats=fresh_nats.url, instance_id=instance,
                                 zmq=[vllm.address]) as relay:
            await join(vllm, relay)
            publish(vllm, 10)
            async with nats_client(fresh_nats.url) as nc:
                got = await read_stream(nc, subject_of(instance), 211)
            assert metric(relay, "kvrelay_resyncs_total", reason="start") == 0
    assert seqs(got) == [(0, s) for s in range(211)]
    assert resyncs(got) == []


async def test_the_router_applies_every_batch_of_a_pack(fresh_nats: NatsServer) -> None:
    """KvConsumer reads packs batch by batch: every batch applied once, no gap, the index's
    stream sequence that of the last message."""
    instance = new_instance_id()
    with SyntheticVllm(ANY_PORT) as vllm:
        await backlog(fresh_nats, vllm, instance, 250, batches_per_message=32)
    async with KvConsumer(fresh_nats.url, NS, COMP) as consumer:
        await asyncio.wait_for(consumer.ready(), 10)
        status = consumer.index.status((instance, 0))
        async with nats_client(fresh_nats.url) as nc:
            messages = await stream_messages(nc, subject_of(instance))
        assert len(messages) < 250
        assert (status.batches, status.seq, status.gaps, status.duplicates) == (251, 250, 0, 0)
        assert consumer.index.stream_seq == messages[-1].metadata.sequence.stream
