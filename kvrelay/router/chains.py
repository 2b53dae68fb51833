"""Worker snapshots of a KvIndex: a tier's blocks as canonical chains, and their msgpack.

A chain is `[parent_of_first, h1, h2, ...]`, each hash's parent the one before it; the same
blocks always give the same chains in the same order, so the same state encodes to the same
bytes. Each chain's blocks carry their token keys (kvrelay/wire/tokenkey.py) beside them.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from typing import Final

import msgspec

from kvrelay.wire.schema import BlockHash, TierSnapshot, WorkerSnapshot

Tier = tuple[str, int]
"""(medium, group_idx)"""
Blocks = dict[BlockHash, BlockHash | None]
"""A tier's blocks, each with its parent hash."""
Keys = dict[BlockHash, int]
"""A tier's blocks that have a token key, with it."""


def tier_snapshots(tiers: dict[Tier, Blocks], keys: dict[Tier, Keys],
                   sizes: dict[Tier, set[int]]) -> list[TierSnapshot]:
    """Every tier holding blocks, in order, its blocks as canonical chains, their keys and
    the keyed blocks' sizes."""
    out: list[TierSnapshot] = []
    for tier, blocks in sorted(tiers.items()):
        if not blocks:
            continue
        chains = canonical_chains(blocks)
        held = keys.get(tier)
        if held:
            chain_keys = [[held.get(b) for b in chain[1:]] for chain in chains]  # type: ignore[arg-type]
            out.append(TierSnapshot(tier[0], tier[1], chains, chain_keys,
                                    sorted(sizes.get(tier, ()))))
        else:
            out.append(TierSnapshot(tier[0], tier[1], chains))
    return out


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


def canonical_chains(blocks: dict[BlockHash, BlockHash | None]) -> list[list[BlockHash | None]]:
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


def check_snapshot(snapshot: WorkerSnapshot) -> None:
    """ValueError unless every chain has blocks, none of them None, and the keys (when there
    are keys) match the chains block for block."""
    for tier in snapshot.tiers:
        chains = tier.chains
        if any(len(c) < 2 or any(h is None for h in islice(c, 1, None)) for c in chains):
            raise ValueError("malformed snapshot: a chain without blocks or a None block")
        if tier.keys and (len(tier.keys) != len(chains) or any(
                len(k) != len(c) - 1 for k, c in zip(tier.keys, chains, strict=True))):
            raise ValueError("malformed snapshot: keys do not match the chains")


def encode_snapshot(snapshot: WorkerSnapshot) -> bytes:
    """Msgpack of a worker snapshot; the same state gives the same bytes."""
    return _SNAPSHOT_ENCODER.encode(snapshot)


def decode_snapshot(data: bytes) -> WorkerSnapshot:
    """A worker snapshot from `encode_snapshot`; ValueError if the bytes are not one."""
    try:
        return _SNAPSHOT_DECODER.decode(data)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a worker snapshot: {exc}") from None
