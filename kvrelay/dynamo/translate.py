"""`--format dynamo`: vLLM events as NVIDIA Dynamo 1.6's KV event plane carries them.

Dynamo's KV router reads msgpack envelopes from core NATS, each carrying a msgpack array of
RouterEvents (the Structs of `kvrelay/dynamo/wire.py`). The relay is one Dynamo event publisher
per DP rank: its own `publisher_id`, `sequence` from 0 per message and `event_id` from 1 per
event, without holes, because Dynamo's router resets a rank whose event_ids jump and ignores
ids it has already applied.

How vLLM's events map onto Dynamo's (the choices Dynamo's own ZMQ relay makes, except where
marked):
- Block hashes become u64: signed int64 as two's complement, 32-byte hashes as their last 8
  bytes big-endian (Dynamo 1.6.1 fails such batches; its later relay maps them so).
- `tokens_hash` is XXH3-64 of each block's token ids as u32 little-endian, seeded with 1337,
  plus XXH3-64(lora_name) and XXH3-64(cache_salt, seed 1) when present (wrapping).
- `medium` becomes `storage_tier`: GPU device, CPU host_pinned, DISK/NVME disk, EXTERNAL
  external; vLLM's FS is disk and OBJ external (Dynamo 1.6.1 drops both). Events of any other
  medium are dropped and counted.
- A BlockStored whose block_size is not the router's `--kv-block-size`, whose hashes repeat, or
  whose values do not fit u64/u32, is dropped and counted; blocks without a full block of
  token ids are cut from the first such block on (counted per block).
- Event types Dynamo cannot express are dropped and counted.
- Every `resync` (gap, restart, overflow, start) becomes one `cleared` for the rank, first in
  the message, so the router forgets what may be wrong and rebuilds from what follows.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable, Sequence
from typing import Final

import msgspec
import xxhash

from kvrelay.dynamo.wire import (
    CLEARED,
    KV_EVENTS_TOPIC,
    DynamoBlock,
    DynamoEventData,
    DynamoRemoveData,
    DynamoStoreData,
    EventEnvelope,
    KvCacheEvent,
    RouterEvent,
    StorageTier,
    Translated,
)
from kvrelay.system.metrics import Metrics
from kvrelay.wire.schema import (
    BlockHash,
    Cleared,
    InputEvent,
    Removed,
    Resync,
    Stored,
    VllmAllBlocksCleared,
    VllmBlockRemoved,
    VllmBlockStored,
)

TOKENS_HASH_SEED: Final = 1337
CACHE_SALT_SEED: Final = 1
_U64: Final = 1 << 64
_BIG_ENDIAN: Final = sys.byteorder != "little"  # tokens are hashed as u32 little-endian
_xxh3: Final = xxhash.xxh3_64_intdigest

STORAGE_TIERS: Final[dict[str | None, StorageTier]] = {
    None: "device",
    "GPU": "device",
    "DEVICE": "device",
    "CPU": "host_pinned",
    "CPU_PINNED": "host_pinned",
    "CPU_TIER1": "host_pinned",
    "CPU_TIER2": "disk",
    "DISK": "disk",
    "NVME": "disk",
    "FS": "disk",
    "EXTERNAL": "external",
    "NETWORK": "external",
    "REMOTE": "external",
    "SHARED": "external",
    "OBJ": "external",
}


# -- hashing ------------------------------------------------------------------------------------


def block_hash_u64(value: BlockHash) -> int:
    """A vLLM block hash as Dynamo's u64; ValueError when an int does not fit 64 bits."""
    if isinstance(value, bytes):
        return int.from_bytes(value[-8:], "big")
    if -(1 << 63) <= value < 0:
        return value + _U64
    if 0 <= value < _U64:
        return value
    raise ValueError(f"block hash {value} does not fit 64 bits")


def block_hashes_u64(values: list[BlockHash]) -> list[int]:
    """`block_hash_u64` of each; the list itself when its values are u64 already (the usual
    case: a C-level min and max instead of a call per hash)."""
    try:
        if values and min(values) >= 0 and max(values) < _U64:  # type: ignore[operator]
            return values  # type: ignore[return-value]  # every value is an int in u64
    except TypeError:
        pass  # bytes among them
    return [block_hash_u64(h) for h in values]


def tokens_hash_seed(lora_name: str | None = None, cache_salt: str | None = None) -> int:
    """Dynamo's seed for a block's tokens_hash: 1337, shifted by the adapter and the salt."""
    seed = TOKENS_HASH_SEED
    if lora_name:
        seed += xxhash.xxh3_64_intdigest(lora_name.encode())
    if cache_salt:
        seed += xxhash.xxh3_64_intdigest(cache_salt.encode(), seed=CACHE_SALT_SEED)
    return seed % _U64


def tokens_hashes(token_ids: Sequence[int], block_size: int, seed: int = TOKENS_HASH_SEED
                  ) -> list[int]:
    """XXH3-64 of each full block of token ids as u32 little-endian; OverflowError if a token
    id is not a u32."""
    length = len(token_ids)
    full = length - length % block_size
    raw = array("I", token_ids if full == length else token_ids[:full])  # C uint: 32 bits
    if _BIG_ENDIAN:
        raw.byteswap()
    data = raw.tobytes()
    step = 4 * block_size
    return [_xxh3(data[i : i + step], seed) for i in range(0, len(data), step)]


# -- translation --------------------------------------------------------------------------------


class Translator:
    """vLLM events (as the codec decodes them) -> Dynamo event data, counting what cannot go."""

    def __init__(self, kv_block_size: int, metrics: Metrics | None = None) -> None:
        self.kv_block_size = kv_block_size
        self._metrics = metrics

    def translate(self, resyncs: Sequence[Resync], events: Iterable[InputEvent]
                  ) -> list[Translated]:
        """The events one message carries: a `cleared` for any resync, then the batch."""
        out: list[Translated] = []
        if resyncs:
            out.append(Translated("device", CLEARED))
        for event in events:
            item = self._event(event)
            if item is not None:
                out.append(item)
            elif self._metrics is not None:
                self._metrics.events_dropped.labels("untranslatable").inc()
        return out

    def _event(self, event: InputEvent) -> Translated | None:
        # vLLM's Structs (the codec's fast path) or output ones: the same fields.
        if isinstance(event, (VllmBlockStored, Stored)):
            return self._stored(event)
        if isinstance(event, (VllmBlockRemoved, Removed)):
            return self._removed(event)
        if isinstance(event, (VllmAllBlocksCleared, Cleared)):
            return Translated("device", CLEARED)
        if isinstance(event, Resync):
            return Translated("device", CLEARED)
        return None  # Unknown: Dynamo has no way to carry it

    def _stored(self, event: Stored | VllmBlockStored) -> Translated | None:
        count = len(event.block_hashes)
        tier = STORAGE_TIERS.get(event.medium)
        if tier is None:
            return self._drop("medium", count)
        if event.block_size != self.kv_block_size:
            return self._drop("block_size", count)
        try:
            hashes = block_hashes_u64(event.block_hashes)
            parent = (None if event.parent_block_hash is None
                      else block_hash_u64(event.parent_block_hash))
            salt = event.cache_salt if isinstance(event.cache_salt, str) else None
            tokens = tokens_hashes(event.token_ids, self.kv_block_size,
                                   tokens_hash_seed(event.lora_name, salt))
        except (ValueError, OverflowError, TypeError):
            return self._drop("invalid", count)
        if len(set(hashes)) != count or parent in hashes:
            return self._drop("duplicate", count)
        if len(tokens) < count:
            self._count("short_tokens", count - len(tokens))
            if not tokens:
                return None
        blocks = list(map(DynamoBlock, hashes, tokens))  # as many as the shorter has
        return Translated(tier, DynamoEventData(
            stored=DynamoStoreData(parent_hash=parent, blocks=blocks)))

    def _removed(self, event: Removed | VllmBlockRemoved) -> Translated | None:
        tier = STORAGE_TIERS.get(event.medium)
        if tier is None:
            return self._drop("medium", len(event.block_hashes))
        try:
            hashes = block_hashes_u64(event.block_hashes)
        except ValueError:
            return self._drop("invalid", len(event.block_hashes))
        return Translated(tier, DynamoEventData(removed=DynamoRemoveData(hashes)))

    def _drop(self, reason: str, blocks: int) -> Translated | None:
        """Leave the whole event out: its blocks are counted here, the event by `translate`."""
        self._count(reason, blocks)
        return None

    def _count(self, reason: str, blocks: int) -> None:
        if self._metrics is not None and blocks:
            self._metrics.dynamo_blocks_dropped.labels(reason).inc(blocks)


# -- messages -----------------------------------------------------------------------------------


_ENCODER: Final = msgspec.msgpack.Encoder()


class EventStream:
    """One Dynamo event publisher (one DP rank): its id, message sequence and event ids."""

    def __init__(self, publisher_id: int, worker_id: int, dp_rank: int) -> None:
        self.publisher_id = publisher_id
        self.worker_id = worker_id
        self.dp_rank = dp_rank
        self.sequence = 0  # of the next message
        self.event_id = 1  # of the next event

    def encode(self, items: Sequence[Translated], published_at_ms: int) -> bytes:
        """The next message, numbered; call `rollback` if it is not sent after all."""
        events = [RouterEvent(self.worker_id, item.storage_tier, "worker",
                              KvCacheEvent(self.event_id + i, item.data, self.dp_rank))
                  for i, item in enumerate(items)]
        envelope = EventEnvelope(self.publisher_id, self.sequence, published_at_ms,
                                 KV_EVENTS_TOPIC, _ENCODER.encode(events))
        self.sequence += 1
        self.event_id += len(items)
        return _ENCODER.encode(envelope)

    def rollback(self, items: int) -> None:
        """Give back the numbers of the last message, which was not sent."""
        self.sequence -= 1
        self.event_id -= items
