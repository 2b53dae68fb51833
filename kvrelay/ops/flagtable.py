"""README.md's table of `kvrelay run` settings, generated from Config (`--check`: verify instead).

    python -m kvrelay.ops.flagtable [--check]

The table sits between the `| flag |` header and the first line after it that is not a table
row; everything else in README.md is left alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Final

from kvrelay.config import Config, env_var

README: Final = Path(__file__).resolve().parents[2] / "README.md"
HEADER: Final = "| flag | environment | default | meaning |"


def _default(value: Any, name: str) -> str:
    if value is None or value == () or value == "":
        return "-"
    if isinstance(value, int) and name.endswith("_bytes") and value > 0:
        for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20)):
            if value % size == 0:
                return f"{value // size} {unit}"
    return str(value)


def flag_table() -> list[str]:
    """The table's lines, one row per Config field in declaration order."""
    lines = [HEADER, "|---|---|---|---|"]
    for f in dataclasses.fields(Config):
        envs = ", ".join(f"`{var}`" for var in (env_var(f.name), *f.metadata["env"]))
        flag = "--" + f.name.replace("_", "-")
        lines.append(f"| `{flag}` | {envs} | {_default(f.default, f.name)} | "
                     f"{f.metadata['help']} |")
    return lines


def render(readme: str) -> str:
    """README text with its flag table replaced by the generated one."""
    lines = readme.split("\n")
    start = lines.index(HEADER)
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "\n".join([*lines[:start], *flag_table(), *lines[end:]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if README.md's table differs from Config")
    args = parser.parse_args(argv)
    current = README.read_text()
    wanted = render(current)
    if args.check:
        if wanted != current:
            print("README.md's flag table is out of date: run python -m kvrelay.ops.flagtable",
                  file=sys.stderr)
            return 1
        return 0
    README.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
