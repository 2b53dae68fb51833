"""Builds kvrelay: compiled with mypyc where it can be, pure Python where it cannot.

The per-batch path (`[tool.kvrelay] compiled` in pyproject.toml) is compiled with mypyc when a
wheel is built (`pip install .`, `pip install kvrelay`, `pip wheel .`, the container image) and
this machine has a C compiler and Python's headers; otherwise the same modules install as
Python, with a notice. KVRELAY_COMPILE chooses:

- unset or `auto`: compile wheels when possible, fall back to Python when not; editable installs
  (`pip install -e .`) stay Python, so that a change to the source takes effect at once;
- `1`: compile, editable installs too (built in place), and fail when it cannot;
- `0`: never compile.

mypyc type-checks the modules against their dependencies, so the build environment holds them
(`[build-system] requires`). `python -c "import kvrelay; print(kvrelay.build())"`, `kvrelay
--version` and the relay's first log line say which build runs.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import tomllib
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent
MODES = ("auto", "1", "0")


def compiled_paths() -> list[str]:
    with (HERE / "pyproject.toml").open("rb") as f:
        names: list[str] = tomllib.load(f)["tool"]["kvrelay"]["compiled"]
    return [f"kvrelay/{name.replace('.', '/')}.py" for name in names]


def mode() -> str:
    value = os.environ.get("KVRELAY_COMPILE", "auto").strip().lower() or "auto"
    if value not in MODES:
        sys.exit(f"KVRELAY_COMPILE must be one of {', '.join(MODES)} (got {value!r})")
    return value


def compiler_missing() -> str | None:
    """Why this machine cannot build a C extension, or None when it can."""
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()
    if not cc or shutil.which(cc[0]) is None:
        return f"no C compiler ({cc[0] if cc else 'cc'} not found)"
    include = sysconfig.get_paths().get("include", "")
    if not (Path(include) / "Python.h").is_file():
        return f"no Python headers ({include}/Python.h not found)"
    return None


def notice(message: str) -> None:
    print(f"kvrelay: {message}", file=sys.stderr)


def builds_code(argv: list[str]) -> bool:
    """Whether this run of setup.py builds the package (metadata runs need no extension)."""
    return any(command in argv for command in ("bdist_wheel", "build_ext", "build", "install",
                                               "editable_wheel", "develop"))


def extensions(chosen: str, argv: list[str]) -> list[Any]:
    if chosen == "0" or not builds_code(argv):
        return []
    if chosen == "auto":
        if "editable_wheel" in argv or "develop" in argv:
            notice("editable install: pure Python (KVRELAY_COMPILE=1 compiles it in place)")
            return []
        missing = compiler_missing()
        if missing is not None:
            notice(f"{missing}: installing the pure-Python build")
            return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        if chosen == "1":
            raise
        notice("mypyc is not installed: installing the pure-Python build")
        return []
    try:
        return list(mypycify(compiled_paths(), opt_level="3", group_name="kvrelay"))
    except (Exception, SystemExit) as exc:  # mypyc reports a type error by exiting
        if chosen == "1":
            raise
        notice(f"mypyc could not compile ({exc}): installing the pure-Python build")
        return []


class BuildExt(build_ext):  # type: ignore[misc]  # setuptools is untyped here
    """Falls back to the pure-Python build when compiling fails and compiling was optional."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            if mode() != "auto":
                raise
            notice(f"compiling failed ({exc}): installing the pure-Python build")
            self.extensions: list[Any] = []
            self.distribution.ext_modules = []


setup(ext_modules=extensions(mode(), sys.argv), cmdclass={"build_ext": BuildExt})
