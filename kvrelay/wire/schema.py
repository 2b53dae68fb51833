"""Wire schemas: vLLM's KV-event batch (input) and the RelayBatch envelope (output).

These Structs are the single source of truth for both wire formats; schemas/ holds the JSON
Schema generated from them (`python -m kvrelay.ops.schemagen`) and a test keeps the two in sync.
Field order is wire order, so keep it when adding fields.
"""

from __future__ import annotations

from typing import Any, Final, Literal

import msgspec
from msgspec import UNSET, Struct, UnsetType

SCHEMA_VERSION: Final = 2

# int64 (Python hash, SGLang), uint64 (vLLM >= 0.10.2) or 32 bytes (sha256 hashing).
BlockHash = int | bytes


# -- events, as both sides carry them --------------------------------------------------------
# vLLM's own field names are kept on the output so a router reads the same words vLLM wrote.


class _StoredFields(Struct, tag_field="type", gc=False):
    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | UnsetType | None = UNSET
    group_idx: int | UnsetType | None = UNSET
    kv_cache_spec_kind: str | UnsetType | None = UNSET
    kv_cache_spec_sliding_window: int | UnsetType | None = UNSET
    locality: Any | UnsetType = UNSET
    ownership: Any | UnsetType = UNSET
    session_id: Any | UnsetType = UNSET
    lookahead_token_ids: list[int] | UnsetType | None = UNSET
    cache_salt: Any | UnsetType = UNSET


class _RemovedFields(Struct, tag_field="type", gc=False):
    block_hashes: list[BlockHash]
    medium: str | None = None
    group_idx: int | UnsetType | None = UNSET


class _ClearedFields(Struct, tag_field="type", gc=False):
    pass


# -- output: the RelayBatch envelope ----------------------------------------------------------


class Stored(_StoredFields, tag="stored"):
    """Blocks written to the worker's KV cache; `extra` keeps keys this version does not know."""

    extra: dict[str, Any] | UnsetType = UNSET


class Removed(_RemovedFields, tag="removed"):
    """Blocks evicted from the worker's KV cache."""

    extra: dict[str, Any] | UnsetType = UNSET


class Cleared(_ClearedFields, tag="cleared"):
    """The worker dropped every block."""

    extra: dict[str, Any] | UnsetType = UNSET


ResyncReason = Literal["gap", "restart", "overflow", "start"]


class Resync(Struct, tag="resync", tag_field="type", gc=False):
    """Written by the relay: the consumer's view may be wrong; treat as `cleared` and rebuild."""

    reason: ResyncReason
    missed_from: int | UnsetType = UNSET
    missed_to: int | UnsetType = UNSET


class Unknown(Struct, tag="unknown", tag_field="type", gc=False):
    """An event this relay does not understand, passed on so newer routers can."""

    tag: str
    raw: Any


RelayEvent = Stored | Removed | Cleared | Resync | Unknown


class RelayBatch(Struct, kw_only=True, gc=False):
    """One vLLM batch as published on `kv.<ns>.<component>.<instance_id>.<dp_rank>`: a message
    holds one (a map), or several consecutive ones of its subject and epoch, in order (a pack:
    an array of these maps; schema 2)."""

    v: int = SCHEMA_VERSION
    instance_id: int
    dp_rank: int
    epoch: int
    seq: int
    ts: float
    relay_ts: float
    events: list[RelayEvent]


class ResumePoint(Struct, gc=False):
    """The part of a published RelayBatch that start-up needs to resume (reads either format)."""

    epoch: int
    seq: int


# -- input: vLLM's fast-path shapes -----------------------------------------------------------
# vLLM >= 0.24 sends an array batch of map events; decoding straight into these Structs is the
# fast path. Anything else (map batch, legacy array events, unknown keys or tags) fails
# validation and takes the general path in codec.py, which accepts every version.


class VllmBlockStored(_StoredFields, tag="BlockStored", forbid_unknown_fields=True):
    pass


class VllmBlockRemoved(_RemovedFields, tag="BlockRemoved", forbid_unknown_fields=True):
    pass


class VllmAllBlocksCleared(_ClearedFields, tag="AllBlocksCleared", forbid_unknown_fields=True):
    pass


class VllmArrayBatch(Struct, array_like=True, forbid_unknown_fields=True, gc=False):
    ts: float
    events: list[VllmBlockStored | VllmBlockRemoved | VllmAllBlocksCleared]
    data_parallel_rank: int | None = None


# What `Codec.decode_input` gives: vLLM's own event Structs on the fast path (the output ones
# share their fields), output Structs from the general path.
InputEvent = RelayEvent | VllmBlockStored | VllmBlockRemoved | VllmAllBlocksCleared


# Positional field names of vLLM <= 0.23's array events, after the tag.
LEGACY_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "BlockStored": _StoredFields.__struct_fields__[:11],  # through kv_cache_spec_sliding_window
    "BlockRemoved": _RemovedFields.__struct_fields__,
    "AllBlocksCleared": (),
}

# vLLM tag -> output Struct.
OUTPUT_TYPES: Final[dict[str, type[Stored] | type[Removed] | type[Cleared]]] = {
    "BlockStored": Stored,
    "BlockRemoved": Removed,
    "AllBlocksCleared": Cleared,
}


RelayMessage = RelayBatch | list[RelayBatch]
"""What one published message holds: a RelayBatch, or a pack of them."""


def relay_batch_json_schema() -> dict[str, Any]:
    """JSON Schema of a published message (a RelayBatch or a pack of them) as the JSON format
    carries it (bytes are lowercase hex there)."""
    schema = msgspec.json.schema(RelayMessage)

    def patch(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("contentEncoding") == "base64":
                del node["contentEncoding"]
                node["pattern"] = "^([0-9a-f]{2})*$"
                node["description"] = "bytes: msgpack bin in the msgpack format, hex in JSON"
            for value in node.values():
                patch(value)
        elif isinstance(node, list):
            for value in node:
                patch(value)

    patch(schema)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = f"kvrelay message v{SCHEMA_VERSION}: a RelayBatch or a pack of them"
    return schema


# -- a worker's KV index state, as a snapshot stores it -----------------------------------------

SNAPSHOT_VERSION: Final = 1


class TierSnapshot(Struct, array_like=True, gc=False):
    """One tier's blocks as chains: `[parent_of_first, h1, h2, ...]`, each hash's parent the one
    before it, so a prefix path costs one hash per block. Chains and tiers are in a canonical
    order: the same state always encodes to the same bytes."""

    medium: str
    group_idx: int
    chains: list[list[BlockHash | None]]
    keys: list[list[int | None]] = []
    """Token keys (kvrelay/wire/tokenkey.py) of each chain's blocks, `keys[i][j]` that of
    `chains[i][j + 1]`, None where a block has none; empty when no block has one (or the
    snapshot was written before keys existed)."""
    block_sizes: list[int] = []
    """The block sizes (in tokens) of the keyed blocks, ascending: a router computes a
    request's keys in each."""


class WorkerSnapshot(Struct, kw_only=True, gc=False):
    """What the KV index holds for one (instance_id, dp_rank), complete up to `stream_seq`: every
    JetStream message at or below it is reflected, so a consumer resumes at `stream_seq + 1`."""

    v: int = SNAPSHOT_VERSION
    instance_id: int
    dp_rank: int
    epoch: int | None  # the last batch applied; None when none was
    seq: int | None
    stream_seq: int
    exact: bool  # see KvIndex: every event since the cache was last empty was applied
    tiers: list[TierSnapshot]
