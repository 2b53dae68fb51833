"""Codec properties: vLLM batches of every version decode to the contract's events, RelayBatch
round-trips in both output formats, and no input makes decode raise anything but
MalformedPayload."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from msgspec import UNSET
from strategies import (
    MSGPACK,
    REMOVED_FIELDS,
    STORED_FIELDS,
    BatchCase,
    EventCase,
    invalid_known_events,
    near_batches,
    relay_batches,
    vllm_batches,
)

from kvrelay.codec import (
    Codec,
    DecodedBatch,
    MalformedPayload,
)
from kvrelay.system.metrics import DECODE_ERROR_KINDS, Metrics
from kvrelay.wire.relaybatch import decode_relay_batch, decode_resume_point
from kvrelay.wire.schema import (
    SCHEMA_VERSION,
    Cleared,
    RelayBatch,
    RelayEvent,
    Removed,
    ResumePoint,
    Stored,
    Unknown,
)

# The real vLLM 0.32 captures, from the repo's copy (CI clones only this repo).
REAL_DIR = Path(__file__).resolve().parent.parent / "schemas" / "vectors" / "input"
REAL_FILES = {  # file -> (batches, dp rank) as spec/vectors/README.md describes them
    "vllm-0.32-int-hashes.msgpack": (41, 0),
    "vllm-0.32-bytes-hashes.msgpack": (11, 0),
    "vllm-0.32-dp1.msgpack": (6, 1),
}
REAL_FRAMES: dict[str, list[list[bytes]]] = {
    name: msgspec.msgpack.decode((REAL_DIR / name).read_bytes()) for name in REAL_FILES
}
REAL_PAYLOADS = [frame[2] for frames in REAL_FRAMES.values() for frame in frames]

# Contract section 1: output type, positional fields of array events, fields defaulting to None.
OUTPUT: dict[str, type[Stored] | type[Removed] | type[Cleared]] = {
    "BlockStored": Stored, "BlockRemoved": Removed, "AllBlocksCleared": Cleared,
}
POSITIONAL = {"BlockStored": STORED_FIELDS[:11], "BlockRemoved": REMOVED_FIELDS,
              "AllBlocksCleared": ()}
NONE_DEFAULTS = {"lora_id", "medium", "lora_name"}

UNKNOWN_TOTAL = "kvrelay_unknown_events_total"
ERRORS_TOTAL = "kvrelay_decode_errors_total"

ROUND_TRIP = settings(max_examples=250, deadline=None)
LIGHT = settings(max_examples=120, deadline=None)  # properties the main round trip also covers
FUZZ = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _pack(obj: Any) -> bytes:
    return msgspec.msgpack.encode(obj)


def _same(a: Any, b: Any) -> bool:
    """Equal value *and* type (1 vs True vs 1.0, int vs bytes hash), NaN included."""
    return _pack(a) == _pack(b)


def _count(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def _envelope(events: list[RelayEvent], ts: float = 0.0) -> RelayBatch:
    return RelayBatch(instance_id=1, dp_rank=0, epoch=0, seq=0, ts=ts, relay_ts=0.0,
                      events=events)


def _assert_passes_through(raw: Any, event: RelayEvent) -> None:
    """`event` carries every field of vLLM's known `raw` event unchanged, and nothing else."""
    tag = raw["type"] if isinstance(raw, dict) else raw[0]
    assert isinstance(event, Stored | Removed | Cleared)
    assert type(event) is OUTPUT[tag]
    if isinstance(raw, dict):
        sent = {k: v for k, v in raw.items() if k != "type"}
    else:
        names = POSITIONAL[tag]
        sent = dict(zip(names, raw[1:], strict=False))
        if len(raw) - 1 > len(names):
            sent["positional_tail"] = raw[1 + len(names):]
    fields = {name: getattr(event, name) for name in event.__struct_fields__
              if name != "extra" and getattr(event, name) is not UNSET}
    extra = {} if event.extra is UNSET else dict(event.extra)
    for key, value in sent.items():
        assert _same(fields.pop(key) if key in fields else extra.pop(key), value), key
    assert not extra
    assert all(name in NONE_DEFAULTS and value is None for name, value in fields.items()), fields


_FUZZ_METRICS = Metrics()  # shared by the fuzz tests (a registry per example is slow)
_FUZZ_CODEC = Codec(metrics=_FUZZ_METRICS)


def _passed_on_as_unknown() -> float:
    return (_count(_FUZZ_METRICS, UNKNOWN_TOTAL)
            + _count(_FUZZ_METRICS, ERRORS_TOTAL, kind="invalid_event"))


def _decode_or_reject(payload: bytes) -> DecodedBatch | MalformedPayload:
    """Decode `payload`; whatever comes back must be a faithful, publishable EventBatch."""
    before = _passed_on_as_unknown()
    try:
        decoded = _FUZZ_CODEC.decode(payload)
    except MalformedPayload as exc:
        rejected = exc
    else:
        return _check_accepted(payload, decoded, _passed_on_as_unknown() - before)
    assert rejected.kind in DECODE_ERROR_KINDS
    return rejected


def _check_accepted(payload: bytes, decoded: DecodedBatch, counted: float) -> DecodedBatch:
    obj = msgspec.msgpack.decode(payload)  # accepted, so it is msgpack
    ts, raw_events = (obj[0], obj[1]) if isinstance(obj, list) else (obj["ts"], obj["events"])
    assert type(decoded.ts) is float
    assert _same(decoded.ts, float(ts))  # NaN included
    assert decoded.dp_rank is None or type(decoded.dp_rank) is int
    assert len(decoded.events) == len(raw_events)
    unknown = 0
    for event, raw in zip(decoded.events, raw_events, strict=True):
        if isinstance(event, Unknown):
            unknown += 1
            assert _same(event.raw, raw)
        else:
            _assert_passes_through(raw, event)
    assert counted == unknown
    Codec().encode(_envelope(decoded.events, decoded.ts))  # publishable
    return decoded


# -- every vLLM version ------------------------------------------------------------------------


@ROUND_TRIP
@given(vllm_batches())
def test_vllm_batches_decode_to_expected_events(case: BatchCase) -> None:
    """Every version's batch decodes to exactly the expected events, ts and dp rank."""
    decoded = Codec().decode(_pack(case.raw))
    assert decoded.events == case.events
    assert _same(decoded.events, case.events)  # types too: int vs bytes hashes, None vs absent
    assert type(decoded.ts) is float
    assert decoded.ts == case.ts
    assert decoded.dp_rank == case.dp_rank


@LIGHT
@given(vllm_batches())
def test_block_hashes_keep_their_type(case: BatchCase) -> None:
    """int hashes stay int (uint64 >= 2**63 included) and 32-byte hashes stay bytes."""
    decoded = Codec().decode(_pack(case.raw))
    for got, want in zip(decoded.events, case.events, strict=True):
        if isinstance(want, Stored | Removed):
            assert isinstance(got, Stored | Removed)
            assert [type(h) for h in got.block_hashes] == [type(h) for h in want.block_hashes]
            assert got.block_hashes == want.block_hashes
        if isinstance(want, Stored):
            assert isinstance(got, Stored)
            assert type(got.parent_block_hash) is type(want.parent_block_hash)


@ROUND_TRIP
@given(vllm_batches())
def test_unknown_tags_pass_through_and_are_counted(case: BatchCase) -> None:
    """Unknown event tags become `unknown` with their raw event and bump kvrelay_unknown_events."""
    metrics = Metrics()
    decoded = Codec(metrics=metrics).decode(_pack(case.raw))
    unknown = [e for e in decoded.events if isinstance(e, Unknown)]
    assert unknown == [e for e in case.events if isinstance(e, Unknown)]
    assert _count(metrics, UNKNOWN_TOTAL) == case.unknown_count
    assert _count(metrics, ERRORS_TOTAL, kind="invalid_event") == 0


@pytest.mark.parametrize(("raw", "extra"), [
    ({"type": "BlockRemoved", "block_hashes": [1], "medium": "GPU", "tier": "hbm"},
     {"tier": "hbm"}),
    ({"type": "BlockRemoved", "block_hashes": [1], "medium": "GPU", "extra": {"k": 1}, "x": 2},
     {"extra": {"k": 1}, "x": 2}),
    ({"type": "BlockRemoved", "block_hashes": [1], "medium": "GPU", "extra": 5}, {"extra": 5}),
    ({"type": "AllBlocksCleared", "token_ids": [1]}, {"token_ids": [1]}),
    (["BlockRemoved", [1], "GPU", 0, "next", [1]], {"positional_tail": ["next", [1]]}),
    (["AllBlocksCleared", None], {"positional_tail": [None]}),
], ids=["new-key", "key-named-extra", "non-map-extra", "other-events-key", "legacy-tail",
        "cleared-tail"])
def test_unknown_keys_land_in_extra(raw: Any, extra: dict[str, Any]) -> None:
    """Keys (or trailing positional fields) a known event does not have are kept in `extra`."""
    (event,) = Codec().decode(_pack([1.0, [raw], 0])).events
    assert isinstance(event, Removed | Cleared)
    assert event.extra == extra


@ROUND_TRIP
@given(st.lists(invalid_known_events(), min_size=1, max_size=3), vllm_batches(unknown=False))
def test_invalid_known_events_pass_as_unknown(bad: list[EventCase], good: BatchCase) -> None:
    """A known tag with a wrong field becomes `unknown` (counted as invalid_event); the rest of
    the batch still decodes."""
    metrics = Metrics()
    decoded = Codec(metrics=metrics).decode(_pack([1.5, [*(c.raw for c in bad),
                                                         *good.raw_events], 0]))
    assert decoded.events == [*(c.expected for c in bad), *good.events]
    assert _count(metrics, ERRORS_TOTAL, kind="invalid_event") == len(bad)
    assert _count(metrics, UNKNOWN_TOTAL) == 0


# -- real vLLM 0.32 frames ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_real_vllm_frames_decode_completely(name: str) -> None:
    """Every event of every real vLLM 0.32 batch comes through, field by field."""
    batches, rank = REAL_FILES[name]
    frames = REAL_FRAMES[name]
    assert [int.from_bytes(seq, "big") for _, seq, _ in frames] == list(range(batches))
    codec, events = Codec(metrics=Metrics()), 0
    for _, _, payload in frames:
        raw = msgspec.msgpack.decode(payload)
        decoded = codec.decode(payload)
        assert _same(decoded.ts, raw[0])
        assert decoded.dp_rank == raw[2] == rank
        assert len(decoded.events) == len(raw[1])
        for raw_event, event in zip(raw[1], decoded.events, strict=True):
            _assert_passes_through(raw_event, event)
        events += len(decoded.events)
    assert events > batches


def test_real_vllm_frames_take_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Current vLLM's batch shape decodes with the typed fast path, not the general one."""

    def general(self: Codec, payload: bytes) -> DecodedBatch:
        raise AssertionError("general path used")

    monkeypatch.setattr(Codec, "_decode_general", general)
    codec = Codec()
    assert all(codec.decode(payload).events for payload in REAL_PAYLOADS)


# -- output round trips ------------------------------------------------------------------------


@ROUND_TRIP
@given(relay_batches())
def test_relay_batch_msgpack_round_trip(batch: RelayBatch) -> None:
    """A RelayBatch encodes to msgpack and decodes back equal, hashes as int or bin."""
    data = Codec("msgpack").encode(batch)
    assert decode_relay_batch(data) == batch
    wire = msgspec.msgpack.decode(data)
    assert wire["v"] == SCHEMA_VERSION
    for got, want in zip(wire["events"], batch.events, strict=True):
        if isinstance(want, Stored | Removed):
            assert _same(got["block_hashes"], want.block_hashes)


@ROUND_TRIP
@given(relay_batches(any_bytes=False))
def test_relay_batch_json_round_trip(batch: RelayBatch) -> None:
    """A RelayBatch encodes to JSON (bytes as lowercase hex, ints exact) and decodes back equal."""
    data = Codec("json").encode(batch)
    assert decode_relay_batch(data) == batch
    text = data.decode()
    wire = json.loads(text)
    assert (wire["v"], wire["instance_id"], wire["seq"]) == (
        SCHEMA_VERSION, batch.instance_id, batch.seq)
    for got, want in zip(wire["events"], batch.events, strict=True):
        assert got["type"] == want.__struct_config__.tag
        if not isinstance(want, Stored | Removed):
            continue
        hashes: list[Any] = [*want.block_hashes]
        written = [*got["block_hashes"]]
        if isinstance(want, Stored):
            hashes.append(want.parent_block_hash)
            written.append(got["parent_block_hash"])
        for h, w in zip(hashes, written, strict=True):
            if isinstance(h, bytes):
                assert w == h.hex()
                assert re.fullmatch(r"[0-9a-f]{64}", w)
                assert f'"{w}"' in text
            else:
                assert type(w) is type(h)
                assert w == h


@LIGHT
@given(relay_batches(any_bytes=False))
def test_resume_point_reads_both_formats(batch: RelayBatch) -> None:
    """decode_resume_point gets (epoch, seq) from a RelayBatch in msgpack and in JSON."""
    for fmt in ("msgpack", "json"):
        data = Codec(fmt).encode(batch)
        assert decode_resume_point(data) == ResumePoint(batch.epoch, batch.seq)


@pytest.mark.parametrize("data", [
    b"", b"{", b"\xc1", _pack([1, 2]), _pack({"epoch": 1}), _pack({"epoch": "1", "seq": 2}),
    b'{"epoch": 1}', b'{"epoch": 1, "seq": -1.5}', b"{}",
])
def test_resume_point_rejects_other_payloads(data: bytes) -> None:
    """Anything that is not a RelayBatch is a ValueError, not a wrong resume point."""
    with pytest.raises(ValueError, match="not a RelayBatch"):
        decode_resume_point(data)


# -- fuzz: nothing but MalformedPayload --------------------------------------------------------


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_never_crash(payload: bytes) -> None:
    """Random bytes decode to a faithful batch or raise MalformedPayload, never anything else."""
    _decode_or_reject(payload)


@FUZZ
@given(st.sampled_from(REAL_PAYLOADS),
       st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_real_payloads_never_crash(payload: bytes, edits: list[tuple[int, int]]) -> None:
    """Real payloads with a few bytes overwritten never crash the decoder."""
    data = bytearray(payload)
    for position, byte in edits:
        data[position % len(data)] = byte
    _decode_or_reject(bytes(data))


def test_truncated_real_payloads_are_malformed() -> None:
    """Every strict prefix of every real payload, and every payload with trailing bytes, is
    MalformedPayload('msgpack')."""
    codec = Codec()
    for payload in REAL_PAYLOADS:
        for bad in (*(payload[:n] for n in range(len(payload))), payload + b"\x00"):
            with pytest.raises(MalformedPayload) as info:
                codec.decode(bad)
            assert info.value.kind == "msgpack"


@ROUND_TRIP
@given(vllm_batches(), st.data())
def test_truncated_batches_are_malformed(case: BatchCase, data: st.DataObject) -> None:
    """A generated batch cut short anywhere is MalformedPayload('msgpack')."""
    payload = _pack(case.raw)
    cut = data.draw(st.integers(0, len(payload) - 1))
    with pytest.raises(MalformedPayload) as info:
        Codec().decode(payload[:cut])
    assert info.value.kind == "msgpack"


@FUZZ
@given(MSGPACK)
def test_random_msgpack_objects_never_crash(obj: Any) -> None:
    """Valid msgpack of any shape decodes faithfully or is rejected as batch_shape."""
    result = _decode_or_reject(_pack(obj))
    if isinstance(result, MalformedPayload):
        assert result.kind == "batch_shape"


@settings(FUZZ, max_examples=600)  # each example builds a whole batch first
@given(near_batches())
def test_near_miss_batches_never_crash(obj: Any) -> None:
    """Batches with one part replaced by garbage decode faithfully or are rejected as
    batch_shape."""
    result = _decode_or_reject(_pack(obj))
    if isinstance(result, MalformedPayload):
        assert result.kind == "batch_shape"


@pytest.mark.parametrize("payload", [
    b"\x91" * 100_000 + b"\xc0",
    b"\x93\xcb" + bytes(8) + b"\x91\x82\xa4type\xacBlockRemoved\xa1x" + b"\x91" * 100_000
    + b"\xc0\x00",
], ids=["batch", "inside-event"])
def test_deeply_nested_payload_is_malformed(payload: bytes) -> None:
    """A payload nested past the decoder's depth limit is MalformedPayload, not RecursionError."""
    with pytest.raises(MalformedPayload) as info:
        Codec().decode(payload)
    assert info.value.kind == "msgpack"


def test_json_stringifies_non_string_keys_of_passed_on_content() -> None:
    """Passed-on maps with int or bytes keys still encode to JSON, keys as text (bytes as hex)."""
    batch = RelayBatch(instance_id=7, dp_rank=0, epoch=0, seq=1, ts=1.0, relay_ts=1.0,
                       events=[Unknown(tag="Future", raw={1: "a", b"\x0f": "b"})])
    doc = msgspec.json.decode(Codec("json").encode(batch))
    assert doc["events"][0]["raw"] == {"1": "a", "0f": "b"}


def test_json_refuses_content_it_cannot_carry_as_malformed() -> None:
    """A msgpack ext value passed on in JSON mode is a counted MalformedPayload, not a crash."""
    batch = RelayBatch(instance_id=7, dp_rank=0, epoch=0, seq=1, ts=1.0, relay_ts=1.0,
                       events=[Unknown(tag="Future", raw=msgspec.msgpack.Ext(5, b"x"))])
    with pytest.raises(MalformedPayload) as caught:
        Codec("json").encode(batch)
    assert caught.value.kind == "unencodable"
