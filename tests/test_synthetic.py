"""The synthetic vLLM publisher speaks vLLM's wire format over real ZMQ sockets."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from kvrelay.testing.synthetic import (
    END_SEQ,
    BatchForm,
    EventForm,
    SyntheticVllm,
    WorkloadFactory,
    all_blocks_cleared,
    block_removed,
    block_stored,
    encode_batch,
    is_bind_endpoint,
)

VECTORS = Path("/work/shared/spec/vectors")
ANY_PORT = "tcp://127.0.0.1:*"
PROBE = b"probe"
TIMEOUT_MS = 1500


Sockets = Callable[[int], zmq.Socket[bytes]]


@pytest.fixture
def sockets() -> Iterator[Sockets]:
    """Makes test-side sockets and closes every one of them after the test."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    made: list[zmq.Socket[bytes]] = []

    def make(kind: int) -> zmq.Socket[bytes]:
        sock = context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if kind == zmq.SUB:
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        made.append(sock)
        return sock

    yield make
    for sock in made:
        sock.close()
    context.term()


def _join(pub: SyntheticVllm, sub: zmq.Socket[bytes]) -> None:
    """Beat ZMQ's slow joiner: probe until the subscription is live."""
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        pub.send_raw([PROBE])
        if sub.poll(10):
            return
    raise AssertionError("subscriber never joined")


def _recv(sock: zmq.Socket[bytes]) -> list[bytes]:
    """Next multipart message that is not a join probe."""
    while True:
        assert sock.poll(TIMEOUT_MS), "timed out waiting for a message"
        frames = sock.recv_multipart()
        if frames != [PROBE]:
            return frames


def _replay(sockets: Sockets, address: str, start: int) -> list[list[bytes]]:
    """Ask the ROUTER for batches from `start`, as the relay's DEALER does; up to the end marker."""
    dealer = sockets(zmq.DEALER)
    dealer.connect(address)
    dealer.send_multipart([b"", start.to_bytes(8, "big")])
    replies = []
    while True:
        frames = _recv(dealer)
        replies.append(frames)
        if frames[-2] == END_SEQ:
            return replies


def _seq(frame: bytes) -> int:
    return int.from_bytes(frame, "big")


def _load(name: str) -> list[list[bytes]]:
    msgs: list[list[bytes]] = msgspec.msgpack.decode((VECTORS / name).read_bytes())
    return msgs


def _rebuild(event: dict[str, Any]) -> Any:
    if event["type"] == "BlockStored":
        return block_stored(
            event["block_hashes"],
            event["parent_block_hash"],
            event["token_ids"],
            block_size=event["block_size"],
            lora_id=event["lora_id"],
            medium=event["medium"],
            lora_name=event["lora_name"],
        )
    if event["type"] == "BlockRemoved":
        return block_removed(event["block_hashes"], medium=event["medium"])
    return all_blocks_cleared()


@pytest.mark.parametrize(
    "name",
    ["vllm-0.32-int-hashes.msgpack", "vllm-0.32-bytes-hashes.msgpack", "vllm-0.32-dp1.msgpack"],
)
def test_builders_reproduce_vllm_bytes_exactly(name: str) -> None:
    """Event builders with their defaults re-encode real vLLM 0.32 payloads byte for byte."""
    for _topic, _seq_bytes, payload in _load(name):
        ts, events, rank = msgspec.msgpack.decode(payload)
        rebuilt = [_rebuild(e) for e in events]
        assert encode_batch(rebuilt, ts, rank, "array") == payload


def test_array_events_have_the_legacy_positional_layout() -> None:
    """Array-form events carry every field positionally, as vLLM <= 0.23 sends them."""
    stored = block_stored([1, 2], None, list(range(32)), form="array")
    assert stored == [
        "BlockStored", [1, 2], None, list(range(32)), 16, None, "GPU", None,
        [None, None], 0, "full_attention", None,
    ]  # fmt: skip
    assert block_removed([1], form="array") == ["BlockRemoved", [1], "GPU", 0]
    assert all_blocks_cleared(form="array") == ["AllBlocksCleared"]
    with pytest.raises(ValueError, match="session_id"):
        block_stored([1], None, [0] * 16, form="array", session_id="s")


def test_map_events_omit_none_optional_fields_and_keep_newer_keys() -> None:
    """Map events always carry lora_id/medium/lora_name but drop other fields that are None."""
    event = block_stored(
        [7], 3, [0] * 16, extra_keys=None, group_idx=None, kv_cache_spec_kind=None,
        session_id=None, locality="local",
    )  # fmt: skip
    assert list(event) == [
        "type", "block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
        "medium", "lora_name", "locality",
    ]  # fmt: skip
    assert block_removed([1], group_idx=None) == {
        "type": "BlockRemoved",
        "block_hashes": [1],
        "medium": "GPU",
    }


@pytest.mark.parametrize(
    ("endpoint", "binds"),
    [
        ("tcp://*:5557", True),
        ("tcp://[::1]:5557", True),
        ("ipc:///tmp/kv", True),
        ("inproc://kv", True),
        ("tcp://127.0.0.1:5557", False),
        ("tcp://vllm-host:5557", False),
    ],
)
def test_bind_rule_matches_vllm(endpoint: str, binds: bool) -> None:
    """PUB binds on wildcard, IPv6, ipc and inproc endpoints and connects otherwise."""
    assert is_bind_endpoint(endpoint) is binds


@pytest.mark.parametrize("batch_form", ["array", "map"])
@pytest.mark.parametrize("event_form", ["map", "array"])
def test_bound_pub_delivers_vllm_frames(
    sockets: Sockets, batch_form: BatchForm, event_form: EventForm
) -> None:
    """A SUB receives [topic, seq, payload] with seq from 0 and a decodable batch of each form."""
    factory = WorkloadFactory(seed=1, event_form=event_form)
    pub = SyntheticVllm(ANY_PORT, dp_rank=2, batch_form=batch_form, factory=factory)
    with pub:
        sub = sockets(zmq.SUB)
        sub.connect(pub.address)
        _join(pub, sub)
        sent = [factory.next_events() for _ in range(3)]
        assert [pub.publish(events, ts=100.0 + i) for i, events in enumerate(sent)] == [0, 1, 2]
        assert pub.seq == 3
        for i, events in enumerate(sent):
            topic, seq, payload = _recv(sub)
            assert (topic, _seq(seq)) == (b"kv-events", i)
            batch = msgspec.msgpack.decode(payload)
            if batch_form == "array":
                assert batch == [100.0 + i, events, 2]
            else:
                assert batch == {"ts": 100.0 + i, "events": events, "data_parallel_rank": 2}
            first = batch[1][0] if batch_form == "array" else batch["events"][0]
            tag = first[0] if event_form == "array" else first["type"]
            assert tag == "BlockStored"


def test_pub_connects_when_the_subscriber_binds(sockets: Sockets) -> None:
    """With a concrete host:port the PUB connects, so a binding SUB receives the stream."""
    sub = sockets(zmq.SUB)
    sub.bind(ANY_PORT)
    address = sub.getsockopt_string(zmq.LAST_ENDPOINT)
    assert not is_bind_endpoint(address)
    with SyntheticVllm(address, topic=b"t") as pub:
        assert pub.address == address
        _join(pub, sub)
        seq = pub.publish([all_blocks_cleared()], ts=1.5)
        expected = encode_batch([{"type": "AllBlocksCleared"}], 1.5)
        assert _recv(sub) == [b"t", seq.to_bytes(8, "big"), expected]


def test_skip_leaves_a_gap_and_send_raw_keeps_seq(sockets: Sockets) -> None:
    """Skipped batches never reach the SUB; raw frames pass as given without using a seq."""
    with SyntheticVllm(ANY_PORT) as pub:
        sub = sockets(zmq.SUB)
        sub.connect(pub.address)
        _join(pub, sub)
        pub.publish_next()
        assert pub.skip(2) == [1, 2]
        pub.send_raw([b"kv-events", b"\x00"])
        pub.publish_next()
        assert [_seq(_recv(sub)[1]) for _ in range(3)] == [0, 0, 3]


def test_resend_repeats_a_sent_batch_and_keeps_seq(sockets: Sockets) -> None:
    """A resent batch arrives again with its own seq and payload; the next seq is unchanged."""
    with SyntheticVllm(ANY_PORT) as pub:
        sub = sockets(zmq.SUB)
        sub.connect(pub.address)
        _join(pub, sub)
        for _ in range(3):
            pub.publish_next()
        sent = [_recv(sub) for _ in range(3)]
        assert pub.resend() == 2
        assert pub.resend(3) == 0
        assert pub.publish_next() == 3
        assert [_recv(sub) for _ in range(2)] == [sent[2], sent[0]]
        assert _seq(_recv(sub)[1]) == 3
        with pytest.raises(ValueError, match="4 batches are kept"):
            pub.resend(5)


@pytest.mark.parametrize("with_topic", [True, False])
def test_replay_returns_buffered_batches_then_end_marker(
    sockets: Sockets, with_topic: bool
) -> None:
    """A DEALER gets every batch from start, skipped ones included, in order, then END_SEQ."""
    pub = SyntheticVllm(ANY_PORT, replay_endpoint=ANY_PORT, replay_with_topic=with_topic)
    with pub:
        pub.publish_next()
        pub.publish_next()
        explicit = [[all_blocks_cleared()], [block_removed([5])]]
        assert pub.skip(events_per_batch=explicit) == [2, 3]
        pub.skip(1)
        pub.publish_payload(b"\xc0")
        assert pub.replay_address is not None
        replies = _replay(sockets, pub.replay_address, 2)
    head = [b"", b"kv-events"] if with_topic else [b""]
    assert all(r[: len(head)] == head and len(r) == len(head) + 2 for r in replies)
    assert [_seq(r[-2]) for r in replies[:-1]] == [2, 3, 4, 5]
    assert replies[-1][-2:] == [END_SEQ, b""]
    assert msgspec.msgpack.decode(replies[0][-1])[1] == explicit[0]
    assert msgspec.msgpack.decode(replies[1][-1])[1] == explicit[1]
    assert replies[3][-1] == b"\xc0"
    assert pub.replay_requests == 1


def test_replay_from_before_the_buffer_begins_at_oldest_held(sockets: Sockets) -> None:
    """A start older than the buffer silently starts at the oldest batch still held."""
    with SyntheticVllm(ANY_PORT, replay_endpoint=ANY_PORT, buffer_batches=3) as pub:
        for _ in range(5):
            pub.publish_next()
        assert pub.replay_address is not None
        replies = _replay(sockets, pub.replay_address, 0)
        assert [_seq(r[-2]) for r in replies] == [2, 3, 4, _seq(END_SEQ)]
        assert _replay(sockets, pub.replay_address, 5) == [[b"", b"kv-events", END_SEQ, b""]]


def test_malformed_replay_request_is_ignored(sockets: Sockets) -> None:
    """A request without exactly [b"", start] gets no answer and the ROUTER keeps serving."""
    with SyntheticVllm(ANY_PORT, replay_endpoint=ANY_PORT) as pub:
        pub.publish_next()
        assert pub.replay_address is not None
        dealer = sockets(zmq.DEALER)
        dealer.connect(pub.replay_address)
        dealer.send_multipart([b"", b"x", b"y"])
        assert not dealer.poll(200)
        assert [_seq(r[-2]) for r in _replay(sockets, pub.replay_address, 0)] == [0, _seq(END_SEQ)]
        assert pub.replay_requests == 1


def test_close_is_prompt_and_idempotent() -> None:
    """close() stops the replay thread quickly, frees the ports and may be called twice."""
    pub = SyntheticVllm(ANY_PORT, replay_endpoint=ANY_PORT).start()
    with pytest.raises(RuntimeError):
        pub.start()
    began = time.monotonic()
    pub.close()
    pub.close()
    assert time.monotonic() - began < 0.5
    with pytest.raises(RuntimeError):
        pub.publish([])


@pytest.mark.parametrize("form", ["map", "array"])
def test_factory_is_deterministic_and_tracks_stored_blocks(form: EventForm) -> None:
    """Same seed gives the same batches, and replaying them yields `stored_blocks`."""
    a = WorkloadFactory(seed=7, event_form=form, capacity=40, clear_probability=0.05)
    b = WorkloadFactory(seed=7, event_form=form, capacity=40, clear_probability=0.05)
    view: set[Any] = set()
    cleared = 0
    for _ in range(300):
        events = a.next_events()
        assert events == b.next_events()
        for event in events:
            if form == "array":
                tag, hashes = event[0], (event[1] if len(event) > 1 else [])
            else:
                tag, hashes = event["type"], event.get("block_hashes", [])
            if tag == "BlockStored":
                assert not view & set(hashes)
                view |= set(hashes)
            elif tag == "BlockRemoved":
                assert set(hashes) <= view
                view -= set(hashes)
            else:
                cleared += 1
                view.clear()
        assert view == a.stored_blocks
        assert len(view) <= 40
    assert cleared > 0


def test_factory_chains_parents_and_honours_hash_kinds() -> None:
    """Blocks chain through parent_block_hash; hashes are uint64, signed int64 or 32 bytes."""
    factory = WorkloadFactory(seed=3, blocks=2, remove_probability=0.0)
    first, second = factory.next_events()[0], factory.next_events()[0]
    assert first["parent_block_hash"] is None
    assert second["parent_block_hash"] == first["block_hashes"][-1]
    assert len(first["token_ids"]) == 2 * 16
    uints = [h for _ in range(50) for h in WorkloadFactory(seed=_).next_events()[0]["block_hashes"]]
    assert all(0 <= h < 2**64 for h in uints)
    assert any(h >= 2**63 for h in uints)
    signed = WorkloadFactory(seed=4, hash_kind="int64")
    ints = [h for _ in range(50) for h in signed.next_events()[0]["block_hashes"]]
    assert all(-(2**63) <= h < 2**63 for h in ints)
    assert any(h < 0 for h in ints)
    raw = WorkloadFactory(seed=5, hash_kind="bytes").next_events()[0]["block_hashes"]
    assert all(isinstance(h, bytes) and len(h) == 32 for h in raw)
