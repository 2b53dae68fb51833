"""The build a plain `pip install` gives: compiled where a C compiler is, Python where not.

Each test builds a wheel from this checkout the way pip does for a user (an isolated build
environment with `[build-system] requires`), then imports the package from the unpacked wheel in
a fresh interpreter that cannot see the checkout (`-P`, another working directory).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from test_compiled import compiled_names

ROOT = Path(__file__).resolve().parent.parent


def build_wheel(out: Path, **env: str) -> Path:
    """`pip wheel --no-deps .` in an isolated build environment, as `pip install .` builds."""
    environ = {key: value for key, value in os.environ.items() if key != "KVRELAY_COMPILE"}
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-cache-dir",
         "-w", str(out), str(ROOT)],
        env={**environ, **env}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    wheels = list(out.glob("kvrelay-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def build_of(wheel: Path, into: Path) -> tuple[str, list[str]]:
    """kvrelay.build() and the compiled modules, imported from the unpacked wheel alone."""
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(into)
    code = ("import sys, kvrelay; assert kvrelay.__file__.startswith(sys.argv[1]), "
            "kvrelay.__file__; print(kvrelay.build()); "
            "print(','.join(kvrelay.compiled_modules(sys.argv[2].split(','))))")
    result = subprocess.run(
        [sys.executable, "-P", "-c", code, str(into), ",".join(compiled_names())],
        env={**os.environ, "PYTHONPATH": str(into)}, cwd=into, capture_output=True, text=True,
        timeout=60)
    assert result.returncode == 0, result.stderr
    build, modules = result.stdout.splitlines()
    return build, [name for name in modules.split(",") if name]


@pytest.mark.timeout(900)
def test_a_plain_install_builds_the_compiled_wheel(tmp_path: Path) -> None:
    """With a C compiler present, the default build compiles every module on the list."""
    wheel = build_wheel(tmp_path / "wheel")
    assert not wheel.name.endswith("-none-any.whl"), wheel.name  # a platform wheel
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
    extra = {top for top in tops if top != "kvrelay" and not top.endswith(".dist-info")}
    assert [top.split(".")[0] for top in extra] == ["kvrelay__mypyc"], tops  # mypyc's runtime
    assert build_of(wheel, tmp_path / "site") == ("compiled", compiled_names())


@pytest.mark.timeout(600)
def test_without_a_compiler_the_install_falls_back_to_python(tmp_path: Path) -> None:
    """No C compiler: the same install succeeds with the pure-Python build."""
    wheel = build_wheel(tmp_path / "wheel", CC="/nonexistent/cc")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    assert build_of(wheel, tmp_path / "site") == ("python", [])


@pytest.mark.timeout(600)
def test_an_invalid_compile_setting_is_refused(tmp_path: Path) -> None:
    """KVRELAY_COMPILE takes auto, 1 or 0; anything else stops the build with that message."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir",
         "-w", str(tmp_path), str(ROOT)],
        env={**os.environ, "KVRELAY_COMPILE": "yes"}, capture_output=True, text=True,
        timeout=600)
    assert result.returncode != 0
    assert "KVRELAY_COMPILE must be one of auto, 1, 0 (got 'yes')" in result.stdout + result.stderr
