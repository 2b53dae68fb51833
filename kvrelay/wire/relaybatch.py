"""Published messages, written and read back in either output format: a message holds one
RelayBatch (a map) or a pack of them (an array of maps, consecutive batches of one subject and
epoch, in order). What the publisher, routers and tools use."""

from __future__ import annotations

from typing import Any

import msgspec

from kvrelay.wire.schema import BlockHash, RelayBatch, ResumePoint

_RESUME_MSGPACK = msgspec.msgpack.Decoder(ResumePoint | list[ResumePoint])
_RESUME_JSON = msgspec.json.Decoder(ResumePoint | list[ResumePoint])
_RELAY_MSGPACK = msgspec.msgpack.Decoder(RelayBatch | list[RelayBatch])


def pack(payloads: list[bytes], json: bool = False) -> bytes:
    """One message of several encoded RelayBatches (all in msgpack, or all in JSON): the array
    of them, written around the bytes as they are."""
    if json:
        return b"[" + b",".join(payloads) + b"]"
    n = len(payloads)
    head = bytes((0x90 | n,)) if n < 16 else b"\xdc" + n.to_bytes(2, "big") if n < 1 << 16 \
        else b"\xdd" + n.to_bytes(4, "big")
    return head + b"".join(payloads)


def decode_resume_point(data: bytes) -> ResumePoint:
    """(epoch, seq) of a published message's last batch, in either format; raise ValueError if
    it holds none."""
    try:
        point = (_RESUME_JSON if data[:1] in (b"{", b"[") else _RESUME_MSGPACK).decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not a RelayBatch: {exc}") from None
    if isinstance(point, list):
        if not point:
            raise ValueError("an empty pack of RelayBatches")
        return point[-1]
    return point


def decode_relay_batches(data: bytes) -> list[RelayBatch]:
    """The RelayBatches of a published message, a single one or a pack, in either format
    (bytes restored from hex in JSON); ValueError (msgspec.DecodeError is one) if the payload
    is neither."""
    if data[:1] not in (b"{", b"["):
        decoded = _RELAY_MSGPACK.decode(data)
    else:
        obj = msgspec.json.decode(data)
        for batch in obj if isinstance(obj, list) else (obj,):
            _unhex_events(batch)
        decoded = msgspec.convert(obj, RelayBatch | list[RelayBatch])
    if not isinstance(decoded, list):
        return [decoded]
    if not decoded:
        raise ValueError("an empty pack of RelayBatches")
    return decoded


def decode_relay_batch(data: bytes) -> RelayBatch:
    """The one RelayBatch of a message that holds a single batch (`decode_relay_batches` reads
    packs too); ValueError if the payload is not one RelayBatch."""
    batches = decode_relay_batches(data)
    if len(batches) != 1:
        raise ValueError(f"a pack of {len(batches)} RelayBatches, not one")
    return batches[0]


def _unhex_events(obj: Any) -> None:
    events = obj.get("events", ()) if isinstance(obj, dict) else ()
    for event in events if isinstance(events, list) else ():
        if isinstance(event, dict) and event.get("type") in ("stored", "removed"):
            hashes = event.get("block_hashes")
            if isinstance(hashes, list):
                event["block_hashes"] = [_unhex(h) for h in hashes]
            if "parent_block_hash" in event:
                event["parent_block_hash"] = _unhex(event["parent_block_hash"])


def _unhex(value: Any) -> BlockHash | None:
    return bytes.fromhex(value) if isinstance(value, str) else value
