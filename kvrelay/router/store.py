"""Where a KvIndex keeps one worker's blocks in one tier: the interface, and its dict form.

Each block is a vLLM block hash with its parent's hash (or None) and its token key (or None).
Two forms hold them: `DictBlocks` here, two dicts, the fastest to change (a relay's own index,
which holds one worker and changes with every batch), and `BlockTable` (kvrelay/router/
packed.py), about a third of the memory (a router's, which holds the fleet).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from kvrelay.wire.schema import BlockHash

NEW: Final = 1
"""`put`: the block was not held."""
KEYED: Final = 2
"""`put`: the block got its token key now."""

_MISSING: Final = object()


class BlockStore:
    """One worker's blocks in one tier: hash -> (parent hash or None, token key or None)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def __contains__(self, block: object) -> bool:
        raise NotImplementedError

    def __iter__(self) -> Iterator[BlockHash]:
        raise NotImplementedError

    @property
    def keyed(self) -> int:
        """How many blocks have a token key."""
        raise NotImplementedError

    def key(self, block: BlockHash) -> int | None:
        """The block's token key; None when it has none or is not held."""
        raise NotImplementedError

    def put(self, block: BlockHash, parent: BlockHash | None, key: int | None) -> int:
        """Hold `block` under `parent` (a held block's parent is replaced, its key kept); give
        it `key` when it has none yet. NEW | KEYED: what changed."""
        raise NotImplementedError

    def pop(self, block: BlockHash) -> tuple[bool, int | None]:
        """Stop holding `block`: (whether it was held, its token key or None)."""
        raise NotImplementedError

    def items(self) -> Iterator[tuple[BlockHash, BlockHash | None, int | None]]:
        """(block, parent, key) of every held block, in no particular order."""
        raise NotImplementedError

    def parents(self) -> dict[BlockHash, BlockHash | None]:
        """Every held block with its parent (a new dict)."""
        return {block: parent for block, parent, _ in self.items()}

    def keys(self) -> dict[BlockHash, int]:
        """Every held block that has a token key, with it (a new dict)."""
        return {block: key for block, _, key in self.items() if key is not None}

    def copy(self) -> BlockStore:
        raise NotImplementedError


class DictBlocks(BlockStore):
    """Two dicts: hash -> parent, and hash -> token key for the blocks that have one."""

    __slots__ = ("_keys", "_parents")

    def __init__(self) -> None:
        self._parents: dict[BlockHash, BlockHash | None] = {}
        self._keys: dict[BlockHash, int] = {}

    def __len__(self) -> int:
        return len(self._parents)

    def __contains__(self, block: object) -> bool:
        return block in self._parents

    def __iter__(self) -> Iterator[BlockHash]:
        return iter(self._parents)

    @property
    def keyed(self) -> int:
        return len(self._keys)

    def key(self, block: BlockHash) -> int | None:
        return self._keys.get(block)

    def put(self, block: BlockHash, parent: BlockHash | None, key: int | None) -> int:
        parents = self._parents
        out = 0 if block in parents else NEW
        parents[block] = parent
        if key is not None:
            keys = self._keys
            if block not in keys:
                keys[block] = key
                out |= KEYED
        return out

    def pop(self, block: BlockHash) -> tuple[bool, int | None]:
        if self._parents.pop(block, _MISSING) is _MISSING:
            return False, None
        return True, self._keys.pop(block, None) if self._keys else None

    def items(self) -> Iterator[tuple[BlockHash, BlockHash | None, int | None]]:
        keys = self._keys
        for block, parent in self._parents.items():
            yield block, parent, keys.get(block)

    def parents(self) -> dict[BlockHash, BlockHash | None]:
        return dict(self._parents)

    def keys(self) -> dict[BlockHash, int]:
        return dict(self._keys)

    def copy(self) -> DictBlocks:
        other = DictBlocks()
        other._parents, other._keys = dict(self._parents), dict(self._keys)
        return other
