"""Builds kvrelay. With KVRELAY_COMPILE=1 the hot path is compiled with mypyc.

Compiling type-checks the modules against the installed dependencies, so it builds without
isolation, in an environment that has them, mypy and a C compiler:

    pip install -e '.[test]' && KVRELAY_COMPILE=1 pip install --no-build-isolation -e .

The modules compiled are `[tool.kvrelay] compiled` in pyproject.toml.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent


def compiled_paths() -> list[str]:
    with (HERE / "pyproject.toml").open("rb") as f:
        names: list[str] = tomllib.load(f)["tool"]["kvrelay"]["compiled"]
    return [f"kvrelay/{name.replace('.', '/')}.py" for name in names]


def extensions() -> list[object]:
    if os.environ.get("KVRELAY_COMPILE", "0") != "1":
        return []
    from mypyc.build import mypycify

    return list(mypycify(compiled_paths(), opt_level="3", group_name="kvrelay"))


setup(ext_modules=extensions())
