"""What the synthetic vLLM publishers send: pools of pre-encoded batches and their ground truth.

Encoding a batch costs far more than sending it, so each publisher gets a pool of batches
encoded before the timed loop and cycles through it. Each pool ends with AllBlocksCleared, so
every cycle starts from an empty cache: a block is stored once and removed at most once per
cycle, which keeps relays that count references (Dynamo's) passing every event through.

With `live_blocks` a worker's cache holds that many blocks instead, as a busy engine's does: a
pool starts with a prefix, sent once as the warm-up, that stores its rank's share, and its cycle
stores `blocks` new blocks per batch and removes the oldest as many, with no clear (see
`build_live_pool`).

The batch timestamp is patched into the pre-encoded bytes at send time (msgpack float64 at a
fixed offset), so the relay sees vLLM's real `ts` without re-encoding.
"""

from __future__ import annotations

import random
import struct
from array import array
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Final, Literal

from kvrelay.testing.synthetic import (
    BatchForm,
    EventForm,
    WorkloadFactory,
    all_blocks_cleared,
    block_removed,
    block_stored,
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
WARM_BATCHES: Final = 1  # batches per publisher sent before the timed phase without a prefix
_VOCAB: Final = 32_000
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
    live_blocks: int = 0  # blocks each worker's cache holds (0: the mix above, cleared per cycle)
    prefill_blocks: int = 64  # blocks per BlockStored of the pre-fill storing them

    def __post_init__(self) -> None:
        if not 1 <= self.blocks_min <= self.blocks_max:
            raise ValueError(f"blocks must be 1 <= min <= max, got {self.blocks_min}-"
                             f"{self.blocks_max}")
        if self.pool_batches < 2:
            raise ValueError("a pool needs at least 2 batches")
        if self.live_blocks < 0 or self.prefill_blocks < 1:
            raise ValueError("live_blocks must be 0 or more, prefill_blocks positive")
        if self.live_blocks and self.blocks_min != self.blocks_max:
            raise ValueError("live blocks take a fixed number of blocks per BlockStored")
        for name in ("remove_probability", "clear_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")


@dataclass(frozen=True)
class Pool:
    """One publisher's batches: bytes around the timestamp, and what each carries. Batch seq
    `s` is pool batch `s` while in the prefix, then the rest of the pool cycles."""

    heads: list[bytes]
    tails: list[bytes]
    fingerprints: list[list[Fingerprint]]
    prefix: int = 0  # leading batches sent once, as the warm-up, before the cycle

    def __len__(self) -> int:
        return len(self.heads)

    @property
    def cycle(self) -> int:
        """Batches in the cycle."""
        return len(self.heads) - self.prefix

    @property
    def warm_batches(self) -> int:
        """Batches sent before the timed phase: the prefix, or seq 0 without one."""
        return self.prefix or WARM_BATCHES

    @property
    def warm_events(self) -> int:
        return sum(len(fps) for fps in self.fingerprints[:self.warm_batches])

    def index(self, seq: int) -> int:
        """The pool batch sent as batch `seq`."""
        return seq if seq < self.prefix else self.prefix + (seq - self.prefix) % self.cycle

    def payload(self, seq: int, ts_bytes: bytes) -> bytes:
        """Batch `seq` with `ts_bytes` (see `ts_field`) as its ts."""
        i = self.index(seq)
        return self.heads[i] + ts_bytes + self.tails[i]

    def events_of(self, seq: int) -> int:
        return len(self.fingerprints[self.index(seq)])


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


def build_pools(spec: WorkloadSpec, workers: int, dp_ranks: int) -> list[Pool]:
    """Every publisher's pool, worker by worker, rank by rank: a worker's live blocks are
    shared among its ranks."""
    pools = []
    for p in range(workers * dp_ranks):
        rank = p % dp_ranks
        if spec.live_blocks:
            share = spec.live_blocks // dp_ranks + (rank < spec.live_blocks % dp_ranks)
            pools.append(build_live_pool(spec, p, rank, share))
        else:
            pools.append(build_pool(spec, p, rank))
    return pools


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


def build_live_pool(spec: WorkloadSpec, publisher: int, dp_rank: int, live: int) -> Pool:
    """A publisher whose cache holds `live` blocks, vLLM-shaped.

    The prefix stores blocks 0..live-1, `prefill_blocks` per BlockStored, each chained to the
    last. Then every batch of the cycle removes the `blocks` oldest (BlockRemoved, as vLLM's
    allocation evicts them) and stores `blocks` new ones chained to the newest, so `live` stay.
    Blocks are numbered round a ring of `blocks` x (batches in the cycle) hashes, at least
    `live + blocks`: a number comes back only after its block was removed, and at the end of the
    cycle the cache holds what it held at its start, so the cycle repeats without a clear. A
    block's tokens are the same each time it is stored, as its hash says they are."""
    if live < 1:
        raise ValueError("a publisher with live blocks needs at least one")
    rng = random.Random(f"{spec.seed}:{publisher}:live")
    per, size = spec.blocks_min, spec.block_size
    cycle = max(spec.pool_batches, -(-(live + per) // per))
    ring = cycle * per
    hashes: list[int] = []
    seen: set[int] = set()
    while len(hashes) < ring:
        h = rng.getrandbits(64)
        if h not in seen:
            seen.add(h)
            hashes.append(h)
    tokens = array("H", rng.randbytes(2 * ring * size))

    def stored(first: int, count: int) -> Any:
        labels = [(first + i) % ring for i in range(count)]
        return block_stored([hashes[n] for n in labels],
                            hashes[(first - 1) % ring] if first else None,
                            [t % _VOCAB for n in labels for t in tokens[n * size:(n + 1) * size]],
                            block_size=size, form=spec.event_form)

    batches = [[stored(first, min(spec.prefill_blocks, live - first))]
               for first in range(0, live, spec.prefill_blocks)]
    prefix = len(batches)
    for t in range(cycle):
        removed = block_removed([hashes[(t * per + i) % ring] for i in range(per)],
                                form=spec.event_form)
        batches.append([removed, stored(live + t * per, per)])
    heads: list[bytes] = []
    tails: list[bytes] = []
    for events in batches:
        head, tail = _split(encode_batch(events, _TS_PLACEHOLDER, dp_rank, spec.batch_form))
        heads.append(head)
        tails.append(tail)
    return Pool(heads, tails, [[fingerprint(e) for e in events] for events in batches], prefix)
