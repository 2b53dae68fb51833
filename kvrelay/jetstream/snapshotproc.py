"""The relay's side of snapshots: a process of their own, fed every stored batch through a pipe.

Keeping a worker's blocks costs a third of the relay's CPU per batch at 10,000 batches/s, and a
snapshot of a quarter of a million blocks about half a second of CPU: on the publishing loop,
or in a child forked from it (whose copy-on-write faults land on the loop), that is lag. So the
Snapshotter (kvrelay/jetstream/snapshot.py) runs in a child process (kvrelay/jetstream/
snapshotd.py) at a lower scheduling priority, and the relay only appends each stored batch's
payload, already encoded, to a buffer it writes to the child's stdin every `_FLUSH_BYTES`
bytes or `_FLUSH_AFTER` seconds (a quiet relay wakes its child once a second at most).

What the child cannot take in time waits in the pipe's buffer, up to `_BEHIND_MAX` bytes; past
that the relay stops passing batches on (until the child has read half of it), counts the
failure (`behind`) and tells the child which ranks missed batches (GAP), which it then rebuilds
from their last snapshot and the stream. A child that exits is logged, counted (`process`) and
started again after a growing pause; it rebuilds from the bucket and the stream, as a relay
restart does. Its reports (kvrelay/jetstream/feed.py) become the relay's snapshot metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from typing import Final

import msgspec

from kvrelay.config import NatsSettings, SnapshotSettings, StreamSettings, SystemSettings
from kvrelay.jetstream.feed import FINAL, GAP, HEAD, READY, SETUP, STORED, frame, replay_line
from kvrelay.jetstream.reports import MetricsReports
from kvrelay.system.metrics import Metrics
from kvrelay.wire.names import Worker

log = logging.getLogger("kvrelay.snapshot")

_FLUSH_BYTES: Final = 64 << 10
_FLUSH_AFTER: Final = 1.0  # seconds a stored batch waits at most before it is written
_BEHIND_MAX: Final = 16 << 20  # bytes the child may leave unread before batches are let go
_RESTART_MAX: Final = 60.0
_MODULE: Final = "kvrelay.jetstream.snapshotd"


class SnapshotProcess:
    """Starts and feeds the snapshot process; the surface the relay uses."""

    def __init__(self, worker: Worker, dp_ranks: list[int], config: SnapshotSettings,
                 nats: NatsSettings, stream: StreamSettings, system: SystemSettings,
                 metrics: Metrics) -> None:
        self._setup = msgspec.json.encode({
            "worker": list(worker), "dp_ranks": dp_ranks, "snapshot": config, "nats": nats,
            "stream": stream, "log_level": system.log_level, "log_format": system.log_format})
        self.reports = MetricsReports(metrics)
        self._out = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._gaps: set[int] = set()  # ranks that missed batches, not told yet
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stream_ready: asyncio.Event | None = None
        self._stopping = False

    # -- the publisher's hook (per stored batch) ------------------------------------------------

    def stored(self, dp_rank: int, payload: bytes, stream_seq: int) -> None:
        """JetStream stored `payload` at `stream_seq`: on to the child with the next write."""
        if self._writer is None:
            return  # no child: the next one rebuilds from the stream
        out = self._out
        out += HEAD.pack(len(payload), STORED, dp_rank, stream_seq)
        out += payload
        if len(out) >= _FLUSH_BYTES:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(_FLUSH_AFTER, self._flush)

    def _flush(self, force: bool = False) -> None:
        """Write what waits to the child; past the bound (unless `force`) let it go instead,
        and try again for the gaps later."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        writer, out = self._writer, self._out
        if writer is not None and not writer.transport.is_closing():
            transport = writer.transport
            # Once behind, it stays so until the child has read half of what waits: a smaller
            # batch fitting under the bound again is no catching up (nor a second episode).
            bound = _BEHIND_MAX // 2 if self._gaps else _BEHIND_MAX
            if not force and transport.get_write_buffer_size() + len(out) > bound:
                if out:
                    self._let_go(out)
                self._timer = asyncio.get_running_loop().call_later(_FLUSH_AFTER, self._flush)
            else:
                for dp_rank in sorted(self._gaps):  # before any batch stored after the gap
                    transport.write(frame(GAP, dp_rank=dp_rank))
                    self.reports.live_ranks.pop(dp_rank, None)
                self._gaps.clear()
                if out:
                    transport.write(bytes(out))
        out.clear()

    def _let_go(self, out: bytearray) -> None:
        """The child is too far behind: the batches in `out` are not passed on."""
        missed = {HEAD.unpack_from(out, at)[2] for at in _frame_starts(out)}
        if not self._gaps:
            self.reports.failed("behind")
            log.warning("the snapshot process is more than %d MiB behind; the blocks of DP "
                        "rank(s) %s are rebuilt from the stream", _BEHIND_MAX >> 20,
                        ", ".join(map(str, sorted(missed))))
        self._gaps |= missed

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, stream_ready: asyncio.Event) -> None:
        """Start the child, and again whenever it exits, until `final` or `close`."""
        self._stream_ready = stream_ready
        self._task = asyncio.ensure_future(self._supervise())

    @property
    def stopping(self) -> bool:
        """Whether `final` or `close` was called: the child is not started again."""
        return self._stopping

    @property
    def behind(self) -> bool:
        """Whether batches were let go and the child is not told yet."""
        return bool(self._gaps)

    def ready(self, dp_rank: int) -> bool:
        """Whether the child rebuilt the rank's blocks and follows what is stored."""
        return dp_rank in self.reports.live_ranks

    async def final(self, within: float) -> None:
        """Pass on what is left, ask for the last snapshot and let the child finish, within
        `within` seconds (then it is stopped)."""
        self._stopping = True
        writer = self._writer
        if writer is not None and not writer.transport.is_closing():
            self._flush(force=True)
            writer.write(frame(FINAL, repr(max(0.0, within)).encode()))
            writer.close()
        await self._wait_child(within + 1.0)

    async def close(self) -> None:
        """Stop the child now (after `final`, it has finished or had its time)."""
        self._stopping = True
        if self._writer is not None and not self._writer.transport.is_closing():
            self._writer.close()
        await self._wait_child(0.2)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _wait_child(self, within: float) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        try:
            await asyncio.wait_for(proc.wait(), timeout=within)
        except TimeoutError:
            log.warning("the snapshot process did not finish in time; stopping it")
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def _supervise(self) -> None:
        delay = 1.0
        while not self._stopping:
            status: int | None = None
            try:
                status = await self._run_child()
            except OSError as exc:
                log.error("cannot start the snapshot process: %s", exc)
            if self.stopping:
                return
            self.reports.failed("process")
            log.error("the snapshot process %s; starting it again in %.0f s (publishing is "
                      "not affected)", "could not start" if status is None
                      else f"exited with status {status}", delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RESTART_MAX)

    async def _run_child(self) -> int:
        flags = ["-P"] if sys.flags.safe_path else []
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *flags, "-m", _MODULE, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE)
        self._proc = proc
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.write(frame(SETUP, self._setup))
        self._writer = proc.stdin
        self._gaps.clear()
        tell_ready = asyncio.ensure_future(self._tell_ready(proc.stdin))
        try:
            async for line in proc.stdout:
                if not replay_line(line, self.reports):
                    log.warning("unexpected output from the snapshot process: %r", line[:200])
            return await proc.wait()
        finally:
            tell_ready.cancel()
            self._writer = None
            self._out.clear()
            self.reports.live_ranks.clear()

    async def _tell_ready(self, writer: asyncio.StreamWriter) -> None:
        assert self._stream_ready is not None
        await self._stream_ready.wait()
        if not writer.transport.is_closing():
            writer.write(frame(READY))


def _frame_starts(out: bytearray) -> list[int]:
    starts, at = [], 0
    while at + HEAD.size <= len(out):
        starts.append(at)
        at += HEAD.size + HEAD.unpack_from(out, at)[0]
    return starts
