"""Token keys: a block's identity computed from its token ids, the same in every process.

vLLM's block hashes depend on the engine's own settings (the hash algorithm, PYTHONHASHSEED, the
hash of the empty parent), so a router cannot compute them for a request. A token key can be
computed by anyone holding the token ids, and two blocks get the same key exactly when vLLM's
prefix cache would reuse one for the other: the same tokens, after the same prefix, under the
same LoRA adapter and with the same extra keys (cache salt, multimodal inputs).

Token key, version 1, with XXH3-64 (xxhash) and unsigned 64-bit integers:

    tokens = the block's `block_size` token ids, each as uint32 little-endian
    seed   = the parent block's token key; for a request's first block (no parent), the root:
             0 without a LoRA adapter, XXH3-64(utf-8 of the adapter's name, seed=0) with one
    extra  = the block's extra keys as vLLM reports them (`extra_keys[i]` of BlockStored), less
             the adapter's name where vLLM puts it first; when any remain:
             seed = XXH3-64(msgpack of the list of them, seed=seed)
    key    = XXH3-64(tokens, seed=seed)

An adapter reported by id only (`lora_id` without `lora_name`, vLLM before 0.14) is named by its
decimal id. vLLM puts a request's cache salt in the extra keys of its first block only, after
the adapter and multimodal keys, so `block_keys(..., cache_salt=...)` adds it there.
schemas/token-keys.json holds golden vectors for implementations in other languages.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterator, Sequence
from typing import Any, Final

import msgspec
import xxhash

from kvrelay.wire.schema import Stored

TOKEN_KEY_VERSION: Final = 1
NO_LORA_ROOT: Final = 0

_xxh3: Final = xxhash.xxh3_64_intdigest
xxh3: Final = xxhash.xxh3_64_intdigest
"""XXH3-64 of a buffer with a seed, as an unsigned integer."""
_encode: Final = msgspec.msgpack.Encoder().encode
_BIG_ENDIAN: Final = sys.byteorder == "big"

ExtraKeys = Sequence[Any] | None
"""One block's extra keys: vLLM's `extra_keys` entry for it (None: none)."""


def lora_label(lora_name: str | None, lora_id: int | None = None) -> str | None:
    """The adapter a block was computed under: its name, or its decimal id when vLLM sent only
    the id; None for the base model (lora_id 0 or None)."""
    if lora_name is not None:
        return lora_name
    return str(lora_id) if lora_id else None


def root_key(lora: str | None = None) -> int:
    """The seed of a request's first block: 0 for the base model, else the adapter's hash."""
    return NO_LORA_ROOT if lora is None else _xxh3(lora.encode(), seed=0)


def own_extras(entry: Any, lora: str | None) -> list[Any] | None:
    """A block's extra keys less the adapter name vLLM puts first (the root holds it already);
    None when nothing is left or the entry is not a list."""
    if not isinstance(entry, (list, tuple)) or not entry:
        return None
    items = list(entry)
    if lora is not None and items[0] == lora:
        del items[0]
    return items or None


def token_bytes(token_ids: Sequence[int]) -> bytes:
    """Token ids as uint32 little-endian; OverflowError for an id outside 0..2**32-1."""
    packed = array("I", token_ids)
    if _BIG_ENDIAN:
        packed.byteswap()
    return packed.tobytes()


def packed_ids(token_ids: Sequence[int] | bytes) -> bytes:
    """A request's token ids as `token_bytes` gives them; bytes are taken as packed already
    (ValueError when their length is not a multiple of 4)."""
    if isinstance(token_ids, bytes):
        if len(token_ids) % 4:
            raise ValueError("packed token ids take 4 bytes each")
        return token_ids
    return token_bytes(token_ids)


def extra_seed(extra: Sequence[Any], seed: int) -> int:
    """The seed of a block with its own extra keys (non-empty), from the parent's key."""
    return _xxh3(_encode(list(extra)), seed=seed)


def iter_keys(tokens: bytes, block_size: int, seed: int,
              extras: Sequence[ExtraKeys] | None = None) -> Iterator[int]:
    """Token keys of the whole blocks in `tokens` (from `token_bytes`), chained from `seed`
    (the parent's key, or `root_key`); `extras[i]`: block i's own extra keys (`own_extras`).
    KvIndex.overlap_tokens runs the same steps inline."""
    step = 4 * block_size
    for i, start in enumerate(range(0, len(tokens) - step + 1, step)):
        extra = extras[i] if extras is not None and i < len(extras) else None
        if extra:
            seed = extra_seed(extra, seed)
        seed = xxh3(tokens[start:start + step], seed)
        yield seed


def request_extras(blocks: int, *, cache_salt: str | None = None,
                   extra_keys: Sequence[ExtraKeys] | None = None) -> list[ExtraKeys]:
    """Each of a request's first `blocks` blocks' own extra keys: `extra_keys` (multimodal
    inputs, as vLLM computes them), and `cache_salt` after them in the first block's."""
    extras: list[ExtraKeys] = [None] * blocks
    for i, entry in enumerate(extra_keys[:blocks] if extra_keys is not None else ()):
        extras[i] = list(entry) if entry else None
    if cache_salt is not None and blocks:
        extras[0] = [*(extras[0] or ()), cache_salt]
    return extras


def block_keys(token_ids: Sequence[int], block_size: int, *, lora_name: str | None = None,
               cache_salt: str | None = None,
               extra_keys: Sequence[ExtraKeys] | None = None) -> list[int]:
    """Token keys of every whole block of a request's tokens (a partial last block has none),
    under its adapter, cache salt and multimodal keys (see `request_extras`)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, not {block_size}")
    blocks = len(token_ids) // block_size
    extras = request_extras(blocks, cache_salt=cache_salt, extra_keys=extra_keys)
    return list(iter_keys(token_bytes(token_ids[:blocks * block_size]), block_size,
                          root_key(lora_name), extras))


def stored_keys(event: Stored, parent_key: int | None) -> list[int] | None:
    """The token keys of a BlockStored's blocks, chained from `parent_key` (its parent's key;
    None for a parent not held keyed) or, without a parent, from its adapter's root. None when
    they cannot be had: no parent key, or token ids that do not fill the blocks exactly or
    are not all uint32."""
    lora = lora_label(event.lora_name, event.lora_id)
    seed = root_key(lora) if event.parent_block_hash is None else parent_key
    size = event.block_size
    # A list, or an array('I') where the relay's window packed them while awaiting the ack:
    # read untyped, or the compiled build would insist on a list.
    tokens: Sequence[int] = getattr(event, "token_ids")  # noqa: B009
    if seed is None or size <= 0 or len(tokens) != len(event.block_hashes) * size:
        return None
    extras: list[ExtraKeys] | None = None
    if type(event.extra_keys) is list:
        extras = [own_extras(entry, lora) for entry in event.extra_keys]
    try:
        data = token_bytes(tokens)
    except (OverflowError, TypeError):  # a token id that is not a uint32
        return None
    return list(iter_keys(data, size, seed, extras))
