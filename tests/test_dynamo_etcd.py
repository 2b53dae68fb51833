"""`--format dynamo` on Dynamo's etcd discovery backend, against a real etcd: the records under
Dynamo's keys, attached to the relay's lease, kept alive, and gone on a stop or a crash."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from dynamo_support import (
    COMP,
    NS,
    eventually,
    publisher,
    running_dynamo_relay,
)
from etcdserver import EtcdServer
from harness import RelayProcess, is_ready

from kvrelay.discovery.etcd import LEASE_TTL
from kvrelay.dynamo.etcd import etcd_key
from kvrelay.dynamo.records import Registration
from kvrelay.testing.natsserver import NatsServer, free_port

pytestmark = pytest.mark.integration


async def until(cond: Callable[[], bool], what: str, within: float) -> None:
    """Poll a (blocking) etcd check off the event loop until it holds."""
    deadline = time.monotonic() + within
    while not await asyncio.to_thread(cond):
        assert time.monotonic() < deadline, f"timed out after {within}s waiting for {what}"
        await asyncio.sleep(0.1)


async def test_records_under_dynamos_keys_kept_alive_and_revoked(
        nats_server: NatsServer, etcd_server: EtcdServer, tmp_path: Path) -> None:
    """With --discovery-backend etcd and --dynamo-register worker the instance ID is the
    relay's lease; every record is at `<bucket>/<key>` with the file backend's JSON, on that
    lease; they outlive the TTL while the relay runs, a deleted one comes back, and a stop
    revokes the lease and removes them all."""
    async with running_dynamo_relay(
            tmp_path, nats=nats_server.url, discovery_backend="etcd",
            etcd_endpoints=etcd_server.url, zmq=[f"tcp://127.0.0.1:{free_port()}"],
            dp_rank_start=2, dynamo_model="m") as relay:
        await eventually(lambda: is_ready(relay), "relay ready")
        assert relay.identity is not None
        lease = relay.identity.value
        assert (relay.identity.source, relay.identity.lease) == ("etcd-lease", lease)
        records = Registration(NS, COMP, "generate", lease,
                               {2: publisher(relay).publisher_id(2)}, 16, "m", True).records()
        expected = {etcd_key(r.bucket, r.key): r.value for r in records}
        assert set(etcd_server.keys("v1/")) == set(expected)
        assert f"v1/instances/{NS}/{COMP}/generate/{lease:x}" in expected
        for key, value in expected.items():
            assert etcd_server.get(key) == (value, lease)
        source = json.loads(expected[next(k for k in expected
                                          if k.startswith("v1/event_sources/"))])
        assert source["metadata"]["worker"] == {"worker_id": lease, "dp_rank": 2}
        assert not tmp_path.joinpath("v1").exists()  # nothing in the file backend

        written_at = time.monotonic()
        gone = next(k for k in expected if k.startswith("v1/mdc/"))
        await asyncio.to_thread(etcd_server.delete, gone)
        await until(lambda: etcd_server.get(gone) == (expected[gone], lease),
                    "the deleted record written back", within=10)
        while time.monotonic() - written_at < LEASE_TTL + 2:  # past the TTL
            assert etcd_server.lease_ttl(lease) > 0
            assert set(etcd_server.keys("v1/")) == set(expected)
            await asyncio.sleep(0.5)
    assert etcd_server.keys("v1/") == []
    assert etcd_server.lease_ttl(lease) == -1


async def test_events_only_take_the_workers_id_from_its_registration(
        nats_server: NatsServer, etcd_server: EtcdServer, tmp_path: Path) -> None:
    """With --dynamo-register events the worker registers itself: its instance ID is read from
    its etcd registration, and the relay's event sources sit on a lease of the relay's own,
    so revoking it leaves the worker's records alone."""
    worker_lease = etcd_server.grant_lease(ttl=60)
    etcd_server.register_worker(worker_lease, host="127.0.0.1", namespace=NS, component=COMP)
    async with running_dynamo_relay(
            tmp_path, nats=nats_server.url, discovery_backend="etcd",
            etcd_endpoints=etcd_server.url, dynamo_register="events",
            zmq=[f"tcp://127.0.0.1:{free_port()}"]) as relay:
        await eventually(lambda: is_ready(relay), "relay ready")
        assert relay.identity is not None
        assert (relay.identity.value, relay.identity.source) == (worker_lease, "etcd")
        sources = etcd_server.keys("v1/event_sources/")
        assert len(sources) == 1
        found = etcd_server.get(sources[0])
        assert found is not None
        value, relay_lease = found
        assert json.loads(value)["metadata"]["worker"]["worker_id"] == worker_lease
        assert relay_lease not in (0, worker_lease)
    assert etcd_server.keys("v1/event_") == []
    assert len(etcd_server.keys("v1/instances/")) == 2  # the worker's own, untouched


def start_relay(relay_procs: Callable[[list[str]], RelayProcess], etcd: EtcdServer,
                nats: NatsServer) -> RelayProcess:
    return relay_procs(["--format", "dynamo", "--discovery-backend", "etcd",
                        "--etcd-endpoints", etcd.url, "--nats", nats.url, "--namespace", NS,
                        "--component", COMP, "--zmq", f"tcp://127.0.0.1:{free_port()}"])


async def registered_lease(relay: RelayProcess, etcd: EtcdServer) -> int:
    """The relay's lease, once its four records are in etcd."""
    deadline = time.monotonic() + 20
    while len(keys := await asyncio.to_thread(etcd.keys, "v1/")) < 4:
        assert relay.proc.poll() is None, relay.output()
        assert time.monotonic() < deadline, f"records not written:\n{relay.output()}"
        await asyncio.sleep(0.1)
    found = etcd.get(keys[0])
    assert found is not None
    return found[1]


async def test_sigterm_revokes_the_lease(
        nats_server: NatsServer, etcd_server: EtcdServer,
        relay_procs: Callable[[list[str]], RelayProcess]) -> None:
    """SIGTERM: the relay exits 0 and its records and lease are gone at once."""
    relay = start_relay(relay_procs, etcd_server, nats_server)
    lease = await registered_lease(relay, etcd_server)
    relay.proc.send_signal(signal.SIGTERM)
    assert await relay.exited(20) == 0, relay.output()
    assert etcd_server.keys("v1/") == []
    assert etcd_server.lease_ttl(lease) == -1


async def test_killed_relays_records_go_when_the_lease_expires(
        nats_server: NatsServer, etcd_server: EtcdServer,
        relay_procs: Callable[[list[str]], RelayProcess]) -> None:
    """SIGKILL: nothing is removed by the relay; etcd deletes the records once the lease runs
    out, within its TTL."""
    relay = start_relay(relay_procs, etcd_server, nats_server)
    lease = await registered_lease(relay, etcd_server)
    relay.proc.kill()
    relay.proc.wait()
    killed_at = time.monotonic()
    assert len(etcd_server.keys("v1/")) == 4
    assert etcd_server.lease_ttl(lease) > 0
    await until(lambda: etcd_server.keys("v1/") == [], "the lease to expire",
                within=LEASE_TTL + 10)
    assert time.monotonic() - killed_at <= LEASE_TTL + 10
    assert etcd_server.lease_ttl(lease) == -1


async def test_unreachable_etcd_stops_the_relay_naming_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No etcd answering while the relay takes its lease: start-up fails after
    --discovery-timeout, naming the endpoint and what went wrong."""
    port = free_port()
    with pytest.raises(AssertionError, match=r"relay stopped during start-up: 1"):
        async with running_dynamo_relay(tmp_path, discovery_backend="etcd",
                                        etcd_endpoints=f"http://127.0.0.1:{port}",
                                        discovery_timeout=0.5):
            pass
    assert f"no etcd endpoint answered: 127.0.0.1:{port}: ConnectError" in caplog.text
