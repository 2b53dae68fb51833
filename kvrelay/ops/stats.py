"""`kvrelay stats` and `kvrelay tail --index`: what a router would see, as plain text frames.

Both follow the stream with a KvConsumer from its first message and print a frame every
`interval` seconds: `tail --index` each worker's block counts, `stats` each worker's events/s,
lag, last (epoch, seq), resyncs and gaps. `once` prints one frame when caught up; `duration`
stops after that many seconds. On a terminal each frame replaces the last (ANSI clear), else
frames follow each other, so the output stays readable in logs and tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Final, TextIO

import uvloop

from kvrelay.config import NatsSettings
from kvrelay.ops.connect import Errors, connection_failure, connection_options, refused
from kvrelay.router.consumer import Delivery, KvConsumer, StreamNotFound
from kvrelay.router.index import KvIndex, WorkerKey

_CLEAR: Final = "\x1b[H\x1b[2J"


class StatsView:
    """Per-worker rates from the batches' own relay timestamps, so replaying history at start
    does not show as a burst: events/s counts events the relay received in the last `window`."""

    def __init__(self, window: float = 10.0, clock: Callable[[], float] = time.time) -> None:
        self.window = window
        self._clock = clock
        self._recent: dict[WorkerKey, deque[tuple[float, int]]] = {}

    def observe(self, delivery: Delivery) -> None:
        batch = delivery.batch
        recent = self._recent.setdefault((batch.instance_id, batch.dp_rank), deque())
        recent.append((batch.relay_ts, len(batch.events)))
        self._trim(recent, self._clock())

    def _trim(self, recent: deque[tuple[float, int]], now: float) -> None:
        while recent and recent[0][0] < now - self.window:
            recent.popleft()

    def events_per_second(self, worker: WorkerKey) -> float:
        recent = self._recent.get(worker)
        if not recent:
            return 0.0
        self._trim(recent, self._clock())
        return sum(n for _, n in recent) / self.window

    def render(self, consumer: KvConsumer) -> str:
        now = self._clock()
        index = consumer.index
        rows: list[tuple[str, ...]] = [("worker", "epoch", "seq", "events/s", "lag(vllm)",
                                        "lag(relay)", "blocks", "exact", "resyncs", "gaps")]
        for worker in index.workers():
            s = index.status(worker)
            rows.append((
                _name(worker), _opt(s.epoch), _opt(s.seq),
                f"{self.events_per_second(worker):.1f}", _age(now - s.last_ts),
                _age(now - s.last_relay_ts), str(s.blocks), "yes" if s.exact else "no",
                str(sum(s.resyncs.values())), str(s.gaps)))
        return "\n".join([_table(rows), _footer(consumer)])


def render_index(consumer: KvConsumer) -> str:
    """`tail --index`: one line per worker with its blocks per tier."""
    index: KvIndex = consumer.index
    lines = []
    for worker in index.workers():
        s = index.status(worker)
        tiers = ", ".join(f"{medium}/{group}={len(index.blocks(worker, (medium, group)))}"
                          for medium, group in index.tiers(worker))
        lines.append(f"{_name(worker)} blocks={s.blocks}{f' ({tiers})' if tiers else ''} "
                     f"exact={'yes' if s.exact else 'no'} epoch={_opt(s.epoch)} "
                     f"seq={_opt(s.seq)}")
    return "\n".join([*lines, _footer(consumer)])


def _name(worker: WorkerKey) -> str:
    return f"{worker[0]}.{worker[1]}"


def _opt(value: int | None) -> str:
    return "-" if value is None else str(value)


def _age(seconds: float) -> str:
    return f"{max(0.0, seconds):.3f}s" if seconds < 1000 else f"{seconds:.0f}s"


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
                     for row in rows)


def _footer(consumer: KvConsumer) -> str:
    return (f"stream seq {consumer.stream_seq}, {len(consumer.index.workers())} workers, "
            f"gaps {consumer.gaps}, undecodable {consumer.undecodable}, "
            f"nats {'connected' if consumer.connected else 'disconnected'}")


async def watch(nats_config: NatsSettings | str, stream: str, subject: str, *,
                mode: str = "stats", interval: float = 2.0, once: bool = False,
                duration: float | None = None, window: float = 10.0, connect_wait: float = 5.0,
                out: TextIO = sys.stdout) -> int:
    """Follow `subject` and print `mode` ("stats" or "index") frames; returns an exit code
    (1 when NATS cannot be reached within `connect_wait` seconds or the stream is missing, 2
    when NATS refuses the credentials or the TLS settings)."""
    config = (NatsSettings(servers=nats_config) if isinstance(nats_config, str)
              else nats_config)
    command = "tail" if mode == "index" else "stats"
    errors = Errors()
    view = StatsView(window)
    consumer = KvConsumer(config.servers, subject=subject, stream=stream,
                          wait_for_stream=False, deliveries=1024 if mode == "stats" else 0,
                          connect_options={**connection_options(config),
                                           "error_cb": errors.record})
    async with consumer:
        observer = (asyncio.ensure_future(_observe(consumer, view)) if mode == "stats"
                    else None)
        try:
            if not await _connected(consumer, connect_wait, config, errors, command):
                print(connection_failure(config, errors, command), file=sys.stderr)
                return 2 if refused(config, errors, command) else 1
            return await _frames(consumer, view, mode, config.redacted_servers(), interval,
                                 once, duration, out)
        finally:
            if observer is not None:
                observer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await observer


async def _observe(consumer: KvConsumer, view: StatsView) -> None:
    async for delivery in consumer.batches():
        view.observe(delivery)


async def _connected(consumer: KvConsumer, within: float, config: NatsSettings,
                     errors: Errors, command: str) -> bool:
    """Wait for the connection; False when `within` passes first or NATS refused us (nats-py
    would go on trying: a refusal does not change by itself)."""
    deadline = time.monotonic() + within
    while not consumer.connected:
        if time.monotonic() > deadline or not consumer.running \
                or refused(config, errors, command):
            return False
        await asyncio.sleep(0.05)
    return True


async def _frames(consumer: KvConsumer, view: StatsView, mode: str, url: str, interval: float,
                  once: bool, duration: float | None, out: TextIO) -> int:
    try:
        await consumer.ready()
    except StreamNotFound as exc:
        print(f"kvrelay {mode}: {exc} on {url}", file=sys.stderr)
        return 1
    await consumer.delivered()  # the rates have seen every batch applied so far
    stop_at = None if duration is None else time.monotonic() + duration
    tty = out.isatty()
    while True:
        frame = view.render(consumer) if mode == "stats" else render_index(consumer)
        stamp = time.strftime("%H:%M:%S")
        print(f"{_CLEAR if tty else ''}{stamp} {consumer.subject} on {consumer.stream}\n{frame}",
              file=out, flush=True)
        if once or (stop_at is not None and time.monotonic() >= stop_at):
            return 0
        if not consumer.running:
            print(f"kvrelay {mode}: stopped following the stream", file=sys.stderr)
            return 1
        pause = interval if stop_at is None else min(interval, stop_at - time.monotonic())
        await asyncio.sleep(max(0.0, pause))
        if not tty:
            print(file=out)


def run(nats_config: NatsSettings, stream: str, subject: str, *, mode: str, interval: float,
        once: bool, duration: float | None, window: float = 10.0) -> int:
    """Entry point of the commands: a uvloop runner; Ctrl-C ends quietly."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            return runner.run(watch(nats_config, stream, subject, mode=mode, interval=interval,
                                    once=once, duration=duration, window=window))
        except KeyboardInterrupt:
            return 0
