"""The relay itself stopped under load: SIGTERM drains and exits 0; after SIGKILL the next relay
resumes from JetStream and replay. Either way every batch is stored once, in order."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import pytest
from harness import (
    ANY_PORT,
    COMP,
    NS,
    RelayProcess,
    SteadyLoad,
    last_seq,
    nats_client,
    new_instance_id,
    scrape,
    subject_of,
)

from fault.accounting import Tally, offered_keys, read_subject, tally
from kvrelay.testing.natsserver import NatsServer
from kvrelay.testing.synthetic import SyntheticVllm

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

Record = Callable[[Tally], Tally]
Procs = Callable[[list[str]], RelayProcess]


async def stored_upto(nc: object, subject: str, seq: int, proc: RelayProcess) -> None:
    deadline = time.monotonic() + 20
    while (await last_seq(nc, subject) or -1) < seq:
        assert time.monotonic() < deadline, proc.output()[-3000:]
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
async def test_relay_stopped_under_load(nats_server: NatsServer, relay_procs: Procs,
                                        record: Record, sig: signal.Signals) -> None:
    """SIGTERM: drained, exit 0, what it read is stored; SIGKILL: the next relay resumes and
    JetStream's dedup keeps what is sent again from being stored twice."""
    instance = new_instance_id()
    subject = subject_of(instance)
    with SyntheticVllm(ANY_PORT, replay_endpoint=ANY_PORT) as vllm:
        assert vllm.replay_address is not None
        args = ["--nats", nats_server.url, "--zmq", vllm.address, "--replay",
                vllm.replay_address, "--instance-id", str(instance), "--namespace", NS,
                "--component", COMP]
        async with nats_client(nats_server.url) as nc:
            first = relay_procs(args)
            await first.healthy()
            load = SteadyLoad(vllm, period=0.001).start()
            try:
                await stored_upto(nc, subject, 500, first)
                first.proc.send_signal(sig)
                code = await first.exited(15)
                stopped_at = vllm.seq
                if sig == signal.SIGTERM:
                    assert code == 0, first.output()[-3000:]
                    assert "not delivered" not in first.output()
                    prefix = await read_subject(nc, subject)
                    assert [r.batch.seq for r in prefix] == list(range(len(prefix)))
                else:
                    assert code == -signal.SIGKILL
                second = relay_procs(args)
                await second.healthy()
                await stored_upto(nc, subject, stopped_at + 300, second)
            finally:
                total = await load.stop()
            await stored_upto(nc, subject, total - 1, second)
            got = await read_subject(nc, subject)
            duplicates_dropped = await scrape(second.system_port,
                                              "kvrelay_publish_duplicates_total")
    row = record(tally(f"relay {sig.name} under load", got, offered_keys(0, total)))
    assert (row.lost, row.duplicates, row.order_violations, row.resyncs) == (0, 0, 0, 0)
    assert row.delivered == total
    assert "resumes after epoch 0 seq" in second.output()
    print(f"{sig.name}: {total} batches, second relay saw {duplicates_dropped:.0f} duplicates")
