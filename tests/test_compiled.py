"""The mypyc build: what it may compile, and that a compiled run really is one."""

from __future__ import annotations

import ast
import os
import tomllib
from pathlib import Path

import pytest

import kvrelay

ROOT = Path(__file__).resolve().parent.parent


def compiled_names() -> list[str]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        names: list[str] = tomllib.load(f)["tool"]["kvrelay"]["compiled"]
    return names


def module_path(name: str) -> Path:
    return ROOT / "kvrelay" / f"{name.replace('.', '/')}.py"


def struct_classes(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                if ast.unparse(base) in ("Struct", "msgspec.Struct"):
                    found.append(node.name)
    return found


def test_compiled_modules_define_no_structs() -> None:
    """No module on the compiled list defines a msgspec Struct (compiled, it loses its options)."""
    names = compiled_names()
    assert names
    offenders = {name: struct_classes(module_path(name).read_text()) for name in names}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_struct_check_sees_structs() -> None:
    """The check above finds Structs, as it would in a module that defines one."""
    assert struct_classes((ROOT / "kvrelay" / "jetstream" / "api.py").read_text()) == [
        "ApiError", "PubAck"]


@pytest.mark.skipif(os.environ.get("KVRELAY_EXPECT_COMPILED") != "1",
                    reason="runs in CI's compiled pass (KVRELAY_EXPECT_COMPILED=1)")
def test_compiled_pass_runs_compiled_code() -> None:
    """In the compiled pass every listed module loads from its extension, not from source."""
    assert kvrelay.compiled_modules(compiled_names()) == compiled_names()
    assert kvrelay.build() == "compiled"
