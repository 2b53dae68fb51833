"""The benchmark tool: its consumer's check, its report, its command line and short real runs
(the workload: test_bench_workload.py; targets, builds and relay CPU: test_bench_targets.py)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from array import array
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.msg import Msg

import kvrelay
from bench.cli import main
from bench.consumer import ConsumePlan, Consumer, percentiles
from bench.report import over_path, summarize
from bench.run import capped_by, trial_seconds, verdict
from bench.track import Track
from bench.trial import TrialResult
from bench.workload import (
    CLEARED,
    REMOVED,
    STORED,
    Fingerprint,
    WorkloadSpec,
    build_pools,
)

TRIAL_FIELDS = {f.name for f in dataclasses.fields(TrialResult)}
REPORT_KEYS = {"version", "config", "machine", "targets", "unavailable", "limits", "summary",
               "search", "ratios", "trials", "errors", "path_lag", "measurement", "idle"}
LIMIT_KEYS = {"zmq_pub_sub", "nats_core_publish", "jetstream_publish_await",
              "jetstream_publish_window"}
MEASURED = ("batches_per_s", "events_per_s", "lag_p50_ms", "lag_p99_ms", "lag_p999_ms",
            "lag_max_ms", "relay_cpu_s", "relay_cpu_us_per_batch", "relay_cpu_s_per_m_events",
            "relay_cpu_percent",
            "relay_peak_rss_mib", "nats_cpu_s_per_m_events", "feeder_batches_per_s",
            "nats_cpu_percent", "consumer_cpu_percent", "feeder_cpu_percent",
            "machine_busy_percent")


# -- the consumer's check -------------------------------------------------------------------------


def _track(fps: list[list[Fingerprint]], capacity: int = 100,
           prefix: int = 0) -> tuple[Track, array[float]]:
    ts = memoryview(bytearray(8 * capacity)).cast("d")
    for b in range(capacity):
        ts[b] = 1000.0 + b
    lags: array[float] = array("d")
    return Track(0, fps, ts, capacity, lags, prefix), lags


POOL: list[list[Fingerprint]] = [[(STORED, 1)], [(STORED, 2), (REMOVED, 1)], [(STORED, 3)],
                                 [(CLEARED, None)]]


def test_track_matches_every_event_once_across_pool_cycles() -> None:
    """Events in order over two cycles all match; each batch after warm-up gets a lag."""
    track, lags = _track(POOL)
    flat = [fp for batch in POOL for fp in batch] * 2
    for fp in flat:
        track.event(fp, now=2000.0)
    assert (track.matched, track.batches, track.duplicates, track.corrupt) == (10, 8, 0, 0)
    assert list(lags) == [2000.0 - (1000.0 + b) for b in range(1, 8)]


def test_track_realigns_by_content_after_lost_events() -> None:
    """A missing event is not matched, and the events after it still are."""
    track, _ = _track(POOL)
    flat = [fp for batch in POOL for fp in batch] * 2
    for i, fp in enumerate(flat):
        if i not in (2, 6):
            track.event(fp, now=2000.0)
    assert track.matched == len(flat) - 2
    assert track.duplicates == 0


def test_track_counts_repeats_and_wrong_content() -> None:
    """A batch seen twice counts as duplicates; an event unlike the one at its place, corrupt."""
    track, _ = _track(POOL)
    track.event((STORED, 1), 0.0, at=track.position(0))
    track.event((STORED, 1), 0.0, at=track.position(0))
    track.event((STORED, 99), 0.0, at=track.position(1))
    assert (track.matched, track.duplicates, track.corrupt) == (1, 1, 1)


def test_track_counts_order_keys_that_do_not_follow() -> None:
    """Only a key that is not the expected successor counts as out of order."""
    track, _ = _track(POOL)
    track.order((0, 0), (0, 0))
    track.order((1, 0), (1, 0))
    track.order((3, 0), (2, 0))
    assert track.out_of_order == 1


def test_track_takes_an_announced_jump_as_in_order() -> None:
    """A seq jump that comes with a resync is in order; a step back still is not."""
    track, _ = _track(POOL)
    track.order((0, 0), (0, 0))
    track.order((5, 0), (1, 0), announced=True)
    track.order((4, 0), (6, 0), announced=True)
    assert track.out_of_order == 1


def test_track_counts_batches_past_the_timestamps_as_untimed() -> None:
    """A batch beyond the feeder's timestamp array is matched and counted, not timed."""
    track, lags = _track(POOL, capacity=4)
    flat = [fp for batch in POOL for fp in batch] * 2
    for at, fp in enumerate(flat):
        track.event(fp, now=2000.0, at=at)
    assert (track.batches, track.untimed, len(lags)) == (8, 4, 3)


def test_track_does_not_time_a_batch_the_feeder_has_not_sent() -> None:
    """A batch matched before the feeder stamped its send time is counted, not timed."""
    track, lags = _track(POOL, capacity=8)
    track._ts[5] = 0.0
    flat = [fp for batch in POOL for fp in batch] * 2
    for at, fp in enumerate(flat):
        track.event(fp, now=2000.0, at=at)
    assert (track.batches, track.untimed, len(lags)) == (8, 1, 6)
    assert all(lag < 1000.0 for lag in lags)


def test_track_follows_a_prefix_sent_once_then_the_cycle() -> None:
    """Batch seqs and content both find their place past the prefix, over cycle wraps; only
    batches after the warm-up prefix are timed, and a prefix batch seen again is a duplicate."""
    pool = build_pools(WorkloadSpec(live_blocks=40, pool_batches=2, prefill_blocks=16), 1, 1)[0]
    assert (pool.prefix, pool.cycle) == (3, 11)
    seqs = pool.prefix + 3 * pool.cycle + 2
    for by_seq in (True, False):
        track, lags = _track(pool.fingerprints, capacity=seqs, prefix=pool.prefix)
        for seq in range(seqs):
            at = track.position(seq)
            for fp in pool.fingerprints[pool.index(seq)]:
                track.event(fp, now=2000.0, at=at if by_seq else None)
                at += 1
        assert (track.batches, track.duplicates, track.corrupt) == (seqs, 0, 0)
        assert track.matched == sum(pool.events_of(seq) for seq in range(seqs))
        assert list(lags) == [2000.0 - (1000.0 + b) for b in range(pool.prefix, seqs)]
    track.event(pool.fingerprints[0][0], now=2000.0, at=track.position(0))
    assert track.duplicates == 1


def _router_message(worker_id: int, event_id: int, data: Any) -> Msg:
    event = {"worker_id": worker_id, "storage_tier": "device", "residency_domain": "worker",
             "event": {"event_id": event_id, "dp_rank": 0, "data": data}}
    envelope = {"publisher_id": worker_id, "sequence": event_id - 1, "published_at": 0,
                "topic": "kv-events", "payload": msgspec.msgpack.encode([event])}
    # The handler reads the payload only; no client is needed to build the message.
    return Msg(_client=None, subject="kv-events",  # type: ignore[arg-type]
               data=msgspec.msgpack.encode(envelope))


def test_dynamo_output_announcing_a_gap_with_cleared_counts_as_a_resync() -> None:
    """A `cleared` where no vLLM clear is due announces a gap; the events after it still match."""
    shm = SharedMemory(create=True, size=8 * 100)
    consumer = Consumer(ConsumePlan("dynamo", "nats://unused", "kv-events", None, {(7, 0): 0},
                                    [POOL], [0], shm.name, 100))
    try:
        stored = [{"stored": {"parent_hash": None, "start_position": None, "blocks": [
            {"block_hash": h, "tokens_hash": h, "mm_extra_info": None}]}} for h in (1, 2, 3)]
        for event_id, data in enumerate([stored[0], "cleared", stored[2], "cleared"], 1):
            consumer._dynamo(_router_message(7, event_id, data))
        result = consumer.result()
        assert (result.resyncs, result.matched_events, result.duplicates) == (1, [3], 0)
    finally:
        consumer.close()
        shm.close()
        shm.unlink()


def test_percentiles_are_nearest_rank_then_max() -> None:
    """p50/p99 of 1..100 are 50 and 99, and the maximum comes last."""
    assert percentiles(array("d", range(100, 0, -1)), (50.0, 99.0)) == [50, 99, 100]
    assert percentiles(array("d"), (50.0,)) == []


# -- the report -----------------------------------------------------------------------------------


def _trial(**overrides: Any) -> TrialResult:
    values: dict[str, Any] = {name: 0 for name in TRIAL_FIELDS}
    values.update(target="kvrelay", relay_build="python", offered_batches_per_s=1000.0, ok=True,
                  notes=[],
                  feeder_batches_per_s=1000.0, batches_per_s=1000.0, lag_p99_ms=2.0)
    values.update(overrides)
    return TrialResult(**values)


def test_summary_takes_medians_and_sums_losses() -> None:
    """Repeats of one configuration: medians of measurements, sum of what was lost."""
    rows = summarize([_trial(events_per_s=10.0, lost_events=0),
                      _trial(events_per_s=30.0, lost_events=2, ok=False),
                      _trial(events_per_s=20.0, lost_events=1, ok=False)])
    assert len(rows) == 1
    assert rows[0]["events_per_s"] == 20.0
    assert rows[0]["lost_events"] == 3
    assert rows[0]["ok"] is False
    assert rows[0]["runs"] == 3


def test_summary_sets_cpu_per_batch_against_dynamo_at_the_same_rate() -> None:
    """Each row's CPU per batch over dynamo's at its rate; none where dynamo did not run."""
    rows = summarize([_trial(relay_cpu_us_per_batch=60.0),
                      _trial(target="dynamo", relay_build="ai-dynamo-runtime 1.6.1",
                             relay_cpu_us_per_batch=120.0),
                      _trial(offered_batches_per_s=100.0, relay_cpu_us_per_batch=400.0)])
    by = {(r["target"], r["offered_batches_per_s"]): r for r in rows}
    assert by["kvrelay", 1000.0]["cpu_per_batch_vs_dynamo"] == 0.5
    assert by["dynamo", 1000.0]["cpu_per_batch_vs_dynamo"] == 1.0
    assert by["kvrelay", 100.0]["cpu_per_batch_vs_dynamo"] is None
    assert by["dynamo", 1000.0]["build"] == "ai-dynamo-runtime 1.6.1"


def test_search_step_verdicts() -> None:
    """A step fails on feeder shortfall, loss, falling behind or lag; passes otherwise."""
    assert verdict(_trial(), 1000.0, 500.0) is None
    assert "feeder" in (verdict(_trial(feeder_batches_per_s=500.0), 1000.0, 500.0) or "")
    assert "loss" in (verdict(_trial(ok=False, lost_events=3), 1000.0, 500.0) or "")
    assert "behind" in (verdict(_trial(batches_per_s=800.0), 1000.0, 500.0) or "")
    assert "lag" in (verdict(_trial(lag_p99_ms=900.0), 1000.0, 500.0) or "")


def test_lag_is_set_against_the_nats_path_each_target_publishes_on() -> None:
    """kvrelay (read from a stream) over the JetStream path, dynamo over core, per rate."""
    summary: list[dict[str, Any]] = [
        {"target": "kvrelay", "offered_batches_per_s": 2000.0, "lag_p99_ms": 3.0},
        {"target": "dynamo", "offered_batches_per_s": 2000.0, "lag_p99_ms": 1.0},
        {"target": "kvrelay", "offered_batches_per_s": None, "lag_p99_ms": 9.0}]
    path = {"2000": {"core_p99_ms": 0.5, "jetstream_p99_ms": 1.5}}
    assert over_path(summary, path) == {"kvrelay": {"2000": 2.0}, "dynamo": {"2000": 2.0}}


def test_search_names_the_part_that_capped_a_step() -> None:
    """A busy machine is the cap; below that a full single-threaded part is; else nothing."""
    busy = _trial(machine_busy_percent=97.0, nats_cpu_percent=63.0, relay_cpu_percent=46.0)
    assert capped_by(busy).startswith("capped by the machine (97% of all cores busy)")
    assert "nats-server 63%, relay 46%" in capped_by(busy)
    consumer = _trial(machine_busy_percent=60.0, consumer_cpu_percent=99.0)
    assert capped_by(consumer).startswith("capped by the consumer (a full core)")
    relay = _trial(machine_busy_percent=60.0, relay_cpu_percent=95.0)
    assert capped_by(relay).startswith("capped by the relay (a full core)")
    idle = _trial(machine_busy_percent=80.0, nats_cpu_percent=95.0)
    assert capped_by(idle).startswith("capped by no part saturated (80% busy)")


def test_a_low_rate_runs_long_enough_for_its_minimum_of_batches() -> None:
    """100/s runs 3000 batches (30 s) where 10 s would give 1000; fast rates keep --duration."""
    assert trial_seconds(100.0, 10.0, 3000) == 30.0
    assert trial_seconds(10_000.0, 10.0, 3000) == 10.0
    assert trial_seconds(None, 4.0, 3000) == 4.0
    assert trial_seconds(100.0, 4.0, 0) == 4.0


@pytest.mark.parametrize("args", [["--rates", "0"], ["--rates", "fast"], ["--targets", "x"],
                                  ["--blocks", "9-2"], ["--workers", "0"],
                                  ["--pub-heartbeat", "-1"], ["--idle", "0"],
                                  ["--idle-window", "-5"], ["--live-blocks", "1"],
                                  ["--live-blocks", "9000", "--blocks", "2-6"],
                                  ["--together-below", "-1"]])
def test_cli_rejects_bad_arguments(args: list[str]) -> None:
    """Invalid arguments exit with usage status 2 before anything starts."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2


# -- real runs ------------------------------------------------------------------------------------


def _bench(tmp_path: Path, *args: str, timeout: float = 240) -> dict[str, Any]:
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", *args, "--json", str(out)],
        capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def _assert_complete_and_lossless(report: dict[str, Any], targets: list[str]) -> None:
    assert set(report) >= REPORT_KEYS
    assert report["errors"] == []
    assert sorted(t["target"] for t in report["trials"]) == sorted(targets)
    for trial in report["trials"]:
        assert set(trial) == TRIAL_FIELDS
        assert trial["lost_events"] == 0, trial
        assert trial["ok"], trial
        assert trial["received_events"] == trial["sent_events"] > 0
        for name in MEASURED:
            assert isinstance(trial[name], float), (name, trial)
            assert trial[name] > 0, (name, trial)
    for row in report["summary"]:
        assert row["lost_events"] == 0


def _overlap(report: dict[str, Any]) -> float:
    """Seconds the timed windows of a report's two trials have in common (negative: the gap
    between them)."""
    first, second = report["trials"]
    return float(min(first["window_end"], second["window_end"])
                 - max(first["window_start"], second["window_start"]))


@pytest.mark.integration
def test_bench_kvrelay_and_naive_deliver_every_event(tmp_path: Path) -> None:
    """A 3 s run of kvrelay and naive at 500 batches/s loses nothing and reports every field;
    below --together-below (1000 by default) the two trials' timed windows coincide."""
    report = _bench(tmp_path, "--targets", "kvrelay,naive", "--rates", "500",
                    "--duration", "3", "--limits-duration", "0.5", "--idle-window", "0")
    _assert_complete_and_lossless(report, ["kvrelay", "naive"])
    assert _overlap(report) > 2.5, report["trials"]
    builds = {t["target"]: t["relay_build"] for t in report["trials"]}
    assert builds == {"kvrelay": kvrelay.build(), "naive": "python"}
    assert set(report["limits"]["median"]) == LIMIT_KEYS
    assert all(v > 0 for v in report["limits"]["median"].values())
    assert set(report["ratios"]["kvrelay/naive"]["at_offered_rate"]["500"]) >= {
        "events_per_s", "relay_cpu_s_per_m_events", "lag_p99_ms"}
    path = report["path_lag"]["median"]["500"]
    assert set(path) == {"core_p50_ms", "core_p99_ms", "jetstream_p50_ms", "jetstream_p99_ms"}
    assert all(0 < v < 1000 for v in path.values()), path
    assert set(report["path_lag"]["p99_over_path"]) == {"kvrelay", "naive"}


@pytest.mark.integration
def test_bench_live_blocks_with_snapshots_on_and_off_deliver_every_event(tmp_path: Path) -> None:
    """With --live-blocks the pre-fill and the steady store-remove cycle all arrive, with
    snapshots written by the relay (kvrelay-relaysnap) and not (kvrelay), and the report says
    how many blocks were live; with --together-below 0 one trial runs after the other."""
    report = _bench(tmp_path, "--targets", "kvrelay,kvrelay-relaysnap", "--rates", "500",
                    "--duration", "2", "--min-batches", "0", "--no-limits",
                    "--live-blocks", "5000", "--idle-window", "0", "--together-below", "0")
    _assert_complete_and_lossless(report, ["kvrelay", "kvrelay-relaysnap"])
    assert _overlap(report) < 0, report["trials"]
    assert report["config"]["workload"]["live_blocks"] == 5000
    for trial in report["trials"]:  # the pre-fill's 5000 blocks came first, 64 a batch
        assert trial["sent_batches"] > 2 * math.ceil(2500 / 64) + 500 * 2 * 0.9


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("dynamo") is None,
                    reason="ai-dynamo-runtime is not installed (pip install -e '.[bench]')")
def test_bench_dynamo_delivers_every_event(tmp_path: Path) -> None:
    """Dynamo's own relay, fed the same way, delivers every event in order to the consumer."""
    report = _bench(tmp_path, "--targets", "dynamo", "--rates", "500", "--duration", "3",
                    "--no-limits", "--idle-window", "0")
    _assert_complete_and_lossless(report, ["dynamo"])
    version = importlib.metadata.version("ai-dynamo-runtime")
    assert report["trials"][0]["relay_build"] == f"ai-dynamo-runtime {version}"
    assert report["summary"][0]["cpu_per_batch_vs_dynamo"] == 1.0


def _processes_using(marker: str, command: bytes = b"") -> list[int]:
    """Other processes whose command line or environment holds `marker` (and `command`)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue  # gone meanwhile
        if marker.encode() in cmdline + environ and command in cmdline:
            found.append(int(entry.name))
    return found


@pytest.mark.integration
@pytest.mark.parametrize("args", [["--targets", "kvrelay"],
                                  ["--targets", "kvrelay,naive", "--idle-window", "0"]],
                         ids=["alone", "together"])
def test_bench_ctrl_c_stops_every_process_it_started(tmp_path: Path, args: list[str]) -> None:
    """SIGINT mid-run: the bench exits 130 and no relay, server or helper process is left,
    one target alone (stopped in its idle measurement) and two whose trials run together
    (500/s, below --together-below)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", *args, "--rates", "500", "--duration", "60",
         "--no-limits"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        deadline = time.monotonic() + 60
        while not _processes_using(str(tmp_path), b"relay\x00run"):
            assert time.monotonic() < deadline, "the relay never started"
            assert proc.poll() is None, "the bench exited early"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 5
    while _processes_using(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_using(str(tmp_path)) == []
