"""schemas/ stays true: the JSON Schema is what the Structs generate, every golden vector is what
the codec produces now, and every expected JSON output validates against the schema."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from strategies import relay_batches

from kvrelay.codec import Codec
from kvrelay.ops import schemagen
from kvrelay.wire.relaybatch import decode_relay_batch
from kvrelay.wire.schema import RelayBatch, relay_batch_json_schema

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"
VECTORS = sorted((SCHEMAS / "vectors").glob("*.json"))
INPUTS = sorted((SCHEMAS / "vectors" / "input").glob("*.msgpack"))
SPEC_VECTORS = Path("/work/shared/spec/vectors")  # the contract's copy, where it exists
SCHEMA: dict[str, Any] = json.loads((SCHEMAS / "relaybatch.schema.json").read_text())


# -- a JSON Schema check for the keywords the generated schema uses (jsonschema is not a
# dependency); any other keyword is an error, so the schema cannot outgrow the check silently.

class SchemaError(AssertionError):
    pass


_ANNOTATIONS = {"$schema", "$defs", "title", "description", "default", "discriminator"}
_TYPES: dict[str, Any] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def validate(doc: Any, node: dict[str, Any] = SCHEMA, at: str = "$") -> None:
    """Raise SchemaError if `doc` does not satisfy `node` of SCHEMA."""
    for key, rule in node.items():
        if key in _ANNOTATIONS:
            continue
        if key == "$ref":
            assert rule.startswith("#/$defs/"), rule
            validate(doc, SCHEMA["$defs"][rule.removeprefix("#/$defs/")], at)
        elif key == "type":
            types = rule if isinstance(rule, list) else [rule]
            if not any(_TYPES[t](doc) for t in types):
                raise SchemaError(f"{at}: {doc!r} is not {rule}")
        elif key == "enum":
            if doc not in rule:
                raise SchemaError(f"{at}: {doc!r} not in {rule}")
        elif key == "pattern":
            if isinstance(doc, str) and not re.search(rule.removesuffix("$") + r"\Z", doc):
                raise SchemaError(f"{at}: {doc!r} does not match {rule}")
        elif key == "required":
            missing = [name for name in rule if isinstance(doc, dict) and name not in doc]
            if missing:
                raise SchemaError(f"{at}: missing {missing}")
        elif key == "properties":
            for name, sub in rule.items():
                if isinstance(doc, dict) and name in doc:
                    validate(doc[name], sub, f"{at}.{name}")
        elif key == "items":
            for i, item in enumerate(doc if isinstance(doc, list) else []):
                validate(item, rule, f"{at}[{i}]")
        elif key == "anyOf":
            errors = []
            for sub in rule:
                try:
                    validate(doc, sub, at)
                    break
                except SchemaError as exc:
                    errors.append(str(exc))
            else:
                raise SchemaError(f"{at}: matches none of anyOf: {errors}")
        else:
            raise AssertionError(f"schema keyword {key!r} is not checked here; extend validate()")


def _rows(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(path.read_text())
    return rows


def _expected(row: dict[str, Any]) -> tuple[bytes, bytes]:
    """What the codec makes of a vector's input today: (msgpack, JSON) output."""
    decoded = Codec().decode(bytes.fromhex(row["input_payload_hex"]))
    batch = RelayBatch(instance_id=row["instance_id"], dp_rank=row["dp_rank"],
                       epoch=row["epoch"], seq=row["seq"], ts=decoded.ts,
                       relay_ts=row["relay_ts"], events=decoded.events)
    return Codec("msgpack").encode(batch), Codec("json").encode(batch)


# -- the files --------------------------------------------------------------------------------


def test_schema_file_matches_the_structs() -> None:
    """schemas/relaybatch.schema.json is exactly what kvrelay.wire.schema's Structs generate."""
    generated = json.dumps(relay_batch_json_schema(), indent=2, sort_keys=True) + "\n"
    assert (SCHEMAS / "relaybatch.schema.json").read_text() == generated


def test_every_input_has_vectors() -> None:
    """Each input file has a vector file with one row per frame, in order, and vice versa."""
    assert {p.stem for p in INPUTS} == {p.stem for p in VECTORS}
    assert len(INPUTS) >= 6  # three real captures and three hand-made inputs
    for path in INPUTS:
        frames = msgspec.msgpack.decode(path.read_bytes())
        rows = _rows(SCHEMAS / "vectors" / f"{path.stem}.json")
        assert [(r["topic"].encode(), r["seq"], bytes.fromhex(r["input_payload_hex"]))
                for r in rows] == [(t, int.from_bytes(s, "big"), p) for t, s, p in frames]


@pytest.mark.skipif(not SPEC_VECTORS.is_dir(), reason="the contract's vectors are not here")
def test_real_inputs_are_the_contracts_captures() -> None:
    """The repo's copies of the real vLLM frames are byte-for-byte the contract's."""
    spec = sorted(SPEC_VECTORS.glob("*.msgpack"))
    assert spec
    for path in spec:
        assert (SCHEMAS / "vectors" / "input" / path.name).read_bytes() == path.read_bytes()


@pytest.mark.parametrize("path", VECTORS, ids=[p.stem for p in VECTORS])
def test_golden_vectors_match_the_codec(path: Path) -> None:
    """Every frame's expected msgpack and JSON output is what the codec produces now, and both
    describe the same RelayBatch."""
    rows = _rows(path)
    assert rows
    for row in rows:
        assert (row["instance_id"], row["epoch"], row["relay_ts"]) == (7, 0, 0.0)
        as_msgpack, as_json = _expected(row)
        assert as_msgpack.hex() == row["expected_msgpack_hex"], row["seq"]
        assert json.loads(as_json) == row["expected_json"], row["seq"]
        from_json = decode_relay_batch(json.dumps(row["expected_json"]).encode())
        assert decode_relay_batch(bytes.fromhex(row["expected_msgpack_hex"])) == from_json


def test_schemagen_check_passes() -> None:
    """`python -m kvrelay.ops.schemagen --check` finds schemas/ up to date."""
    assert schemagen.main(["--check"]) == 0


def test_schemagen_check_detects_drift(tmp_path: Path) -> None:
    """--check exits 1 on a changed or stale file; writing repairs both."""
    root = tmp_path / "schemas"
    shutil.copytree(SCHEMAS, root)
    vector = root / "vectors" / "handmade-unknown.json"
    vector.write_text(vector.read_text().replace('"BlockPinned"', '"BlockPinnde"', 1))
    (root / "vectors" / "gone.json").write_text("[]\n")
    assert schemagen.main(["--check", "--root", str(root)]) == 1
    assert schemagen.main(["--root", str(root)]) == 0
    assert not (root / "vectors" / "gone.json").exists()
    assert schemagen.main(["--check", "--root", str(root)]) == 0
    (root / "relaybatch.schema.json").write_text("{}\n")
    assert schemagen.main(["--check", "--root", str(root)]) == 1


# -- validation against the JSON Schema --------------------------------------------------------


@pytest.mark.parametrize("path", VECTORS, ids=[p.stem for p in VECTORS])
def test_expected_json_validates(path: Path) -> None:
    """Every golden vector's expected JSON output satisfies the JSON Schema."""
    for row in _rows(path):
        validate(row["expected_json"])


@settings(max_examples=150, deadline=None)
@given(relay_batches())
def test_codec_json_validates(batch: RelayBatch) -> None:
    """Any RelayBatch the codec writes as JSON (resync and unknown events too) satisfies it."""
    validate(json.loads(Codec("json").encode(batch)))


_VALID = {
    "v": 1, "instance_id": 7, "dp_rank": 0, "epoch": 0, "seq": 3, "ts": 1.5, "relay_ts": 0.0,
    "events": [
        {"type": "stored", "block_hashes": ["00ff"], "parent_block_hash": None,
         "token_ids": [1, 2], "block_size": 2, "lora_id": None, "medium": "GPU",
         "lora_name": None},
        {"type": "removed", "block_hashes": [2**64 - 1], "medium": None},
        {"type": "cleared"},
        {"type": "resync", "reason": "gap", "missed_from": 1, "missed_to": 2},
        {"type": "unknown", "tag": "X", "raw": [1]},
    ],
}


def _broken(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(json.dumps(_VALID))
    node: Any = doc
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


def test_validator_accepts_a_valid_batch() -> None:
    """The check passes a hand-written RelayBatch with one event of every type."""
    validate(_VALID)


@pytest.mark.parametrize(("path", "value"), [
    (("seq",), KeyError),
    (("seq",), "3"),
    (("ts",), True),
    (("events",), {}),
    (("events", 0, "type"), "bogus"),
    (("events", 0, "block_hashes", 0), "00FF"),
    (("events", 0, "block_hashes", 0), "abc"),
    (("events", 0, "block_size"), KeyError),
    (("events", 1, "block_hashes", 0), 1.5),
    (("events", 3, "reason"), "oops"),
    (("events", 4, "tag"), KeyError),
])
def test_validator_rejects_invalid_batches(path: tuple[Any, ...], value: Any) -> None:
    """The check is not vacuous: each broken RelayBatch fails it."""
    with pytest.raises(SchemaError):
        validate(_broken(path, value))
