"""The package's layout: which rooms exist, which may import which, and what the wheel ships.

The layers are declared once, here, and CONTRIBUTING.md's layout table is checked against them.
An import may go to the importer's own package or to a lower layer, never up or sideways; the
router side may use the wire and nothing of the relay.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "kvrelay"

# room -> layer, lowest first. A room is a sub-package or a module directly in kvrelay/.
LAYERS: dict[str, int] = {
    "kvrelay": 0,  # the package itself: version and build
    "kvrelay.wire": 0,
    "kvrelay.ratelimit": 0,
    "kvrelay.config": 1,
    "kvrelay.system": 1,
    "kvrelay.router": 1,
    "kvrelay.testing": 1,
    "kvrelay.discovery": 2,
    "kvrelay.codec": 2,
    "kvrelay.natsio": 2,
    "kvrelay.ingest": 3,
    "kvrelay.publish": 4,
    "kvrelay.jetstream": 5,
    "kvrelay.dynamo": 5,
    "kvrelay.app": 6,
    "kvrelay.ops": 7,
    "kvrelay.__main__": 8,
}
# Rooms that must stay usable without the relay: what they may import besides themselves.
ONLY: dict[str, set[str]] = {
    "kvrelay.wire": set(),
    "kvrelay.router": {"kvrelay.wire", "kvrelay.ratelimit"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def imports(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, module) of every kvrelay import in a file of `package`, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("kvrelay")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            if base.startswith("kvrelay"):
                found.append((node.lineno, base))
    return found


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_room_has_a_layer() -> None:
    """Each module of kvrelay belongs to a room the layer table names."""
    assert {room(module_name(p)) for p in modules()} == set(LAYERS)


def test_imports_only_run_downward() -> None:
    """No module imports a room at its own layer or above (its own room aside)."""
    upward = []
    for path in modules():
        here = room(module_name(path))
        package = module_name(path if path.name == "__init__.py" else path.parent)
        for line, target in imports(path, package):
            there = room(target)
            if there == here:
                continue
            allowed = ONLY.get(here)
            if LAYERS[there] >= LAYERS[here] or (allowed is not None and there not in allowed):
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert upward == []


def test_the_import_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The check reads imports inside functions and relative ones, as an offender would write."""
    fake = tmp_path / "x.py"
    fake.write_text("def f():\n    from kvrelay.app import Relay\n"
                    "    from ..ingest import source\n")
    assert [m for _, m in imports(fake, "kvrelay.router")] == ["kvrelay.app", "kvrelay.ingest"]


def test_contributing_layout_matches() -> None:
    """CONTRIBUTING.md's layout table lists every room with its layer, as declared here."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    rows = re.findall(r"^\| (\d+) \| `([\w./]+)` \|", text, re.M)
    table = {name.rstrip("/").removesuffix(".py").replace("/", "."): int(layer)
             for layer, name in rows}
    assert table == LAYERS


def test_every_package_says_what_it_is() -> None:
    """Each sub-package opens with a docstring: the one sentence CONTRIBUTING's table quotes."""
    missing = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("__init__.py")
               if ast.get_docstring(ast.parse(p.read_text())) is None]
    assert missing == []


@pytest.mark.timeout(300)
def test_wheel_ships_only_kvrelay(tmp_path: Path) -> None:
    """`pip wheel .` builds a wheel whose only top-level package is kvrelay (no bench, tests).
    (Python build here; tests/test_build.py checks the compiled wheel's extra runtime library.)"""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path),
                    str(ROOT)], check=True, timeout=280, env={**os.environ, "KVRELAY_COMPILE": "0"})
    (wheel,) = tmp_path.glob("kvrelay-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        tops = {name.split("/")[0] for name in zf.namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"kvrelay"}
