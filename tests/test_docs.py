"""The manual: the repository's own pages link only to files that exist, and mkdocs.yml's nav
holds every page under docs/ (`mkdocs build --strict`, in CI, checks the links inside docs/)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)\s]+)\)")


def relative_links(text: str) -> list[str]:
    """Markdown link targets that are neither URLs nor anchors on the same page."""
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def nav_pages(node: Any) -> list[str]:
    """Every page a mkdocs nav (a list of pages, `title: page` maps and sections) names."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [page for item in node for page in nav_pages(item)]
    if isinstance(node, dict):
        return [page for value in node.values() for page in nav_pages(value)]
    return []


@pytest.mark.parametrize("name", ["README.md", "CONTRIBUTING.md", "CHANGELOG.md",
                                  "schemas/README.md"])
def test_links_name_files_that_exist(name: str) -> None:
    """Every relative link in one of the repository's own pages names a file that exists."""
    page = ROOT / name
    for target in relative_links(page.read_text()):
        assert (page.parent / target.split("#")[0]).exists(), f"{name} links to {target}"


def test_nav_holds_every_page_of_the_manual() -> None:
    """mkdocs.yml's nav lists each page under docs/ once, and nothing else."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    pages = nav_pages(config["nav"])
    on_disk = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md"))
    assert sorted(pages) == on_disk
