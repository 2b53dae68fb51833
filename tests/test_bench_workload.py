"""The benchmark's workload: what the synthetic vLLM publishers send, decoded and replayed."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest

from bench.workload import (
    CLEARED,
    Pool,
    WorkloadSpec,
    build_pool,
    build_pools,
    fingerprint,
    ts_field,
)
from kvrelay.codec import Codec
from kvrelay.wire.schema import Cleared, Removed, Stored


def test_pooled_batch_is_a_vllm_batch_carrying_the_send_timestamp() -> None:
    """A pooled batch with a spliced-in ts decodes as vLLM's array batch with that ts."""
    pool = build_pool(WorkloadSpec(pool_batches=50), publisher=3, dp_rank=1)
    for i in (0, 17, 49, 50 + 17):
        raw = msgspec.msgpack.decode(pool.payload(i, ts_field(1_700_000_123.25)))
        assert raw[0] == 1_700_000_123.25
        assert raw[2] == 1
        assert [fingerprint(e) for e in raw[1]] == pool.fingerprints[i % 50]
        decoded = Codec().decode(pool.payload(i, ts_field(5.5)))
        assert decoded.ts == 5.5
        assert all(isinstance(e, Stored | Removed | Cleared) for e in decoded.events)


def test_pool_cycle_stores_each_block_once_and_removes_it_at_most_once() -> None:
    """Each cycle starts empty and ends with a clear, so reference-counting relays pass all."""
    pool = build_pool(WorkloadSpec(pool_batches=400, blocks_min=1, blocks_max=64,
                                   clear_probability=0.01, capacity=256), 0, 0)
    stored: set[Any] = set()
    removed: set[Any] = set()
    for i in range(len(pool)):
        for event in msgspec.msgpack.decode(pool.payload(i, ts_field(0.0)))[1]:
            if event["type"] == "BlockStored":
                assert 1 <= len(event["block_hashes"]) <= 64
                assert len(event["token_ids"]) == 16 * len(event["block_hashes"])
                assert not stored & set(event["block_hashes"])
                stored |= set(event["block_hashes"])
            elif event["type"] == "BlockRemoved":
                assert set(event["block_hashes"]) <= stored - removed
                removed |= set(event["block_hashes"])
            else:
                stored.clear()
                removed.clear()
    assert pool.fingerprints[-1] == [(CLEARED, None)]


def test_legacy_array_events_are_fingerprinted_like_map_events() -> None:
    """The same seed gives the same events whether encoded as maps or legacy arrays."""
    as_map = build_pool(WorkloadSpec(pool_batches=30, event_form="map"), 0, 0)
    as_array = build_pool(WorkloadSpec(pool_batches=30, event_form="array"), 0, 0)
    assert as_map.fingerprints == as_array.fingerprints
    first = msgspec.msgpack.decode(as_array.payload(0, ts_field(0.0)))[1][0]
    assert first[0] == "BlockStored"


def _replay(pool: Pool, batches: int) -> list[dict[Any, None]]:
    """Apply what a publisher sends as seq 0.. to a cache, as vLLM's would be: the live blocks
    (oldest first) after each batch. Fails on a store of a live block or a removal of a dead
    one, the two things a cache that counts references cannot take."""
    live: dict[Any, None] = {}
    after = []
    for seq in range(batches):
        for event in msgspec.msgpack.decode(pool.payload(seq, ts_field(0.0)))[1]:
            hashes = event["block_hashes"]
            if event["type"] == "BlockStored":
                assert len(event["token_ids"]) == 16 * len(hashes)
                assert event["parent_block_hash"] == (next(reversed(live)) if live else None)
                assert not live.keys() & set(hashes), seq
                live.update(dict.fromkeys(hashes))
            else:
                assert event["type"] == "BlockRemoved"
                assert hashes == list(live)[:len(hashes)], seq  # the oldest
                for h in hashes:
                    del live[h]
        after.append(dict(live))
    return after


def test_live_blocks_hold_n_blocks_from_the_prefill_on_across_cycles() -> None:
    """With --live-blocks N a worker's ranks hold N blocks after the pre-fill, and keep N through
    cycles of 4 stores and 4 removals of the oldest, the same tokens for a block each time."""
    spec = WorkloadSpec(live_blocks=1001, pool_batches=2, prefill_blocks=64)
    pools = build_pools(spec, workers=1, dp_ranks=2)
    shares = []
    for pool in pools:
        after = _replay(pool, pool.prefix + 2 * pool.cycle + 7)
        share = len(after[pool.prefix - 1])
        shares.append(share)
        assert pool.prefix == math.ceil(share / 64)  # the pre-fill: 64 blocks per batch
        assert all(len(live) == share for live in after[pool.prefix - 1:])
        assert after[pool.prefix - 1] == after[pool.prefix + pool.cycle - 1]
        stored = [e for seq in range(pool.prefix, pool.prefix + 2 * pool.cycle)
                  for e in msgspec.msgpack.decode(pool.payload(seq, ts_field(0.0)))[1]
                  if e["type"] == "BlockStored"]
        assert {len(e["block_hashes"]) for e in stored} == {4}
        tokens: dict[int, list[int]] = {}
        for e in stored:
            assert tokens.setdefault(e["block_hashes"][0], e["token_ids"][:16]) == \
                e["token_ids"][:16]
    assert sorted(shares) == [500, 501]


def test_workload_spec_rejects_impossible_mixes() -> None:
    """Block ranges and probabilities outside their domain are refused with a reason."""
    with pytest.raises(ValueError, match="blocks"):
        WorkloadSpec(blocks_min=5, blocks_max=4)
    with pytest.raises(ValueError, match="remove_probability"):
        WorkloadSpec(remove_probability=1.5)
    with pytest.raises(ValueError, match="fixed number of blocks"):
        WorkloadSpec(live_blocks=1000, blocks_min=2, blocks_max=6)
