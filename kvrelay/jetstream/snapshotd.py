"""The snapshot process: a Snapshotter fed by the relay through a pipe (kvrelay/jetstream/feed.py).

Started by the relay as `python -m kvrelay.jetstream.snapshotd`, never by hand. It reads the
settings from the first frame, lowers its own scheduling priority (its work can wait; the relay's
cannot), keeps the worker's blocks from the stored batches the relay passes on, writes the
snapshots, and reports to the relay on stdout. Signals are the relay's to handle: this process
ignores SIGINT and SIGTERM (a Ctrl-C reaches the whole process group) and stops when its stdin
ends, after the last snapshot if the relay asked for one (FINAL).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from typing import Final

import msgspec
import uvloop

from kvrelay.config import NatsSettings, SnapshotSettings, StreamSettings
from kvrelay.jetstream.feed import (
    FINAL,
    GAP,
    HEAD,
    READY,
    SETUP,
    STORED,
    FrameReader,
    LineReports,
)
from kvrelay.jetstream.snapshot import Snapshotter
from kvrelay.system.logs import setup_logging
from kvrelay.wire.names import Worker

NICE: Final = 10


class Setup(msgspec.Struct, frozen=True):
    """What the relay tells its snapshot process first."""

    worker: tuple[str, str, int, str]
    dp_ranks: list[int]
    snapshot: SnapshotSettings
    nats: NatsSettings
    stream: StreamSettings
    log_level: str = "info"
    log_format: str = "text"


class _Feed(asyncio.Protocol):
    """The relay's frames, handed to the Snapshotter as they arrive."""

    def __init__(self, on_frame: FrameSink) -> None:
        self._reader = FrameReader()
        self._on_frame = on_frame
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        try:
            for frame in self._reader.feed(data):
                self._on_frame(*frame)
        except ValueError as exc:
            if not self.ended.done():
                self.ended.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended.done():
            self.ended.set_result(None)


class FrameSink:
    """Does what each frame says."""

    def __init__(self, snapshotter: Snapshotter) -> None:
        self.snapshotter = snapshotter
        self.stream_ready = asyncio.Event()
        self.final: float | None = None  # seconds for the last snapshot, once asked

    def __call__(self, kind: int, dp_rank: int, stream_seq: int, body: bytes) -> None:
        if kind == STORED:
            self.snapshotter.stored(dp_rank, body, stream_seq)
        elif kind == GAP:
            self.snapshotter.gap(dp_rank)
        elif kind == READY:
            self.stream_ready.set()
        elif kind == FINAL:
            self.final = float(body)


def read_setup(fd: int = 0) -> Setup:
    """The first frame of stdin, read exactly (blocking: nothing else runs yet), so what
    follows it is left for the loop."""
    length, kind, _, _ = HEAD.unpack(_read_exactly(fd, HEAD.size))
    if kind != SETUP:
        raise SystemExit("kvrelay snapshot process: the first frame is not the setup")
    return msgspec.json.decode(_read_exactly(fd, length), type=Setup)


def _read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        part = os.read(fd, size - len(data))
        if not part:
            raise SystemExit("kvrelay snapshot process: stdin ended before the setup")
        data += part
    return data


async def serve(setup: Setup) -> int:
    loop = asyncio.get_running_loop()
    out_transport, _ = await loop.connect_write_pipe(
        asyncio.Protocol, os.fdopen(sys.stdout.fileno(), "wb", buffering=0, closefd=False))
    reports = LineReports(out_transport.write)
    worker = Worker(*setup.worker)
    snapshotter = Snapshotter(worker, setup.dp_ranks, setup.snapshot, setup.nats, setup.stream,
                              reports)
    sink = FrameSink(snapshotter)
    _, feed = await loop.connect_read_pipe(
        lambda: _Feed(sink), os.fdopen(sys.stdin.fileno(), "rb", buffering=0, closefd=False))
    snapshotter.start(sink.stream_ready)
    try:
        await feed.ended
    finally:
        if sink.final is not None:
            await snapshotter.final(sink.final)
        await snapshotter.close()
        out_transport.close()
    return 0


def main() -> int:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    setup = read_setup()
    setup_logging(setup.log_level, setup.log_format)
    with contextlib.suppress(OSError):
        os.nice(NICE)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(setup))


if __name__ == "__main__":
    sys.exit(main())
