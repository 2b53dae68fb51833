"""Hypothesis strategies for kvrelay's tests (the project keeps all of them in this module).

vLLM-side strategies draw an input object exactly as vLLM's msgpack encoder sees it *and* the
normalized output the relay must make of it, built here from the contract (docs/contract.md
sections 1 and 2), never by calling the codec, so a test can compare `Codec.decode` with an
independent expectation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import msgspec
from hypothesis import strategies as st
from msgspec import UNSET

from kvrelay.ingest.sequencer import Frame
from kvrelay.wire.schema import (
    BlockHash,
    Cleared,
    RelayBatch,
    RelayEvent,
    Removed,
    Resync,
    Stored,
    Unknown,
)

# -- block hashes ----------------------------------------------------------------------------

INT64: Final = st.integers(-(2**63), 2**63 - 1)  # vLLM <= 0.10.1 (Python hash()), SGLang
UINT64: Final = st.one_of(st.integers(2**63, 2**64 - 1), st.integers(0, 2**64 - 1))  # >= 0.10.2
BYTES32: Final = st.binary(min_size=32, max_size=32)  # VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0
HASHES: Final[dict[str, st.SearchStrategy[BlockHash]]] = {
    "int64": INT64,
    "uint64": UINT64,
    "bytes32": BYTES32,
}
hash_kinds: Final = st.sampled_from(sorted(HASHES))
block_hashes: Final[st.SearchStrategy[BlockHash]] = st.one_of(INT64, UINT64, BYTES32)


# -- free-form values (unknown keys, unknown events, Any-typed fields) -----------------------


def any_values(*, with_bytes: bool = True) -> st.SearchStrategy[Any]:
    """msgpack values as msgspec decodes them (lists, str keys); JSON-safe without bytes."""
    scalars: st.SearchStrategy[Any] = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=8),
    )
    if with_bytes:
        scalars = scalars | st.binary(max_size=8)
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                    max_size=3),
        max_leaves=6,
    )


ANY: Final = any_values()
ANY_JSON: Final = any_values(with_bytes=False)


def _any(any_bytes: bool) -> st.SearchStrategy[Any]:
    return ANY if any_bytes else ANY_JSON


def msgpack_values() -> st.SearchStrategy[Any]:
    """Any msgpack object at all (int and str map keys too): the raw material of the fuzz."""
    scalars: st.SearchStrategy[Any] = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(),
        st.text(max_size=8),
        st.binary(max_size=8),
    )
    keys = st.text(max_size=6) | st.integers(-(2**63), 2**64 - 1)
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
        max_leaves=12,
    )


MSGPACK: Final = msgpack_values()


# -- vLLM versions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class VllmVersion:
    """How one vLLM (or SGLang) release writes its events."""

    name: str
    stored_fields: int = 0  # positional fields after the tag of array events; 0: map events
    removed_fields: int = 0
    optional_keys: tuple[str, ...] = ()  # map events: keys omitted when None
    positional_tail: bool = False  # array events longer than any known release

    @property
    def maps(self) -> bool:
        return self.stored_fields == 0

    def sends(self, names: tuple[str, ...], n_positional: int,
              always: tuple[str, ...]) -> tuple[str, ...]:
        """Which of an event's `names` this version writes (optional map keys: when not None)."""
        if not self.maps:
            return names[:n_positional]
        return tuple(name for name in names if name in always or name in self.optional_keys)


_MAP_KEYS_0_24: Final = ("extra_keys", "group_idx", "kv_cache_spec_kind",
                         "kv_cache_spec_sliding_window")
VERSIONS: Final = (
    VllmVersion("0.8.5", 5, 1),  # through lora_id
    VllmVersion("0.10.2", 6, 2),  # + medium
    VllmVersion("0.14", 7, 2),  # + lora_name
    VllmVersion("0.17", 8, 2),  # + extra_keys
    VllmVersion("0.20", 9, 3),  # + group_idx
    VllmVersion("0.22", 11, 3),  # + kv_cache_spec_kind, kv_cache_spec_sliding_window
    VllmVersion("array-future", 11, 3, positional_tail=True),  # unknown trailing fields
    VllmVersion("0.24", optional_keys=_MAP_KEYS_0_24),  # map events
    VllmVersion("0.26", optional_keys=(*_MAP_KEYS_0_24, "locality")),
    VllmVersion("0.29", optional_keys=(*_MAP_KEYS_0_24, "locality", "ownership")),
    VllmVersion("0.30", optional_keys=(*_MAP_KEYS_0_24, "locality", "ownership", "session_id")),
    VllmVersion("0.33", optional_keys=(*_MAP_KEYS_0_24, "locality", "ownership", "session_id",
                                       "lookahead_token_ids")),
    VllmVersion("sglang", optional_keys=("cache_salt",)),
)
versions: Final = st.sampled_from(VERSIONS)

# Field names in vLLM's order (the positional order of array events).
STORED_FIELDS: Final = (
    "block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
    "lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind", "kv_cache_spec_sliding_window",
    "locality", "ownership", "session_id", "lookahead_token_ids", "cache_salt",
)
REMOVED_FIELDS: Final = ("block_hashes", "medium", "group_idx")
VLLM_TAGS: Final = ("BlockStored", "BlockRemoved", "AllBlocksCleared")
MEDIA: Final = ("GPU", "CPU", "FS", "OBJ", "STORAGE")

token_ids: Final = st.lists(st.integers(0, 2**31 - 1), max_size=8)
_SIMPLE: Final[dict[str, st.SearchStrategy[Any]]] = {
    "lora_id": st.none() | st.integers(0, 2**31 - 1),
    "medium": st.none() | st.sampled_from(MEDIA) | st.text(max_size=6),
    "lora_name": st.none() | st.text(max_size=12),
    "group_idx": st.none() | st.integers(0, 16),
    "kv_cache_spec_kind": st.none() | st.sampled_from(
        ("full_attention", "sliding_window", "chunked_local_attention", "mamba")),
    "kv_cache_spec_sliding_window": st.none() | st.integers(1, 2**20),
    "lookahead_token_ids": st.none() | token_ids,
    "cache_salt": st.none() | st.text(max_size=12),
}

# Names an unknown key may have: new words, near misses, and names the output already uses.
unknown_keys: Final = st.one_of(
    st.sampled_from(("extra", "positional_tail", "future_field", "Type", "TYPE", "v", "tag",
                     "raw", "token_ids", "lora_id", "reason")),
    st.text(min_size=1, max_size=10),
)
unknown_tags: Final = st.one_of(
    st.sampled_from(("BlockUpdated", "KVCacheSnapshot", "stored", "removed", "cleared",
                     "unknown", "blockstored", "")),
    st.text(max_size=16),
).filter(lambda tag: tag not in VLLM_TAGS)


def _unknown_keys_of(out: type[Stored] | type[Removed] | type[Cleared]) -> st.SearchStrategy[str]:
    """Key names `out`'s vLLM event does not have (`extra` included: vLLM has no such key)."""
    own = frozenset(out.__struct_fields__) - {"extra"}
    return unknown_keys.filter(lambda key: key not in own and key != "type")


_UNKNOWN_KEYS: Final = {out: _unknown_keys_of(out) for out in (Stored, Removed, Cleared)}


class EventCase(NamedTuple):
    raw: Any  # the event as vLLM encodes it
    expected: RelayEvent


def _value(draw: st.DrawFn, name: str, n_blocks: int, any_bytes: bool) -> Any:
    if name in _SIMPLE:
        return draw(_SIMPLE[name])
    if name == "extra_keys":  # one entry per block: None or a tuple such as (mm_hash, offset)
        entry = st.lists(st.text(max_size=8) | st.integers(0, 4096), max_size=3)
        return draw(st.none() | st.lists(st.none() | entry, min_size=n_blocks,
                                         max_size=n_blocks))
    return draw(st.none() | _any(any_bytes))  # locality, ownership, session_id


def _finish(draw: st.DrawFn, version: VllmVersion, tag: str, fields: dict[str, Any],
            n_positional: int, names: tuple[str, ...], always: tuple[str, ...],
            out: type[Stored] | type[Removed] | type[Cleared], any_bytes: bool) -> EventCase:
    """Lay `fields` out the way `version` sends them and build the expected output event."""
    expected: dict[str, Any] = {}
    if not version.maps:
        raw: Any = [tag, *(fields[name] for name in names[:n_positional])]
        expected.update({name: fields[name] for name in names[:n_positional]})
        if version.positional_tail:
            tail = draw(st.lists(_any(any_bytes), min_size=1, max_size=3))
            raw.extend(tail)
            expected["extra"] = {"positional_tail": tail}
        return EventCase(raw, out(**expected))
    raw = {"type": tag}
    for name in version.sends(names, n_positional, always):
        if name in always or fields[name] is not None:
            raw[name] = expected[name] = fields[name]
    unknown = draw(st.dictionaries(_UNKNOWN_KEYS[out], _any(any_bytes), max_size=3))
    if unknown:
        raw.update(unknown)
        expected["extra"] = unknown
    return EventCase(raw, out(**expected))


@st.composite
def stored_events(draw: st.DrawFn, version: VllmVersion, hash_kind: str = "uint64",
                  any_bytes: bool = True) -> EventCase:
    """A BlockStored as `version` sends it, with the `stored` event expected from it."""
    hashes = draw(st.lists(HASHES[hash_kind], min_size=1, max_size=4))
    block_size = draw(st.integers(1, 4))
    fields: dict[str, Any] = {
        "block_hashes": hashes,
        "parent_block_hash": draw(st.none() | HASHES[hash_kind]),
        "token_ids": draw(st.lists(st.integers(0, 2**31 - 1), min_size=len(hashes) * block_size,
                                   max_size=len(hashes) * block_size)),
        "block_size": block_size,
    }
    for name in version.sends(STORED_FIELDS, version.stored_fields, STORED_FIELDS[:7]):
        if name not in fields:
            fields[name] = _value(draw, name, len(hashes), any_bytes)
    return _finish(draw, version, "BlockStored", fields, version.stored_fields, STORED_FIELDS,
                   STORED_FIELDS[:7], Stored, any_bytes)


@st.composite
def removed_events(draw: st.DrawFn, version: VllmVersion, hash_kind: str = "uint64",
                   any_bytes: bool = True) -> EventCase:
    """A BlockRemoved as `version` sends it, with the `removed` event expected from it."""
    fields: dict[str, Any] = {
        name: draw(st.lists(HASHES[hash_kind], min_size=1, max_size=4))
        if name == "block_hashes" else _value(draw, name, 0, any_bytes)
        for name in version.sends(REMOVED_FIELDS, version.removed_fields, REMOVED_FIELDS[:2])
    }
    return _finish(draw, version, "BlockRemoved", fields, version.removed_fields, REMOVED_FIELDS,
                   REMOVED_FIELDS[:2], Removed, any_bytes)


@st.composite
def cleared_events(draw: st.DrawFn, version: VllmVersion, any_bytes: bool = True) -> EventCase:
    """An AllBlocksCleared as `version` sends it, with the `cleared` event expected from it."""
    return _finish(draw, version, "AllBlocksCleared", {}, 0, (), (), Cleared, any_bytes)


@st.composite
def unknown_events(draw: st.DrawFn, version: VllmVersion, any_bytes: bool = True) -> EventCase:
    """An event of a type no vLLM release here has, expected back as `unknown` with its raw."""
    tag = draw(unknown_tags)
    values = _any(any_bytes)
    if version.maps and draw(st.booleans()):
        raw: Any = {"type": tag, **draw(st.dictionaries(
            st.text(max_size=8).filter(lambda k: k != "type"), values, max_size=3))}
    else:
        raw = [tag, *draw(st.lists(values, max_size=4))]
    return EventCase(raw, Unknown(tag=tag, raw=raw))


@st.composite
def vllm_events(draw: st.DrawFn, version: VllmVersion | None = None, hash_kind: str | None = None,
                any_bytes: bool = True, unknown: bool = True) -> EventCase:
    """Any one event of `version` (drawn if None), unknown tags included unless unknown=False."""
    version = draw(versions) if version is None else version
    hash_kind = draw(hash_kinds) if hash_kind is None else hash_kind
    kinds = ["stored", "stored", "removed", "cleared"] + (["unknown"] if unknown else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "stored":
        return draw(stored_events(version, hash_kind, any_bytes))
    if kind == "removed":
        return draw(removed_events(version, hash_kind, any_bytes))
    if kind == "cleared":
        return draw(cleared_events(version, any_bytes))
    return draw(unknown_events(version, any_bytes))


# -- batches -----------------------------------------------------------------------------------

BATCH_FORMS: Final = ("array2", "array3", "map")  # 0.9.0, every release since 0.9.1, new trees


class BatchCase(NamedTuple):
    raw: Any  # the EventBatch as vLLM encodes it: msgspec.msgpack.encode(raw) is the payload
    ts: float
    events: list[RelayEvent]
    dp_rank: int | None
    version: str
    form: str

    @property
    def raw_events(self) -> list[Any]:
        return self.raw["events"] if isinstance(self.raw, dict) else self.raw[1]  # type: ignore[no-any-return]

    @property
    def unknown_count(self) -> int:
        return sum(isinstance(event, Unknown) for event in self.events)


@st.composite
def vllm_batches(draw: st.DrawFn, any_bytes: bool = True, unknown: bool = True) -> BatchCase:
    """An EventBatch of one version and hash kind in any batch form, with the expected result."""
    version = draw(versions)
    hash_kind = draw(hash_kinds)
    cases = draw(st.lists(vllm_events(version, hash_kind, any_bytes, unknown), max_size=6))
    ts: float | int = draw(st.floats(0, 4e9) | st.integers(0, 2**53))
    rank = draw(st.none() | st.integers(0, 64))
    form = draw(st.sampled_from(BATCH_FORMS))
    events = [case.raw for case in cases]
    raw: Any
    if form == "array2":
        raw, rank = [ts, events], None
    elif form == "array3":
        raw = [ts, events, rank]
    else:
        raw = {"ts": ts, "events": events}
        if rank is not None or draw(st.booleans()):
            raw["data_parallel_rank"] = rank
    return BatchCase(raw, float(ts), [case.expected for case in cases], rank, version.name, form)


# -- invalid input -----------------------------------------------------------------------------

_FLOATS: Final = st.floats(allow_nan=False)
_WRONG: Final[dict[str, st.SearchStrategy[Any]]] = {
    "block_hashes": st.one_of(st.text(max_size=4), st.just(None),
                              st.lists(_FLOATS | st.text(max_size=4), min_size=1, max_size=2)),
    "parent_block_hash": _FLOATS | st.text(max_size=4) | st.lists(INT64, max_size=1),
    "token_ids": st.text(max_size=4) | st.lists(st.text(max_size=2), min_size=1, max_size=2),
    "block_size": st.none() | _FLOATS | st.text(max_size=3),
    "medium": INT64 | st.lists(st.text(max_size=2), max_size=1),
    "group_idx": _FLOATS | st.text(max_size=3),
}


@st.composite
def invalid_known_events(draw: st.DrawFn) -> EventCase:
    """A BlockStored/BlockRemoved with one field of the wrong type or a required one missing:
    expected back as `unknown` under its own tag, with the raw event."""
    version = draw(versions.filter(lambda v: not v.positional_tail))
    case = draw(st.one_of(stored_events(version), removed_events(version)))
    raw = case.raw
    names = STORED_FIELDS if isinstance(case.expected, Stored) else REMOVED_FIELDS
    present = [n for n in names if (n in raw if version.maps else names.index(n) < len(raw) - 1)]
    name = draw(st.sampled_from([n for n in present if n in _WRONG]))
    tag = raw["type"] if version.maps else raw[0]
    if version.maps and draw(st.booleans()) and name in ("block_hashes", "token_ids"):
        raw = {k: v for k, v in raw.items() if k != name}
    elif version.maps:
        raw = {**raw, name: draw(_WRONG[name])}
    else:
        raw = list(raw)
        raw[names.index(name) + 1] = draw(_WRONG[name])
    return EventCase(raw, Unknown(tag=tag, raw=raw))


@st.composite
def near_batches(draw: st.DrawFn) -> Any:
    """msgpack objects shaped almost like an EventBatch, with one part replaced by garbage."""
    case = draw(vllm_batches())
    junk = MSGPACK
    raw = case.raw
    where = draw(st.sampled_from(("ts", "events", "event", "rank", "length", "whole")))
    if where == "whole":
        return draw(junk)
    if where == "length":  # fewer than two elements, or an array whose events is no array
        items = list(raw.values()) if isinstance(raw, dict) else raw
        return items[: draw(st.integers(0, 1))] + draw(st.sampled_from(([], [1, 2, 3])))
    key: Any = {"ts": 0, "events": 1, "rank": 2}.get(where, 1)
    if isinstance(raw, dict):
        key = {0: "ts", 1: "events", 2: "data_parallel_rank"}[key]
    elif key == 2 and len(raw) == 2:
        raw.append(None)
    if where == "event":
        events = list(raw[key])
        bad = draw(junk | invalid_known_events().map(lambda c: c.raw))
        events.insert(draw(st.integers(0, len(events))), bad)
        raw[key] = events
    else:
        raw[key] = draw(junk)
    return raw


# -- RelayBatch envelopes ----------------------------------------------------------------------

resync_events: Final = st.builds(
    Resync,
    reason=st.sampled_from(("gap", "restart", "overflow", "start")),
    missed_from=st.just(UNSET) | st.integers(0, 2**64 - 1),
    missed_to=st.just(UNSET) | st.integers(0, 2**64 - 1),
)


@st.composite
def relay_batches(draw: st.DrawFn, any_bytes: bool = True) -> RelayBatch:
    """RelayBatch envelopes as the relay publishes them; any_bytes=False keeps Any-typed values
    JSON-safe (JSON restores bytes only in block hashes)."""
    case = draw(vllm_batches(any_bytes=any_bytes))
    resyncs = draw(st.lists(resync_events, max_size=2))
    return RelayBatch(
        instance_id=draw(st.integers(0, 2**64 - 1)),
        dp_rank=draw(st.integers(0, 1023)),
        epoch=draw(st.integers(0, 2**32)),
        seq=draw(st.integers(0, 2**64 - 1)),
        ts=case.ts,
        relay_ts=draw(st.floats(allow_nan=False, allow_infinity=False)),
        events=[*resyncs, *case.events],
    )


# -- whole ZMQ messages, as the relay's SUB socket may receive them ---------------------------


@st.composite
def zmq_messages(draw: st.DrawFn) -> list[bytes]:
    """One message on vLLM's PUB socket, from valid to garbage: the wrong number of frames, a
    seq that is not 8 bytes, or [topic, seq, payload] with any payload (valid batches, near
    misses, other msgpack, random bytes). The seq frame of a 3-frame message is left for the
    sender to number, so the stream stays in sequence."""
    shape = draw(st.sampled_from(["frames", "seq", "payload"]))
    if shape == "frames":
        count = draw(st.sampled_from([1, 2, 4, 5]))
        return draw(st.lists(st.binary(max_size=40), min_size=count, max_size=count))
    topic = draw(st.sampled_from([b"", b"kv-events"]))
    if shape == "seq":
        seq = draw(st.binary(max_size=16).filter(lambda raw: len(raw) != 8))
        return [topic, seq, draw(st.binary(max_size=64))]
    payload = draw(st.one_of(
        st.binary(max_size=300),
        msgpack_values().map(msgspec.msgpack.encode),
        near_batches().map(msgspec.msgpack.encode),
        vllm_batches().map(lambda case: msgspec.msgpack.encode(case.raw)),
    ))
    return [topic, bytes(8), payload]


# -- KV index scripts --------------------------------------------------------------------------
# Few workers, tiers and hashes, so stores, removes and queries keep meeting the same blocks.

INDEX_WORKERS: Final = ((7, 0), (7, 1), (2**64 - 1, 0))
INDEX_TIERS: Final = (("GPU", 0), ("GPU", 1), ("CPU", 0))
INDEX_HASHES: Final[tuple[BlockHash, ...]] = (
    *range(10), 2**64 - 1, -(2**63), b"\x00" * 32, b"\xff" * 32)
index_hashes: Final = st.sampled_from(INDEX_HASHES)
index_chains: Final = st.lists(index_hashes, max_size=6)  # what a router asks about


@st.composite
def _tier_fields(draw: st.DrawFn) -> dict[str, Any]:
    """medium and group_idx of a tier, sometimes left out the way older vLLMs leave them."""
    medium, group = draw(st.sampled_from(INDEX_TIERS))
    fields: dict[str, Any] = {"medium": medium, "group_idx": group}
    if medium == "GPU" and draw(st.booleans()):
        fields["medium"] = None  # vLLM <= 0.10.1 sends none: GPU
    if group == 0 and draw(st.booleans()):
        fields["group_idx"] = draw(st.sampled_from((None, UNSET)))  # before 0.20: group 0
    return fields


@st.composite
def index_events(draw: st.DrawFn, resyncs: bool = True) -> RelayEvent:
    """An event as a RelayBatch carries it, over INDEX_HASHES and INDEX_TIERS."""
    kinds = ["stored"] * 4 + ["removed"] * 3 + ["cleared", "unknown"] + (
        ["resync"] if resyncs else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "stored":
        hashes = draw(st.lists(index_hashes, min_size=1, max_size=4, unique=True))
        return Stored(hashes, draw(st.none() | index_hashes), [0] * len(hashes), 1,
                      **draw(_tier_fields()))
    if kind == "removed":
        return Removed(draw(st.lists(index_hashes, min_size=1, max_size=4)),
                       **draw(_tier_fields()))
    if kind == "cleared":
        return Cleared()
    if kind == "resync":
        return draw(resync_events)
    tag = draw(st.sampled_from(("BlockUpdated", "BlockStored", "BlockRemoved",
                                "AllBlocksCleared")))
    return Unknown(tag=tag, raw=[tag])


@st.composite
def index_scripts(draw: st.DrawFn, resyncs: bool = True) -> list[RelayBatch]:
    """Batches of INDEX_WORKERS interleaved, each worker's seqs 0, 1, 2, ... in epoch 0."""
    next_seq = dict.fromkeys(INDEX_WORKERS, 0)
    batches: list[RelayBatch] = []
    for _ in range(draw(st.integers(0, 30))):
        worker = draw(st.sampled_from(INDEX_WORKERS))
        events = draw(st.lists(index_events(resyncs), max_size=3))
        batches.append(RelayBatch(instance_id=worker[0], dp_rank=worker[1], epoch=0,
                                  seq=next_seq[worker], ts=1.0, relay_ts=1.0, events=events))
        next_seq[worker] += 1
    return batches


# -- ZMTP byte streams, as a PUB writes them to the relay's native SUB --------------------------

zmtp_frames: Final = st.one_of(st.binary(max_size=300), st.binary(min_size=250, max_size=2000))
zmtp_messages: Final = st.lists(st.lists(zmtp_frames, min_size=1, max_size=4), max_size=12)


@st.composite
def chunkings(draw: st.DrawFn, size: int) -> list[int]:
    """Where a stream of `size` bytes is cut into the reads that deliver it (sorted offsets)."""
    if size < 2:
        return []
    return sorted(set(draw(st.lists(st.integers(1, size - 1), max_size=40))))


# -- NATS protocol streams, as the server writes them to the publisher's connection -------------

REPLY_INBOX: Final = "_INBOX.test."
REPLY_SID: Final = 7


@st.composite
def nats_operations(draw: st.DrawFn) -> tuple[bytes, bool]:
    """One server-to-client operation and whether it is a reply on REPLY_INBOX (sid REPLY_SID):
    replies (JSON acks, empty, long), other subscriptions' MSG and HMSG, PING, PONG, INFO."""
    kind = draw(st.sampled_from(["reply", "reply", "reply", "msg", "hmsg", "ping", "pong",
                                 "info", "other_sid"]))
    payload = draw(st.one_of(st.binary(max_size=60), st.binary(min_size=500, max_size=3000)))
    if kind == "reply":
        token = draw(st.integers(0, 10**6))
        return b"MSG %s%d %d %d\r\n%s\r\n" % (REPLY_INBOX.encode(), token, REPLY_SID,
                                             len(payload), payload), True
    if kind == "other_sid":  # the reply inbox's subject, another subscription
        return b"MSG %s1 %d %d\r\n%s\r\n" % (REPLY_INBOX.encode(), REPLY_SID + 1, len(payload),
                                            payload), False
    if kind == "msg":
        return b"MSG kv.x 3 _INBOX.other.1 %d\r\n%s\r\n" % (len(payload), payload), False
    if kind == "hmsg":
        head = b"NATS/1.0\r\nA: b\r\n\r\n"
        return b"HMSG kv.y 4 %d %d\r\n%s%s\r\n" % (len(head), len(head) + len(payload), head,
                                                 payload), False
    if kind == "info":
        return b'INFO {"server_id":"x","max_payload":1048576}\r\n', False
    return (b"PING\r\n" if kind == "ping" else b"PONG\r\n"), False


@st.composite
def frames_in_hand(draw: st.DrawFn) -> list[Frame]:
    """Frames of a few DP ranks, interleaved, each rank's seqs in order, payloads of any size
    up to a few kB: what a turn of the relay's loop may have taken."""
    ranks = draw(st.lists(st.integers(0, 3), max_size=60))
    seqs: dict[int, int] = {}
    frames = []
    for rank in ranks:
        seqs[rank] = seqs.get(rank, -1) + 1
        size = draw(st.integers(1, 4000))
        frames.append(Frame(rank, 0, seqs[rank], bytes(size), 0.0, ()))
    return frames


# -- one vLLM publisher's run, as the relay's Sequencer reads it --------------------------------

EngineStep = tuple[str, int]


@st.composite
def engine_scripts(draw: st.DrawFn) -> list[EngineStep]:
    """What one vLLM publisher does, step by step: `send` its next n batches, `skip` n (lost on
    the way to the relay, kept for replay), `repeat` the batch n behind the last one the relay
    read, `restart` (counting from 0 again; n = 1: the relay saw its connection go away)."""
    kinds = draw(st.lists(st.sampled_from(["send"] * 4 + ["skip", "repeat", "restart"]),
                          max_size=40))
    return [(kind, draw(st.integers(0, 1) if kind == "restart" else
                        st.integers(1, 5) if kind == "send" else st.integers(1, 3)))
            for kind in kinds]
