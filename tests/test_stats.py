"""`kvrelay stats` and `kvrelay tail --index`: per-worker views of the stream, as text."""

from __future__ import annotations

import io
import re
import time
from collections.abc import AsyncIterator

import nats
import pytest
from harness import run_cli
from test_consumer import A, B, Stream, new_namespace, relay_batch, stored

from kvrelay.ops.stats import StatsView, watch
from kvrelay.router.consumer import Delivery
from kvrelay.router.index import KvIndex
from kvrelay.testing.natsserver import NatsServer
from kvrelay.wire.schema import Resync, Stored

pytestmark = pytest.mark.integration


@pytest.fixture
async def stream(nats_server: NatsServer) -> AsyncIterator[Stream]:
    """A namespace of its own on the session server, holding a little history."""
    nc = await nats.connect(nats_server.url)
    try:
        s = Stream(nc, new_namespace())
        now = time.time()
        await s.publish(
            relay_batch(A, 0, stored(1, 2), stored(3, parent=2), relay_ts=now - 1),
            relay_batch(A, 1, stored(4, parent=3), relay_ts=now - 1),
            relay_batch(A, 2, Resync("overflow", 0, 0),
                        Stored([5], None, [0], 1, medium="CPU"), relay_ts=now - 1, ts=now - 3),
            relay_batch(B, 0, stored(1), relay_ts=now - 100),
            relay_batch(B, 3, stored(9), relay_ts=now - 100),  # seq 1..2 lost: a gap
        )
        yield s
    finally:
        await nc.close()


def subject_of(stream: Stream) -> str:
    return f"kv.{stream.namespace}.>"


async def test_stats_once_shows_each_worker(nats_server: NatsServer, stream: Stream) -> None:
    """One frame once caught up: per worker its epoch, seq, events/s over the window, lags,
    blocks, exactness, resyncs and gaps; a footer with the totals."""
    out = io.StringIO()
    code = await watch(nats_server.url, "KV_EVENTS", subject_of(stream), mode="stats",
                       once=True, window=10.0, out=out)
    assert code == 0
    lines = out.getvalue().splitlines()
    assert lines[0].endswith(f"{subject_of(stream)} on KV_EVENTS")
    assert lines[1].split() == ["worker", "epoch", "seq", "events/s", "lag(vllm)",
                                "lag(relay)", "blocks", "exact", "resyncs", "gaps"]
    rows = {line.split()[0]: line.split() for line in lines[2:4]}
    a, b = rows[f"{A[0]}.{A[1]}"], rows[f"{B[0]}.{B[1]}"]
    # A: 5 events relayed 1 s ago, in a 10 s window; B's are older than the window.
    assert a[1:4] == ["0", "2", "0.5"]
    assert b[1:4] == ["0", "3", "0.0"]
    assert re.fullmatch(r"\d+\.\d{3}s", a[4])
    assert 3.0 <= float(a[4][:-1]) < 60  # now - vLLM's ts of the last batch
    assert 1.0 <= float(a[5][:-1]) < 58  # now - the relay's
    assert float(b[5][:-1]) >= 100
    assert a[6:] == ["1", "no", "1", "0"]  # the resync emptied A, then CPU block 5
    assert b[6:] == ["1", "no", "0", "1"]
    assert re.match(r"stream seq \d+, 2 workers, gaps 1, undecodable 0, nats connected",
                    lines[4])


async def test_tail_index_once_shows_block_counts(nats_server: NatsServer,
                                                  stream: Stream) -> None:
    """tail --index prints each worker's blocks per tier, exactness and position."""
    await stream.publish(relay_batch(A, 3, stored(6, 7)))
    out = io.StringIO()
    code = await watch(nats_server.url, "KV_EVENTS", subject_of(stream), mode="index",
                       once=True, out=out)
    assert code == 0
    lines = out.getvalue().splitlines()
    assert lines[1] == (f"{A[0]}.{A[1]} blocks=3 (CPU/0=1, GPU/0=2) exact=no epoch=0 seq=3")
    assert lines[2] == f"{B[0]}.{B[1]} blocks=1 (GPU/0=1) exact=no epoch=0 seq=3"
    assert lines[3].startswith("stream seq ")


async def test_duration_prints_frames_until_it_ends(nats_server: NatsServer,
                                                    stream: Stream) -> None:
    """--duration keeps printing a frame every interval, then exits 0."""
    out = io.StringIO()
    started = time.monotonic()
    code = await watch(nats_server.url, "KV_EVENTS", subject_of(stream), mode="index",
                       interval=0.1, duration=0.5, out=out)
    assert code == 0
    assert time.monotonic() - started >= 0.5
    assert out.getvalue().count(" on KV_EVENTS\n") >= 3


def test_cli_stats_and_tail_index(nats_server: NatsServer, stream: Stream) -> None:
    """`kvrelay stats --once` and `kvrelay tail --index --once` run from the command line."""
    stats = run_cli(["stats", "--nats", nats_server.url, "--subject", subject_of(stream),
                     "--once"])
    assert stats.returncode == 0, stats.stderr
    assert "lag(vllm)" in stats.stdout
    assert "2 workers, gaps 1" in stats.stdout
    index = run_cli(["tail", "--index", "--nats", nats_server.url, "--subject",
                     subject_of(stream), "--once"])
    assert index.returncode == 0, index.stderr
    assert f"{A[0]}.{A[1]} blocks=" in index.stdout


@pytest.mark.parametrize("mode", ["stats", "index"])
async def test_unreachable_nats_or_missing_stream_exit_1(fresh_nats: NatsServer,
                                                         mode: str,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    """No stream, or no server: a one-line error and exit code 1, not a hang."""
    assert await watch(fresh_nats.url, "NO_SUCH", "kv.>", mode=mode, once=True,
                       out=io.StringIO()) == 1
    assert "no stream NO_SUCH" in capsys.readouterr().err
    fresh_nats.stop()
    assert await watch(fresh_nats.url, "KV_EVENTS", "kv.>", mode=mode, once=True,
                       connect_wait=1.0, out=io.StringIO()) == 1
    assert f"cannot reach NATS at {fresh_nats.url}" in capsys.readouterr().err


def test_events_per_second_uses_relay_timestamps() -> None:
    """events/s counts the events the relay received in the last window, by the batches' own
    relay timestamps, so replaying old history shows no burst."""
    now = [1000.0]
    view = StatsView(window=10.0, clock=lambda: now[0])
    index = KvIndex()
    for seq, relay_ts in enumerate((900.0, 995.0, 999.0)):
        batch = relay_batch(A, seq, stored(seq), stored(seq + 10), relay_ts=relay_ts)
        index.apply(batch)
        view.observe(Delivery("kv.x", seq + 1, batch, None))
    assert view.events_per_second(A) == pytest.approx(0.4)
    now[0] = 1006.0
    assert view.events_per_second(A) == pytest.approx(0.2)
    assert view.events_per_second(B) == 0.0
