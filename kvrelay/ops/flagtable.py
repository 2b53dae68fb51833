"""The manual's table of `kvrelay run` settings (docs/configuration.md), generated from Config
(`--check`: verify instead).

    python -m kvrelay.ops.flagtable [--check]

The table sits between the `| flag |` header and the first line after it that is not a table
row; everything else in docs/configuration.md is left alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Final

from kvrelay.config import settings

PAGE: Final = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
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
    """The table's lines, one row per setting, section by section."""
    lines = [HEADER, "|---|---|---|---|"]
    for s in settings():
        envs = ", ".join(f"`{var}`" for var in s.env_vars)
        lines.append(f"| `{s.flag}` | {envs} | {_default(s.default, s.key)} | {s.help} |")
    return lines


def render(page: str) -> str:
    """The page's text with its flag table replaced by the generated one."""
    lines = page.split("\n")
    start = lines.index(HEADER)
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "\n".join([*lines[:start], *flag_table(), *lines[end:]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if docs/configuration.md's table differs from Config")
    args = parser.parse_args(argv)
    current = PAGE.read_text()
    wanted = render(current)
    if args.check:
        if wanted != current:
            print("docs/configuration.md's flag table is out of date: run "
                  "python -m kvrelay.ops.flagtable", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
