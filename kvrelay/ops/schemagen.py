"""Generate schemas/: RelayBatch's JSON Schema and golden vectors (`--check`: verify instead).

    python -m kvrelay.ops.schemagen [--check]

Every input in schemas/vectors/input/*.msgpack (a msgpack list of raw ZMQ frames [topic,
seq (8 bytes big-endian), payload], the format of the contract's real vLLM captures) goes through
the codec with fixed envelope values; schemas/vectors/<name>.json records, per frame, the input
and the RelayBatch expected in both output formats; schemas/vectors/dynamo/<name>.json records
the message `--format dynamo` publishes for it. The hand-made inputs below are written to
input/ too; the real captures were copied there from the contract's spec/vectors/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Final

import msgspec

from kvrelay.codec import Codec
from kvrelay.dynamo.translate import EventStream, Translator
from kvrelay.dynamo.wire import decode_message
from kvrelay.testing.synthetic import all_blocks_cleared, block_removed, block_stored
from kvrelay.wire.schema import RelayBatch, Stored, relay_batch_json_schema
from kvrelay.wire.tokenkey import TOKEN_KEY_VERSION, block_keys, root_key

ROOT: Final = Path(__file__).resolve().parents[2] / "schemas"
INSTANCE_ID: Final = 7
EPOCH: Final = 0
RELAY_TS: Final = 0.0
DYNAMO_PUBLISHER_ID: Final = 0x1D00  # + dp_rank
DYNAMO_PUBLISHED_AT: Final = 0

_H1, _H2 = bytes(range(32)), bytes(range(255, 223, -1))  # 32-byte hashes
_STORED_0_33: Final = {
    "type": "BlockStored", "block_hashes": [_H1, _H2], "parent_block_hash": None,
    "token_ids": [1, 2, 3, 4], "block_size": 2, "lora_id": None, "medium": "GPU",
    "lora_name": None, "extra_keys": [None, [["mm-hash", 0]]], "group_idx": 0,
    "kv_cache_spec_kind": "full_attention", "locality": "node-0", "ownership": "shared",
    "session_id": "session-1", "lookahead_token_ids": [5, 6],
}

# name -> EventBatches as vLLM encodes them; frames get seq 0, 1, ... and topic "kv-events".
HANDMADE: Final[dict[str, list[Any]]] = {
    "handmade-legacy-arrays": [  # vLLM <= 0.23: array events, one more field per release
        [1700000000.0, [["BlockStored", [-(2**63), -1], None, [1, 2, 3, 4], 2, None],  # 0.8.5
                        ["BlockRemoved", [-(2**63)]]]],  # 0.9.0: two-element batch
        [1700000000.25, [["BlockStored", [2**64 - 1, 2**63], -1, [5, 6, 7, 8], 2, None, "GPU"],
                         ["BlockRemoved", [2**63], "GPU"]], 0],  # 0.10.2: uint64, medium
        [1700000000.5, [["BlockStored", [11], 2**63, [9, 10], 2, 3, "CPU", "sql-lora"]], 0],
        [1700000001, [["BlockStored", [12], 11, [11, 12], 2, None, "GPU", None,  # int ts
                       [[["mm-hash", 0]]]]], 0],  # 0.17: extra_keys
        [1700000001.5, [["BlockStored", [13], 12, [13, 14], 2, None, "GPU", None, [None], 1],
                        ["BlockRemoved", [11], "CPU", 1]], 0],  # 0.20: group_idx
        [1700000002.0, [["BlockStored", [14], 13, [15, 16], 2, None, "GPU", None, [None], 0,
                         "sliding_window", 1024]], 0],  # 0.22: kv_cache_spec_*
        [1700000002.5, [["AllBlocksCleared"]], 0],
    ],
    "handmade-map-events": [  # vLLM >= 0.24 and SGLang: map events
        [1700000003.0, [_STORED_0_33, {"type": "BlockRemoved", "block_hashes": [_H1],
                                       "medium": "CPU", "group_idx": 0}], 3],
        {"ts": 1700000003.5, "data_parallel_rank": 3, "events": [  # map batch (newer trees)
            {"type": "BlockRemoved", "block_hashes": [_H2], "medium": "GPU"},
            {"type": "AllBlocksCleared"}]},
        [1700000004.0, [{"type": "BlockStored", "block_hashes": [-7, 2**63 - 1],  # SGLang
                         "parent_block_hash": -8, "token_ids": [1, 2], "block_size": 1,
                         "lora_id": None, "medium": "GPU", "lora_name": None,
                         "cache_salt": "tenant-a"}], 3],
    ],
    "handmade-unknown": [  # forward compatibility: unknown tags and keys pass through
        [1700000005.0, [{"type": "BlockPinned", "block_hashes": [1], "until": 99},
                        ["BlockPinned", [2], "GPU"]], 0],
        [1700000005.5, [{"type": "BlockRemoved", "block_hashes": [1], "medium": "GPU",
                         "tier": "hbm", "extra": {"k": "v"}},
                        {"type": "AllBlocksCleared", "reason": "reset"},
                        ["BlockRemoved", [2], "GPU", 0, "future-positional"]], 0],
    ],
}


_T16, _T32 = list(range(1, 17)), list(range(1, 33))
HANDMADE["handmade-dynamo"] = [  # what --format dynamo keeps, maps and leaves out
    [1700000010.0, [block_stored([1, 2], None, _T32)], 0],  # tokens 1..16 -> 1686344...
    [1700000010.5, [block_stored([-3], 2, _T16, lora_id=1, lora_name="my-lora"),  # LoRA seed
                    block_stored([_H1], None, _T16, cache_salt="tenant-a")], 0],  # salt seed
    [1700000011.0, [block_stored([5], None, _T16, medium="CPU"),  # host_pinned
                    block_stored([6], None, _T16, medium="FS"),  # disk
                    block_stored([7], None, _T16, medium="STORAGE")], 0],  # left out
    [1700000011.5, [block_stored([8, 9], None, _T32[:24]),  # second block cut: 8 tokens short
                    block_stored([10], None, _T16[:8], block_size=8),  # not the router's size
                    block_stored([11, 11], None, _T32)], 0],  # repeated hash: left out
    [1700000012.0, [block_removed([1, -3]), {"type": "BlockPinned", "block_hashes": [1]},
                    block_removed([_H1], medium="CPU")], 0],
    [1700000012.5, [{"type": "BlockPinned", "block_hashes": [1]}], 0],  # nothing to send
    [1700000013.0, [all_blocks_cleared()], 0],
    [1700000013.5, [block_stored([12], None, _T16)], 1],  # rank 1: its own publisher
]


def _text(doc: Any) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def encode_frames(batches: list[Any]) -> bytes:
    """An input file: `batches` as the frames vLLM's PUB socket would send them."""
    frames = [[b"kv-events", seq.to_bytes(8, "big"), msgspec.msgpack.encode(batch)]
              for seq, batch in enumerate(batches)]
    return msgspec.msgpack.encode(frames)


def vectors(input_file: bytes) -> bytes:
    """The golden vector file for one input file: one JSON object per frame, one per line."""
    msgpack_codec, json_codec = Codec("msgpack"), Codec("json")
    rows = []
    for topic, seq_bytes, payload in msgspec.msgpack.decode(input_file):
        decoded = msgpack_codec.decode(payload)
        batch = RelayBatch(
            instance_id=INSTANCE_ID, dp_rank=decoded.dp_rank or 0, epoch=EPOCH,
            seq=int.from_bytes(seq_bytes, "big"), ts=decoded.ts, relay_ts=RELAY_TS,
            events=decoded.events,
        )
        rows.append({
            "topic": topic.decode(), "seq": batch.seq, "dp_rank": batch.dp_rank,
            "instance_id": INSTANCE_ID, "epoch": EPOCH, "relay_ts": RELAY_TS,
            "input_payload_hex": payload.hex(),
            "expected_msgpack_hex": msgpack_codec.encode(batch).hex(),
            "expected_json": json.loads(json_codec.encode(batch)),
        })
    return ("[\n" + ",\n".join(json.dumps(row, sort_keys=True) for row in rows) + "\n]\n").encode()


def dynamo_vectors(input_file: bytes) -> bytes:
    """The `--format dynamo` vector file for one input file: per frame, the message published
    (null when nothing in the batch can go), numbered on from the previous frames of its rank.
    The router's block size is the one the file's first BlockStored declares."""
    codec = Codec()
    frames = msgspec.msgpack.decode(input_file)
    batches = [codec.decode(payload) for _, _, payload in frames]
    sizes = [e.block_size for b in batches for e in b.events if isinstance(e, Stored)]
    translator = Translator(sizes[0] if sizes else 16)
    streams: dict[int, EventStream] = {}
    rows = []
    for (topic, seq_bytes, payload), decoded in zip(frames, batches, strict=True):
        rank = decoded.dp_rank or 0
        stream = streams.setdefault(
            rank, EventStream(DYNAMO_PUBLISHER_ID + rank, INSTANCE_ID, rank))
        items = translator.translate((), decoded.events)
        message = stream.encode(items, DYNAMO_PUBLISHED_AT) if items else None
        expected = None
        if message is not None:
            envelope, events = decode_message(message)
            expected = {**msgspec.to_builtins(envelope), "payload": msgspec.to_builtins(events)}
        rows.append({
            "topic": topic.decode(), "seq": int.from_bytes(seq_bytes, "big"), "dp_rank": rank,
            "worker_id": INSTANCE_ID, "publisher_id": DYNAMO_PUBLISHER_ID + rank,
            "published_at": DYNAMO_PUBLISHED_AT, "kv_block_size": translator.kv_block_size,
            "input_payload_hex": payload.hex(),
            "expected_message_hex": None if message is None else message.hex(),
            "expected_message": expected,
        })
    return ("[\n" + ",\n".join(json.dumps(row, sort_keys=True) for row in rows) + "\n]\n").encode()


# Token-key cases: (what it shows, token_ids, block_size, lora_name, cache_salt, extra_keys).
TOKEN_KEY_CASES: Final[list[tuple[str, list[int], int, str | None, str | None, Any]]] = [
    ("two blocks of tokens 1..32", list(range(1, 33)), 16, None, None, None),
    ("a partial last block has no key", list(range(1, 41)), 16, None, None, None),
    ("the same tokens under a LoRA adapter", list(range(1, 33)), 16, "my-lora", None, None),
    ("a cache salt (first block only)", list(range(1, 33)), 16, None, "tenant-a", None),
    ("adapter and salt", list(range(1, 33)), 16, "my-lora", "tenant-a", None),
    ("multimodal extra keys on the second block", list(range(1, 33)), 16, None, None,
     [None, [["mm-hash", 0]]]),
    ("the largest token id, block size 32", [2**32 - 1] * 32 + [0] * 32, 32, None, None, None),
]


def token_key_vectors() -> bytes:
    """schemas/token-keys.json: token keys (kvrelay/wire/tokenkey.py) of a few
    requests, for implementations in other languages to test against."""
    rows = [{"what": what, "version": TOKEN_KEY_VERSION, "token_ids": tokens,
             "block_size": size, "lora_name": lora, "cache_salt": salt, "extra_keys": extras,
             "root": root_key(lora),
             "keys": block_keys(tokens, size, lora_name=lora, cache_salt=salt,
                                extra_keys=extras)}
            for what, tokens, size, lora, salt, extras in TOKEN_KEY_CASES]
    return ("[\n" + ",\n".join(json.dumps(row) for row in rows) + "\n]\n").encode()


def render(root: Path = ROOT) -> dict[Path, bytes]:
    """Every generated file under `root` (schemas/) with its content."""
    inputs = root / "vectors" / "input"
    files = {root / "relaybatch.schema.json": _text(relay_batch_json_schema()),
             root / "token-keys.json": token_key_vectors()}
    input_files = {path.stem: path.read_bytes() for path in inputs.glob("*.msgpack")}
    for name, batches in HANDMADE.items():
        input_files[name] = files[inputs / f"{name}.msgpack"] = encode_frames(batches)
    for name, data in sorted(input_files.items()):
        files[root / "vectors" / f"{name}.json"] = vectors(data)
        files[root / "vectors" / "dynamo" / f"{name}.json"] = dynamo_vectors(data)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvrelay.ops.schemagen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if schemas/ is stale")
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    root: Path = args.root
    files = render(root)
    generated = [*(root / "vectors").glob("*.json"), *(root / "vectors" / "dynamo").glob("*.json")]
    stale = [p for p in sorted(generated) if p not in files]
    changed = [p for p, data in files.items() if not p.is_file() or p.read_bytes() != data]
    if args.check:
        for path in changed + stale:
            print(f"schemagen: {path} is out of date; run python -m kvrelay.ops.schemagen",
                  file=sys.stderr)
        return 1 if changed or stale else 0
    for path in changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(files[path])
        print(f"wrote {path}")
    for path in stale:
        path.unlink()
        print(f"removed {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
