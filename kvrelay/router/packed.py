"""The packed forms of a KvIndex's tables: block hashes, parents and token keys as 64-bit
integers in arrays, not as Python objects in dicts.

A dict holding a block's parent and token key costs about 170 bytes a block (the entries, the
tables' spare room, the int objects); `BlockTable` costs 24 bytes a slot, about 36 at its
average load, and `KeyHolders` 16 bytes a slot for each distinct key. Both use open addressing
with linear probing, delete by shifting back (no tombstones), and grow past 80% full.

`BlockTable`: one worker's blocks in one tier (a `BlockStore`). `KeyHolders`: each token key
with the mask of the worker slots holding it, the table a router's query walks.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from typing import Final

from kvrelay.router.store import KEYED, NEW, BlockStore
from kvrelay.wire.schema import BlockHash

M64: Final = (1 << 64) - 1
_HIGH: Final = 1 << 63
_EITHER: Final = 0  # a BlockTable's hashes so far fit both readings
_UNSIGNED: Final = 1
_SIGNED: Final = 2


def _prime_at_least(n: int) -> int:
    """The smallest prime >= n (n >= 2): a table's size, so that a hash's slot, hash % size,
    depends on all its bits."""
    while True:
        if n % 2 and all(n % d for d in range(3, int(n ** 0.5) + 1, 2)):
            return n
        n += 1


class BlockTable(BlockStore):
    """One worker's blocks in one tier: hash -> (parent hash or None, token key or None).

    A slot is three words, (hash, parent, key), in one array: a lookup reads one cache line.
    Hash 0 marks an empty slot, a parent equal to the block's own hash a block without one,
    and key 0 a block without a token key. Hashes are unsigned 64-bit ints (vLLM >= 0.10.2) or
    signed ones (older vLLM, SGLang), stored as their two's complement: the first hash outside
    0..2**63-1 sets which. A block the arrays cannot hold (bytes hashes, from vLLM's
    VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0; a sign the table did not take; a key of 0; a block
    its own parent) lives in the dict `_odd` instead. A hash's slot is `word % size`, the size
    a prime, so that it depends on all the word's bits."""

    __slots__ = ("_keyed", "_mode", "_odd", "_size", "_slots", "_used")

    def __init__(self, capacity: int = 0) -> None:
        self._alloc(_prime_at_least(max(11, capacity * 5 // 4 + 1)))
        self._used = 0
        self._keyed = 0
        self._mode = _EITHER
        self._odd: dict[BlockHash, tuple[BlockHash | None, int | None]] = {}

    def _alloc(self, size: int) -> None:
        self._slots: array[int] = array("Q", bytes(24 * size))
        self._size = size

    def __len__(self) -> int:
        return self._used + len(self._odd)

    @property
    def keyed(self) -> int:
        """How many blocks have a token key."""
        return self._keyed

    def _word(self, value: object) -> int:
        """The word `value` is stored as here; 0 when it cannot be."""
        if type(value) is not int:
            return 0
        if 0 <= value < _HIGH:
            return value
        if value < 0:
            return value & M64 if value >= -_HIGH and self._mode != _UNSIGNED else 0
        return value if value <= M64 and self._mode != _SIGNED else 0

    def _claim(self, value: object) -> int:
        """`_word`, and a value past 2**63-1 either way sets which the table holds."""
        word = self._word(value)
        if word >= _HIGH and self._mode == _EITHER:
            self._mode = _SIGNED if value < 0 else _UNSIGNED  # type: ignore[operator]
        return word

    def _value(self, word: int) -> int:
        return word - (1 << 64) if word >= _HIGH and self._mode == _SIGNED else word

    def _find(self, word: int) -> int:
        """The index in `_slots` of the slot holding `word`, or of the empty slot where it
        would go."""
        slots, end = self._slots, 3 * self._size
        i = 3 * (word % self._size)
        while True:
            held = slots[i]
            if held == word or not held:
                return i
            i += 3
            if i == end:
                i = 0

    def __contains__(self, block: object) -> bool:
        word = self._word(block)
        if word and self._slots[self._find(word)]:
            return True
        return bool(self._odd) and block in self._odd

    def key(self, block: BlockHash) -> int | None:
        """The block's token key; None when it has none or is not held."""
        word = self._word(block)
        if word:
            i = self._find(word)
            if self._slots[i]:
                return self._slots[i + 2] or None
        held = self._odd.get(block) if self._odd else None
        return held[1] if held is not None else None

    def put(self, block: BlockHash, parent: BlockHash | None, key: int | None) -> int:
        """Hold `block` under `parent` (a held block's parent is replaced, its key kept); give
        it `key` when it has none yet. NEW | KEYED: what changed."""
        word = self._claim(block)
        if not word or key == 0 or (self._odd and block in self._odd):
            return self._put_odd(block, parent, key)
        slots = self._slots
        i = self._find(word)
        up = word if parent is None else self._claim(parent)
        if not up or (up == word and parent is not None):
            return self._put_odd(block, parent, key)  # moves the block there, if held
        out = 0
        if not slots[i]:
            if (self._used + 1) * 5 > self._size * 4:
                self._grow()
                slots = self._slots
                i = self._find(word)
            slots[i] = word
            slots[i + 2] = 0
            self._used += 1
            out = NEW
        slots[i + 1] = up
        if key is not None and not slots[i + 2]:
            slots[i + 2] = key
            self._keyed += 1
            out |= KEYED
        return out

    def _put_odd(self, block: BlockHash, parent: BlockHash | None, key: int | None) -> int:
        held = self._odd.get(block)
        if held is None:
            word = self._word(block)
            i = self._find(word) if word else 0
            if word and self._slots[i]:  # held in a slot: moves here, its key kept
                self._odd[block] = (None, self._slots[i + 2] or None)
                self._used -= 1
                self._shift_back(i)
                return self._put_odd(block, parent, key)
            self._odd[block] = (parent, key)
            if key is not None:
                self._keyed += 1
                return NEW | KEYED
            return NEW
        if held[1] is None and key is not None:
            self._odd[block] = (parent, key)
            self._keyed += 1
            return KEYED
        self._odd[block] = (parent, held[1])
        return 0

    def pop(self, block: BlockHash) -> tuple[bool, int | None]:
        """Stop holding `block`: (whether it was held, its token key or None)."""
        word = self._word(block)
        if word:
            i = self._find(word)
            slots = self._slots
            if slots[i]:
                key = slots[i + 2] or None
                if key is not None:
                    self._keyed -= 1
                self._used -= 1
                self._shift_back(i)
                return True, key
        held = self._odd.pop(block, None) if self._odd else None
        if held is None:
            return False, None
        if held[1] is not None:
            self._keyed -= 1
        return True, held[1]

    def _shift_back(self, i: int) -> None:
        """Empty the slot at i, moving later slots of its probe run back into the hole."""
        slots, size = self._slots, self._size
        end = 3 * size
        j = i
        while True:
            j += 3
            if j == end:
                j = 0
            held = slots[j]
            if not held:
                break
            home = 3 * (held % size)
            if (i < j and i < home <= j) or (i > j and (home > i or home <= j)):
                continue  # its home lies between the hole and it: it stays
            slots[i:i + 3] = slots[j:j + 3]
            i = j
        slots[i] = 0

    def _grow(self) -> None:
        old = self._slots
        self._alloc(_prime_at_least(self._size * 3 // 2 + 1))
        slots, size = self._slots, self._size
        end = 3 * size
        for j in range(0, len(old), 3):
            block = old[j]
            if block:
                i = 3 * (block % size)
                while slots[i]:
                    i += 3
                    if i == end:
                        i = 0
                slots[i:i + 3] = old[j:j + 3]

    def items(self) -> Iterator[tuple[BlockHash, BlockHash | None, int | None]]:
        """(block, parent, key) of every held block, in no particular order."""
        slots, value = self._slots, self._value
        for i in range(0, len(slots), 3):
            word = slots[i]
            if word:
                parent = slots[i + 1]
                yield (value(word), None if parent == word else value(parent),
                       slots[i + 2] or None)
        for odd, (parent_, key) in self._odd.items():
            yield odd, parent_, key

    def __iter__(self) -> Iterator[BlockHash]:
        slots = self._slots
        for i in range(0, len(slots), 3):
            if slots[i]:
                yield self._value(slots[i])
        yield from self._odd

    def copy(self) -> BlockTable:
        other = BlockTable.__new__(BlockTable)
        other._slots, other._size = array("Q", self._slots), self._size
        other._used, other._keyed, other._odd = self._used, self._keyed, dict(self._odd)
        other._mode = self._mode
        return other


class KeyHolders:
    """Token key -> mask of the worker slots holding it (a key no worker holds is absent).

    A slot is empty when its mask is 0. Keys are XXH3 outputs, uniform already: a key's home
    slot is its low bits, the size a power of two. KvIndex's walk inlines `get`."""

    __slots__ = ("_keys", "_mask", "_masks", "_used")

    def __init__(self) -> None:
        self._alloc(8)
        self._used = 0

    def _alloc(self, size: int) -> None:
        self._keys: array[int] = array("Q", bytes(8 * size))
        self._masks: list[int] = [0] * size
        self._mask = size - 1

    def __len__(self) -> int:
        return self._used

    @property
    def arrays(self) -> tuple[array[int], list[int], int]:
        """(keys, masks, slot mask), for a walk that probes inline."""
        return self._keys, self._masks, self._mask

    def get(self, key: int) -> int:
        """The mask of the workers holding `key` (0: none)."""
        return self._masks[self._slot(key)]

    def _slot(self, key: int) -> int:
        keys, masks, mask = self._keys, self._masks, self._mask
        i = key & mask
        while masks[i] and keys[i] != key:
            i = (i + 1) & mask
        return i

    def hold(self, key: int, bit: int) -> None:
        """Add a worker's bit to what holds `key`; a key only this worker holds shares the
        worker's own bit object."""
        i = self._slot(key)
        others = self._masks[i]
        if others:
            self._masks[i] = others | bit
            return
        if (self._used + 1) * 5 > len(self._masks) * 4:
            self._grow()
            i = self._slot(key)
        self._keys[i] = key
        self._masks[i] = bit
        self._used += 1

    def unhold(self, key: int, bit: int) -> None:
        """Take a worker's bit off `key` (and the key off when no worker is left)."""
        i = self._slot(key)
        held = self._masks[i]
        if not held:
            return
        rest = held & ~bit
        if rest:
            self._masks[i] = rest
            return
        self._used -= 1
        mask, keys, masks = self._mask, self._keys, self._masks
        j = i
        while True:
            j = (j + 1) & mask
            if not masks[j]:
                break
            home = keys[j] & mask
            if (i < j and i < home <= j) or (i > j and (home > i or home <= j)):
                continue
            keys[i], masks[i] = keys[j], masks[j]
            i = j
        masks[i] = 0

    def _grow(self) -> None:
        old_keys, old_masks = self._keys, self._masks
        self._alloc(2 * len(old_masks))
        keys, masks, mask = self._keys, self._masks, self._mask
        for j, held in enumerate(old_masks):
            if held:
                key = old_keys[j]
                i = key & mask
                while masks[i]:
                    i = (i + 1) & mask
                keys[i], masks[i] = key, held

    def items(self) -> Iterator[tuple[int, int]]:
        keys = self._keys
        for i, held in enumerate(self._masks):
            if held:
                yield keys[i], held
