"""The relay's snapshot process: the pipe's frames and reports, and the process itself under a
real relay, a real nats-server and a synthetic vLLM: killed, stopped, interrupted."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest
from harness import COMP, eventually, join, metric, new_instance_id, publish, running_relay
from test_snapshot import bucket_snapshot, held, new_namespace, own_index_ready

from kvrelay.app import Relay
from kvrelay.jetstream import snapshotd, snapshotproc
from kvrelay.jetstream.feed import (
    FINAL,
    GAP,
    READY,
    STORED,
    FrameReader,
    LineReports,
    frame,
    replay_line,
)
from kvrelay.jetstream.reports import MetricsReports
from kvrelay.router.restore import snapshot_key
from kvrelay.system.metrics import Metrics
from kvrelay.testing.natsserver import NatsServer
from kvrelay.testing.synthetic import SyntheticVllm, WorkloadFactory

FRAMES = [(STORED, 1, 77, b"a payload"), (GAP, 3, 0, b""), (READY, 0, 0, b""),
          (STORED, 0, 2**63, bytes(range(256)) * 3), (FINAL, 0, 0, b"2.5")]


def test_frames_come_out_whole_however_the_pipe_cuts_them() -> None:
    """Frames read back the same whether the bytes arrive at once, one at a time or in odd
    pieces; bytes that are not this protocol are refused, not guessed at."""
    data = b"".join(frame(kind, body, rank, seq) for kind, rank, seq, body in FRAMES)
    for size in (len(data), 1, 7, 100):
        reader = FrameReader()
        got = [f for at in range(0, len(data), size) for f in reader.feed(data[at:at + size])]
        assert got == FRAMES, f"pieces of {size}"
    with pytest.raises(ValueError, match="kind 9"):
        list(FrameReader().feed(frame(9, b"x")))


def test_report_lines_become_the_relay_metrics() -> None:
    """What the process reports, sent as lines, lands in the relay's metrics as if reported
    in the relay; a line that is not a report is refused."""
    lines: list[bytes] = []
    sender = LineReports(lines.append)
    sender.failed("write")
    sender.built(0.25)
    sender.written(1, 900, 4096, 1.0e9)
    sender.live(1, 900)
    metrics = Metrics()
    reports = MetricsReports(metrics)
    assert all(replay_line(line, reports) for line in lines)
    sample = metrics.registry.get_sample_value
    assert sample("kvrelay_snapshot_failures_total", {"reason": "write"}) == 1
    assert sample("kvrelay_snapshot_build_cpu_seconds_total", {}) == 0.25
    assert sample("kvrelay_snapshots_written_total", {}) == 1
    assert sample("kvrelay_snapshot_stream_sequence", {"dp_rank": "1"}) == 900
    assert sample("kvrelay_snapshot_bytes", {"dp_rank": "1"}) == 4096
    assert reports.live_ranks == {1: 900}
    for junk in (b"not json\n", b'["drop_tables"]\n', b'{"failed": 1}\n', b'["written", 1]\n'):
        assert not replay_line(junk, reports), junk


def child_pid(relay: Any) -> int:
    proc = relay.snapshotter._proc
    assert proc is not None
    assert proc.returncode is None
    return int(proc.pid)


@contextlib.asynccontextmanager
async def snapshotting_relay(nats_server: NatsServer, ns: str, instance: int,
                             vllm: SyntheticVllm) -> AsyncIterator[Relay]:
    """A relay for `vllm` whose snapshot process has rebuilt its blocks; its only snapshot is
    the last one, at shutdown."""
    async with running_relay(nats=nats_server.url, namespace=ns, instance_id=instance,
                             zmq=[vllm.address], snapshot_interval=3600,
                             snapshot_events=0) as relay:
        await eventually(lambda: own_index_ready(relay), "the blocks rebuilt")
        yield relay


async def test_a_killed_snapshot_process_is_started_again_and_rebuilds(
        nats_server: NatsServer, nc: Any) -> None:
    """The snapshot process, running at a lower priority than the relay, killed: counted,
    logged, started again; it rebuilds the blocks from the stream, and the relay's last
    snapshot holds exactly what the engine holds. A SIGINT (a Ctrl-C reaches the whole process
    group) leaves it to the relay."""
    ns, instance = new_namespace(), new_instance_id()
    with SyntheticVllm("tcp://127.0.0.1:*", factory=WorkloadFactory(seed=21)) as vllm:
        async with snapshotting_relay(nats_server, ns, instance, vllm) as relay:
            first = child_pid(relay)
            own = os.getpriority(os.PRIO_PROCESS, 0)
            assert os.getpriority(os.PRIO_PROCESS, first) == min(19, own + snapshotd.NICE)
            os.kill(first, signal.SIGINT)
            await join(vllm, relay)
            publish(vllm, 20)
            await asyncio.sleep(0.3)
            assert child_pid(relay) == first, "SIGINT ended the snapshot process"
            os.kill(first, signal.SIGKILL)
            await eventually(lambda: metric(relay, "kvrelay_snapshot_failures_total",
                                            reason="process") == 1, "the exit counted")
            await eventually(lambda: own_index_ready(relay), "rebuilt by a new process",
                             within=15)
            assert child_pid(relay) != first
            publish(vllm, 20)
            await eventually(lambda: metric(relay, "kvrelay_batches_published_total") == 40,
                             "every batch stored")
        # The new process's, once rebuilt (none was written before), and the last.
        assert metric(relay, "kvrelay_snapshots_written_total") == 2
        snapshot = await bucket_snapshot(nc, snapshot_key(ns, COMP, instance, 0))
        assert snapshot is not None
        assert (snapshot.seq, snapshot.exact) == (39, True)
        assert held(snapshot) == vllm.factory.stored_blocks


async def test_a_snapshot_process_too_far_behind_rebuilds_what_it_missed(
        nats_server: NatsServer, nc: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stopped snapshot process lets the pipe fill: past the bound the relay lets stored
    batches go (counted as `behind`) instead of holding them, and the process, told of
    the gap, rebuilds that rank from the stream: the last snapshot is still exact."""
    monkeypatch.setattr(snapshotproc, "_BEHIND_MAX", 4096)
    monkeypatch.setattr(snapshotproc, "_FLUSH_BYTES", 1)
    ns, instance = new_namespace(), new_instance_id()
    with SyntheticVllm("tcp://127.0.0.1:*", factory=WorkloadFactory(seed=22)) as vllm:
        async with snapshotting_relay(nats_server, ns, instance, vllm) as relay:
            pid = child_pid(relay)
            os.kill(pid, signal.SIGSTOP)
            try:
                await join(vllm, relay)
                publish(vllm, 400)  # far more than 4 KiB of payloads plus the pipe's 64 KiB
                await eventually(lambda: metric(relay, "kvrelay_batches_published_total")
                                 == 400, "every batch stored")
                # Counted when batches are first let go (again if the bound is passed anew).
                assert metric(relay, "kvrelay_snapshot_failures_total", reason="behind") >= 1
                assert metric(relay, "kvrelay_batches_dropped_total", reason="shutdown") == 0
            finally:
                os.kill(pid, signal.SIGCONT)
            publish(vllm, 5)
            await eventually(lambda: metric(relay, "kvrelay_batches_published_total") == 405,
                             "the next batches stored")
            snapshots = relay.snapshotter
            assert snapshots is not None
            await eventually(lambda: not snapshots.behind and own_index_ready(relay),
                             "the rank rebuilt", within=15)
            assert child_pid(relay) == pid  # the same process caught up
        snapshot = await bucket_snapshot(nc, snapshot_key(ns, COMP, instance, 0))
        assert snapshot is not None
        assert (snapshot.seq, snapshot.exact) == (404, True)
        assert held(snapshot) == vllm.factory.stored_blocks
