"""Metrics and /health tell the truth at the edges: batches held while NATS is away at start,
whether vLLM ever attached, and no `_created` series."""

from __future__ import annotations

import asyncio
import json

import pytest
from harness import (
    ANY_PORT,
    eventually,
    http_get,
    join,
    metric,
    nats_client,
    new_instance_id,
    publish,
    read_stream,
    running_relay,
    subject_of,
)

from kvrelay.app import Relay
from kvrelay.testing.natsserver import NatsServer
from kvrelay.testing.synthetic import SyntheticVllm

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def health(relay: Relay) -> tuple[int, dict[str, object]]:
    assert relay.system is not None
    status, body = await http_get(relay.system.port, "/health")
    return status, json.loads(body)


async def test_batches_held_while_nats_is_away_at_start(fresh_nats: NatsServer) -> None:
    """Batches read before NATS ever answered show in kvrelay_buffer_* and events_received,
    and are not counted again once published."""
    fresh_nats.stop()
    instance = new_instance_id()
    with SyntheticVllm(ANY_PORT) as vllm:
        async with running_relay(nats=fresh_nats.url, zmq=[vllm.address],
                                 instance_id=instance) as relay:
            await join(vllm, relay)
            publish(vllm, 5)
            await eventually(lambda: metric(relay, "kvrelay_buffer_batches") == 5,
                             "5 batches held")
            assert metric(relay, "kvrelay_buffer_bytes") > 0
            received = metric(relay, "kvrelay_events_received_total")
            assert received > 0
            assert metric(relay, "kvrelay_batches_received_total", dp_rank="0") == 5
            await asyncio.to_thread(fresh_nats.start)
            async with nats_client(fresh_nats.url) as nc:
                await read_stream(nc, subject_of(instance), 5, settle=0)
            await eventually(lambda: metric(relay, "kvrelay_buffer_batches") == 0,
                             "nothing held once published")
            await eventually(lambda: metric(relay, "kvrelay_events_published_total") == received,
                             "every event received published")
            assert metric(relay, "kvrelay_events_received_total") == received


async def test_health_and_metric_say_whether_vllm_ever_attached(nats_server: NatsServer) -> None:
    """/health's body says per endpoint whether vLLM is attached, went away or never attached,
    kvrelay_vllm_attached says whether one ever did; readiness does not wait for vLLM."""
    vllm = SyntheticVllm(ANY_PORT)
    vllm.start()
    address = vllm.address
    vllm.close()  # the port is known; nobody publishes on it yet
    async with running_relay(nats=nats_server.url, zmq=[address],
                             instance_id=new_instance_id()) as relay:
        await eventually(lambda: metric(relay, "kvrelay_ready") == 1 or bool(
            relay.publisher and relay.publisher.connected), "connected")
        await asyncio.sleep(0.3)
        status, body = await health(relay)
        assert list(body["vllm"].values()) == ["never attached"]  # type: ignore[attr-defined]
        assert metric(relay, "kvrelay_vllm_attached", dp_rank="0") == 0
        with SyntheticVllm(address.replace("127.0.0.1", "*")) as again:
            await join(again, relay)
            status, body = await health(relay)
            assert status == 200
            assert list(body["vllm"].values()) == ["attached"]  # type: ignore[attr-defined]
            assert metric(relay, "kvrelay_vllm_attached", dp_rank="0") == 1
            assert metric(relay, "kvrelay_vllm_publishers", dp_rank="0") == 1
        await eventually(lambda: metric(relay, "kvrelay_vllm_publishers", dp_rank="0") == 0,
                         "vLLM gone")
        _, body = await health(relay)
        assert list(body["vllm"].values()) == ["went away"]  # type: ignore[attr-defined]
        assert metric(relay, "kvrelay_vllm_attached", dp_rank="0") == 1


async def test_no_created_series(nats_server: NatsServer) -> None:
    """/metrics has no `_created` series."""
    async with running_relay(nats=nats_server.url, zmq=["tcp://127.0.0.1:1"],
                             instance_id=new_instance_id()) as relay:
        assert relay.system is not None
        _, body = await http_get(relay.system.port, "/metrics")
    assert b"kvrelay_batches_dropped_total" in body
    assert b"_created" not in body
