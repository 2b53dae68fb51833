"""Token keys and scoring by token ids: the key function against its written definition and
golden vectors, and `KvIndex.overlap_tokens` against a model that compares token prefixes.

The model knows nothing of hashes: a worker holds a block when it holds the exact token prefix
ending with it, under the same adapter and extra keys, which is what vLLM's prefix cache reuses.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path
from typing import Any

import msgspec
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from kvrelay.router.index import KvIndex, WorkerKey, decode_snapshot, encode_snapshot
from kvrelay.wire.schema import BlockHash, Cleared, RelayBatch, RelayEvent, Removed, Resync, Stored
from kvrelay.wire.tokenkey import block_keys, root_key

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"
A: WorkerKey = (5, 0)
B: WorkerKey = (6, 0)
BS = 4


def spec_keys(tokens: list[int], size: int, lora: str | None, salt: str | None,
              extras: list[Any] | None) -> list[int]:
    """The key function exactly as tokenkey.py's docstring and docs/router.md define it."""
    seed = 0 if lora is None else xxhash.xxh3_64_intdigest(lora.encode("utf-8"), seed=0)
    keys = []
    for i in range(len(tokens) // size):
        own = list(extras[i]) if extras and i < len(extras) and extras[i] else []
        if i == 0 and salt is not None:
            own.append(salt)
        if own:
            seed = xxhash.xxh3_64_intdigest(msgspec.msgpack.encode(own), seed=seed)
        data = struct.pack(f"<{size}I", *tokens[i * size:(i + 1) * size])
        seed = xxhash.xxh3_64_intdigest(data, seed=seed)
        keys.append(seed)
    return keys


def batch(worker: WorkerKey, seq: int, *events: RelayEvent) -> RelayBatch:
    return RelayBatch(instance_id=worker[0], dp_rank=worker[1], epoch=0, seq=seq, ts=1.0,
                      relay_ts=1.0, events=list(events))


class Engine:
    """A worker as vLLM reports it: stores a request's whole blocks with engine-private hashes
    (random, as with xxhash's per-process seed), parents chained, extra keys per block."""

    def __init__(self, worker: WorkerKey, size: int = BS) -> None:
        self.worker, self.size, self.seq = worker, size, 0
        self.hashes: dict[tuple[Any, ...], int] = {}  # (lora, salt, prefix tokens) -> hash
        self.rng = random.Random(hash(worker))

    def store(self, tokens: list[int], *, lora: str | None = None, salt: str | None = None,
              blocks: int | None = None) -> RelayBatch:
        count = len(tokens) // self.size if blocks is None else blocks
        hashes: list[BlockHash] = [
            self.hashes.setdefault((lora, salt, tuple(tokens[:(i + 1) * self.size])),
                                   self.rng.getrandbits(64)) for i in range(count)]
        extras: list[Any] = [[lora] if lora else None for _ in range(count)]
        if salt is not None and count:
            extras[0] = [*(extras[0] or []), salt]
        event = Stored(hashes, None, tokens[:count * self.size], self.size, lora_name=lora,
                       extra_keys=extras if any(extras) else None)
        return self.emit(event)

    def hash_of(self, tokens: list[int], blocks: int, lora: str | None = None,
                salt: str | None = None) -> int:
        return self.hashes[(lora, salt, tuple(tokens[:blocks * self.size]))]

    def emit(self, *events: RelayEvent) -> RelayBatch:
        self.seq += 1
        return batch(self.worker, self.seq - 1, *events)


# -- the key function --------------------------------------------------------------------------


def test_golden_vectors_follow_the_definition() -> None:
    """schemas/token-keys.json holds keys that the written definition reproduces."""
    rows = json.loads((SCHEMAS / "token-keys.json").read_text())
    assert len(rows) >= 7
    for row in rows:
        expected = spec_keys(row["token_ids"], row["block_size"], row["lora_name"],
                             row["cache_salt"], row["extra_keys"])
        assert row["keys"] == expected, row["what"]
        assert row["root"] == root_key(row["lora_name"])
        assert len(row["keys"]) == len(row["token_ids"]) // row["block_size"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), max_size=40), st.sampled_from([1, 2, 4, 16]),
       st.none() | st.text(min_size=1, max_size=8), st.none() | st.text(max_size=8))
def test_block_keys_match_the_definition(tokens: list[int], size: int, lora: str | None,
                                         salt: str | None) -> None:
    """block_keys equals the definition for any tokens, block size, adapter and salt."""
    assert block_keys(tokens, size, lora_name=lora, cache_salt=salt) == spec_keys(
        tokens, size, lora, salt, None)


def test_block_keys_rejects_bad_input() -> None:
    """A block size below 1 and a token id outside uint32 are refused with a clear error."""
    with pytest.raises(ValueError, match="block_size"):
        block_keys([1, 2], 0)
    with pytest.raises(OverflowError):
        block_keys([2**32], 1)


# -- scoring by token ids ----------------------------------------------------------------------


def test_overlap_tokens_counts_leading_reusable_blocks() -> None:
    """A worker scores the leading whole blocks it holds, never the one with the last token."""
    index, engine = KvIndex(), Engine(A)
    prompt = list(range(100, 112))  # 3 blocks
    index.apply(engine.store(prompt))
    assert index.overlap_tokens([*prompt, 1]) == {A: 3}
    assert index.overlap_tokens(prompt) == {A: 2}  # the third holds the last token
    assert index.overlap_tokens(prompt[:9]) == {A: 2}
    assert index.overlap_tokens([*prompt[:5], 0, 0, 0, 0, 0]) == {A: 1}
    assert index.overlap_tokens([7, *prompt]) == {}
    assert index.overlap_tokens(prompt[:4]) == {}
    assert index.overlap_tokens([]) == {}


def test_packed_token_ids_score_the_same() -> None:
    """Token ids packed as uint32 little-endian score exactly as the list of them; a length
    that is not a multiple of 4 is refused."""
    index, engine = KvIndex(), Engine(A)
    prompt = list(range(100, 112))
    index.apply(engine.store(prompt))
    for tokens in ([*prompt, 1], prompt, prompt[:5], [7, *prompt], []):
        packed = struct.pack(f"<{len(tokens)}I", *tokens)
        assert index.overlap_tokens(packed) == index.overlap_tokens(tokens)
    assert index.overlap_tokens(struct.pack("<13I", *prompt, 1)) == {A: 3}
    with pytest.raises(ValueError, match="4 bytes"):
        index.overlap_tokens(b"\x01\x02\x03")


def test_overlap_tokens_separates_adapters_and_salts() -> None:
    """Blocks stored under a LoRA adapter or a cache salt match only requests with the same."""
    index, engine = KvIndex(), Engine(A)
    plain, lora, salted = list(range(12)), list(range(20, 32)), list(range(40, 52))
    for b in (engine.store(plain), engine.store(lora, lora="sql"),
              engine.store(salted, salt="tenant-a"), engine.store(lora, lora="sql", salt="s")):
        index.apply(b)
    probe = [*plain, 0]
    assert index.overlap_tokens(probe) == {A: 3}
    assert index.overlap_tokens(probe, lora_name="sql") == {}
    assert index.overlap_tokens(probe, cache_salt="tenant-a") == {}
    assert index.overlap_tokens([*lora, 0]) == {}
    assert index.overlap_tokens([*lora, 0], lora_name="sql") == {A: 3}
    assert index.overlap_tokens([*lora, 0], lora_name="sql", cache_salt="s") == {A: 3}
    assert index.overlap_tokens([*lora, 0], lora_name="other") == {}
    assert index.overlap_tokens([*salted, 0]) == {}
    assert index.overlap_tokens([*salted, 0], cache_salt="tenant-b") == {}
    assert index.overlap_tokens([*salted, 0], cache_salt="tenant-a") == {A: 3}


def test_adapter_known_by_id_only() -> None:
    """An event naming its adapter by id only (vLLM before 0.14) is keyed by the decimal id."""
    index = KvIndex()
    index.apply(batch(A, 0, Stored([1], None, [1, 2, 3, 4], 4, lora_id=3)))
    assert index.overlap_tokens([1, 2, 3, 4, 5], lora_name="3") == {A: 1}
    assert index.overlap_tokens([1, 2, 3, 4, 5]) == {}


def test_blocks_after_an_unknown_parent_are_unkeyed_and_counted() -> None:
    """A block whose parent the worker does not hold gets no key (vLLM cannot reach it), nor
    do its children, and one whose token ids do not fill it; each is counted."""
    index = KvIndex()
    index.apply(batch(A, 0, Stored([10, 11], 99, list(range(8)), 4),
                      Stored([12], 11, list(range(8, 12)), 4),
                      Stored([13], None, [1, 2, 3], 4)))
    assert index.status(A).unkeyed_blocks == 4
    assert index.keys(A) == {}
    assert index.blocks(A) == {10: 99, 11: 10, 12: 11, 13: None}


def test_continuation_chains_from_the_parent_key() -> None:
    """A later event continuing a request (parent set) gets the keys the whole prompt gives."""
    index = KvIndex()
    tokens = list(range(16))
    index.apply(batch(A, 0, Stored([1, 2], None, tokens[:8], 4)))
    index.apply(batch(A, 1, Stored([3, 4], 2, tokens[8:], 4)))
    assert list(index.keys(A).values()) == block_keys(tokens, 4)
    assert index.overlap_tokens([*tokens, 99]) == {A: 4}


def test_removal_clear_and_resync_release_keys() -> None:
    """Evicted blocks stop matching; `cleared` and `resync` empty the worker's keys."""
    index, a, b = KvIndex(), Engine(A), Engine(B)
    prompt = list(range(12))
    index.apply(a.store(prompt))
    index.apply(b.store(prompt))
    assert index.overlap_tokens([*prompt, 0]) == {A: 3, B: 3}
    index.apply(a.emit(Removed([a.hash_of(prompt, 3)])))
    assert index.overlap_tokens([*prompt, 0]) == {A: 2, B: 3}
    index.apply(a.emit(Removed([a.hash_of(prompt, 1)])))  # the rest is unreachable
    assert index.overlap_tokens([*prompt, 0]) == {B: 3}
    index.apply(b.emit(Cleared()))
    assert index.overlap_tokens([*prompt, 0]) == {}
    index.apply(b.store(prompt))
    index.apply(b.emit(Resync("overflow")))
    assert index.overlap_tokens([*prompt, 0]) == {}


def test_one_key_under_two_hashes_never_overclaims() -> None:
    """A worker holding the same tokens under two engine hashes (two KV cache pools reporting
    one tier) loses the key with the first removal instead of keeping a stale claim."""
    index = KvIndex()
    index.apply(batch(A, 0, Stored([1], None, [5, 6, 7, 8], 4), Stored([2], None, [5, 6, 7, 8], 4)))
    assert index.overlap_tokens([5, 6, 7, 8, 9]) == {A: 1}
    index.apply(batch(A, 1, Removed([1])))
    index.apply(batch(A, 2, Removed([2])))
    assert index.overlap_tokens([5, 6, 7, 8, 9]) == {}


def test_several_block_sizes_score_each_worker_at_its_own() -> None:
    """Workers with different block sizes are each scored in their own blocks."""
    index, a, b = KvIndex(), Engine(A, size=4), Engine(B, size=8)
    prompt = list(range(17))
    index.apply(a.store(prompt))
    index.apply(b.store(prompt))
    assert index.overlap_tokens(prompt) == {A: 4, B: 2}


# -- snapshots carry the keys ------------------------------------------------------------------


def test_snapshot_keeps_keys_for_late_routers() -> None:
    """A router restoring a relay's snapshot scores as the full stream would, and keys blocks
    stored after it from the snapshot's keys."""
    relay, engine = KvIndex(queries=False), Engine(A)
    prompt = list(range(12))
    relay.apply(engine.store(prompt), stream_seq=1)
    snapshot = decode_snapshot(encode_snapshot(relay.snapshot(A)))
    assert snapshot.tiers[0].keys == [block_keys(prompt, BS)]
    router = KvIndex()
    router.restore(snapshot)
    assert router.overlap_tokens([*prompt, 0]) == {A: 3}
    more = [*prompt, 50, 51, 52, 53]
    follow = Stored([engine.rng.getrandbits(64)], engine.hash_of(prompt, 3), more[12:], BS)
    router.apply(engine.emit(follow), stream_seq=2)
    assert router.overlap_tokens([*more, 0]) == {A: 4}


def test_snapshot_without_keys_still_restores() -> None:
    """A snapshot written before keys existed restores its blocks, unkeyed."""
    relay, engine = KvIndex(queries=False), Engine(A)
    relay.apply(engine.store(list(range(8))), stream_seq=1)
    old = relay.snapshot(A)
    for tier in old.tiers:
        tier.keys = []
    data = msgspec.msgpack.encode(old)
    router = KvIndex()
    router.restore(decode_snapshot(data))
    assert len(router.blocks(A)) == 2
    assert router.overlap_tokens(list(range(9))) == {}


def test_snapshot_with_mismatched_keys_is_refused() -> None:
    """Keys that do not line up with the chains make the snapshot malformed, not misread."""
    relay, engine = KvIndex(queries=False), Engine(A)
    relay.apply(engine.store(list(range(8))), stream_seq=1)
    snapshot = relay.snapshot(A)
    snapshot.tiers[0].keys = [[1]]
    with pytest.raises(ValueError, match="keys"):
        KvIndex().restore(snapshot)


# -- against a model of vLLM's prefix cache ----------------------------------------------------

LORAS = st.sampled_from([None, None, "a"])
SALTS = st.sampled_from([None, None, "s"])
PROMPTS = st.lists(st.integers(0, 3), min_size=1, max_size=14)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([A, B]), PROMPTS, LORAS, SALTS,
                          st.integers(0, 3)), max_size=12),
       st.lists(st.tuples(PROMPTS, LORAS, SALTS), min_size=1, max_size=6))
def test_overlap_tokens_matches_prefix_model(
        script: list[tuple[WorkerKey, list[int], str | None, str | None, int]],
        queries: list[tuple[list[int], str | None, str | None]]) -> None:
    """Stores and evictions of the tail blocks of requests on two workers: every query scores
    each worker by the leading blocks whose exact token prefix (with adapter and salt) it
    still holds."""
    index = KvIndex()
    engines = {A: Engine(A, size=2), B: Engine(B, size=2)}
    held: dict[WorkerKey, set[tuple[Any, ...]]] = {A: set(), B: set()}
    for worker, tokens, lora, salt, evict in script:
        engine = engines[worker]
        count = len(tokens) // 2
        index.apply(engine.store(tokens, lora=lora, salt=salt))
        prefixes = [(lora, salt, tuple(tokens[:(i + 1) * 2])) for i in range(count)]
        held[worker].update(prefixes)
        gone = prefixes[count - min(evict, count):]
        if gone:
            index.apply(engine.emit(Removed([engine.hashes[p] for p in gone])))
            held[worker].difference_update(gone)
    for tokens, lora, salt in queries:
        expected = {}
        for worker in (A, B):
            depth = 0
            while depth < (len(tokens) - 1) // 2 and (
                    lora, salt, tuple(tokens[:(depth + 1) * 2])) in held[worker]:
                depth += 1
            if depth:
                expected[worker] = depth
        assert index.overlap_tokens(tokens, lora_name=lora, cache_salt=salt) == expected
