"""`--format dynamo`: NVIDIA Dynamo 1.6's KV event plane on the wire, as msgspec Structs.

Dynamo's KV router reads msgpack envelopes from core NATS, each carrying a msgpack array of
RouterEvents; field order is Dynamo's. The Structs live apart from the translation in
`kvrelay/dynamo/translate.py`, which is compiled in the compiled build: a Struct defined in a
compiled module loses its class options.
"""

from __future__ import annotations

from typing import Final, Literal

import msgspec
from msgspec import UNSET, Struct, UnsetType

KV_EVENTS_TOPIC: Final = "kv-events"

StorageTier = Literal["device", "host_pinned", "disk", "external"]


class DynamoBlock(Struct, gc=False):
    """One stored block: the engine's hash and the hash of its tokens."""

    block_hash: int
    tokens_hash: int
    mm_extra_info: None = None


class DynamoStoreData(Struct, kw_only=True, gc=False):
    parent_hash: int | None
    start_position: int | None = None
    blocks: list[DynamoBlock]


class DynamoRemoveData(Struct, gc=False):
    block_hashes: list[int]


class DynamoEventData(Struct, omit_defaults=True, gc=False):
    """Rust's externally tagged enum: `{"stored": ...}` or `{"removed": ...}`."""

    stored: DynamoStoreData | UnsetType = UNSET
    removed: DynamoRemoveData | UnsetType = UNSET


CLEARED: Final = "cleared"  # the enum's unit variant is a bare string
EventData = DynamoEventData | Literal["cleared"]


class KvCacheEvent(Struct, gc=False):
    event_id: int
    data: EventData
    dp_rank: int


class RouterEvent(Struct, gc=False):
    """One event of one worker rank, as Dynamo's router applies it."""

    worker_id: int
    storage_tier: StorageTier
    residency_domain: str
    event: KvCacheEvent


class EventEnvelope(Struct, gc=False):
    """One NATS message: `payload` is the msgpack array of RouterEvents, as bin."""

    publisher_id: int
    sequence: int
    published_at: int
    topic: str
    payload: bytes


def kv_events_subject(namespace: str, component: str, endpoint: str) -> str:
    """The core NATS subject Dynamo's router subscribes to for an endpoint's KV events."""
    return f"namespace.{namespace}.component.{component}.endpoint.{endpoint}.{KV_EVENTS_TOPIC}"


class Translated(Struct, array_like=True, gc=False):
    """One event ready for Dynamo, before the publisher numbers it."""

    storage_tier: StorageTier
    data: EventData


ENVELOPE_DECODER: Final = msgspec.msgpack.Decoder(EventEnvelope)
PAYLOAD_DECODER: Final = msgspec.msgpack.Decoder(list[RouterEvent])


def decode_message(data: bytes) -> tuple[EventEnvelope, list[RouterEvent]]:
    """A Dynamo KV event message: its envelope and the RouterEvents of its payload."""
    envelope = ENVELOPE_DECODER.decode(data)
    return envelope, PAYLOAD_DECODER.decode(envelope.payload)
