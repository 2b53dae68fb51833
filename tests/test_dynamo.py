"""`--format dynamo` without a network: vLLM events -> Dynamo RouterEvents, message numbering,
the discovery records and Dynamo's file backend, and the configuration of the mode.

Expected hashes marked "Dynamo 1.6.1" were computed by the ai-dynamo-runtime 1.6.1 wheel itself
(`dynamo.llm.compute_block_hash_for_seq`, and its own ZMQ relay fed the same vLLM events).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from dynamo_support import tokens_hash, u64
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import frames_in_hand, relay_batches, vllm_batches

from kvrelay.codec import Codec, MalformedPayload
from kvrelay.config import Config, ConfigError
from kvrelay.dynamo.records import (
    TEMP_PREFIX,
    FileBackend,
    FileStore,
    Registrar,
    Registration,
    escape_key,
    new_publisher_id,
    slug,
)
from kvrelay.dynamo.translate import (
    EventStream,
    Translator,
    block_hash_u64,
    block_hashes_u64,
    tokens_hash_seed,
    tokens_hashes,
)
from kvrelay.dynamo.wire import (
    CLEARED,
    DynamoEventData,
    Translated,
    decode_message,
    kv_events_subject,
)
from kvrelay.ingest.sequencer import Frame
from kvrelay.publish.common import group_frames
from kvrelay.system.metrics import Metrics
from kvrelay.testing.synthetic import all_blocks_cleared, block_removed, block_stored, encode_batch
from kvrelay.wire.schema import Cleared, RelayBatch, Removed, Resync, Stored, Unknown

T16 = list(range(1, 17))
T32 = list(range(1, 33))


def translate(events: list[Any], kv_block_size: int = 16, metrics: Metrics | None = None,
              resyncs: tuple[Resync, ...] = ()) -> list[Translated]:
    decoded = Codec().decode(encode_batch(events, 1.0))
    return Translator(kv_block_size, metrics).translate(resyncs, decoded.events)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


# -- hashing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("tokens", "lora", "salt", "expected"), [
    (T16, None, None, 16863443419780771464),  # the contract's vector
    (T32[16:], None, None, 2287610619914608821),  # Dynamo 1.6.1
    (T16, "my-lora", None, 4148081000444450790),  # Dynamo 1.6.1
    (T16, None, "tenant-a", 8175209796170318505),  # Dynamo 1.6.1, cache_salt
    (T16, "my-lora", "tenant-a", 1363821083928792307),  # Dynamo 1.6.1
    (T16, "", "", 16863443419780771464),  # empty names are no names, as in Dynamo
])
def test_tokens_hash_is_dynamos(tokens: list[int], lora: str | None, salt: str | None,
                                expected: int) -> None:
    """tokens_hash is XXH3-64 of u32 LE token ids seeded as Dynamo seeds it."""
    assert tokens_hashes(tokens, 16, tokens_hash_seed(lora, salt)) == [expected]


def test_tokens_hashes_cover_full_blocks_only() -> None:
    """One hash per full block; a partial tail has none; a non-u32 token id is refused."""
    assert tokens_hashes(T32[:24], 16) == [16863443419780771464]
    assert tokens_hashes(T16, 8) == [tokens_hash(T16[:8]), tokens_hash(T16[8:])]
    with pytest.raises(OverflowError):
        tokens_hashes([2**32] * 16, 16)


@pytest.mark.parametrize(("vllm_hash", "expected"), [
    (0, 0),
    (2**64 - 1, 2**64 - 1),  # uint64 as vLLM >= 0.10.2 sends it
    (-1, 2**64 - 1),  # int64: two's complement, as Dynamo casts it
    (-(2**63), 2**63),
    (bytes(range(32)), 0x18191A1B1C1D1E1F),  # 32 bytes: the last 8, big-endian
    (b"\x01\x02", 0x0102),
])
def test_block_hash_u64(vllm_hash: int | bytes, expected: int) -> None:
    """Every vLLM block hash becomes the u64 Dynamo's router keys blocks by."""
    assert block_hash_u64(vllm_hash) == expected


@pytest.mark.parametrize("hashes", [
    [1, 2**64 - 1], [-1, 5], [bytes(range(32)), 7], [b"\x01", b"\x02"], [0], [],
])
def test_block_hashes_u64_map_each_hash(hashes: list[int | bytes]) -> None:
    """A list of vLLM hashes maps as each hash does, whichever kinds it mixes."""
    assert block_hashes_u64(hashes) == [block_hash_u64(h) for h in hashes]


@pytest.mark.parametrize("hashes", [[1, 2**64], [-(2**63) - 1, 1], [b"\x01", 2**64]])
def test_block_hashes_u64_refuse_what_does_not_fit(hashes: list[int | bytes]) -> None:
    """One hash outside 64 bits refuses the list."""
    with pytest.raises(ValueError, match="64 bits"):
        block_hashes_u64(hashes)


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1])
def test_block_hash_outside_64_bits_is_refused(value: int) -> None:
    """An int no 64-bit type holds is an error, not a silent wrap."""
    with pytest.raises(ValueError, match="64 bits"):
        block_hash_u64(value)


# -- translation ---------------------------------------------------------------------------------


def test_stored_removed_cleared_translate() -> None:
    """BlockStored, BlockRemoved and AllBlocksCleared become Dynamo's stored/removed/cleared."""
    items = translate([block_stored([1, -2], 7, T32), block_removed([bytes(range(32))]),
                       all_blocks_cleared()])
    stored = items[0].data
    assert isinstance(stored, DynamoEventData)
    assert msgspec.to_builtins(stored) == {"stored": {
        "parent_hash": 7, "start_position": None, "blocks": [
            {"block_hash": 1, "tokens_hash": 16863443419780771464, "mm_extra_info": None},
            {"block_hash": 2**64 - 2, "tokens_hash": 2287610619914608821,
             "mm_extra_info": None}]}}
    assert msgspec.to_builtins(items[1].data) == {"removed": {
        "block_hashes": [0x18191A1B1C1D1E1F]}}
    assert items[2].data == CLEARED
    assert [i.storage_tier for i in items] == ["device"] * 3


@pytest.mark.parametrize(("medium", "tier"), [
    ("GPU", "device"), (None, "device"), ("CPU", "host_pinned"), ("FS", "disk"),
    ("OBJ", "external"), ("DISK", "disk"),
])
def test_medium_becomes_storage_tier(medium: str | None, tier: str) -> None:
    """vLLM's medium maps onto Dynamo's storage tiers, stored and removed alike."""
    items = translate([block_stored([1], None, T16, medium=medium),
                       block_removed([1], medium=medium)])
    assert [i.storage_tier for i in items] == [tier, tier]


@pytest.mark.parametrize(("event", "reason", "blocks"), [
    (block_stored([1], None, T16, medium="STORAGE"), "medium", 1),
    (block_removed([1, 2], medium="TAPE"), "medium", 2),
    (block_stored([1, 2], None, T16, block_size=8), "block_size", 2),
    (block_stored([1, 1], None, T32), "duplicate", 2),
    (block_stored([1], 1, T16), "duplicate", 1),  # its own parent
    (block_stored([1], None, [2**32, *T16[1:]]), "invalid", 1),
    (block_stored([1], None, [-1, *T16[1:]]), "invalid", 1),
])
def test_events_dynamo_cannot_take_are_counted_and_dropped(
        event: Any, reason: str, blocks: int) -> None:
    """An event Dynamo's router cannot take is left out, its blocks counted by reason."""
    metrics = Metrics()
    assert translate([event, all_blocks_cleared()], metrics=metrics) == [
        Translated("device", CLEARED)]
    assert sample(metrics, "kvrelay_dynamo_blocks_dropped_total", reason=reason) == blocks
    assert sample(metrics, "kvrelay_events_dropped_total", reason="untranslatable") == 1


def test_short_token_ids_cut_the_blocks_after() -> None:
    """Blocks without a full block of token ids are cut from the first one on, counted."""
    metrics = Metrics()
    items = translate([block_stored([1, 2, 3], None, T32[:24])], metrics=metrics)
    assert isinstance(items[0].data, DynamoEventData)
    assert msgspec.to_builtins(items[0].data)["stored"]["blocks"] == [
        {"block_hash": 1, "tokens_hash": 16863443419780771464, "mm_extra_info": None}]
    assert sample(metrics, "kvrelay_dynamo_blocks_dropped_total", reason="short_tokens") == 2


def test_unknown_events_are_counted_and_dropped() -> None:
    """Event types Dynamo has no word for are dropped and counted, never passed on."""
    metrics = Metrics()
    items = translate([{"type": "BlockPinned", "block_hashes": [1]}, block_removed([1])],
                      metrics=metrics)
    assert [msgspec.to_builtins(i.data) for i in items] == [{"removed": {"block_hashes": [1]}}]
    assert sample(metrics, "kvrelay_events_dropped_total", reason="untranslatable") == 1


def test_resyncs_become_one_cleared_first() -> None:
    """Whatever the relay must announce (gap, overflow, ...) is one `cleared`, first."""
    items = translate([block_removed([1])],
                      resyncs=(Resync("overflow", 3, 4), Resync("gap", 5, 5)))
    assert [msgspec.to_builtins(i.data) for i in items] == [
        "cleared", {"removed": {"block_hashes": [1]}}]


TIERS = {None: "device", "GPU": "device", "DEVICE": "device", "CPU": "host_pinned",
         "CPU_PINNED": "host_pinned", "CPU_TIER1": "host_pinned", "CPU_TIER2": "disk",
         "DISK": "disk", "NVME": "disk", "FS": "disk", "EXTERNAL": "external",
         "NETWORK": "external", "REMOTE": "external", "SHARED": "external", "OBJ": "external"}


def _expected(event: Any, kv_block_size: int) -> Any:
    """What the contract says a relay event becomes (None: left out), built here on its own."""
    if isinstance(event, Cleared | Resync):
        return ("device", "cleared")
    if isinstance(event, Unknown) or event.medium not in TIERS:
        return None
    tier = TIERS[event.medium]
    hashes = [u64(h) for h in event.block_hashes]
    if isinstance(event, Removed):
        return (tier, {"removed": {"block_hashes": hashes}})
    assert isinstance(event, Stored)
    parent = None if event.parent_block_hash is None else u64(event.parent_block_hash)
    if (event.block_size != kv_block_size or len(set(hashes)) != len(hashes)
            or parent in hashes):
        return None
    salt = event.cache_salt if isinstance(event.cache_salt, str) else None
    chunks = [event.token_ids[i * kv_block_size:(i + 1) * kv_block_size]
              for i in range(len(hashes))]
    blocks = [{"block_hash": h, "tokens_hash": tokens_hash(c, event.lora_name, salt),
               "mm_extra_info": None}
              for h, c in zip(hashes, chunks, strict=True) if len(c) == kv_block_size]
    if not blocks:
        return None
    return (tier, {"stored": {"parent_hash": parent, "start_position": None,
                              "blocks": blocks}})


@settings(max_examples=200, deadline=None)
@given(relay_batches(), st.integers(1, 4))
def test_any_batch_translates_as_the_contract_says(batch: RelayBatch, kv_block_size: int) -> None:
    """Any decoded batch (every vLLM version, unknown events, resyncs) becomes exactly the
    Dynamo events the contract's rules give, and the message decodes as Dynamo's."""
    items = Translator(kv_block_size).translate((), batch.events)
    expected = [e for e in (_expected(ev, kv_block_size) for ev in batch.events) if e]
    assert [(i.storage_tier, msgspec.to_builtins(i.data)) for i in items] == expected
    if items:
        stream = EventStream(5, batch.instance_id, batch.dp_rank)
        _envelope, events = decode_message(stream.encode(items, 0))
        assert [e.event.event_id for e in events] == list(range(1, len(items) + 1))
        assert {(e.worker_id, e.event.dp_rank) for e in events} == {
            (batch.instance_id, batch.dp_rank)}


# -- numbering and the wire --------------------------------------------------------------------


def test_event_stream_numbers_messages_and_events() -> None:
    """sequence counts messages from 0, event_id counts events from 1, across messages;
    a rolled-back message gives its numbers back."""
    stream = EventStream(0xABC, 7, 2)
    one, two = [Translated("device", CLEARED)], [Translated("device", CLEARED)] * 2
    first = decode_message(stream.encode(one, 10))
    stream.encode(two, 11)
    stream.rollback(2)
    second = decode_message(stream.encode(two, 12))
    assert [(m[0].sequence, [e.event.event_id for e in m[1]]) for m in (first, second)] == [
        (0, [1]), (1, [2, 3])]
    assert (second[0].publisher_id, second[0].published_at, second[0].topic) == (
        0xABC, 12, "kv-events")


@given(frames=frames_in_hand(), max_batches=st.integers(1, 8), max_bytes=st.integers(1, 9000))
def test_frames_group_into_messages_per_rank_in_order(frames: list[Frame], max_batches: int,
                                                       max_bytes: int) -> None:
    """Frames in hand group into messages of one rank each, every rank's frames in their order,
    within the bounds (a frame alone may exceed the bytes), and a message closes only when
    its rank's next frame would not fit."""
    groups = group_frames(frames, max_batches, max_bytes)
    assert all(len({f.dp_rank for f in group}) == 1 for group in groups)
    for rank in {f.dp_rank for f in frames}:
        mine = [group for group in groups if group[0].dp_rank == rank]
        assert [f for group in mine for f in group] == [f for f in frames if f.dp_rank == rank]
        for group, following in zip(mine, [*mine[1:], None], strict=True):
            size = sum(len(f.payload) for f in group)
            assert len(group) <= max_batches
            assert len(group) == 1 or size <= max_bytes
            if following is not None:
                assert (len(group) == max_batches
                        or size + len(following[0].payload) > max_bytes)
    first_frames = [group[0] for group in groups]
    assert first_frames == sorted(first_frames, key=frames.index)


def test_message_bytes_are_dynamos_layout() -> None:
    """The message is Dynamo's msgpack byte for byte: named fields in Dynamo's order, the
    payload as bin, `cleared` as a bare string."""
    stream = EventStream(6970226497590177, 2**63 + 5, 0)
    items = translate([block_stored([111, 222], None, T32), all_blocks_cleared()])
    block = [{"block_hash": 111, "tokens_hash": 16863443419780771464, "mm_extra_info": None},
             {"block_hash": 222, "tokens_hash": 2287610619914608821, "mm_extra_info": None}]
    payload = msgspec.msgpack.encode([
        {"worker_id": 2**63 + 5, "storage_tier": "device", "residency_domain": "worker",
         "event": {"event_id": 1, "data": {"stored": {
             "parent_hash": None, "start_position": None, "blocks": block}}, "dp_rank": 0}},
        {"worker_id": 2**63 + 5, "storage_tier": "device", "residency_domain": "worker",
         "event": {"event_id": 2, "data": "cleared", "dp_rank": 0}},
    ])
    assert stream.encode(items, 1795433061366) == msgspec.msgpack.encode({
        "publisher_id": 6970226497590177, "sequence": 0, "published_at": 1795433061366,
        "topic": "kv-events", "payload": payload})


def test_subject_is_dynamos() -> None:
    """One core NATS subject per endpoint, as Dynamo's router subscribes."""
    assert kv_events_subject("dynamo", "backend", "generate") == (
        "namespace.dynamo.component.backend.endpoint.generate.kv-events")


# -- discovery records ---------------------------------------------------------------------------


def test_escape_key_is_dynamos() -> None:
    """Keys are file names with everything but ASCII letters and digits %-escaped."""
    assert escape_key("namespace/dynamo/component/backend/endpoint/generate/topic/kv-events/"
                      "18c362526493a1") == ("namespace%2Fdynamo%2Fcomponent%2Fbackend%2Fendpoint"
                                            "%2Fgenerate%2Ftopic%2Fkv%2Devents%2F18c362526493a1")
    assert escape_key("a_b.c é") == "a%5Fb%2Ec%20%C3%A9"


def _registration(**overrides: Any) -> Registration:
    fields: dict[str, Any] = {
        "namespace": "dynamo", "component": "backend", "endpoint": "generate",
        "worker_id": 5628645129392078072, "publishers": {0: 6970226497590177},
        "kv_block_size": 16, "model": "Qwen/Qwen3 0.6B", "register_worker": True}
    return Registration(**{**fields, **overrides})


def test_event_records_are_byte_for_byte_dynamos() -> None:
    """EventChannel and EventSource are the JSON Dynamo 1.6.1's own publisher writes, under
    the same keys."""
    records = {(r.bucket, r.key): r.value for r in _registration().records()}
    key = "namespace/dynamo/component/backend/endpoint/generate/topic/kv-events/18c362526493a1"
    endpoint = '{"namespace":"dynamo","component":"backend","name":"generate"}'
    scope = '{"kind":"endpoint","endpoint":' + endpoint + "}"
    assert records[("v1/event_channels", key)].decode() == (
        '{"type":"EventChannel","scope":' + scope + ',"topic":"kv-events",'
        '"instance_id":6970226497590177,"transport":{"kind":"Nats","config":'
        '{"subject_prefix":"namespace.dynamo.component.backend.endpoint.generate"}}}')
    assert records[("v1/event_sources", key)].decode() == (
        '{"type":"EventSource","scope":' + scope + ',"topic":"kv-events",'
        '"publisher_id":6970226497590177,"metadata":{"kv_state_endpoint":' + endpoint + ','
        '"worker":{"worker_id":5628645129392078072,"dp_rank":0},'
        '"publisher_id":6970226497590177}}')


def test_worker_records_carry_what_the_router_reads() -> None:
    """The instance and model card name the worker; the card lists its DP ranks and block
    size and asks for no recovery the relay cannot serve."""
    reg = _registration(publishers={2: 11, 3: 12}, kv_block_size=32)
    records = {(r.bucket, r.key): json.loads(r.value) for r in reg.records()}
    key = "dynamo/backend/generate/4e1cf6ec6025bcf8"
    instance, card = records[("v1/instances", key)], records[("v1/mdc", key)]
    assert instance["type"] == "Endpoint"
    assert instance["instance_id"] == reg.worker_id
    assert instance["transport"]["tcp"].endswith("/4e1cf6ec6025bcf8/dynamo/backend/generate")
    assert card["type"] == "Model"
    assert card["instance_id"] == reg.worker_id
    assert card["card_json"]["display_name"] == "Qwen/Qwen3 0.6B"
    assert card["card_json"]["slug"] == "qwen_qwen3_0_6b"  # Dynamo 1.6.1's slug of it
    assert card["card_json"]["kv_cache_block_size"] == 32
    assert card["card_json"]["runtime_config"] == {
        "data_parallel_start_rank": 2, "data_parallel_size": 2, "enable_local_indexer": False}
    assert [b for b, _ in records] == ["v1/instances", "v1/mdc", "v1/event_channels",
                                       "v1/event_sources", "v1/event_channels",
                                       "v1/event_sources"]


def test_events_only_registration_leaves_the_worker_alone() -> None:
    """--dynamo-register events writes the event sources only."""
    buckets = {r.bucket for r in _registration(register_worker=False).records()}
    assert buckets == {"v1/event_channels", "v1/event_sources"}


def test_slug_and_publisher_ids() -> None:
    """Slugs follow Dynamo's rule; publisher IDs are non-zero and below 2**53."""
    assert slug("fake-model") == "fake-model"
    ids = {new_publisher_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(0 < i < 2**53 for i in ids)


# -- the file backend ----------------------------------------------------------------------------


def test_file_store_writes_whole_files_and_lists_keys(tmp_path: Path) -> None:
    """put() renames a complete temp file into place; items() skips temp files and gives
    keys back unescaped."""
    store = FileStore(tmp_path)
    store.put("v1/mdc", "ns/comp/ep/ff", b"{}")
    (tmp_path / "v1" / "mdc" / f"{TEMP_PREFIX}0123").write_bytes(b"partial")
    assert (tmp_path / "v1" / "mdc" / "ns%2Fcomp%2Fep%2Fff").read_bytes() == b"{}"
    assert store.items("v1/mdc") == [("ns/comp/ep/ff", b"{}")]
    assert store.items("v1/absent") == []
    assert store.delete("v1/mdc", "ns/comp/ep/ff")
    assert not store.delete("v1/mdc", "ns/comp/ep/ff")


def test_file_store_refresh_touches_or_writes_back(tmp_path: Path) -> None:
    """refresh() pushes the mtime forward, and writes the record again when it vanished or
    was changed by someone else."""
    store = FileStore(tmp_path)
    store.put("v1/b", "k", b"ours")
    path = store.path("v1/b", "k")
    os.utime(path, (time.time() - 60, time.time() - 60))
    assert store.refresh("v1/b", "k", b"ours")
    assert time.time() - path.stat().st_mtime < 5
    path.write_bytes(b"theirs")
    assert not store.refresh("v1/b", "k", b"ours")
    assert path.read_bytes() == b"ours"
    path.unlink()
    assert not store.refresh("v1/b", "k", b"ours")
    assert path.read_bytes() == b"ours"


async def test_registrar_lifecycle(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """register() replaces event sources an unclean earlier run of this worker left (not other
    workers'), run() keeps every record fresh and writes back lost ones, unregister() removes
    them all."""
    store = FileStore(tmp_path)
    ours = _registration()
    crashed = _registration(publishers={0: 999}, register_worker=False)
    other = _registration(worker_id=42, publishers={0: 998}, register_worker=False)
    for record in (*crashed.records(), *other.records()):
        store.put(*record)
    registrar = Registrar(FileBackend(store), ours, keep_alive=0.05)
    await registrar.register()
    keys = {(b, k) for b, k, _ in ours.records()}
    on_disk = {(b, k) for b in ("v1/instances", "v1/mdc", "v1/event_channels",
                                "v1/event_sources") for k, _ in store.items(b)}
    assert on_disk == keys | {(r.bucket, r.key) for r in other.records()}
    assert "earlier run" in caplog.text
    lost = ours.records()[-1]
    store.delete(lost.bucket, lost.key)
    aged = store.path(*ours.records()[0][:2])
    os.utime(aged, (time.time() - 60, time.time() - 60))
    keeper = asyncio.ensure_future(registrar.run())
    try:
        deadline = time.monotonic() + 5
        while (store.items(lost.bucket) == [(k, v) for k, v in store.items(lost.bucket)
                                            if k != lost.key]
               or time.time() - aged.stat().st_mtime > 5):
            assert time.monotonic() < deadline, "records not refreshed"
            await asyncio.sleep(0.02)
    finally:
        keeper.cancel()
    assert registrar.registered
    await registrar.unregister()
    left = {(b, k) for b in ("v1/instances", "v1/mdc", "v1/event_channels",
                             "v1/event_sources") for k, _ in store.items(b)}
    assert left == {(r.bucket, r.key) for r in other.records()}


# -- configuration -------------------------------------------------------------------------------


def test_dynamo_settings_from_flags_and_dynamos_env() -> None:
    """--format dynamo reads Dynamo's own variables for the discovery backend and directory."""
    config = Config.load({"format": "dynamo", "dynamo_endpoint": "prefill"},
                         {"DYN_FILE_KV": "/var/dyn", "DYN_DISCOVERY_BACKEND": "file"})
    assert (config.dynamo.dynamo_endpoint, config.dynamo.dynamo_file_kv,
            config.discovery.discovery_backend) == ("prefill", "/var/dyn", "file")
    assert (config.dynamo.kv_block_size, config.dynamo.dynamo_register) == (16, "worker")


@pytest.mark.parametrize(("flags", "env", "message"), [
    ({"format": "dynamo"}, {"DYN_DISCOVERY_BACKEND": "kubernetes"}, "file or etcd discovery"),
    ({"format": "dynamo", "etcd_endpoints": " , "}, {"DYN_DISCOVERY_BACKEND": "etcd"},
     "needs --etcd-endpoints"),
    ({"format": "dynamo", "dynamo_endpoint": "Gen"}, {}, "must match"),
    ({"format": "dynamo", "kv_block_size": 0}, {}, "--kv-block-size must be at least 1"),
    ({"format": "dynamo", "dynamo_register": "all"}, {}, "not one of worker, events"),
])
def test_dynamo_config_errors(flags: dict[str, Any], env: dict[str, str], message: str) -> None:
    """Settings --format dynamo cannot work with are start-up errors saying why."""
    with pytest.raises(ConfigError, match=message):
        Config.load(flags, env)


def test_other_formats_ignore_dynamos_discovery_backend() -> None:
    """A Kubernetes pod's DYN_DISCOVERY_BACKEND does not stop the JetStream formats."""
    assert Config.load({}, {"DYN_DISCOVERY_BACKEND": "kubernetes"}).publish.format == "msgpack"


def test_missing_xxhash_is_a_clear_start_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the dynamo extra, --format dynamo fails at start naming the package."""
    monkeypatch.setitem(sys.modules, "xxhash", None)
    with pytest.raises(ConfigError, match=r"xxhash .*kvrelay\[dynamo\]"):
        Config.load({"format": "dynamo"}, {})


# -- golden vectors ------------------------------------------------------------------------------

VECTORS = Path(__file__).resolve().parent.parent / "schemas" / "vectors"
DYNAMO_VECTORS = sorted((VECTORS / "dynamo").glob("*.json"))


def _rows(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(path.read_text())
    return rows


def test_every_input_has_dynamo_vectors() -> None:
    """Each input file has a --format dynamo vector file with one row per frame."""
    inputs = sorted((VECTORS / "input").glob("*.msgpack"))
    assert {p.stem for p in inputs} == {p.stem for p in DYNAMO_VECTORS}
    for path in inputs:
        frames = msgspec.msgpack.decode(path.read_bytes())
        assert [bytes.fromhex(r["input_payload_hex"]) for r in _rows(
            VECTORS / "dynamo" / f"{path.stem}.json")] == [p for _, _, p in frames]


@pytest.mark.parametrize("path", DYNAMO_VECTORS, ids=[p.stem for p in DYNAMO_VECTORS])
def test_dynamo_vectors_match_the_encoder(path: Path) -> None:
    """Every row is what the translator and the rank's publisher produce now, and its JSON
    form is its bytes decoded."""
    rows = _rows(path)
    translator = Translator(rows[0]["kv_block_size"])
    streams: dict[int, EventStream] = {}
    for row in rows:
        decoded = Codec().decode(bytes.fromhex(row["input_payload_hex"]))
        stream = streams.setdefault(row["dp_rank"], EventStream(
            row["publisher_id"], row["worker_id"], row["dp_rank"]))
        items = translator.translate((), decoded.events)
        message = stream.encode(items, row["published_at"]).hex() if items else None
        assert message == row["expected_message_hex"], row["seq"]
        if message is not None:
            envelope, events = decode_message(bytes.fromhex(message))
            assert row["expected_message"] == {**msgspec.to_builtins(envelope),
                                               "payload": msgspec.to_builtins(events)}


def test_dynamo_vectors_pin_dynamos_hashes() -> None:
    """The hand-made vector holds the values Dynamo 1.6.1 computes: tokens 1..16, a LoRA
    adapter, a cache salt; a batch with nothing to carry publishes nothing; rank 1 numbers
    from the start."""
    rows = _rows(VECTORS / "dynamo" / "handmade-dynamo.json")

    def blocks(row: int, event: int) -> list[tuple[int, int]]:
        data = rows[row]["expected_message"]["payload"][event]["event"]["data"]
        return [(b["block_hash"], b["tokens_hash"]) for b in data["stored"]["blocks"]]

    assert blocks(0, 0) == [(1, 16863443419780771464), (2, 2287610619914608821)]
    assert blocks(1, 0) == [(2**64 - 3, 4148081000444450790)]
    assert blocks(1, 1) == [(0x18191A1B1C1D1E1F, 8175209796170318505)]
    assert [e["storage_tier"] for e in rows[2]["expected_message"]["payload"]] == [
        "host_pinned", "disk"]
    assert rows[5]["expected_message"] is None
    last = rows[-1]["expected_message"]
    assert (last["sequence"], last["payload"][0]["event"]["event_id"]) == (0, 1)


@pytest.mark.parametrize("name", ["vllm-0.32-int-hashes", "vllm-0.32-bytes-hashes"])
def test_real_frames_keep_every_block(name: str) -> None:
    """From real vLLM frames every block goes out, hashed as the contract says."""
    for row in _rows(VECTORS / "dynamo" / f"{name}.json"):
        _, events, _ = msgspec.msgpack.decode(bytes.fromhex(row["input_payload_hex"]))
        payload = row["expected_message"]["payload"]
        assert len(payload) == len(events)
        for vllm, dynamo in zip(events, payload, strict=True):
            data = dynamo["event"]["data"]
            if vllm["type"] == "BlockStored":
                chunks = [vllm["token_ids"][i:i + 16] for i in range(0, 16 * len(
                    vllm["block_hashes"]), 16)]
                assert [(b["block_hash"], b["tokens_hash"]) for b in data["stored"]["blocks"]
                        ] == [(u64(h), tokens_hash(c)) for h, c in zip(
                            vllm["block_hashes"], chunks, strict=True)]
            elif vllm["type"] == "BlockRemoved":
                assert data == {"removed": {"block_hashes": [u64(h) for h in
                                                             vllm["block_hashes"]]}}
            else:
                assert data == "cleared"


@settings(max_examples=300)
@given(case=vllm_batches(any_bytes=False), block_size=st.sampled_from([1, 4, 16]))
def test_translation_reads_vllm_and_output_structs_alike(case: Any, block_size: int) -> None:
    """The translator gives the same events from the codec's vLLM Structs (`decode_input`, what
    --format dynamo uses) as from the output Structs (`decode`), for any batch vLLM sends."""
    codec = Codec()
    payload = msgspec.msgpack.encode(case.raw)
    try:
        converted = codec.decode(payload)
    except MalformedPayload:
        with pytest.raises(MalformedPayload):
            codec.decode_input(payload)
        return
    direct = codec.decode_input(payload)
    assert (direct.ts, direct.dp_rank) == (converted.ts, converted.dp_rank)
    as_output = Translator(block_size).translate((), converted.events)
    as_input = Translator(block_size).translate((), direct.events)
    assert msgspec.msgpack.encode(as_input) == msgspec.msgpack.encode(as_output)
