"""bench/score_bench.py runs end to end on a small fleet: in-process scores and the HTTP
encodings, each line with its figures."""

from __future__ import annotations

import re
import subprocess
import sys

from harness import REPO


def test_score_bench_reports_latency_memory_and_http() -> None:
    """A small run prints memory per worker-block, three query kinds, the four HTTP bodies,
    and the latency at a fixed offered rate for those that keep up with it."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.score_bench", "--workers", "3", "--blocks", "300",
         "--tokens", "256", "--queries", "60", "--http", "--traced", "--duration", "0.5",
         "--connections", "2", "--rate", "50"], capture_output=True, text=True, timeout=120,
        cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert re.search(r"memory: .* \d+ bytes per held \(worker, block\)", out)
    assert re.search(r"memory allocated by the index: \d+ bytes per held", out)
    for kind in ("held request", "system prompt only", "no prefix"):
        assert re.search(rf"overlap_tokens, {kind}: p50 [\d.]+ ms, p99 [\d.]+ ms", out)
    for name in ("JSON", "JSON, packed ids", "msgpack", "msgpack, packed ids"):
        found = re.search(rf"HTTP scorer on one core, {name} \(.*: ([\d,]+) requests/s", out)
        assert found, out
        assert int(found.group(1).replace(",", "")) > 0
        assert re.search(rf"{name} \(.* server CPU [\d,]+ us per request", out)
    paced = re.findall(r"  at 50 requests/s offered: ([\d,]+) answered/s, p50 [\d.]+ ms, "
                       r"p99 [\d.]+ ms", out)
    assert len(paced) == 4, out  # each body keeps up with 50/s on a fleet this small
    assert all(40 <= int(n.replace(",", "")) <= 60 for n in paced), paced
