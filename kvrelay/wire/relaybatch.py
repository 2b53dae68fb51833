"""Reading published RelayBatches back, in either output format: what routers and tools use."""

from __future__ import annotations

from typing import Any

import msgspec

from kvrelay.wire.schema import BlockHash, RelayBatch, ResumePoint

_RESUME_MSGPACK = msgspec.msgpack.Decoder(ResumePoint)
_RESUME_JSON = msgspec.json.Decoder(ResumePoint)
_RELAY_MSGPACK = msgspec.msgpack.Decoder(RelayBatch)


def decode_resume_point(data: bytes) -> ResumePoint:
    """(epoch, seq) of a published RelayBatch in either format; raise ValueError if not one."""
    try:
        if data[:1] == b"{":
            return _RESUME_JSON.decode(data)
        return _RESUME_MSGPACK.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not a RelayBatch: {exc}") from None


def decode_relay_batch(data: bytes) -> RelayBatch:
    """A published RelayBatch in either format, bytes restored from hex in JSON; ValueError
    (msgspec.DecodeError is one) if the payload is not a RelayBatch."""
    if data[:1] != b"{":
        return _RELAY_MSGPACK.decode(data)
    obj = msgspec.json.decode(data)
    events = obj.get("events", ()) if isinstance(obj, dict) else ()
    for event in events if isinstance(events, list) else ():
        if isinstance(event, dict) and event.get("type") in ("stored", "removed"):
            hashes = event.get("block_hashes")
            if isinstance(hashes, list):
                event["block_hashes"] = [_unhex(h) for h in hashes]
            if "parent_block_hash" in event:
                event["parent_block_hash"] = _unhex(event["parent_block_hash"])
    return msgspec.convert(obj, RelayBatch)


def _unhex(value: Any) -> BlockHash | None:
    return bytes.fromhex(value) if isinstance(value, str) else value
