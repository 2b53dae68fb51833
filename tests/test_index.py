"""The KV index: blocks per worker and tier, overlap scores, loss handling, snapshots.

Hypothesis tests hold the index to a plain model (dicts of dicts, applied event by event); the
unit tests pin the sequence rules (gaps, duplicates, epochs) and the snapshot format.
"""

from __future__ import annotations

import random
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec import UNSET
from strategies import INDEX_TIERS, INDEX_WORKERS, index_chains, index_scripts

from kvrelay.router.index import (
    DEFAULT_TIER,
    Gap,
    KvIndex,
    Outcome,
    Tier,
    WorkerKey,
    decode_snapshot,
    encode_snapshot,
)
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

A: WorkerKey = (11, 0)
B: WorkerKey = (11, 1)
C: WorkerKey = (2**64 - 1, 3)


class Model:
    """What the index must hold, in the plainest terms: per worker and tier, hash -> parent."""

    def __init__(self) -> None:
        self.blocks: dict[WorkerKey, dict[Tier, dict[BlockHash, BlockHash | None]]] = {}
        self.exact: dict[WorkerKey, bool] = {}

    def apply(self, batch: RelayBatch) -> None:
        worker = (batch.instance_id, batch.dp_rank)
        tiers = self.blocks.setdefault(worker, {})
        self.exact.setdefault(worker, batch.seq == 0)
        for event in batch.events:
            if isinstance(event, Stored | Removed):
                group = event.group_idx if isinstance(event.group_idx, int) else 0
                held = tiers.setdefault((event.medium or "GPU", group), {})
                if isinstance(event, Stored):
                    parent = event.parent_block_hash
                    for block in event.block_hashes:
                        held[block] = parent
                        parent = block
                else:
                    for block in event.block_hashes:
                        held.pop(block, None)
            elif isinstance(event, Cleared):
                tiers.clear()
                self.exact[worker] = True
            elif isinstance(event, Resync):
                tiers.clear()
                self.exact[worker] = event.reason == "restart" and event.missed_from is UNSET
            elif isinstance(event, Unknown) and event.tag in (
                    "BlockStored", "BlockRemoved", "AllBlocksCleared"):
                tiers.clear()
                self.exact[worker] = False

    def held(self, worker: WorkerKey, tier: Tier) -> dict[BlockHash, BlockHash | None]:
        return self.blocks.get(worker, {}).get(tier, {})

    def overlap(self, chain: list[BlockHash], tier: Tier) -> dict[WorkerKey, int]:
        scores = {}
        for worker in self.blocks:
            held = self.held(worker, tier)
            depth = 0
            while depth < len(chain) and chain[depth] in held:
                depth += 1
            if depth:
                scores[worker] = depth
        return scores


def batch(worker: WorkerKey, seq: int, *events: RelayEvent, epoch: int = 0) -> RelayBatch:
    return RelayBatch(instance_id=worker[0], dp_rank=worker[1], epoch=epoch, seq=seq, ts=1.0,
                      relay_ts=2.0, events=list(events))


def stored(*hashes: BlockHash, parent: BlockHash | None = None, medium: str | None = "GPU",
           group: int | None = 0, keyed: bool = True) -> Stored:
    """Blocks of one token each; `keyed=False`: no token ids, so no token keys."""
    return Stored(list(hashes), parent, [0] * len(hashes) if keyed else [], 1, medium=medium,
                  group_idx=group)


def removed(*hashes: BlockHash, medium: str | None = "GPU", group: int | None = 0) -> Removed:
    return Removed(list(hashes), medium=medium, group_idx=group)


def applied(index: KvIndex, b: RelayBatch, stream_seq: int | None = None) -> Gap | None:
    outcome, gap = index.apply(b, stream_seq)
    assert outcome is Outcome.APPLIED
    return gap


# -- against the model -------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(index_scripts(), st.lists(index_chains, max_size=5))
def test_index_equals_model(script: list[RelayBatch], chains: list[list[BlockHash]]) -> None:
    """After any mix of stores, removes, clears, resyncs and unknown events over shared hashes,
    every worker's blocks (with parents), exactness and overlap scores equal the model's."""
    index, model = KvIndex(), Model()
    for b in script:
        assert index.apply(b) == (Outcome.APPLIED, None)
        model.apply(b)
    for worker in INDEX_WORKERS:
        for tier in INDEX_TIERS:
            assert index.blocks(worker, tier) == model.held(worker, tier)
        if worker in model.exact:
            assert index.status(worker).exact == model.exact[worker]
            assert index.status(worker).blocks == sum(
                len(held) for held in model.blocks[worker].values())
    for chain in chains:
        for tier in INDEX_TIERS:
            assert index.overlap(chain, tier) == model.overlap(chain, tier)


@settings(max_examples=200, deadline=None)
@given(index_scripts(), st.integers(0, 40), st.lists(index_chains, min_size=1, max_size=5))
def test_hash_masks_built_midway_stay_true(script: list[RelayBatch], split: int,
                                           chains: list[list[BlockHash]]) -> None:
    """The per-hash masks `overlap` needs are built at its first call and then kept through
    every later store, remove, clear and resync: scores equal the model's at the end."""
    index, model = KvIndex(), Model()
    for i, b in enumerate(script):
        if i == split:
            index.overlap(chains[0])  # builds the masks from what is held so far
        index.apply(b)
        model.apply(b)
    for chain in chains:
        for tier in INDEX_TIERS:
            assert index.overlap(chain, tier) == model.overlap(chain, tier)
            assert index.distinct_blocks(tier) == len(
                set().union(*(model.held(w, tier) for w in INDEX_WORKERS)))


@settings(max_examples=300, deadline=None)
@given(index_scripts())
def test_blocks_only_index_keeps_the_same_blocks(script: list[RelayBatch]) -> None:
    """An index built without query masks (`queries=False`, the relay's snapshots) holds the same
    blocks, status and snapshots as a full one, and refuses overlap queries."""
    full, lean = KvIndex(), KvIndex(queries=False)
    for seq, b in enumerate(script, 1):
        assert full.apply(b, seq) == lean.apply(b, seq)
    assert full.workers() == lean.workers()
    for worker in full.workers():
        assert full.status(worker) == lean.status(worker)
        assert encode_snapshot(full.snapshot(worker)) == encode_snapshot(lean.snapshot(worker))
        restored = KvIndex(queries=False)
        restored.restore(lean.snapshot(worker))
        assert restored.tiers(worker) == lean.tiers(worker)
        for tier in INDEX_TIERS:
            assert restored.blocks(worker, tier) == full.blocks(worker, tier)
    with pytest.raises(TypeError, match="queries=False"):
        lean.overlap([1, 2])


@settings(max_examples=200, deadline=None)
@given(index_scripts(resyncs=False), st.data())
def test_lost_batches_are_gaps(script: list[RelayBatch], data: st.DataObject) -> None:
    """Any batches lost unannounced: one gap per lost run that a later batch shows, and each
    worker then holds what the batches after its last gap stored (never more)."""
    lost = {i for i in range(len(script)) if data.draw(st.booleans(), label=f"lose {i}")}
    index = KvIndex()
    gaps: list[Gap] = []
    after_gap: dict[WorkerKey, Model] = {}
    expected_gaps = 0
    last_seen: dict[WorkerKey, int] = {}
    for i, b in enumerate(script):
        worker = (b.instance_id, b.dp_rank)
        if i in lost:
            continue
        if b.seq != last_seen.get(worker, b.seq - 1) + 1:
            expected_gaps += 1
            after_gap[worker] = Model()
            after_gap[worker].exact[worker] = False
        last_seen[worker] = b.seq
        outcome, gap = index.apply(b)
        assert outcome is Outcome.APPLIED
        if gap is not None:
            gaps.append(gap)
            assert gap.missed == (gap.previous[1] + 1, b.seq - 1)
        after_gap.setdefault(worker, Model()).apply(b)
    assert len(gaps) == expected_gaps
    for worker, model in after_gap.items():
        for tier in INDEX_TIERS:
            assert index.blocks(worker, tier) == model.held(worker, tier)
        assert index.status(worker).exact == model.exact[worker]
        assert index.status(worker).gaps == sum(g.worker == worker for g in gaps)


@settings(max_examples=200, deadline=None)
@given(index_scripts())
def test_snapshot_round_trip(script: list[RelayBatch]) -> None:
    """Every worker's snapshot, encoded and decoded, restores the same blocks, parents,
    position and exactness, and encodes to the same bytes again."""
    index = KvIndex()
    for stream_seq, b in enumerate(script, start=1):
        index.apply(b, stream_seq)
    restored = KvIndex()
    for worker in index.workers():
        data = encode_snapshot(index.snapshot(worker))
        snapshot = decode_snapshot(data)
        assert snapshot.stream_seq == len(script)
        restored.restore(snapshot)
        for tier in INDEX_TIERS:
            assert restored.blocks(worker, tier) == index.blocks(worker, tier)
        got, want = restored.status(worker), index.status(worker)
        assert (got.epoch, got.seq, got.exact) == (want.epoch, want.seq, want.exact)
        assert encode_snapshot(restored.snapshot(worker)) == data


# -- overlap -----------------------------------------------------------------------------------


def test_overlap_counts_leading_blocks_only() -> None:
    """A worker scores the blocks it holds from the chain's start on; after the first block it
    lacks nothing counts."""
    index = KvIndex()
    applied(index, batch(A, 0, stored(1, 2, 3, 4)))
    applied(index, batch(B, 0, stored(1, 2), stored(9, parent=5)))
    applied(index, batch(C, 0, stored(2, 3, 4, parent=1)))  # without the first block
    assert index.overlap([1, 2, 3, 4, 5]) == {A: 4, B: 2}
    assert index.overlap([2, 3, 4]) == {A: 3, B: 1, C: 3}
    assert index.overlap([5, 1, 2]) == {}
    assert index.overlap([9]) == {B: 1}
    assert index.overlap([7]) == {}
    assert index.overlap([]) == {}
    assert index.overlap([1, 2], ("CPU", 0)) == {}


def test_tiers_are_separate() -> None:
    """The same hash in GPU and CPU, or in two KV cache groups: removing one keeps the other;
    events without medium or group_idx are GPU, group 0."""
    index = KvIndex()
    applied(index, batch(A, 0, stored(1, 2, medium=None, group=None),
                         stored(1, 2, medium="CPU"), stored(1, 2, group=1)))
    applied(index, batch(A, 1, removed(1, 2, medium="GPU", group=1)))
    assert index.overlap([1, 2]) == {A: 2}
    assert index.overlap([1, 2], ("CPU", 0)) == {A: 2}
    assert index.overlap([1, 2], ("GPU", 1)) == {}
    assert index.tiers(A) == [("CPU", 0), ("GPU", 0)]


def test_removed_worker_frees_its_slot() -> None:
    """A worker the router forgets no longer scores; a new worker takes its slot cleanly."""
    index = KvIndex()
    applied(index, batch(A, 0, stored(1, 2)))
    applied(index, batch(B, 0, stored(1)))
    assert index.remove_worker(A) is True
    assert index.remove_worker(A) is False
    assert index.overlap([1, 2]) == {B: 1}
    applied(index, batch(C, 0, stored(1, 2, 3)))
    assert index.overlap([1, 2, 3]) == {B: 1, C: 3}
    assert index.workers() == [B, C]


def test_many_workers_share_blocks() -> None:
    """With 200 workers (masks wider than a machine word) each scores its own prefix length."""
    index = KvIndex()
    chain = list(range(1000, 1300))
    for rank in range(200):
        applied(index, batch((5, rank), 0, stored(*chain[: rank + 1])))
    scores = index.overlap(chain)
    assert scores == {(5, rank): rank + 1 for rank in range(200)}
    assert index.distinct_blocks() == 200


# -- sequence rules and losses -----------------------------------------------------------------


def test_resync_empties_only_that_worker() -> None:
    """A resync drops the worker's blocks in every tier (it may have missed removes), counts
    the reason, and leaves other workers alone; what it stores next is known again."""
    index = KvIndex()
    applied(index, batch(A, 0, stored(1, 2), stored(3, medium="CPU")))
    applied(index, batch(B, 0, stored(1, 2)))
    applied(index, batch(A, 5, Resync("gap", 1, 4), stored(7)))
    assert index.blocks(A) == {7: None}
    assert index.tiers(A) == [DEFAULT_TIER]
    assert index.overlap([1, 2]) == {B: 2}
    status = index.status(A)
    assert (status.resyncs, status.gaps, status.exact) == ({"gap": 1}, 0, False)


@pytest.mark.parametrize(("event", "exact"), [
    (Resync("restart"), True),
    (Resync("restart", 0, 3), False),
    (Resync("overflow", 1, 1), False),
    (Resync("start", 0, 9), False),
    (Cleared(), True),
    (Unknown(tag="BlockRemoved", raw=["BlockRemoved", "garbage"]), False),
], ids=["restart", "restart-missed", "overflow", "start", "cleared", "unreadable"])
def test_exactness(event: RelayEvent, exact: bool) -> None:
    """After a loss the worker is not exact; a clean restart or a cleared cache makes it exact."""
    index = KvIndex()
    applied(index, batch(A, 3, stored(1)))
    assert index.status(A).exact is False  # first seen mid-history
    applied(index, batch(A, 4, event))
    assert index.status(A).exact is exact
    assert index.blocks(A) == {}


def test_unknown_event_types_are_counted_not_applied() -> None:
    """An event type the index does not know is counted and changes nothing."""
    index = KvIndex()
    applied(index, batch(A, 0, stored(1, 2)))
    applied(index, batch(A, 1, Unknown(tag="BlockUpdated", raw={"type": "BlockUpdated"})))
    status = index.status(A)
    assert (status.unknown_events, status.unreadable_events, status.exact) == (1, 0, True)
    assert index.overlap([1, 2]) == {A: 2}


def test_gap_in_seq_is_reported_and_handled_like_resync() -> None:
    """seq jumping past prev + 1 without a resync covering it is a gap: reported, blocks
    dropped, the batch itself applied."""
    index = KvIndex()
    applied(index, batch(A, 0, stored(1, 2)))
    gap = applied(index, batch(A, 4, stored(3)))
    assert gap == Gap(A, (0, 0), (0, 4))
    assert gap.missed == (1, 3)
    assert "seq 1..3 of epoch 0 missing" in gap.describe()
    assert index.blocks(A) == {3: None}
    assert index.status(A).gaps == 1


def test_announced_gap_is_not_reported() -> None:
    """Missing seqs the batch's resyncs cover, even split over two, are the relay's: no gap."""
    index = KvIndex()
    applied(index, batch(A, 0))
    assert applied(index, batch(A, 5, Resync("gap", 1, 2), Resync("overflow", 3, 4))) is None
    assert applied(index, batch(A, 9, Resync("gap", 6, 7))) == Gap(A, (0, 5), (0, 9))
    assert index.status(A).gaps == 1


def test_duplicates_are_skipped() -> None:
    """A batch at or before the last (epoch, seq) applied changes nothing and is counted."""
    index = KvIndex()
    applied(index, batch(A, 0, stored(1)))
    applied(index, batch(A, 1, removed(1)))
    assert index.apply(batch(A, 0, stored(1))) == (Outcome.DUPLICATE, None)
    assert index.blocks(A) == {}
    assert index.status(A).duplicates == 1


def test_new_epoch_starts_empty() -> None:
    """An engine restart (new epoch from seq 0) empties the worker even without a resync;
    a new epoch starting later than 0 without one is a gap."""
    index = KvIndex()
    applied(index, batch(A, 7, stored(1)))
    assert applied(index, batch(A, 0, stored(2), epoch=1)) is None
    assert index.blocks(A) == {2: None}
    assert index.status(A).exact is True
    assert applied(index, batch(A, 0, Resync("restart"), stored(3), epoch=2)) is None
    assert index.blocks(A) == {3: None}
    gap = applied(index, batch(A, 2, stored(4), epoch=3))
    assert gap is not None
    assert gap.missed == (0, 1)
    assert applied(index, batch(A, 2, Resync("restart", 0, 1), stored(5), epoch=4)) is None
    assert index.blocks(A) == {5: None}


def test_epoch_going_back_is_a_gap() -> None:
    """An epoch lower than the last one applied is reported and the worker emptied."""
    index = KvIndex()
    applied(index, batch(A, 0, stored(1), epoch=3))
    gap = applied(index, batch(A, 9, stored(2), epoch=1))
    assert gap is not None
    assert gap.epoch_back
    assert gap.missed is None
    assert "epoch went back" in gap.describe()
    assert index.blocks(A) == {2: None}


def test_removes_of_unheld_blocks_are_counted() -> None:
    """Removing blocks the index never saw stored is harmless and counted."""
    index = KvIndex()
    applied(index, batch(A, 0, stored(1), removed(1, 2), removed(3, medium="CPU")))
    assert index.status(A).unmatched_removes == 2


def test_status_keeps_last_timestamps() -> None:
    """The status carries the last batch's vLLM and relay timestamps and the totals."""
    index = KvIndex()
    applied(index, batch(A, 0, stored(1), stored(2, parent=1)))
    status = index.status(A)
    assert (status.epoch, status.seq, status.batches, status.events) == (0, 0, 1, 2)
    assert (status.last_ts, status.last_relay_ts) == (1.0, 2.0)


# -- snapshots ---------------------------------------------------------------------------------


def test_snapshot_is_canonical_chains() -> None:
    """Blocks are written as chains (one hash per block, parents implied), in an order that
    does not depend on the order they were stored in (without token keys, which do)."""
    stores: list[Any] = [stored(1, 2, 3, keyed=False), stored(4, 5, parent=2, keyed=False),
                         stored(9, parent=99, keyed=False),
                         stored(b"\x01" * 32, parent=3, keyed=False),
                         stored(6, parent=2, keyed=False)]
    encodings = set()
    for seed in range(5):
        order = stores[:]
        random.Random(seed).shuffle(order)
        index = KvIndex()
        for seq, event in enumerate(order):
            applied(index, batch(A, seq, event), stream_seq=10 + seq)
        encodings.add(encode_snapshot(index.snapshot(A)))
        snapshot = index.snapshot(A)
    assert len(encodings) == 1
    assert snapshot.tiers == [TierSnapshot("GPU", 0, [
        [None, 1, 2, 3, b"\x01" * 32], [2, 4, 5], [2, 6], [99, 9]])]
    assert snapshot.stream_seq == 14


def test_parent_cycle_survives_snapshot() -> None:
    """Parent links that form a cycle (inconsistent input) still snapshot every block."""
    index = KvIndex()
    applied(index, batch(A, 0, stored(1, parent=2), stored(2, parent=1)))
    restored = KvIndex()
    restored.restore(decode_snapshot(encode_snapshot(index.snapshot(A))))
    assert restored.blocks(A) == {1: 2, 2: 1}


def test_restored_worker_skips_what_its_snapshot_covers() -> None:
    """After restore, messages at or below the snapshot's stream sequence are skipped and the
    next batch continues the sequence checks from the snapshot's (epoch, seq)."""
    index = KvIndex()
    applied(index, batch(A, 0, stored(1, 2)), stream_seq=1)
    applied(index, batch(B, 0, stored(1)), stream_seq=2)
    applied(index, batch(A, 1, stored(3, parent=2)), stream_seq=3)
    snapshots = [encode_snapshot(index.snapshot(w)) for w in index.workers()]
    later = KvIndex()
    for data in snapshots:
        later.restore(decode_snapshot(data))
    assert later.apply(batch(A, 1, stored(3, parent=2)), 3) == (Outcome.COVERED, None)
    assert applied(later, batch(A, 2, removed(1)), 4) is None
    assert applied(later, batch(B, 1, stored(2, parent=1)), 5) is None
    assert later.overlap([1, 2, 3]) == {B: 2}
    assert later.blocks(A) == {2: 1, 3: 2}
    assert later.status(A).exact is True
    assert later.snapshot(A).stream_seq == 5


@pytest.mark.parametrize("data", [
    b"\xc1",
    msgspec.msgpack.encode({"v": 1}),
    msgspec.msgpack.encode(["not", "a", "snapshot"]),
], ids=["not-msgpack", "missing-fields", "wrong-shape"])
def test_decode_snapshot_rejects_garbage(data: bytes) -> None:
    """Bytes that are not a worker snapshot are a ValueError, not a crash later."""
    with pytest.raises(ValueError, match="not a worker snapshot"):
        decode_snapshot(data)


def test_restore_rejects_malformed_chains() -> None:
    """A chain with no block or a None block is refused before the index changes."""
    index = KvIndex()
    applied(index, batch(A, 0, stored(1)))
    malformed: list[list[list[BlockHash | None]]] = [[[None]], [[None, 1, None]]]
    for chains in malformed:
        bad = WorkerSnapshot(instance_id=A[0], dp_rank=A[1], epoch=0, seq=0, stream_seq=1,
                             exact=True, tiers=[TierSnapshot("GPU", 0, chains)])
        with pytest.raises(ValueError, match="malformed snapshot"):
            index.restore(bad)
    assert index.blocks(A) == {1: None}


def test_index_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """The index benchmark runs at a small size and reports what it built and measured."""
    from bench.index_bench import main

    main(["--workers", "3", "--blocks", "64", "--chain", "8", "--queries", "50"])
    out = capsys.readouterr().out
    # 6 own blocks per 8-block chain, 2 shared by all: 48 own + 2 shared per worker.
    assert "held (worker, block) pairs 150, distinct blocks 146" in out
    for figure in ("events/s", "batches/s", "p50", "bytes per held"):
        assert figure in out
