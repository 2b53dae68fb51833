"""`kvrelay tail`: print RelayBatches from JetStream as they arrive, for operators."""

from __future__ import annotations

import asyncio
import re
import sys
from typing import Any, TextIO

import msgspec
import nats
import nats.errors
import nats.js.errors
import uvloop
from nats.js.api import DeliverPolicy

from kvrelay.wire.relaybatch import decode_relay_batch
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


async def tail_async(url: str, stream: str, subject: str, *, from_start: bool, count: int,
                     out: TextIO = sys.stdout) -> int:
    """Follow `subject` with an ordered consumer; returns an exit code."""
    try:
        nc = await nats.connect([u.strip() for u in url.split(",")], connect_timeout=3,
                                max_reconnect_attempts=3, reconnect_time_wait=0.5,
                                allow_reconnect=True)
    except (nats.errors.NoServersError, OSError, TimeoutError) as exc:
        print(f"kvrelay tail: cannot reach NATS at {_shown(url)}: {exc!r}", file=sys.stderr)
        return 1
    seen = 0
    try:
        policy = DeliverPolicy.ALL if from_start else DeliverPolicy.NEW
        try:
            sub = await nc.jetstream().subscribe(subject, stream=stream, ordered_consumer=True,
                                                 deliver_policy=policy)
        except nats.js.errors.NotFoundError:
            print(f"kvrelay tail: no stream {stream} on {_shown(url)}", file=sys.stderr)
            return 1
        async for msg in sub.messages:
            try:
                line = describe(decode_relay_batch(msg.data), msg.subject)
            except (msgspec.DecodeError, ValueError) as exc:
                line = f"{msg.subject} undecodable ({exc})"
            print(line, file=out, flush=True)
            seen += 1
            if count and seen >= count:
                break
    finally:
        await nc.close()
    return 0


def _shown(url: str) -> str:
    """The URL without the credentials it may carry."""
    return re.sub(r"//[^@/]*@", "//***@", url)


def tail(url: str, stream: str, subject: str, *, from_start: bool, count: int) -> int:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            return runner.run(tail_async(url, stream, subject, from_start=from_start,
                                         count=count))
        except KeyboardInterrupt:
            return 0
