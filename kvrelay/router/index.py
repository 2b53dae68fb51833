"""An in-memory KV index: which blocks each worker (instance_id, dp_rank) holds, from RelayBatches.

Pure (no I/O): the consumer, the commands and a snapshot writer share it. It answers a KV
router's question, for a request, how many leading blocks each worker holds:
`overlap_tokens()` from the request's token ids, `overlap()` from vLLM block hashes.

Token keys. Each stored block also gets a token key (kvrelay/wire/tokenkey.py): a hash of its
token ids chained from its parent's key and seeded by its LoRA adapter and extra keys, so a
router computes the same keys from a request's tokens without knowing how the engine hashes. A
block whose parent the worker does not hold keyed (evicted, or lost in a gap) gets none, as
vLLM would not reach it either; so does one whose token ids do not fill its blocks. Both are
counted (`unkeyed_blocks`).

Layout. Blocks are held per tier, (medium, group_idx): vLLM reports the GPU cache, offloaded
tiers and, for hybrid models, one block pool per KV cache group, and one hash may live in
several. Per worker and tier a BlockStore (kvrelay/router/store.py) holds each block's hash,
parent (for snapshots, and to clear a worker in time of its own blocks) and token key: packed
in arrays in an index that answers queries (it holds a fleet), in dicts in one that does not (a
relay's own, which changes with every batch). Per tier a KeyHolders table maps each token key,
and from the first query by hashes a dict each hash, to a bitmask of the worker slots holding it
(a query: one lookup and one `&` per block, however many workers).

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

from collections.abc import Callable, Sequence
from itertools import islice
from typing import Any

from msgspec import UNSET

from kvrelay.router.chains import (
    Blocks,
    Keys,
    check_snapshot,
    decode_snapshot,
    encode_snapshot,
    tier_snapshots,
)
from kvrelay.router.packed import BlockTable, KeyHolders
from kvrelay.router.store import KEYED, NEW, BlockStore, DictBlocks
from kvrelay.router.walk import walk_hashes, walk_tokens
from kvrelay.router.worker import (
    DEFAULT_TIER,
    VLLM_TAGS,
    Gap,
    Outcome,
    Tier,
    Worker,
    WorkerKey,
    WorkerStatus,
    announced,
    tier_of,
)
from kvrelay.wire.schema import (
    BlockHash,
    Cleared,
    RelayBatch,
    RelayEvent,
    Removed,
    Resync,
    Stored,
    Unknown,
    WorkerSnapshot,
)
from kvrelay.wire.tokenkey import ExtraKeys, packed_ids, request_extras, root_key, stored_keys

__all__ = ["DEFAULT_TIER", "Gap", "KvIndex", "Outcome", "Tier", "WorkerKey", "WorkerStatus",
           "decode_snapshot", "encode_snapshot", "tier_of"]


class KvIndex:
    """Blocks per worker and tier, built by `apply`ing RelayBatches in stream order."""

    def __init__(self, *, queries: bool = True) -> None:
        """`queries=False`: an index that only keeps blocks (a relay's own, for snapshots) and
        answers no `overlap` or `distinct_blocks`; it skips the per-block holder masks those
        need, which halves the memory each event touches."""
        self._workers: dict[WorkerKey, Worker] = {}
        self._slots: list[WorkerKey | None] = []
        self._queries = queries
        self._holders: dict[Tier, dict[BlockHash, int]] = {}
        self._by_hash = False  # whether _holders is kept: from the first query by hashes on
        self.membership = 0
        """Grows whenever a worker is added or removed (a cache of `workers()` checks it)."""
        self._key_holders: dict[Tier, KeyHolders] = {}
        self._block_sizes: dict[Tier, set[int]] = {}
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
            if seq > worker.seq + 1 and not announced(batch.events, worker.seq + 1, seq - 1):
                gap = Gap(worker.key, (worker.epoch, worker.seq), (epoch, seq))
        elif epoch > worker.epoch:  # the engine restarted: its cache starts empty
            self._clear(worker)
            worker.exact = seq == 0
            if seq > 0 and not announced(batch.events, 0, seq - 1):
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

    def _event(self, worker: Worker, event: RelayEvent) -> None:
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

    def _store(self, worker: Worker, event: Stored) -> None:
        tier = tier_of(event)
        blocks = self._tier(worker, tier)
        parent = event.parent_block_hash
        new_keys = stored_keys(event, None if parent is None else blocks.key(parent))
        holders = self._holders.setdefault(tier, {}) if self._by_hash else None
        bit = worker.bit
        if new_keys is None:
            worker.unkeyed_blocks += len(event.block_hashes)
            for block in event.block_hashes:
                if blocks.put(block, parent, None) and holders is not None:
                    _hold(holders, block, bit)
                parent = block
            return
        _sized(worker, tier, event.block_size)
        key_holders = self._key_table(tier) if self._queries else None
        if self._queries:
            self._block_sizes.setdefault(tier, set()).add(event.block_size)
        for block, key in zip(event.block_hashes, new_keys, strict=True):
            changed = blocks.put(block, parent, key)
            if changed:
                if changed & NEW and holders is not None:
                    _hold(holders, block, bit)
                if changed & KEYED and key_holders is not None:
                    key_holders.hold(key, bit)
            parent = block

    def _tier(self, worker: Worker, tier: Tier) -> BlockStore:
        """The worker's store for `tier`, made when missing: packed in an index that holds a
        fleet, dicts in a relay's own."""
        blocks = worker.tiers.get(tier)
        if blocks is None:
            blocks = worker.tiers[tier] = BlockTable() if self._queries else DictBlocks()
        return blocks

    def _key_table(self, tier: Tier) -> KeyHolders:
        """The tier's token keys and their holders, made when missing."""
        holders = self._key_holders.get(tier)
        if holders is None:
            holders = self._key_holders[tier] = KeyHolders()
        return holders

    def _remove(self, worker: Worker, event: Removed) -> None:
        tier = tier_of(event)
        blocks = worker.tiers.get(tier)
        if not blocks:
            worker.unmatched_removes += len(event.block_hashes)
            return
        holders = self._holders.get(tier) if self._by_hash else None
        key_holders = self._key_holders.get(tier) if self._queries else None
        bit = worker.bit
        for block in event.block_hashes:
            held, key = blocks.pop(block)
            if not held:
                worker.unmatched_removes += 1
                continue
            if holders is not None:
                _drop(holders, block, bit)
            if key is not None and key_holders is not None:
                key_holders.unhold(key, bit)

    def _clear(self, worker: Worker) -> None:
        if self._queries:
            bit = worker.bit
            for tier, blocks in worker.tiers.items():
                if self._by_hash:
                    holders = self._holders[tier]
                    for block in blocks:
                        _drop(holders, block, bit)
                key_holders = self._key_holders.get(tier)
                if key_holders is not None and blocks.keyed:
                    for _, _, key in blocks.items():
                        if key is not None:
                            key_holders.unhold(key, bit)
        worker.tiers, worker.sizes = {}, {}

    def _add(self, key: WorkerKey) -> Worker:
        self.membership += 1
        try:
            slot = self._slots.index(None)
            self._slots[slot] = key
        except ValueError:
            slot = len(self._slots)
            self._slots.append(key)
        worker = self._workers[key] = Worker(key, slot, 1 << slot)
        return worker

    def remove_worker(self, worker: WorkerKey) -> bool:
        """Forget a worker that left (its slot is reused); False if the index did not know it."""
        state = self._workers.pop(worker, None)
        if state is None:
            return False
        self._clear(state)
        self._slots[state.slot] = None
        self.membership += 1
        return True

    # -- queries -------------------------------------------------------------------------------

    def overlap(self, block_hashes: Sequence[BlockHash], tier: Tier = DEFAULT_TIER
                ) -> dict[WorkerKey, int]:
        """For a request's vLLM block hashes, how many leading ones each worker holds (workers
        holding none are left out)."""
        self._answers()
        scores: dict[WorkerKey, int] = {}
        holders = self._hash_holders().get(tier)
        if holders:
            walk_hashes(iter(block_hashes), holders, self._slots, scores)
        return scores

    def _hash_holders(self) -> dict[Tier, dict[BlockHash, int]]:
        """Each tier's hashes with the mask of the workers holding them, built at the first
        query by hashes and kept from then on (a router scoring by tokens never pays for
        them)."""
        if not self._by_hash:
            self._by_hash = True
            for worker in self._workers.values():
                bit = worker.bit
                for tier, blocks in worker.tiers.items():
                    holders = self._holders.setdefault(tier, {})
                    for block in blocks:
                        _hold(holders, block, bit)
        return self._holders

    def overlap_tokens(self, token_ids: Sequence[int] | bytes, *, lora_name: str | None = None,
                       cache_salt: str | None = None,
                       extra_keys: Sequence[ExtraKeys] | None = None,
                       tier: Tier = DEFAULT_TIER) -> dict[WorkerKey, int]:
        """For a request's token ids, how many leading blocks each worker holds that vLLM
        would reuse (workers holding none are left out); OverflowError for an id that is not
        a uint32. `token_ids` may also be bytes: the ids packed as uint32 little-endian
        (`tokenkey.token_bytes`), which spares making an int object per token.

        Only whole blocks count, and not the one holding the prompt's last token, which vLLM
        always computes: at most `(len(token_ids) - 1) // block_size` blocks. `lora_name`: the
        request's adapter; `cache_salt`: its salt; `extra_keys`: each block's multimodal keys,
        as vLLM computes them (kvrelay/wire/tokenkey.py). Workers are scored at each block
        size their events used (one, in a uniform fleet)."""
        self._answers()
        scores: dict[WorkerKey, int] = {}
        data = packed_ids(token_ids)  # checks every id
        count = len(data) // 4
        holders = self._key_holders.get(tier)
        if not holders:
            return scores
        root = root_key(lora_name)
        for size in sorted(self._block_sizes.get(tier, ())):
            usable = (count - 1) // size
            if usable <= 0:
                continue
            extras = (request_extras(usable, cache_salt=cache_salt, extra_keys=extra_keys)
                      if cache_salt is not None or extra_keys else None)
            walk_tokens(data, 4 * size, usable, root, extras, holders, self._slots, scores)
        return scores

    def workers(self) -> list[WorkerKey]:
        return sorted(self._workers)

    def status(self, worker: WorkerKey) -> WorkerStatus:
        w = self._workers[worker]
        return WorkerStatus(
            w.key, w.epoch, w.seq, w.exact, sum(len(b) for b in w.tiers.values()), w.batches,
            w.events, dict(w.resyncs), w.gaps, w.duplicates, w.unknown_events,
            w.unreadable_events, w.unmatched_removes, w.last_ts, w.last_relay_ts,
            w.unkeyed_blocks)

    def blocks(self, worker: WorkerKey, tier: Tier = DEFAULT_TIER) -> Blocks:
        """A copy of the worker's blocks in `tier`, each with its parent hash."""
        state = self._workers.get(worker)
        held = state.tiers.get(tier) if state is not None else None
        return held.parents() if held is not None else {}

    def keys(self, worker: WorkerKey, tier: Tier = DEFAULT_TIER) -> Keys:
        """A copy of the worker's blocks in `tier` that have a token key, each with it."""
        state = self._workers.get(worker)
        held = state.tiers.get(tier) if state is not None else None
        return held.keys() if held is not None else {}

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
        return len(self._hash_holders().get(tier, ()))

    def _answers(self) -> None:
        if not self._queries:
            raise TypeError("this KvIndex keeps blocks only (queries=False): it answers no "
                            "overlap queries")

    # -- snapshots -----------------------------------------------------------------------------

    def snapshot(self, worker: WorkerKey) -> WorkerSnapshot:
        """The worker's state, complete up to the stream sequence it records."""
        w = self._workers[worker]
        return _snapshot(w, max(self.stream_seq, w.covered), w.tiers, w.sizes)

    def snapshot_later(self, worker: WorkerKey) -> Callable[[], WorkerSnapshot]:
        """The worker's state now, copied, and a function building its snapshot from the copy:
        the costly part (canonical chains, a few microseconds per block) can then run in
        another thread while this index goes on changing."""
        w = self._workers[worker]
        stream_seq = max(self.stream_seq, w.covered)
        tiers = {tier: blocks.copy() for tier, blocks in w.tiers.items()}
        sizes = {tier: set(held) for tier, held in w.sizes.items()}
        frozen = Worker(w.key, w.slot, w.bit, epoch=w.epoch, seq=w.seq, exact=w.exact)
        return lambda: _snapshot(frozen, stream_seq, tiers, sizes)

    def restore(self, snapshot: WorkerSnapshot) -> None:
        """Replace a worker's state with a snapshot's; later messages it covers are skipped."""
        check_snapshot(snapshot)
        key = (snapshot.instance_id, snapshot.dp_rank)
        worker = self._workers.get(key) or self._add(key)
        self._clear(worker)
        bit = worker.bit
        for tier in snapshot.tiers:
            where = (tier.medium, tier.group_idx)
            blocks = self._tier(worker, where)
            holders = self._holders.setdefault(where, {}) if self._by_hash else None
            key_holders = self._key_table(where) if self._queries else None
            if tier.keys:
                worker.sizes.setdefault(where, set()).update(tier.block_sizes)
                if self._queries:
                    self._block_sizes.setdefault(where, set()).update(tier.block_sizes)
            for i, chain in enumerate(tier.chains):
                chain_keys = tier.keys[i] if tier.keys else None
                parent = chain[0]
                for j, block in enumerate(islice(chain, 1, None)):
                    assert block is not None
                    token_key = chain_keys[j] if chain_keys is not None else None
                    changed = blocks.put(block, parent, token_key)
                    if changed & NEW and holders is not None:
                        _hold(holders, block, bit)
                    if changed & KEYED and key_holders is not None:
                        assert token_key is not None
                        key_holders.hold(token_key, bit)
                    parent = block
        worker.epoch, worker.seq = snapshot.epoch, snapshot.seq
        worker.exact = snapshot.exact
        worker.covered = snapshot.stream_seq


def _snapshot(w: Worker, stream_seq: int, tiers: dict[Tier, BlockStore],
              sizes: dict[Tier, set[int]]) -> WorkerSnapshot:
    parents = {tier: blocks.parents() for tier, blocks in tiers.items()}
    keys = {tier: blocks.keys() for tier, blocks in tiers.items() if blocks.keyed}
    return WorkerSnapshot(
        instance_id=w.key[0], dp_rank=w.key[1], epoch=w.epoch, seq=w.seq,
        stream_seq=stream_seq, exact=w.exact, tiers=tier_snapshots(parents, keys, sizes))


def _sized(worker: Worker, tier: Tier, size: int) -> None:
    sizes = worker.sizes.get(tier)
    if sizes is None:
        worker.sizes[tier] = {size}
    elif size not in sizes:
        sizes.add(size)


def _hold(masks: dict[Any, int], block: Any, bit: int) -> None:
    """Add a worker's bit to what holds `block`; a block only this worker holds shares the
    worker's own bit object."""
    others = masks.get(block)
    masks[block] = bit if others is None else others | bit


def _drop(masks: dict[Any, int], block: Any, bit: int) -> None:
    """Take a worker's bit off a `block` it holds (and the block off when no worker is left)."""
    mask = masks[block] ^ bit
    if mask:
        masks[block] = mask
    else:
        del masks[block]
