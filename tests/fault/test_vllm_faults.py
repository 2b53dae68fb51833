"""Faults on vLLM's side: the engine killed and restarted, and gaps on the PUB socket with the
replay socket working, absent, or answering garbage."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator

import pytest
from harness import (
    ANY_PORT,
    Received,
    SteadyLoad,
    as_output,
    dead_replay_endpoint,
    eventually,
    is_ready,
    join,
    metric,
    nats_client,
    new_instance_id,
    plain,
    publish,
    running_relay,
    subject_of,
)

from fault.accounting import Tally, offered_keys, read_subject, tally
from kvrelay.app import Relay
from kvrelay.testing.natsserver import NatsServer, free_port
from kvrelay.testing.synthetic import SyntheticVllm, WorkloadFactory
from kvrelay.wire.schema import Resync

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

Record = Callable[[Tally], Tally]


async def read_drained(relay: Relay, url: str, instance: int, published: int) -> list[Received]:
    """Once the relay had `published` batches acknowledged and holds none, its subject."""
    assert relay.publisher is not None
    publisher = relay.publisher
    await eventually(lambda: metric(relay, "kvrelay_batches_published_total") >= published
                     and not relay.buffer and publisher.in_flight == 0,
                     f"{published} batches acknowledged", within=20)
    async with nats_client(url) as nc:
        return await read_subject(nc, subject_of(instance))


def resyncs_of(got: list[Received]) -> list[tuple[int, int, Resync]]:
    return [(r.batch.epoch, r.batch.seq, e) for r in got for e in r.batch.events
            if isinstance(e, Resync)]


async def test_engine_killed_and_restarted(nats_server: NatsServer, record: Record) -> None:
    """vLLM dies mid-stream and a new one starts from seq 0 on the same ports: a new epoch led
    by `resync` restart, every batch of both runs once, and no batch of one run in the other."""
    instance = new_instance_id()
    endpoint = f"tcp://*:{free_port('0.0.0.0')}"
    replay = f"tcp://127.0.0.1:{free_port()}"
    runs = [WorkloadFactory(seed=21), WorkloadFactory(seed=22)]
    async with running_relay(nats=nats_server.url, instance_id=instance, replay=[replay],
                             zmq=[endpoint.replace("*", "127.0.0.1")]) as relay:
        await eventually(lambda: is_ready(relay), "relay ready")
        with SyntheticVllm(endpoint, replay_endpoint=replay, factory=runs[0]) as first:
            await join(first, relay)
            async with SteadyLoad(first):
                await eventually(lambda: metric(relay, "kvrelay_batches_received_total",
                                                dp_rank="0") >= 300, "300 batches read")
            await eventually(lambda: metric(relay, "kvrelay_batches_received_total",
                                            dp_rank="0") >= first.seq, "the first run read")
            first_run = first.seq
        await eventually(lambda: relay.source_states()[0]["peers"] == 0, "the engine gone")
        with SyntheticVllm(endpoint, replay_endpoint=replay, factory=runs[1]) as second:
            async with SteadyLoad(second):  # from its first batch, relay listening or not
                await eventually(lambda: metric(relay, "kvrelay_batches_received_total",
                                                dp_rank="0") >= first_run + 300,
                                 "300 batches of the second run")
            second_run = second.seq
            got = await read_drained(relay, nats_server.url, instance,
                                     first_run + second_run)
            assert len(got) == first_run + second_run
            assert metric(relay, "kvrelay_engine_restarts_total") == 1
    row = record(tally("vLLM killed and restarted", got,
                       offered_keys(0, first_run) + offered_keys(1, second_run)))
    assert (row.lost, row.duplicates, row.order_violations, row.resyncs) == (0, 0, 0, 1)
    assert resyncs_of(got) == [(1, 0, Resync("restart"))]
    expected = [WorkloadFactory(seed=21), WorkloadFactory(seed=22)]
    for received in got:  # each batch carries its own run's events
        events = [plain(e) for e in received.batch.events if not isinstance(e, Resync)]
        assert events == [as_output(e) for e in expected[received.batch.epoch].next_events()]


@contextlib.contextmanager
def replay_socket(kind: str, vllm_replay: str | None) -> Iterator[str]:
    if kind == "up":
        assert vllm_replay is not None
        yield vllm_replay
    else:
        with dead_replay_endpoint(kind) as endpoint:
            yield endpoint


@pytest.mark.parametrize("kind", ["up", "absent", "garbage"])
async def test_zmq_gap(nats_server: NatsServer, record: Record, kind: str) -> None:
    """Batches missing on the PUB socket: filled by a working replay, else one `resync` gap
    naming exactly the missing range."""
    instance = new_instance_id()
    with SyntheticVllm(ANY_PORT, replay_endpoint=ANY_PORT) as vllm, \
            replay_socket(kind, vllm.replay_address) as replay:
        async with running_relay(nats=nats_server.url, instance_id=instance, zmq=[vllm.address],
                                 replay=[replay], replay_timeout=0.3,
                                 replay_cooldown=0.2) as relay:
            await eventually(lambda: sum(metric(relay, "kvrelay_replays_total", outcome=o)
                                         for o in ("succeeded", "partial", "failed")) == 1,
                             "the start-up replay")
            await join(vllm, relay)
            publish(vllm, 20)
            await eventually(lambda: metric(relay, "kvrelay_batches_published_total") == 20,
                             "20 acknowledged")
            await asyncio.sleep(0.25)  # past the replay cooldown of a failed start-up replay
            vllm.skip(5)  # 20..24 never reach the relay's SUB socket
            publish(vllm, 20)
            got = await read_drained(relay, nats_server.url, instance,
                                     45 if kind == "up" else 40)
            failed = metric(relay, "kvrelay_replays_total", outcome="failed")
    row = record(tally(f"ZMQ gap, replay {kind}", got, offered_keys(0, 45)))
    assert (row.duplicates, row.order_violations) == (0, 0)
    if kind == "up":
        assert (row.lost, row.resyncs) == (0, 0)
        assert failed == 0
    else:
        assert (row.lost, row.announced, row.resyncs) == (5, 5, 1)
        assert resyncs_of(got) == [(0, 25, Resync("gap", 20, 24))]
        assert failed == 2
