"""`kvrelay tail`: print RelayBatches from JetStream as they arrive, for operators."""

from __future__ import annotations

import asyncio
import sys
from typing import Any, TextIO

import msgspec
import nats
import nats.errors
import nats.js.errors
import uvloop
from nats.js.api import DeliverPolicy

from kvrelay.codec import Codec
from kvrelay.config import NatsSettings
from kvrelay.ops.connect import Errors, connection_failure, connection_options, refused
from kvrelay.wire.relaybatch import decode_relay_batches
from kvrelay.wire.schema import RelayBatch, Resync, Stored, Unknown


def describe(batch: RelayBatch, subject: str) -> str:
    """One line per batch: where it came from, its place in the stream, what it carries."""
    parts: list[str] = []
    for event in batch.events:
        kind = type(event).__name__.lower()
        if isinstance(event, Stored | Resync | Unknown):
            detail: Any = msgspec.structs.asdict(event)
            detail.pop("token_ids", None)
            detail = {k: v for k, v in detail.items()
                      if v is not msgspec.UNSET and v is not None and k != "extra_keys"}
            if isinstance(event, Stored):
                detail = {"blocks": len(event.block_hashes),
                          "parent": event.parent_block_hash, "medium": event.medium}
            parts.append(f"{kind}{_short(detail)}")
        elif hasattr(event, "block_hashes"):
            parts.append(f"{kind}(blocks={len(event.block_hashes)})")
        else:
            parts.append(kind)
    return (f"{subject} epoch={batch.epoch} seq={batch.seq} "
            f"lag={max(0.0, batch.relay_ts - batch.ts) * 1000:.1f}ms events=[{', '.join(parts)}]")


def _short(detail: dict[str, Any]) -> str:
    def fmt(value: Any) -> str:
        return value.hex()[:12] if isinstance(value, bytes) else str(value)

    return "(" + ", ".join(f"{k}={fmt(v)}" for k, v in detail.items()) + ")"


async def tail_async(nats_config: NatsSettings | str, stream: str, subject: str, *,
                     from_start: bool, count: int, as_json: bool = False,
                     out: TextIO = sys.stdout) -> int:
    """Follow `subject` with an ordered consumer; returns an exit code (1: NATS not reached or
    no such stream, 2: NATS refused the credentials or the TLS settings)."""
    config = (NatsSettings(servers=nats_config) if isinstance(nats_config, str)
              else nats_config)
    errors = Errors()
    options = {**connection_options(config), "connect_timeout": 3, "max_reconnect_attempts": 3,
               "reconnect_time_wait": 0.5, "error_cb": errors.record}
    try:
        nc = await nats.connect(**options)
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        if not errors.seen:
            await errors.record(exc)
        print(connection_failure(config, errors, "tail"), file=sys.stderr)
        return 2 if refused(config, errors, "tail") else 1
    seen = 0
    codec = Codec("json")
    try:
        policy = DeliverPolicy.ALL if from_start else DeliverPolicy.NEW
        try:
            sub = await nc.jetstream().subscribe(subject, stream=stream, ordered_consumer=True,
                                                 deliver_policy=policy)
        except nats.js.errors.NotFoundError:
            print(f"kvrelay tail: no stream {stream} on {config.redacted_servers()}",
                  file=sys.stderr)
            return 1
        async for msg in sub.messages:
            lines = (as_json_line(codec, msg.subject, msg.metadata.sequence.stream, msg.data)
                     if as_json else _text_line(msg.subject, msg.data)).split("\n")
            if count:
                lines = lines[:count - seen]
            print("\n".join(lines), file=out, flush=True)
            seen += len(lines)
            if count and seen >= count:
                break
    finally:
        await nc.close()
    return 0


def _text_line(subject: str, data: bytes) -> str:
    """One line per batch of the message."""
    try:
        return "\n".join(describe(batch, subject) for batch in decode_relay_batches(data))
    except (msgspec.DecodeError, ValueError) as exc:
        return f"{subject} undecodable ({exc})"


def as_json_line(codec: Codec, subject: str, stream_seq: int, data: bytes) -> str:
    """`tail --json`: one JSON object per batch (a pack's batches share their message's
    `stream_seq`), the RelayBatch's fields (bytes as lowercase hex, as `--format json`) with
    its `subject` and `stream_seq`; `error` when undecodable."""
    head: dict[str, Any] = {"subject": subject, "stream_seq": stream_seq}
    try:
        batches = [msgspec.json.decode(codec.encode(batch))
                   for batch in decode_relay_batches(data)]
    except (msgspec.DecodeError, ValueError) as exc:
        return msgspec.json.encode({**head, "error": f"undecodable ({exc})"}).decode()
    return "\n".join(msgspec.json.encode({**head, **batch}).decode() for batch in batches)


def tail(nats_config: NatsSettings, stream: str, subject: str, *, from_start: bool, count: int,
         as_json: bool = False) -> int:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            return runner.run(tail_async(nats_config, stream, subject, from_start=from_start,
                                         count=count, as_json=as_json))
        except KeyboardInterrupt:
            return 0
