"""Snapshots built in a forked child: the same bytes, the index as at the fork, failures and
cancellation handled, the child always reaped."""

from __future__ import annotations

import asyncio
import os
import random
import time

import pytest

from kvrelay.jetstream.snapshot import _framed
from kvrelay.router import forked
from kvrelay.router.index import KvIndex, decode_snapshot, encode_snapshot
from kvrelay.wire.schema import BlockHash, RelayBatch, Stored

pytestmark = pytest.mark.skipif(not forked.available(), reason="this platform cannot fork")


def filled(blocks: int, seed: int = 1) -> KvIndex:
    """A relay-side index of one worker holding `blocks` blocks in chains of varying length."""
    index = KvIndex(queries=False)
    rnd = random.Random(seed)
    parent: BlockHash | None = None
    for seq in range(blocks // 4):
        hashes: list[BlockHash] = [rnd.getrandbits(63) for _ in range(4)]
        if rnd.random() < 0.1:
            parent = None
        stored = Stored(block_hashes=hashes, parent_block_hash=parent, token_ids=[],
                        block_size=16)
        index.apply(RelayBatch(instance_id=1, dp_rank=0, epoch=0, seq=seq, ts=0.0,
                               relay_ts=0.0, events=[stored]), seq + 1)
        parent = hashes[-1]
    return index


def children() -> set[int]:
    """This process's live or unreaped children."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid():
                found.add(int(entry))
    return found


async def test_the_child_builds_the_same_snapshot_as_the_index() -> None:
    """The bytes from the child are the snapshot the index encodes in process, with its
    stream sequence in front; the child's CPU time is reported; no child is left."""
    index = filled(40_000)
    before = children()
    framed, cpu = await forked.in_child(lambda: _framed(index, (1, 0)))
    snapshot = index.snapshot((1, 0))
    assert int.from_bytes(framed[:8], "big") == snapshot.stream_seq == 10_000
    assert framed[8:] == encode_snapshot(snapshot)
    assert sum(len(c) - 1 for t in decode_snapshot(framed[8:]).tiers for c in t.chains) == 40_000
    assert cpu > 0
    assert children() == before


async def test_the_child_sees_the_index_as_it_was_at_the_fork() -> None:
    """Changes made while the child builds do not reach its snapshot."""
    index = filled(20_000)
    expected = encode_snapshot(index.snapshot((1, 0)))
    task = asyncio.ensure_future(forked.in_child(lambda: _framed(index, (1, 0))))
    await asyncio.sleep(0)  # forked by now
    index.apply(RelayBatch(instance_id=1, dp_rank=0, epoch=0, seq=5_000, ts=0.0, relay_ts=0.0,
                           events=[Stored(block_hashes=[1, 2], parent_block_hash=None,
                                          token_ids=[], block_size=16)]), 5_001)
    framed, _ = await task
    assert framed[8:] == expected
    assert encode_snapshot(index.snapshot((1, 0))) != expected


def _fails() -> bytes:
    raise ValueError("cannot build")


async def test_a_failing_build_is_reported_and_reaped() -> None:
    """A build that raises in the child makes the parent raise ChildFailed; no zombie."""
    before = children()
    with pytest.raises(forked.ChildFailed, match="exited with status 1"):
        await forked.in_child(_fails)
    assert children() == before


def _slow() -> bytes:
    time.sleep(30)
    return b"late"


async def test_a_cancelled_build_kills_and_reaps_the_child() -> None:
    """Cancelling the caller (the relay stopping) ends the child and reaps it."""
    before = children()
    task = asyncio.ensure_future(forked.in_child(_slow))
    await asyncio.sleep(0.05)
    assert children() - before  # the child is building
    task.cancel()  # the child would need 30 s more: it is killed
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=1.5)
    for _ in range(100):
        if children() == before:
            break
        await asyncio.sleep(0.02)
    assert children() == before
