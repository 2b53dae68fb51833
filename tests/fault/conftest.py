"""The fault table: every fault test records its Tally; the run prints them and writes JSON."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fault.accounting import Tally

ROWS = pytest.StashKey[list[Tally]]()
TABLE_FILE = pytest.StashKey[Path]()
COLUMNS = ("fault", "offered", "delivered", "lost", "announced", "duplicates",
           "order_violations", "resyncs")


def rows(config: pytest.Config) -> list[Tally]:
    """The run's fault table."""
    return config.stash.setdefault(ROWS, [])


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Callable[[Tally], Tally]:
    """Adds a Tally to the run's fault table and hands it back for asserting."""
    table = rows(request.config)

    def add(row: Tally) -> Tally:
        table.append(row)
        return row

    return add


@pytest.fixture(scope="session", autouse=True)
def fault_table_file(request: pytest.FixtureRequest,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where the fault table is written as JSON when the run ends."""
    path = tmp_path_factory.getbasetemp() / "fault-table.json"
    request.config.stash[TABLE_FILE] = path
    yield path
    path.write_text(json.dumps([row._asdict() for row in rows(request.config)], indent=1))


def format_table(rows: list[Tally]) -> list[str]:
    cells = [list(COLUMNS)] + [[str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                      for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in cells]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter,
                            config: pytest.Config) -> None:
    table = rows(config)
    if not table:
        return
    terminalreporter.write_sep("-", "fault accounting (batches)")
    for line in format_table(table):
        terminalreporter.write_line(line)
    if TABLE_FILE in config.stash:
        terminalreporter.write_line(f"written to {config.stash[TABLE_FILE]}")
