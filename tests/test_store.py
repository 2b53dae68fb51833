"""A KvIndex's block stores and key table: the packed BlockTable and KeyHolders, and DictBlocks.

Hypothesis drives each store through puts, pops and lookups against a plain dict model, with
the hashes that stress the packed form: zero, its empty-slot mark; signed and unsigned hashes
in one table, of which it packs the sign it met first; bytes and ints outside 64 bits, which it
keeps beside; a block its own parent; keys of zero; hashes that share a home slot, which probe,
shift back on removal and survive growth.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvrelay.router.packed import M64, BlockTable, KeyHolders
from kvrelay.router.store import KEYED, NEW, BlockStore, DictBlocks

STORES = [BlockTable, DictBlocks]
HASHES = st.one_of(
    st.integers(0, 40),  # small and sequential: one probe run
    st.sampled_from([11 * k for k in range(1, 30)]),  # one home slot in the first size (11)
    st.integers(0, M64),
    st.integers(-(1 << 63), -1),  # signed hashes (vLLM <= 0.10.1, SGLang)
    st.sampled_from([-1, 1 << 63, M64, M64 + 1, -(1 << 63) - 1, 1 << 70]),
    st.binary(min_size=1, max_size=4),  # vLLM's older bytes hashes
)
KEYS = st.one_of(st.none(), st.just(0), st.integers(0, M64))
OPS = st.lists(st.tuples(st.sampled_from(["put", "pop", "look"]), HASHES,
                         st.one_of(st.none(), HASHES), KEYS), max_size=300)


def _check(store: BlockStore, model: dict[Any, tuple[Any, int | None]]) -> None:
    assert len(store) == len(model)
    assert {b: (p, k) for b, p, k in store.items()} == model
    assert sorted(map(repr, store)) == sorted(map(repr, model))
    assert store.keyed == sum(1 for _, k in model.values() if k is not None)
    assert store.parents() == {b: p for b, (p, _) in model.items()}
    assert store.keys() == {b: k for b, (_, k) in model.items() if k is not None}


@pytest.mark.parametrize("kind", STORES)
@settings(max_examples=300, deadline=None)
@given(ops=OPS)
def test_store_matches_a_dict(kind: type[BlockStore], ops: list[Any]) -> None:
    """Every put says what changed (NEW, KEYED), keeps a held block's key and replaces its
    parent; pop says whether the block was held and gives its key; after each step the store
    holds exactly what a dict would, and so does its copy."""
    store = kind()
    model: dict[Any, tuple[Any, int | None]] = {}
    for op, block, parent, key in ops:
        if op == "put":
            old = model.get(block)
            kept = old[1] if old is not None else None
            expected = (NEW if old is None else 0) | (
                KEYED if kept is None and key is not None else 0)
            model[block] = (parent, kept if kept is not None else key)
            assert store.put(block, parent, key) == expected
        elif op == "pop":
            held = model.pop(block, None)
            assert store.pop(block) == ((True, held[1]) if held else (False, None))
        else:
            assert (block in store) == (block in model)
            assert store.key(block) == (model[block][1] if block in model else None)
    _check(store, model)
    copy = store.copy()
    _check(copy, model)
    if model:  # the copy is its own
        block = next(iter(model))
        copy.pop(block)
        _check(store, model)


def test_table_grows_and_shrinks_back_to_empty() -> None:
    """Ten thousand blocks in one chain go in (the table grows many times), each is found with
    its parent and key, and popping them all leaves an empty table that still takes blocks."""
    table = BlockTable()
    blocks = [(i * 0x9E3779B97F4A7C15) & M64 or 1 for i in range(1, 10_001)]
    parent = None
    for i, block in enumerate(blocks):
        assert table.put(block, parent, i + 1) == NEW | KEYED
        parent = block
    assert len(table) == table.keyed == 10_000
    parents = table.parents()
    assert parents[blocks[0]] is None
    assert parents[blocks[-1]] == blocks[-2]
    assert [table.key(b) for b in blocks] == list(range(1, 10_001))
    for i, block in enumerate(reversed(blocks)):
        assert table.pop(block) == (True, 10_000 - i)
    assert len(table) == table.keyed == 0
    assert list(table.items()) == []
    assert table.put(5, None, None) == NEW
    assert 5 in table


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.one_of(st.integers(0, 64), st.integers(0, M64)),
                          st.integers(0, 4)), max_size=400))
def test_key_holders_match_a_dict(ops: list[tuple[bool, int, int]]) -> None:
    """hold and unhold move a worker's bit on a key exactly as on a dict of masks; a key no
    worker holds is gone, and get answers 0 for it, however its probe run was shifted."""
    holders = KeyHolders()
    model: dict[int, int] = {}
    for hold, key, slot in ops:
        bit = 1 << slot
        if hold:
            holders.hold(key, bit)
            model[key] = model.get(key, 0) | bit
        else:
            holders.unhold(key, bit)
            rest = model.get(key, 0) & ~bit
            if rest:
                model[key] = rest
            else:
                model.pop(key, None)
        assert holders.get(key) == model.get(key, 0)
    assert dict(holders.items()) == model
    assert len(holders) == len(model)
    assert all(holders.get(key) == model.get(key, 0) for _, key, _ in ops)


def test_a_single_holder_shares_the_worker_bit() -> None:
    """A key held by one worker keeps that worker's own bit object: no int per key."""
    holders = KeyHolders()
    bit = 1 << 90
    for key in range(1, 1000):
        holders.hold(key * 7919, bit)
    assert all(mask is bit for _, mask in holders.items())


def test_packed_table_costs_a_third_of_the_dicts() -> None:
    """Allocated bytes per block, 64-bit hashes and keys as vLLM 0.32 sends them: BlockTable
    with its KeyHolders share under 70, against over 150 for the dicts it replaces."""
    import random

    rng = random.Random(1)
    pairs = [(rng.getrandbits(64), rng.getrandbits(64)) for _ in range(50_000)]

    def traced(kind: type[BlockStore]) -> float:
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            store = kind()
            holders: KeyHolders | dict[int, int] = KeyHolders() if kind is BlockTable else {}
            parent: int | None = None
            for block, key in pairs:
                store.put(block, parent, key)
                if isinstance(holders, KeyHolders):
                    holders.hold(key, 1)
                else:
                    holders[key] = 1
                parent = block
            return (tracemalloc.get_traced_memory()[0] - before) / len(pairs)
        finally:
            tracemalloc.stop()

    packed, dicts = traced(BlockTable), traced(DictBlocks)
    assert packed < 70, packed
    assert dicts > 150, dicts


@pytest.mark.parametrize("sign", [1, -1])
def test_signed_hashes_pack_as_well_as_unsigned(sign: int) -> None:
    """A worker whose engine sends signed hashes (vLLM <= 0.10.1, SGLang) gets them packed
    too, and back with their sign: none is kept in the dict beside."""
    import random

    rng = random.Random(2)
    table = BlockTable()
    blocks = [sign * rng.randrange(1 << 62, 1 << 63) for _ in range(1000)]
    parent = None
    for block in blocks:
        table.put(block, parent, rng.getrandbits(64) or 1)
        parent = block
    assert not table._odd
    assert set(table) == set(blocks)
    assert table.parents()[blocks[1]] == blocks[0]
