"""The relay: wires ingest -> buffer -> publish and owns their lifecycle.

`Relay.serve()` is async and embeddable (tests run relays in-process); `run()` owns the event
loop, on uvloop. serve = startup -> main loop -> shutdown. The first SIGTERM/SIGINT drains, a
second one stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

import uvloop
import zmq.asyncio

from kvrelay import __version__, build, discovery
from kvrelay.config import Config
from kvrelay.discovery import DiscoveryError, InstanceId
from kvrelay.ingest.budget import Budget
from kvrelay.ingest.buffer import Buffer
from kvrelay.ingest.source import Source
from kvrelay.jetstream.publisher import Publisher
from kvrelay.jetstream.snapshotproc import SnapshotProcess
from kvrelay.publish.base import Output
from kvrelay.system.health import SystemServer
from kvrelay.system.metrics import Metrics
from kvrelay.system.summary import Summary
from kvrelay.wire.names import Worker

log = logging.getLogger("kvrelay")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2

T = TypeVar("T")
_TASKS_END = 2.0  # seconds the relay waits for its tasks to end once cancelled


class StartupError(Exception):
    """The relay cannot start here as configured; the message says why."""


class Relay:
    """One relay: the vLLM publishers of one worker into its JetStream subjects."""

    def __init__(self, config: Config, *, env: Mapping[str, str] | None = None,
                 install_signal_handlers: bool = False) -> None:
        self.config = config
        self.metrics = Metrics()
        self.summary = Summary(self.metrics)
        self.exit_code = EXIT_OK
        self.identity: InstanceId | None = None
        self.discovery: discovery.Source | None = None
        self._env = os.environ if env is None else env
        self._install_signal_handlers = install_signal_handlers
        self._exit = asyncio.Event()
        self._force = asyncio.Event()
        self._draining = False
        self._tasks: list[asyncio.Task[None]] = []
        self._source_tasks: list[asyncio.Task[None]] = []
        self._sources: list[Source] = []
        self._zmq: zmq.asyncio.Context | None = None
        self.buffer: Buffer | None = None
        self.publisher: Output | None = None
        self.snapshotter: SnapshotProcess | None = None
        self.system: SystemServer | None = None
        self.started = asyncio.Event()

    # -- lifecycle -----------------------------------------------------------------------------

    async def serve(self) -> int:
        """Run until asked to stop; returns the process exit code."""
        if self._install_signal_handlers:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.handle_exit, sig)
        try:
            await self.startup()
            if self.started.is_set():  # not stopped while discovery waited
                await self.main_loop()
        except StartupError as exc:
            log.error("%s", exc)
            self.exit_code = EXIT_FAILED
        finally:
            await self.shutdown()
        return self.exit_code

    async def startup(self) -> None:
        """System port first (probes answer while discovery waits), then the instance ID, then
        the pipeline; returns early, without setting `started`, when told to stop meanwhile."""
        config = self.config
        log.debug("configuration: %s", config.redacted())

        system = config.system
        self.system = SystemServer(system.system_host, system.system_port, self.metrics,
                                   self.readiness, self.health_details)
        try:
            await self.system.start()
        except OSError as exc:
            raise StartupError(f"cannot serve /health and /metrics on "
                               f"{system.system_host}:{system.system_port}: {exc.strerror}; "
                               "choose another --system-port") from None

        log.info("kvrelay %s, %s build", __version__, build())
        self.discovery = discovery.select_source(config.discovery, self._env,
                                                 own_lease=config.own_lease)
        log.info("discovery: reading %s", self.discovery.target)
        try:
            self.identity = await self._until(self._exit, self.discovery.resolve())
        except DiscoveryError as exc:
            raise StartupError(f"discovery: {exc}") from None
        if self.identity is None:
            log.info("stopped while waiting for %s", self.discovery.target)
            return
        instance_id = self.identity.value
        log.info("instance ID %d (%s: %s)", instance_id, self.identity.source,
                 self.identity.detail)
        self.metrics.instance.labels(str(instance_id), self.identity.source).set(1)

        publish = config.publish
        worker = Worker(config.discovery.namespace, config.discovery.component, instance_id,
                        config.stream.subject_prefix)
        # One bound on everything ingest holds: the buffer and the batches held during a
        # resume or a replay, of every source.
        budget = Budget(publish.buffer_batches, publish.buffer_bytes)
        self.buffer = Buffer(budget, self.metrics)
        specs = config.zmq.sources()
        ranks = [s.dp_rank for s in specs]
        self.publisher = self._output(worker, ranks, self.identity.lease)
        self._spawn(self.publisher.connect(ranks))
        self._spawn(self.publisher.run())
        if config.system.summary_interval > 0:
            self._spawn(self._summaries(config.system.summary_interval))
        self._zmq = zmq.asyncio.Context()
        topic = config.zmq.topic.encode()
        for spec in specs:
            source = Source(spec, self._zmq, self.publisher.take, self.metrics, topic=topic,
                            budget=budget, replay_timeout=config.zmq.replay_timeout,
                            replay_cooldown=config.zmq.replay_cooldown,
                            engine=config.zmq.engine, max_batch_bytes=config.zmq.max_batch_bytes,
                            heartbeat=config.zmq.heartbeat,
                            turn=(self.publisher.begin_turn, self.publisher.end_turn))
            self._sources.append(source)
            task = asyncio.ensure_future(source.run(self.publisher.resume_point(spec.dp_rank)))
            self._source_tasks.append(task)
            log.info("publishing %s on %s", source.name, self.publisher.subject(spec.dp_rank))
        self.started.set()

    def _output(self, worker: Worker, ranks: list[int], lease: int | None) -> Output:
        """The configured output (with the JetStream one, its snapshots when they are on)."""
        config, buffer = self.config, self.buffer
        assert buffer is not None
        if config.publish.format == "dynamo":
            from kvrelay.dynamo.publisher import DynamoPublisher  # needs the dynamo extra

            # Core NATS: no stream, so no snapshots (Dynamo's router keeps its own state).
            etcd = (config.discovery.etcd_endpoint_list() if config.dynamo_backend() == "etcd"
                    else None)
            return DynamoPublisher(worker, config.nats, config.publish, config.dynamo, buffer,
                                   self.metrics, etcd=etcd, lease=lease)
        if config.snapshot.enabled:
            self.snapshotter = SnapshotProcess(worker, ranks, config.snapshot, config.nats,
                                               config.stream, config.system, self.metrics)
        publisher = Publisher(worker, config.nats, config.publish, config.stream, buffer,
                              self.metrics, self.snapshotter.stored if self.snapshotter else None)
        if self.snapshotter is not None:
            self.snapshotter.start(publisher.stream_ready)
        return publisher

    async def _summaries(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            log.info("%s", self.summary.line())

    def _spawn(self, coro: asyncio.Future[None] | asyncio.Task[None] | object) -> None:
        self._tasks.append(asyncio.ensure_future(coro))  # type: ignore[arg-type]

    async def main_loop(self) -> None:
        """Wait for a signal, a fatal configuration problem, or a part that died."""
        assert self.publisher is not None
        exit_wait = asyncio.ensure_future(self._exit.wait())
        watched: set[asyncio.Future[Any]] = {exit_wait, self.publisher.fatal,
                                             *self._tasks, *self._source_tasks}
        while True:
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            if exit_wait in done:
                return
            if self.publisher.fatal in done:
                log.error("%s", self.publisher.fatal.result())
                self.exit_code = EXIT_CONFIG
                self._force.set()
                return
            for task in done:
                watched.discard(task)
                if not task.cancelled() and task.exception() is not None:
                    log.error("a relay task failed; stopping", exc_info=task.exception())
                    self.exit_code = EXIT_FAILED
                    return

    def handle_exit(self, sig: int | None = None) -> None:
        """First call drains, the second stops at once (as a second Ctrl-C does)."""
        if self._exit.is_set():
            log.warning("second signal: stopping without draining")
            self._force.set()
            return
        if sig is not None:
            log.info("received %s: draining", signal.Signals(sig).name)
        self._exit.set()

    async def shutdown(self) -> None:
        self._draining = True
        deadline = time.monotonic() + self.config.publish.drain_timeout
        # Phase 1: stop intake. vLLM's PUB keeps going; nothing more is read from it. Batches
        # held for a resume or a replay still in progress go on once it completes.
        for task in self._source_tasks:
            task.cancel()
        await asyncio.gather(*self._source_tasks, return_exceptions=True)
        held_lost = 0
        for source in self._sources:
            within = 0.0 if self._force.is_set() else deadline - time.monotonic()
            lost = await self._unless_forced(source.settle(within))
            held_lost += await source.settle(0.0) if lost is None else lost
        # Phase 2: publish what is buffered and wait for the acks, bounded by the drain timeout
        # (and by a second signal).
        if self.publisher is not None and self.buffer is not None:
            pending = len(self.buffer) + self.publisher.in_flight
            if pending and not self._force.is_set():
                log.info("draining %d batches (up to %.0fs)", pending,
                         self.config.publish.drain_timeout)
                await self._unless_forced(
                    self.publisher.flush(max(0.0, deadline - time.monotonic())))
            lost = self.publisher.abandon() + held_lost
            if lost:
                log.error("stopped with %d batches not delivered (counted as dropped: shutdown)",
                          lost)
        # Phase 2b: a last snapshot of what was stored, in what is left of the drain timeout.
        if self.snapshotter is not None:
            within = 0.0 if self._force.is_set() else deadline - time.monotonic()
            await self._unless_forced(self.snapshotter.final(within))
            await self.snapshotter.close()
        # Phase 3: close everything.
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # nats-py can swallow a cancellation in a connection attempt: not waited for long.
            _, stuck = await asyncio.wait(self._tasks, timeout=_TASKS_END)
            if stuck:
                log.warning("%d relay task(s) did not stop within %.0f s; stopping anyway",
                            len(stuck), _TASKS_END)
        if self.publisher is not None:
            # nats-py flushes on close, which a frozen server would never let finish.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.publisher.close(), timeout=2.0)
        if self.system is not None:
            await self.system.stop()
        if self._zmq is not None:
            self._zmq.destroy(linger=0)
        if self.started.is_set():
            log.info("%s", self.summary.line(final=True))
        log.info("stopped")

    async def _unless_forced(self, work: Coroutine[Any, Any, T]) -> T | None:
        """Await `work`, or cancel it and return None when a second signal comes first."""
        return await self._until(self._force, work)

    @staticmethod
    async def _until(event: asyncio.Event, work: Coroutine[Any, Any, T]) -> T | None:
        """Await `work`, or cancel it and return None when `event` is set first."""
        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(event.wait())
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None

    # -- state ---------------------------------------------------------------------------------

    def readiness(self) -> dict[str, str]:
        """Each part and "ok", or what is wrong with it."""
        publisher = self.publisher
        parts: dict[str, str] = {}
        if self.identity is None and self.discovery is not None:
            return {"discovery": self.discovery.status}
        if publisher is None:
            return {"relay": "starting"}
        parts["nats"] = "ok" if publisher.connected else publisher.last_error
        parts.update(publisher.readiness())
        idle = [s.spec.endpoint for s in self._sources if not s.subscribed]
        parts["zmq"] = "ok" if not idle else f"not subscribed: {', '.join(idle)}"
        if self._draining:
            parts["relay"] = "draining"
        return parts

    def health_details(self) -> dict[str, object]:
        """/health's word on vLLM (not part of readiness: a relay waits for vLLM ready):
        per endpoint, attached now, attached before and gone, or never attached."""
        return {"vllm": {
            s.name: "attached" if s.peers else "went away" if s.ever_attached
            else "never attached" for s in self._sources}}

    def source_states(self) -> list[dict[str, object]]:
        return [{"endpoint": s.spec.endpoint, "dp_rank": s.spec.dp_rank, "epoch": s.epoch,
                 "next_seq": s.expected, "peers": s.peers} for s in self._sources]


def run(config: Config) -> int:
    """Run a relay in this process on uvloop until it is told to stop."""
    relay = Relay(config, install_signal_handlers=True)
    # What exists now (modules, classes) lives as long as the process: out of the collector's
    # full passes, which would otherwise stall the event loop for tens of ms.
    gc.freeze()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(relay.serve())
