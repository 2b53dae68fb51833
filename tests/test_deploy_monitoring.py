"""The Grafana dashboard (deploy/grafana/) against Grafana's dashboard model, promtool and the
relay's metrics; the alerts' names and metrics against the relay's (their promtool checks and
unit tests run with each overlay in test_deploy_kubernetes.py).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy import validate

pytestmark = pytest.mark.deploy

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "deploy" / "kubernetes" / "monitoring" / "prometheusrule.yaml"
Obj = dict[str, Any]

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool (Debian package prometheus) not installed")


def dashboard() -> Obj:
    board: Obj = json.loads(validate.DASHBOARD.read_text())
    return board


def panel(board: Obj, title: str) -> Obj:
    (found,) = [p for p in board["panels"] if p["title"] == title]
    result: Obj = found
    return result


@needs_promtool
def test_dashboard_is_valid() -> None:
    """The shipped dashboard fits Grafana's model, its queries parse, its metrics exist."""
    assert validate.dashboard_problems(dashboard()) == []


def test_dashboard_is_what_its_builder_makes() -> None:
    """kvrelay.json is exactly what deploy/grafana/dashboard.py builds (no hand edits drift)."""
    result = subprocess.run([sys.executable, str(validate.DASHBOARD_SCRIPT), "--check"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_shows_what_the_alerts_watch() -> None:
    """Every metric an alert watches is on the dashboard."""
    rules = yaml.safe_load(RULES.read_text())
    watched = {name for group in rules["spec"]["groups"] for rule in group["rules"]
               for name in re.findall(r"\bkvrelay_[a-z0-9_]+", rule["expr"])}
    shown = set(re.findall(r"\bkvrelay_[a-z0-9_]+", validate.DASHBOARD.read_text()))
    assert watched <= shown, watched - shown


BREAKAGES: list[tuple[str, Callable[[Obj], None], str]] = [
    ("unknown-dashboard-field",
     lambda b: b.update(refreshInterval="30s"),
     "refreshInterval: not a field of Grafana's dashboard model"),
    ("unknown-panel-field",
     lambda b: panel(b, "Batches").update(unitt="ops"),
     "panels[5].unitt: not a field of Grafana's dashboard model"),
    ("unknown-metric",
     lambda b: panel(b, "Batches")["targets"][0].update(expr="rate(kvrelay_batches_total[5m])"),
     "kvrelay_batches_total is not a metric the relay exports"),
    ("query-does-not-parse",
     lambda b: panel(b, "Batches")["targets"][0].update(
         expr="sum by (pod) (rate(kvrelay_batches_received_total[$__rate_interval])"),
     "a query does not parse"),
    ("repeated-ref-id",
     lambda b: panel(b, "Batches")["targets"][1].update(refId="A"),
     "queries share a refId"),
    ("repeated-panel-id",
     lambda b: panel(b, "Batches").update(id=1),
     "panel ids repeat"),
]


@needs_promtool
@pytest.mark.parametrize(("breakage", "expected"), [(b[1], b[2]) for b in BREAKAGES],
                         ids=[b[0] for b in BREAKAGES])
def test_broken_dashboard_fails(breakage: Callable[[Obj], None], expected: str) -> None:
    """Each kind of mistake in the dashboard is reported, saying what is wrong."""
    board = copy.deepcopy(dashboard())
    breakage(board)
    problems = validate.dashboard_problems(board)
    assert any(expected in p for p in problems), problems
