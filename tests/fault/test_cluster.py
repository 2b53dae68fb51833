"""A 3-node JetStream cluster, stream with 3 replicas: nodes die under a steady load.

Killing the node the relay is connected to, or the stream's leader, and restarting it loses
nothing, stores nothing twice and keeps vLLM's order.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
from harness import (
    ANY_PORT,
    STREAM,
    SteadyLoad,
    eventually,
    is_ready,
    join,
    metric,
    new_instance_id,
    running_relay,
    subject_of,
)
from nats.js.api import StorageType, StreamConfig

from fault.accounting import Tally, offered_keys, read_subject, tally
from kvrelay.app import Relay
from kvrelay.testing.natsserver import NatsCluster, NatsServer
from kvrelay.testing.synthetic import SyntheticVllm

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

Record = Callable[[Tally], Tally]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """Three routed JetStream nodes on loopback, shared by this module's tests."""
    with NatsCluster(tmp_path_factory.mktemp("cluster")) as nodes:
        yield nodes


@contextlib.asynccontextmanager
async def cluster_client(servers: list[NatsServer]) -> AsyncIterator[Any]:
    nc = await nats.connect(servers=[s.url for s in servers], connect_timeout=2,
                            max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        yield nc
    finally:
        await nc.close()


async def healthy_cluster(cluster: NatsCluster, within: float = 60.0) -> None:
    """Every node up, JetStream answering, and the stream (if any) current on all replicas."""
    for node in cluster.nodes:
        if not node.running:
            node.start()
    async with cluster_client(cluster.nodes) as nc:
        js = nc.jetstream()
        deadline = time.monotonic() + within
        while True:
            try:
                info = await js.stream_info(STREAM)
                replicas = info.cluster.replicas if info.cluster else None
                if info.cluster and info.cluster.leader and replicas and len(replicas) == 2 \
                        and all(p.current and not p.offline for p in replicas):
                    return
            except nats.js.errors.NotFoundError:
                await js.account_info()
                return
            except (nats.errors.Error, TimeoutError):
                pass
            assert time.monotonic() < deadline, "the cluster did not settle"
            await asyncio.sleep(0.2)


async def replicated_stream_leader(cluster: NatsCluster) -> NatsServer:
    """Create the stream with 3 replicas if absent; the node that leads it."""
    async with cluster_client(cluster.nodes) as nc:
        js = nc.jetstream()
        with contextlib.suppress(nats.js.errors.BadRequestError):
            await js.add_stream(StreamConfig(name=STREAM, subjects=["kv.>"], num_replicas=3,
                                             storage=StorageType.FILE))
        info = await js.stream_info(STREAM)
        assert info.cluster is not None
        assert info.cluster.leader
        assert info.config.num_replicas == 3
        return cluster.node(info.cluster.leader)


async def settled_after(relay: Relay, batches: int, within: float = 30.0) -> None:
    """Wait until `batches` more are acknowledged than now."""
    target = metric(relay, "kvrelay_batches_published_total") + batches
    await eventually(lambda: metric(relay, "kvrelay_batches_published_total") >= target,
                     f"{batches} more acknowledged batches", within)


async def run_through(cluster: NatsCluster, record: Record, fault: str,
                      servers: list[NatsServer], pick: Callable[[Relay], NatsServer]) -> None:
    """Steady load through a relay on `servers`; kill the node `pick` chooses, restart it."""
    await healthy_cluster(cluster)
    instance = new_instance_id()
    with SyntheticVllm(ANY_PORT) as vllm:
        async with running_relay(nats=",".join(s.url for s in servers), stream_replicas=3,
                                 instance_id=instance, zmq=[vllm.address], ack_timeout=2.0,
                                 drain_timeout=20.0) as relay:
            await eventually(lambda: is_ready(relay), "relay ready", within=30)
            await join(vllm, relay)
            load = SteadyLoad(vllm).start()
            try:
                await settled_after(relay, 200)
                victim = pick(relay)
                victim.kill()
                await settled_after(relay, 200)
                victim.start()
                await settled_after(relay, 200)
            finally:
                total = await load.stop()
            await eventually(lambda: all_acknowledged(relay, total), "every batch acknowledged",
                             within=30)
            await healthy_cluster(cluster)
            async with cluster_client(cluster.nodes) as nc:
                got = await read_subject(nc, subject_of(instance))
            for reason in ("overflow", "rejected", "out_of_order"):
                assert metric(relay, "kvrelay_batches_dropped_total", reason=reason) == 0
    row = record(tally(fault, got, offered_keys(0, total)))
    assert (row.lost, row.duplicates, row.order_violations, row.resyncs) == (0, 0, 0, 0), row
    assert row.delivered == total > 600


def all_acknowledged(relay: Relay, total: int) -> bool:
    """The relay read `total` batches and holds none unacknowledged."""
    assert relay.publisher is not None
    return (metric(relay, "kvrelay_batches_received_total", dp_rank="0") >= total
            and not relay.buffer and relay.publisher.in_flight == 0)


def connected_node(cluster: NatsCluster, relay: Relay) -> NatsServer:
    assert relay.publisher is not None
    assert relay.publisher._nc is not None
    url = relay.publisher._nc.connected_url
    assert url is not None
    assert url.port is not None
    return cluster.node_at(url.port)


async def test_kill_connected_node(cluster: NatsCluster, record: Record) -> None:
    """The node the relay talks to dies and comes back: all batches once, in order."""
    await run_through(cluster, record, "cluster: relay's node killed", cluster.nodes,
                      lambda relay: connected_node(cluster, relay))


async def test_kill_stream_leader(cluster: NatsCluster, record: Record) -> None:
    """The stream leader dies (relay on the other nodes) and comes back: all once, in order."""
    await healthy_cluster(cluster)
    leader = await replicated_stream_leader(cluster)
    others = [node for node in cluster.nodes if node is not leader]
    await run_through(cluster, record, "cluster: stream leader killed", others,
                      lambda relay: leader)
