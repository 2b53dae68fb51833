"""What the synthetic vLLM publishers send: pools of pre-encoded batches and their ground truth.

Encoding a batch costs far more than sending it, so each publisher gets a pool of batches
encoded before the timed loop and cycles through it. Each pool ends with AllBlocksCleared, so
every cycle starts from an empty cache: a block is stored once and removed at most once per
cycle, which keeps relays that count references (Dynamo's) passing every event through.

The batch timestamp is patched into the pre-encoded bytes at send time (msgpack float64 at a
fixed offset), so the relay sees vLLM's real `ts` without re-encoding.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Final, Literal

from kvrelay.testing.synthetic import (
    BatchForm,
    EventForm,
    WorkloadFactory,
    all_blocks_cleared,
    encode_batch,
)

STORED: Final = 0
REMOVED: Final = 1
CLEARED: Final = 2

Kind = Literal[0, 1, 2]
Fingerprint = tuple[int, int | bytes | None]
"""(kind, first block hash): enough to tell one event of a pool cycle from every other."""

TAG_KINDS: Final[dict[str, int]] = {"BlockStored": STORED, "BlockRemoved": REMOVED,
                                    "AllBlocksCleared": CLEARED}
_TS_PLACEHOLDER: Final = 1_234_567_890.0625
_TS_BYTES: Final = b"\xcb" + struct.pack(">d", _TS_PLACEHOLDER)


@dataclass(frozen=True)
class WorkloadSpec:
    """The mix of events every publisher sends (the same mix, different seeds)."""

    blocks_min: int = 4
    blocks_max: int = 4
    block_size: int = 16
    remove_probability: float = 0.5
    clear_probability: float = 0.0005
    capacity: int = 4096
    pool_batches: int = 2048
    event_form: EventForm = "map"
    batch_form: BatchForm = "array"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.blocks_min <= self.blocks_max:
            raise ValueError(f"blocks must be 1 <= min <= max, got {self.blocks_min}-"
                             f"{self.blocks_max}")
        if self.pool_batches < 2:
            raise ValueError("a pool needs at least 2 batches")
        for name in ("remove_probability", "clear_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")


@dataclass(frozen=True)
class Pool:
    """One publisher's cycle of batches: bytes around the timestamp, and what each carries."""

    heads: list[bytes]
    tails: list[bytes]
    fingerprints: list[list[Fingerprint]]

    def __len__(self) -> int:
        return len(self.heads)

    @property
    def events(self) -> int:
        """Events in one cycle."""
        return sum(len(fps) for fps in self.fingerprints)

    def payload(self, index: int, ts_bytes: bytes) -> bytes:
        """Batch `index` (taken modulo the pool) with `ts_bytes` (see `ts_field`) as its ts."""
        i = index % len(self.heads)
        return self.heads[i] + ts_bytes + self.tails[i]

    def events_of(self, index: int) -> int:
        return len(self.fingerprints[index % len(self.heads)])


def ts_field(ts: float) -> bytes:
    """The msgpack float64 encoding of a timestamp, to splice into a pooled batch."""
    return b"\xcb" + struct.pack(">d", ts)


def shared_floats(shm: SharedMemory) -> memoryview[float]:
    """A shared memory block as an array of doubles (the batch timestamps)."""
    buf = shm.buf
    if buf is None:
        raise RuntimeError("shared memory is closed")
    return buf.cast("d")


def fingerprint(event: Any) -> Fingerprint:
    """Fingerprint of a vLLM event in either form (map with `type`, or legacy array)."""
    if isinstance(event, dict):
        tag, hashes = event.get("type"), event.get("block_hashes")
    elif isinstance(event, list | tuple) and event:
        tag, hashes = event[0], event[1] if len(event) > 1 else None
    else:
        raise ValueError(f"not a vLLM event: {event!r}")
    kind = TAG_KINDS.get(tag) if isinstance(tag, str) else None
    if kind is None:
        raise ValueError(f"unknown event tag {tag!r}")
    return kind, (hashes[0] if kind != CLEARED and hashes else None)


def _split(payload: bytes) -> tuple[bytes, bytes]:
    at = payload.find(_TS_BYTES)
    if at < 0 or payload.find(_TS_BYTES, at + 1) >= 0:
        raise RuntimeError("cannot locate the batch timestamp in the encoded batch")
    return payload[:at], payload[at + len(_TS_BYTES):]


def build_pool(spec: WorkloadSpec, publisher: int, dp_rank: int) -> Pool:
    """Publisher `publisher`'s pool: deterministic for a given spec and index."""
    rng = random.Random(f"{spec.seed}:{publisher}")
    factory = WorkloadFactory(
        seed=rng.getrandbits(64), blocks=spec.blocks_min, block_size=spec.block_size,
        event_form=spec.event_form, remove_probability=spec.remove_probability,
        clear_probability=spec.clear_probability, capacity=spec.capacity,
    )
    heads: list[bytes] = []
    tails: list[bytes] = []
    fingerprints: list[list[Fingerprint]] = []
    for i in range(spec.pool_batches):
        if i == spec.pool_batches - 1:
            events = [all_blocks_cleared(form=spec.event_form)]
        else:
            factory.blocks = rng.randint(spec.blocks_min, spec.blocks_max)
            events = factory.next_events()
        head, tail = _split(encode_batch(events, _TS_PLACEHOLDER, dp_rank, spec.batch_form))
        heads.append(head)
        tails.append(tail)
        fingerprints.append([fingerprint(e) for e in events])
    return Pool(heads, tails, fingerprints)
