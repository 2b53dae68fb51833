"""Decode vLLM's msgpack batches (every version in the field) and encode RelayBatch envelopes.

Decoders and encoders are built once per Codec; the hot path is one typed msgspec decode of
the shape current vLLM sends. Everything else takes a general path that accepts array or map
batches, array or map events, unknown keys (kept under `extra`) and unknown tags (passed on).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import msgspec
from msgspec.structs import astuple

from kvrelay.system.metrics import Metrics
from kvrelay.wire.schema import (
    LEGACY_FIELDS,
    OUTPUT_TYPES,
    Cleared,
    InputEvent,
    RelayBatch,
    RelayEvent,
    Removed,
    Stored,
    Unknown,
    VllmAllBlocksCleared,
    VllmArrayBatch,
    VllmBlockRemoved,
    VllmBlockStored,
)

log = logging.getLogger("kvrelay.codec")

# dynamo: decoded here, encoded in kvrelay/dynamo/translate.py
Format = Literal["msgpack", "json", "dynamo"]


class MalformedPayload(ValueError):
    """A payload that is not a vLLM EventBatch; `kind` labels the decode-error counter."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


class DecodedBatch(NamedTuple):
    ts: float
    events: list[RelayEvent]
    dp_rank: int | None


class InputBatch(NamedTuple):
    ts: float
    events: Sequence[InputEvent]
    dp_rank: int | None


# What msgspec raises on bytes that are not msgpack: besides DecodeError, RecursionError when
# nested past its depth limit and UnicodeDecodeError for a str that is not UTF-8.
_NOT_MSGPACK = (msgspec.DecodeError, RecursionError, UnicodeDecodeError)

_FAST_OUTPUT: dict[type, type[Stored] | type[Removed] | type[Cleared]] = {
    VllmBlockStored: Stored,
    VllmBlockRemoved: Removed,
    VllmAllBlocksCleared: Cleared,
}


class Codec:
    """vLLM payload -> events, and RelayBatch -> bytes in the configured output format."""

    def __init__(self, fmt: Format = "msgpack", metrics: Metrics | None = None) -> None:
        self.format = fmt
        self._metrics = metrics
        self._fast = msgspec.msgpack.Decoder(VllmArrayBatch)
        self._generic = msgspec.msgpack.Decoder()
        self._msgpack = msgspec.msgpack.Encoder()
        self._json = msgspec.json.Encoder()

    # -- input ---------------------------------------------------------------------------------

    def decode(self, payload: bytes) -> DecodedBatch:
        """Decode one vLLM EventBatch; raise MalformedPayload if it is not one."""
        try:
            batch = self._fast.decode(payload)
        except msgspec.ValidationError:
            return self._decode_general(payload)
        except _NOT_MSGPACK as exc:
            raise MalformedPayload("msgpack", str(exc)) from None
        events: list[RelayEvent] = [
            _FAST_OUTPUT[type(event)](*astuple(event)) for event in batch.events
        ]
        return DecodedBatch(batch.ts, events, batch.data_parallel_rank)

    def decode_input(self, payload: bytes) -> InputBatch:
        """`decode` without turning the fast path's vLLM Structs into output ones, for a
        consumer that only reads their fields (`--format dynamo`'s translator)."""
        try:
            batch = self._fast.decode(payload)
        except msgspec.ValidationError:
            general = self._decode_general(payload)
            return InputBatch(general.ts, general.events, general.dp_rank)
        except _NOT_MSGPACK as exc:
            raise MalformedPayload("msgpack", str(exc)) from None
        return InputBatch(batch.ts, batch.events, batch.data_parallel_rank)

    def _decode_general(self, payload: bytes) -> DecodedBatch:
        try:
            obj = self._generic.decode(payload)
        except _NOT_MSGPACK as exc:
            raise MalformedPayload("msgpack", str(exc)) from None
        if isinstance(obj, list) and len(obj) >= 2:
            ts, raw_events = obj[0], obj[1]
            rank = obj[2] if len(obj) >= 3 else None
        elif isinstance(obj, dict) and "ts" in obj and "events" in obj:
            ts, raw_events, rank = obj["ts"], obj["events"], obj.get("data_parallel_rank")
        else:
            raise MalformedPayload("batch_shape", f"not an EventBatch: {type(obj).__name__}")
        if isinstance(ts, bool) or not isinstance(ts, int | float):
            raise MalformedPayload("batch_shape", f"ts is {type(ts).__name__}, not a number")
        if not isinstance(raw_events, list):
            raise MalformedPayload("batch_shape", "events is not an array")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
            raise MalformedPayload("batch_shape", "data_parallel_rank is not an integer")
        return DecodedBatch(float(ts), [self._event(raw) for raw in raw_events], rank)

    def _event(self, raw: Any) -> RelayEvent:
        if isinstance(raw, list) and raw and isinstance(raw[0], str):
            tag: Any = raw[0]
            names = LEGACY_FIELDS.get(tag)
            fields: dict[Any, Any] = {}  # Any keys: a map event's (below) need not be strings
            if names is not None:
                fields = dict(zip(names, raw[1:], strict=False))
                if len(raw) - 1 > len(names):
                    fields["positional_tail"] = raw[1 + len(names) :]
        elif isinstance(raw, dict):
            tag = raw.get("type")
            fields = {k: v for k, v in raw.items() if k != "type"}
        else:
            tag = None
            fields = {}
        out_type = OUTPUT_TYPES.get(tag) if isinstance(tag, str) else None
        if out_type is None:
            if self._metrics is not None:
                self._metrics.unknown_events.inc()
            return Unknown(tag=tag if isinstance(tag, str) else repr(tag), raw=raw)
        # Not `extra` itself: a vLLM key of that name is an unknown key like any other.
        known = set(out_type.__struct_fields__) - {"extra"}
        extra = {k: v for k, v in fields.items() if k not in known}
        if extra:
            fields = {k: v for k, v in fields.items() if k in known}
            fields["extra"] = extra
        try:
            # builtin_types: a str is not a hash; convert would otherwise base64-decode it to bytes.
            return msgspec.convert(fields, out_type, builtin_types=(bytes,))
        except msgspec.ValidationError as exc:
            if self._metrics is not None:
                self._metrics.decode_errors.labels("invalid_event").inc()
            log.debug("invalid %s event passed on as unknown: %s", tag, exc)
            return Unknown(tag=tag, raw=raw)

    # -- output --------------------------------------------------------------------------------

    def encode(self, batch: RelayBatch) -> bytes:
        """Encode a RelayBatch in the configured format (JSON writes bytes as lowercase hex)."""
        if self.format == "msgpack":
            return self._msgpack.encode(batch)
        if self.format == "dynamo":
            raise ValueError("--format dynamo sends Dynamo's RouterEvents, not RelayBatches")
        try:
            return self._json.encode(
                _hex_bytes(msgspec.to_builtins(batch, builtin_types=(bytes,))))
        except (TypeError, ValueError, RecursionError) as exc:
            # Passed-on content JSON cannot carry (msgpack ext types, absurd nesting).
            raise MalformedPayload("unencodable", repr(exc)) from None


_PEEK: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(
    list[msgspec.Raw] | dict[str, msgspec.Raw])
_PEEK_EVENTS = msgspec.msgpack.Decoder(list[msgspec.Raw])


def count_events(payload: bytes) -> int:
    """How many events a vLLM batch holds, without decoding them (0 when it is not a batch),
    for batches held before they can be decoded and published."""
    try:
        outer = _PEEK.decode(payload)
        if isinstance(outer, list):
            events = outer[1] if len(outer) >= 2 else None
        else:
            events = outer.get("events")
        return 0 if events is None else len(_PEEK_EVENTS.decode(events))
    except _NOT_MSGPACK:
        return 0


def _hex_bytes(node: Any) -> Any:
    if isinstance(node, bytes):
        return node.hex()
    if isinstance(node, list):
        return [_hex_bytes(v) for v in node]
    if isinstance(node, dict):
        # JSON keys are strings; msgpack's may be anything.
        return {k if isinstance(k, str) else str(_hex_bytes(k)): _hex_bytes(v)
                for k, v in node.items()}
    return node
