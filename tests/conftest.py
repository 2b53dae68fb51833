"""Shared fixtures: real nats-server and etcd processes, so tests see the real behaviour, and a
local HTTPS Kubernetes API (the one part that cannot run here) serving recorded responses."""

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from etcdserver import EtcdServer, etcd_binary
from harness import RelayProcess, nats_client
from kubeapi import KubeApi

from kvrelay.testing.natsserver import NatsServer


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One JetStream server shared by the whole run; tests must not kill or pause it."""
    with NatsServer(tmp_path_factory.mktemp("nats-session"), name="session") as server:
        yield server


@pytest.fixture
def fresh_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A private JetStream server a test may kill, restart or pause; always stopped after."""
    server = NatsServer(tmp_path / "nats", name="fresh")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def kube_api(tmp_path: Path) -> AsyncIterator[KubeApi]:
    """A local HTTPS Kubernetes API serving recorded DynamoWorkerMetadata responses."""
    api = KubeApi(tmp_path / "kube")
    await api.start()
    try:
        yield api
    finally:
        await api.stop()


@pytest.fixture
def etcd_server(tmp_path: Path) -> Iterator[EtcdServer]:
    """A real etcd on free loopback ports with its own data dir; always stopped after."""
    if etcd_binary() is None:
        pytest.skip("etcd is not installed: apt-get install etcd-server (.ci/run does)")
    server = EtcdServer(tmp_path / "etcd-data")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[Any]:
    """A client of the session server, closed after the test."""
    async with nats_client(nats_server.url) as client:
        yield client


@pytest.fixture
def relay_procs(tmp_path: Path) -> Iterator[Callable[[list[str]], RelayProcess]]:
    """Starts relay processes; kills whatever is still running after the test."""
    started: list[RelayProcess] = []

    def start(args: list[str]) -> RelayProcess:
        proc = RelayProcess(args, tmp_path / f"relay-{len(started)}.log")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
