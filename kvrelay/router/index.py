"""An in-memory KV index: which blocks each worker (instance_id, dp_rank) holds, from RelayBatches.

Pure (no I/O): the consumer, the commands and a snapshot writer share it. `overlap()` answers a
KV router's question: for a request's block hashes, how many leading ones each worker holds.

Layout. Blocks are held per tier, (medium, group_idx): vLLM reports the GPU cache, offloaded
tiers and, for hybrid models, one block pool per KV cache group, and one hash may live in
several. Per tier a dict maps each hash to a bitmask of the worker slots holding it (`overlap`:
one lookup and one `&` per block, however many workers); per worker and tier a dict maps each
held hash to its parent (for snapshots, and to clear a worker in time of its own blocks).

Losses. A block claimed but evicted sends requests to a worker that recomputes them; a block
missed only costs a hit. So a `resync`, a gap found here, an epoch going back, or a vLLM event
the relay could not read empties the worker (every tier), as the contract says for `resync`.
`exact` says the index saw every event since the worker's cache was last empty (seq 0 of an
engine, a `cleared`, a `restart` with nothing missed); while False the worker holds at least
what the index says. `cleared` empties every tier. Unknown event types are only counted.

Sequence checks, per worker in stream order: the same epoch continues at seq + 1, a new epoch
(engine restart: the worker is emptied) starts at 0; anything missing that the batch's own
`resync` ranges do not announce is a Gap, returned and handled like a resync. A seq at or below
the last one applied in the same epoch is a duplicate, skipped. After `restore()` of a snapshot,
messages at or below its stream sequence are skipped (`Outcome.COVERED`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Final, NamedTuple

import msgspec
from msgspec import UNSET

from kvrelay.wire.schema import (
    BlockHash,
    Cleared,
    RelayBatch,
    RelayEvent,
    Removed,
    Resync,
    Stored,
    TierSnapshot,
    Unknown,
    WorkerSnapshot,
)

WorkerKey = tuple[int, int]
"""(instance_id, dp_rank)"""
Tier = tuple[str, int]
"""(medium, group_idx); events without them are GPU, group 0."""
DEFAULT_TIER: Final[Tier] = ("GPU", 0)
VLLM_TAGS: Final = frozenset({"BlockStored", "BlockRemoved", "AllBlocksCleared"})
_MISSING: Final = object()


class Outcome(enum.Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"  # (epoch, seq) at or before the last one applied: skipped
    COVERED = "covered"  # at or below a restored snapshot's stream sequence: skipped


class Gap(NamedTuple):
    """Batches of a worker missing on the consumer's side: the relay did not announce them."""

    worker: WorkerKey
    previous: tuple[int, int]  # (epoch, seq) last applied
    current: tuple[int, int]  # (epoch, seq) of the batch that showed the gap

    @property
    def epoch_back(self) -> bool:
        return self.current[0] < self.previous[0]

    @property
    def missed(self) -> tuple[int, int] | None:
        """Seq range missed in the current epoch; None when the epoch went back."""
        if self.epoch_back:
            return None
        start = self.previous[1] + 1 if self.current[0] == self.previous[0] else 0
        return start, self.current[1] - 1

    def describe(self) -> str:
        instance, rank = self.worker
        what = (f"seq {self.missed[0]}..{self.missed[1]} of epoch {self.current[0]} missing"
                if self.missed is not None else "epoch went back")
        return (f"worker {instance} rank {rank}: {what} (last epoch {self.previous[0]} seq "
                f"{self.previous[1]}, now epoch {self.current[0]} seq {self.current[1]})")


class WorkerStatus(NamedTuple):
    """A read-only view of one worker's state and counters."""

    worker: WorkerKey
    epoch: int | None
    seq: int | None
    exact: bool
    blocks: int  # over every tier
    batches: int
    events: int
    resyncs: dict[str, int]  # by reason, as the relay announced them
    gaps: int  # found on this side
    duplicates: int
    unknown_events: int
    unreadable_events: int  # unknown events under a vLLM tag: treated as a loss
    unmatched_removes: int  # removes of blocks the index did not hold
    last_ts: float  # of the last batch applied: vLLM's clock and the relay's
    last_relay_ts: float


@dataclass(slots=True, eq=False)
class _Worker:
    key: WorkerKey
    slot: int
    bit: int
    tiers: dict[Tier, dict[BlockHash, BlockHash | None]] = field(default_factory=dict)
    epoch: int | None = None
    seq: int | None = None
    covered: int = 0  # stream sequence a restored snapshot is complete up to
    exact: bool = False
    batches: int = 0
    events: int = 0
    resyncs: dict[str, int] = field(default_factory=dict)
    gaps: int = 0
    duplicates: int = 0
    unknown_events: int = 0
    unreadable_events: int = 0
    unmatched_removes: int = 0
    last_ts: float = 0.0
    last_relay_ts: float = 0.0


def tier_of(event: Stored | Removed) -> Tier:
    group = event.group_idx
    return (event.medium or "GPU", group if type(group) is int else 0)


class KvIndex:
    """Blocks per worker and tier, built by `apply`ing RelayBatches in stream order."""

    def __init__(self, *, queries: bool = True) -> None:
        """`queries=False`: an index that only keeps blocks (a relay's own, for snapshots) and
        answers no `overlap` or `distinct_blocks`; it skips the per-block holder masks those
        need, which halves the memory each event touches."""
        self._workers: dict[WorkerKey, _Worker] = {}
        self._slots: list[WorkerKey | None] = []
        self._queries = queries
        self._holders: dict[Tier, dict[BlockHash, int]] = {}
        self.stream_seq = 0
        """The highest JetStream sequence passed to `apply` (0: none)."""

    # -- updates -------------------------------------------------------------------------------

    def apply(self, batch: RelayBatch, stream_seq: int | None = None
              ) -> tuple[Outcome, Gap | None]:
        """Apply one batch; the Gap, if any, was found before it and handled like a resync."""
        worker = self._workers.get((batch.instance_id, batch.dp_rank))
        if worker is None:
            worker = self._add((batch.instance_id, batch.dp_rank))
        if stream_seq is not None:
            self.stream_seq = max(self.stream_seq, stream_seq)
            if stream_seq <= worker.covered:
                return Outcome.COVERED, None
        epoch, seq = batch.epoch, batch.seq
        gap: Gap | None = None
        if worker.epoch is None or worker.seq is None:
            worker.exact = seq == 0  # seq 0 is the engine's first batch: its cache was empty
        elif epoch == worker.epoch:
            if seq <= worker.seq:
                worker.duplicates += 1
                return Outcome.DUPLICATE, None
            if seq > worker.seq + 1 and not _announced(batch.events, worker.seq + 1, seq - 1):
                gap = Gap(worker.key, (worker.epoch, worker.seq), (epoch, seq))
        elif epoch > worker.epoch:  # the engine restarted: its cache starts empty
            self._clear(worker)
            worker.exact = seq == 0
            if seq > 0 and not _announced(batch.events, 0, seq - 1):
                gap = Gap(worker.key, (worker.epoch, worker.seq), (epoch, seq))
        else:
            gap = Gap(worker.key, (worker.epoch, worker.seq), (epoch, seq))
        if gap is not None:
            worker.gaps += 1
            self._clear(worker)
            worker.exact = False
        for event in batch.events:
            kind = type(event)
            if kind is Stored:
                self._store(worker, event)  # type: ignore[arg-type]
            elif kind is Removed:
                self._remove(worker, event)  # type: ignore[arg-type]
            else:
                self._event(worker, event)
        worker.epoch, worker.seq = epoch, seq
        worker.batches += 1
        worker.events += len(batch.events)
        worker.last_ts, worker.last_relay_ts = batch.ts, batch.relay_ts
        return Outcome.APPLIED, gap

    def _event(self, worker: _Worker, event: RelayEvent) -> None:
        if isinstance(event, Stored):
            self._store(worker, event)
        elif isinstance(event, Removed):
            self._remove(worker, event)
        elif isinstance(event, Cleared):
            self._clear(worker)
            worker.exact = True
        elif isinstance(event, Resync):
            worker.resyncs[event.reason] = worker.resyncs.get(event.reason, 0) + 1
            self._clear(worker)
            worker.exact = event.reason == "restart" and event.missed_from is UNSET
        elif isinstance(event, Unknown):
            worker.unknown_events += 1
            if event.tag in VLLM_TAGS:  # a vLLM event the relay could not read: a loss
                worker.unreadable_events += 1
                self._clear(worker)
                worker.exact = False

    def _store(self, worker: _Worker, event: Stored) -> None:
        tier = tier_of(event)
        blocks = worker.tiers.get(tier)
        if blocks is None:
            blocks = worker.tiers[tier] = {}
        if not self._queries:
            parent = event.parent_block_hash
            for block in event.block_hashes:
                blocks[block] = parent
                parent = block
            return
        holders = self._holders.setdefault(tier, {})
        bit = worker.bit
        parent = event.parent_block_hash
        for block in event.block_hashes:
            if block not in blocks:
                others = holders.get(block)
                # A block only this worker holds shares the worker's own bit object.
                holders[block] = bit if others is None else others | bit
            blocks[block] = parent
            parent = block

    def _remove(self, worker: _Worker, event: Removed) -> None:
        tier = tier_of(event)
        blocks = worker.tiers.get(tier)
        if not blocks:
            worker.unmatched_removes += len(event.block_hashes)
            return
        if not self._queries:
            pop = blocks.pop
            for block in event.block_hashes:
                if pop(block, _MISSING) is _MISSING:
                    worker.unmatched_removes += 1
            return
        holders = self._holders[tier]
        bit = worker.bit
        for block in event.block_hashes:
            if blocks.pop(block, _MISSING) is _MISSING:
                worker.unmatched_removes += 1
                continue
            mask = holders[block] ^ bit
            if mask:
                holders[block] = mask
            else:
                del holders[block]

    def _clear(self, worker: _Worker) -> None:
        if not self._queries:
            worker.tiers = {}
            return
        bit = worker.bit
        for tier, blocks in worker.tiers.items():
            holders = self._holders[tier]
            for block in blocks:
                mask = holders[block] ^ bit
                if mask:
                    holders[block] = mask
                else:
                    del holders[block]
        worker.tiers = {}

    def _add(self, key: WorkerKey) -> _Worker:
        try:
            slot = self._slots.index(None)
            self._slots[slot] = key
        except ValueError:
            slot = len(self._slots)
            self._slots.append(key)
        worker = self._workers[key] = _Worker(key, slot, 1 << slot)
        return worker

    def remove_worker(self, worker: WorkerKey) -> bool:
        """Forget a worker that left (its slot is reused); False if the index did not know it."""
        state = self._workers.pop(worker, None)
        if state is None:
            return False
        self._clear(state)
        self._slots[state.slot] = None
        return True

    # -- queries -------------------------------------------------------------------------------

    def overlap(self, block_hashes: Sequence[BlockHash], tier: Tier = DEFAULT_TIER
                ) -> dict[WorkerKey, int]:
        """For a request's block hashes, how many leading ones each worker holds (workers
        holding none are left out)."""
        self._answers()
        holders = self._holders.get(tier)
        if not holders or not block_hashes:
            return {}
        alive = holders.get(block_hashes[0], 0)
        scores: dict[WorkerKey, int] = {}
        depth = 1
        get = holders.get
        for block in islice(block_hashes, 1, None):
            if not alive:
                return scores
            held = alive & get(block, 0)
            if held != alive:
                self._score(alive ^ held, depth, scores)
                alive = held
            depth += 1
        self._score(alive, depth, scores)
        return scores

    def _score(self, mask: int, depth: int, scores: dict[WorkerKey, int]) -> None:
        while mask:
            low = mask & -mask
            key = self._slots[low.bit_length() - 1]
            assert key is not None
            scores[key] = depth
            mask ^= low

    def workers(self) -> list[WorkerKey]:
        return sorted(self._workers)

    def status(self, worker: WorkerKey) -> WorkerStatus:
        w = self._workers[worker]
        return WorkerStatus(
            w.key, w.epoch, w.seq, w.exact, sum(len(b) for b in w.tiers.values()), w.batches,
            w.events, dict(w.resyncs), w.gaps, w.duplicates, w.unknown_events,
            w.unreadable_events, w.unmatched_removes, w.last_ts, w.last_relay_ts)

    def blocks(self, worker: WorkerKey, tier: Tier = DEFAULT_TIER
               ) -> dict[BlockHash, BlockHash | None]:
        """A copy of the worker's blocks in `tier`, each with its parent hash."""
        state = self._workers.get(worker)
        return dict(state.tiers.get(tier, {})) if state is not None else {}

    def block_count(self, worker: WorkerKey) -> int:
        """How many blocks the worker holds, all tiers together."""
        state = self._workers.get(worker)
        return sum(map(len, state.tiers.values())) if state is not None else 0

    def tiers(self, worker: WorkerKey) -> list[Tier]:
        state = self._workers.get(worker)
        return sorted(t for t, b in state.tiers.items() if b) if state is not None else []

    def distinct_blocks(self, tier: Tier = DEFAULT_TIER) -> int:
        """Distinct hashes held by any worker in `tier`."""
        self._answers()
        return len(self._holders.get(tier, ()))

    def _answers(self) -> None:
        if not self._queries:
            raise TypeError("this KvIndex keeps blocks only (queries=False): it answers no "
                            "overlap queries")

    # -- snapshots -----------------------------------------------------------------------------

    def snapshot(self, worker: WorkerKey) -> WorkerSnapshot:
        """The worker's state, complete up to the stream sequence it records."""
        w = self._workers[worker]
        return _snapshot(w, max(self.stream_seq, w.covered), w.tiers)

    def snapshot_later(self, worker: WorkerKey) -> Callable[[], WorkerSnapshot]:
        """The worker's state now, copied, and a function building its snapshot from the copy:
        the costly part (canonical chains, a few microseconds per block) can then run in
        another thread while this index goes on changing."""
        w = self._workers[worker]
        stream_seq = max(self.stream_seq, w.covered)
        tiers = {tier: dict(blocks) for tier, blocks in w.tiers.items()}
        frozen = _Worker(w.key, w.slot, w.bit, epoch=w.epoch, seq=w.seq, exact=w.exact)
        return lambda: _snapshot(frozen, stream_seq, tiers)

    def restore(self, snapshot: WorkerSnapshot) -> None:
        """Replace a worker's state with a snapshot's; later messages it covers are skipped."""
        chains = [(tier.medium, tier.group_idx, chain) for tier in snapshot.tiers
                  for chain in tier.chains]
        if any(len(c) < 2 or any(h is None for h in islice(c, 1, None)) for *_, c in chains):
            raise ValueError("malformed snapshot: a chain without blocks or a None block")
        key = (snapshot.instance_id, snapshot.dp_rank)
        worker = self._workers.get(key) or self._add(key)
        self._clear(worker)
        for medium, group, chain in chains:
            blocks = worker.tiers.setdefault((medium, group), {})
            holders = self._holders.setdefault((medium, group), {}) if self._queries else None
            parent = chain[0]
            for block in islice(chain, 1, None):
                assert block is not None
                if holders is not None and block not in blocks:
                    others = holders.get(block)
                    holders[block] = worker.bit if others is None else others | worker.bit
                blocks[block] = parent
                parent = block
        worker.epoch, worker.seq = snapshot.epoch, snapshot.seq
        worker.exact = snapshot.exact
        worker.covered = snapshot.stream_seq


def _snapshot(w: _Worker, stream_seq: int, tiers: dict[Tier, dict[BlockHash, BlockHash | None]]
              ) -> WorkerSnapshot:
    return WorkerSnapshot(
        instance_id=w.key[0], dp_rank=w.key[1], epoch=w.epoch, seq=w.seq,
        stream_seq=stream_seq, exact=w.exact,
        tiers=[TierSnapshot(tier[0], tier[1], _chains(blocks))
               for tier, blocks in sorted(tiers.items()) if blocks])


def _announced(events: Iterable[RelayEvent], first: int, last: int) -> bool:
    """Whether the batch's resync ranges together cover seqs first..last."""
    ranges = sorted((e.missed_from, e.missed_to) for e in events if isinstance(e, Resync)
                    and e.missed_from is not UNSET and e.missed_to is not UNSET)
    for start, end in ranges:
        if start > first:
            return False
        first = max(first, end + 1)
        if first > last:
            return True
    return False


def _hash_order(block: BlockHash) -> tuple[int, BlockHash]:
    return (1, block) if isinstance(block, bytes) else (0, block)


def _sorted(blocks: Iterable[BlockHash]) -> list[BlockHash]:
    """Hashes in canonical order: integers by value, then bytes by value."""
    try:
        return sorted(blocks)  # one kind (the usual case): no key to build per hash
    except TypeError:
        return sorted(blocks, key=_hash_order)


def _before(a: BlockHash, b: BlockHash) -> bool:
    if type(a) is type(b):
        return a < b  # type: ignore[operator]
    return isinstance(b, bytes)


def _chains(blocks: dict[BlockHash, BlockHash | None]) -> list[list[BlockHash | None]]:
    """Canonical chains of a tier: each block continues its parent's chain when it is the
    parent's smallest held child; chains in the order of their first block; parent cycles
    (only from inconsistent input) are cut at their smallest block. One pass over the blocks
    and a sort of the chains' starts only."""
    successor: dict[BlockHash, BlockHash] = {}
    for block, parent in blocks.items():
        if parent is not None and parent != block and parent in blocks:
            held = successor.get(parent)
            if held is None or _before(block, held):
                successor[parent] = block
    continuing = set(successor.values())
    emitted: set[BlockHash] = set()
    chains: list[list[BlockHash | None]] = []

    def emit(start: BlockHash) -> None:
        chain: list[BlockHash | None] = [blocks[start]]
        block: BlockHash | None = start
        while block is not None and block not in emitted:
            emitted.add(block)
            chain.append(block)
            block = successor.get(block)
        chains.append(chain)

    for block in _sorted([b for b in blocks if b not in continuing]):
        emit(block)
    if len(emitted) < len(blocks):  # what is left lies on cycles
        for block in _sorted([b for b in blocks if b not in emitted]):
            if block not in emitted:
                emit(block)
    return chains


_SNAPSHOT_ENCODER: Final = msgspec.msgpack.Encoder()
_SNAPSHOT_DECODER: Final = msgspec.msgpack.Decoder(WorkerSnapshot)


def encode_snapshot(snapshot: WorkerSnapshot) -> bytes:
    """Msgpack of a worker snapshot; the same state gives the same bytes."""
    return _SNAPSHOT_ENCODER.encode(snapshot)


def decode_snapshot(data: bytes) -> WorkerSnapshot:
    """A worker snapshot from `encode_snapshot`; ValueError if the bytes are not one."""
    try:
        return _SNAPSHOT_DECODER.decode(data)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a worker snapshot: {exc}") from None
