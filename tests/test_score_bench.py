"""bench/score_bench.py runs end to end on a small fleet: in-process scores and both HTTP
encodings, each line with its figures."""

from __future__ import annotations

import re
import subprocess
import sys

from harness import REPO


def test_score_bench_reports_latency_memory_and_http() -> None:
    """A small run prints memory per worker-block, three query kinds and both HTTP formats."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.score_bench", "--workers", "3", "--blocks", "300",
         "--tokens", "256", "--queries", "60", "--http", "--traced", "--duration", "0.5",
         "--connections", "2"], capture_output=True, text=True, timeout=120, cwd=REPO,
        check=False)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert re.search(r"memory: .* \d+ bytes per held \(worker, block\)", out)
    assert re.search(r"memory allocated by the index: \d+ bytes per held", out)
    for kind in ("held request", "system prompt only", "no prefix"):
        assert re.search(rf"overlap_tokens, {kind}: p50 [\d.]+ ms, p99 [\d.]+ ms", out)
    for name in ("JSON", "msgpack", "msgpack, packed ids"):
        found = re.search(rf"HTTP scorer on one core, {name} \(.*: ([\d,]+) requests/s", out)
        assert found, out
        assert int(found.group(1).replace(",", "")) > 0
        assert re.search(rf"{name} \(.* server CPU [\d,]+ us per request", out)
