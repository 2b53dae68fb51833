"""An idle sidecar sleeps: with a vLLM publisher attached, NATS up and nothing to relay, the
relay's event loop wakes only for NATS keep-alive pings, not for timers polling its window."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from harness import RelayProcess, new_instance_id, scrape

from kvrelay.testing.natsserver import NatsServer
from kvrelay.testing.synthetic import SyntheticVllm

ANY_PORT = "tcp://127.0.0.1:*"
IDLE = 6.0  # seconds watched: at least one NATS ping (every 5 s) per connection


def wakeups(pid: int) -> int:
    """Times the process's main thread went to sleep and was woken (each loop wake-up)."""
    with open(f"/proc/{pid}/task/{pid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise LookupError("no voluntary_ctxt_switches in /proc")


def relay_process(output: str, vllm: SyntheticVllm, nats_server: NatsServer,
                  tmp_path: Path) -> RelayProcess:
    """A relay process reading `vllm`, publishing to JetStream or, with output "dynamo", in
    Dynamo's form with its discovery records in files under `tmp_path`."""
    args = ["--zmq", vllm.address, "--nats", nats_server.url,
            "--instance-id", str(new_instance_id())]
    env: dict[str, str] = {}
    if output == "dynamo":
        args += ["--format", "dynamo"]
        env = {"DYN_DISCOVERY_BACKEND": "file", "DYN_FILE_KV": str(tmp_path / "kv")}
    return RelayProcess(args, tmp_path / "relay.log", env)


@pytest.mark.parametrize("output", ["jetstream", "dynamo"])
async def test_an_idle_relay_does_not_wake_up(output: str, nats_server: NatsServer,
                                             tmp_path: Path) -> None:
    """After relaying a few batches and seeing them confirmed, the relay's main thread wakes
    fewer than 3 times a second over 6 idle seconds (NATS pings and their replies only). A
    timer checking the window four times a second would wake it 24 times on its own."""
    with SyntheticVllm(ANY_PORT) as vllm:
        relay = relay_process(output, vllm, nats_server, tmp_path)
        try:
            await relay.healthy(within=20)
            for _ in range(5):
                vllm.publish_next()
                await asyncio.sleep(0.05)
            for _ in range(200):
                if await scrape(relay.system_port, "kvrelay_batches_published_total") >= 5:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"the batches were not published:\n{relay.output()}")
            await asyncio.sleep(1.0)  # confirmations settle
            before = wakeups(relay.proc.pid)
            await asyncio.sleep(IDLE)
            woke = wakeups(relay.proc.pid) - before
        finally:
            relay.stop()
    assert woke < 3 * IDLE, relay.output()
