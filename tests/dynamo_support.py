"""Helpers of the `--format dynamo` tests: an in-process relay, a core NATS reader of Dynamo
messages, and the state Dynamo's router must reach, modelled on its rules."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import xxhash
from harness import running_relay

from kvrelay.app import Relay
from kvrelay.dynamo.publisher import DynamoPublisher
from kvrelay.dynamo.wire import RouterEvent, decode_message, kv_events_subject

NS = "kvdyn"
COMP = "worker"
ENDPOINT = "generate"
SUBJECT = kv_events_subject(NS, COMP, ENDPOINT)
ANY_PORT = "tcp://127.0.0.1:*"
U64 = 1 << 64


async def eventually(cond: Callable[[], bool], what: str, within: float = 10.0) -> None:
    """Poll `cond` until it holds; fail saying `what` did not happen."""
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


def publisher(relay: Relay) -> DynamoPublisher:
    assert isinstance(relay.publisher, DynamoPublisher)
    return relay.publisher


def running_dynamo_relay(file_kv: Path,
                         **flags: Any) -> contextlib.AbstractAsyncContextManager[Relay]:
    """Serve a `--format dynamo` relay in this event loop, as `running_relay` serves others."""
    return running_relay(**{"format": "dynamo", "namespace": NS, "component": COMP,
                            "drain_timeout": 5.0, "dynamo_file_kv": str(file_kv), **flags})


@dataclass
class Message:
    publisher_id: int
    sequence: int
    published_at: int
    events: list[RouterEvent]


@dataclass
class KvEventReader:
    """Everything published on the Dynamo KV event subject, decoded, in arrival order."""

    messages: list[Message] = field(default_factory=list)

    async def on_message(self, msg: Any) -> None:
        envelope, events = decode_message(msg.data)
        assert envelope.topic == "kv-events"
        self.messages.append(Message(envelope.publisher_id, envelope.sequence,
                                     envelope.published_at, events))

    def events(self, publisher_id: int | None = None) -> list[RouterEvent]:
        return [e for m in self.messages if publisher_id in (None, m.publisher_id)
                for e in m.events]


@contextlib.asynccontextmanager
async def kv_event_reader(url: str) -> AsyncIterator[KvEventReader]:
    """Subscribe to the Dynamo KV event subject before anything is published."""
    nc = await nats.connect(url, connect_timeout=2, reconnect_time_wait=0.1,
                            max_reconnect_attempts=-1)
    reader = KvEventReader()
    try:
        await nc.subscribe(SUBJECT, cb=reader.on_message)
        await nc.flush()
        yield reader
    finally:
        await nc.close()


# -- what Dynamo's router holds -------------------------------------------------------------------


def u64(block_hash: int | bytes) -> int:
    """A vLLM block hash as Dynamo's u64, computed independently of kvrelay/dynamo/translate.py."""
    if isinstance(block_hash, bytes):
        return int.from_bytes(block_hash[-8:], "big")
    return block_hash % U64


def tokens_hash(tokens: Iterable[int], lora_name: str | None = None,
                cache_salt: str | None = None) -> int:
    """The contract's rule: XXH3-64 of the u32 LE token ids, seed 1337 (+ adapter, + salt)."""
    seed = 1337 + (xxhash.xxh3_64_intdigest(lora_name.encode()) if lora_name else 0)
    seed += xxhash.xxh3_64_intdigest(cache_salt.encode(), seed=1) if cache_salt else 0
    data = b"".join(t.to_bytes(4, "little") for t in tokens)
    return xxhash.xxh3_64_intdigest(data, seed=seed % U64)


@dataclass
class Block:
    parent: int | None
    tokens: list[int]
    lora_name: str | None


@dataclass
class RouterModel:
    """One worker rank as Dynamo's router keeps it: a tree rooted at parentless blocks. A
    store under a parent it does not hold is refused; removing a block drops its subtree."""

    block_size: int
    blocks: dict[int, Block] = field(default_factory=dict)

    def apply(self, event: dict[str, Any]) -> None:
        """Apply one vLLM event (map form, as kvrelay.testing.synthetic builds them)."""
        kind = event["type"]
        if kind == "AllBlocksCleared":
            self.blocks.clear()
        elif kind == "BlockRemoved":
            for h in event["block_hashes"]:
                self._drop(u64(h))
        elif kind == "BlockStored":
            parent = event["parent_block_hash"]
            parent = None if parent is None else u64(parent)
            if parent is not None and parent not in self.blocks:
                return
            tokens = event["token_ids"]
            for i, h in enumerate(event["block_hashes"]):
                chunk = tokens[i * self.block_size:(i + 1) * self.block_size]
                self.blocks[u64(h)] = Block(parent, chunk, event.get("lora_name"))
                parent = u64(h)

    def _drop(self, block: int) -> None:
        if self.blocks.pop(block, None) is None:
            return
        for child in [h for h, b in self.blocks.items() if b.parent == block]:
            self._drop(child)

    def path(self, block: int) -> tuple[list[int], str | None]:
        """The tokens of the chain from the root to `block`, and its adapter."""
        chunks: list[list[int]] = []
        at: int | None = block
        while at is not None:
            chunks.append(self.blocks[at].tokens)
            at = self.blocks[at].parent
        return [t for chunk in reversed(chunks) for t in chunk], self.blocks[block].lora_name

    def held(self) -> dict[int, tuple[int | None, int]]:
        """block_hash -> (parent_hash, tokens_hash) for every block held."""
        return {h: (b.parent, tokens_hash(b.tokens, b.lora_name)) for h, b in self.blocks.items()}


def held_by_router(dump: list[dict[str, Any]], worker_id: int, dp_rank: int
                   ) -> dict[int, tuple[int | None, int]]:
    """The same map, read from Dynamo's `dump_events()` for one worker rank."""
    out: dict[int, tuple[int | None, int]] = {}
    for event in dump:
        if event["worker_id"] != worker_id or event["event"]["dp_rank"] != dp_rank:
            continue
        stored = event["event"]["data"]["stored"]
        parent = stored["parent_hash"]
        for block in stored["blocks"]:
            out[block["block_hash"]] = (parent, block["tokens_hash"])
            parent = block["block_hash"]
    return out

