"""The walks a KvIndex query makes down a request's blocks, over the holder tables.

A walk keeps the mask of the workers still holding every block so far (`alive`); where a block
is held by fewer, those that dropped out score the depth reached. Scores go into `scores` by
worker, a worker keeping its higher score (a query at several block sizes walks once per size).
`slots[i]` is the worker whose bit is `1 << i`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from kvrelay.router.packed import KeyHolders
from kvrelay.router.worker import WorkerKey
from kvrelay.wire.tokenkey import ExtraKeys, extra_seed, xxh3

Scores = dict[WorkerKey, int]


def walk_tokens(data: bytes, step: int, usable: int, seed: int,
                extras: list[ExtraKeys] | None, holders: KeyHolders,
                slots: list[WorkerKey | None], scores: Scores) -> None:
    """Walk the token keys of `data`'s first `usable` blocks of `step` bytes, chained from
    `seed`, each hashed only when the walk gets there (the steps of tokenkey.iter_keys and of
    KeyHolders.get, inline: this is a router's hot path)."""
    keys, masks, mask = holders.arrays
    alive = -1  # every worker, until the first block
    depth = 0
    for i in range(usable):
        if extras is not None:
            extra = extras[i]
            if extra:
                seed = extra_seed(extra, seed)
        start = i * step
        seed = xxh3(data[start:start + step], seed)
        slot = seed & mask
        held = masks[slot]
        while held and keys[slot] != seed:
            slot = (slot + 1) & mask
            held = masks[slot]
        if depth:
            held &= alive
        if held != alive and depth:
            score(alive ^ held, depth, slots, scores)
        if not held:
            return
        alive = held
        depth += 1
    score(alive, depth, slots, scores)


def walk_hashes(hashes: Iterator[Any], holders: dict[Any, int], slots: list[WorkerKey | None],
                scores: Scores) -> None:
    """Walk a request's vLLM block hashes over the per-hash masks."""
    first = next(hashes, None)
    alive = holders.get(first, 0) if first is not None else 0
    depth = 1
    get = holders.get
    for block in hashes:
        if not alive:
            return
        held = alive & get(block, 0)
        if held != alive:
            score(alive ^ held, depth, slots, scores)
            alive = held
        depth += 1
    score(alive, depth, slots, scores)


def score(mask: int, depth: int, slots: list[WorkerKey | None], scores: Scores) -> None:
    """Each worker in `mask` scores `depth`, unless it has more already."""
    while mask:
        low = mask & -mask
        worker = slots[low.bit_length() - 1]
        assert worker is not None
        if scores.get(worker, 0) < depth:
            scores[worker] = depth
        mask ^= low
