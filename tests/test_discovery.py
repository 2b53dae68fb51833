"""Instance-ID discovery: the pod-name hash Dynamo uses, the order of sources, Dynamo's records."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from kvrelay.config import Config
from kvrelay.discovery import (
    DiscoveryError,
    EtcdSource,
    InstanceId,
    KubernetesSource,
    PodNameHashSource,
    hash_pod_name,
    select_source,
    siphash13,
)
from kvrelay.discovery.dynamo import DynamoEndpoint, transport_address, worker_ids

# docs/contract.md section 3: Dynamo's hash_pod_name over these names.
POD_NAME_VECTORS = [
    ("worker-0", 1186445869714687),
    ("worker-99999", 7410589986301036),
    ("deployment-with-hash-suffix-a1b2c3d4e5f6", 2590930466072916),
    ("fake-name-1-0-worker-nrdfv", 1009006049675451),
]


@pytest.mark.parametrize(("name", "expected"), POD_NAME_VECTORS)
def test_pod_name_hash_matches_dynamo(name: str, expected: int) -> None:
    """hash_pod_name gives exactly the IDs Dynamo's Kubernetes discovery assigns."""
    assert hash_pod_name(name) == expected


def test_siphash13_covers_every_tail_length() -> None:
    """Inputs of every length mod 8 hash to distinct values (the tail word is mixed in)."""
    digests = {siphash13(bytes(range(n))) for n in range(17)}
    assert len(digests) == 17


def discovered(flags: dict[str, str], env: dict[str, str]) -> InstanceId:
    """Resolve as the relay does: Config from flags and env, then the first source that applies."""
    return asyncio.run(select_source(Config.load(flags, env).discovery, env).resolve())


def test_explicit_id_wins() -> None:
    """--instance-id beats POD_NAME and a configured discovery backend."""
    found = discovered({"instance_id": "42"},
                       {"POD_NAME": "worker-0", "DYN_DISCOVERY_BACKEND": "kubernetes"})
    assert (found.value, found.source) == (42, "explicit")


def test_pod_name_used_when_no_explicit_id() -> None:
    """POD_NAME from the downward API gives the pod-name hash."""
    found = discovered({}, {"POD_NAME": "worker-0"})
    assert (found.value, found.source) == (1186445869714687, "pod-name-hash")
    assert found.detail == "POD_NAME=worker-0"


def test_hostname_used_without_pod_name() -> None:
    """Outside Kubernetes the hostname stands in for the pod name, as in Dynamo."""
    found = discovered({}, {})
    assert found.source == "hostname-hash"
    assert found.value == hash_pod_name(socket.gethostname())


@pytest.mark.parametrize(("env", "source"), [
    ({"DYN_DISCOVERY_BACKEND": "kubernetes", "POD_NAME": "w", "POD_NAMESPACE": "ns"},
     KubernetesSource),
    ({"DYN_DISCOVERY_BACKEND": "kubernetes", "POD_NAME": "w"}, KubernetesSource),
    ({"DYN_DISCOVERY_BACKEND": "kubernetes"}, PodNameHashSource),
    ({"DYN_DISCOVERY_BACKEND": "etcd"}, EtcdSource),
    ({"DYN_DISCOVERY_BACKEND": "etcd", "ETCD_ENDPOINTS": "http://etcd:2379"}, EtcdSource),
    ({"DYN_DISCOVERY_BACKEND": "file", "POD_NAME": "w"}, PodNameHashSource),
    ({"POD_NAME": "w"}, PodNameHashSource),
])
def test_first_source_that_applies(env: dict[str, str], source: type, tmp_path: Path) -> None:
    """Kubernetes needs POD_NAME and a namespace, etcd its backend; others get the hash."""
    (tmp_path / "namespace").write_text("ns\n")
    flags = {"kube_serviceaccount_dir": str(tmp_path)}
    assert type(select_source(Config.load(flags, env).discovery, env)) is source


def test_pod_namespace_from_the_service_account(tmp_path: Path) -> None:
    """Without POD_NAMESPACE the pod's namespace comes from the service-account mount."""
    (tmp_path / "namespace").write_text("inference\n")
    env = {"DYN_DISCOVERY_BACKEND": "kubernetes", "POD_NAME": "w"}
    config = Config.load({"kube_serviceaccount_dir": str(tmp_path)}, env)
    source = select_source(config.discovery, env)
    assert source.target == "DynamoWorkerMetadata inference/w"


def test_kubernetes_without_pod_name_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """A kubernetes backend without the downward API falls back, and the log says why."""
    env = {"DYN_DISCOVERY_BACKEND": "kubernetes"}
    config = Config.load({"kube_serviceaccount_dir": "/nonexistent"}, env)
    source = select_source(config.discovery, env)
    assert isinstance(source, PodNameHashSource)
    assert "needs POD_NAME and POD_NAMESPACE" in caplog.text


def test_kubernetes_outside_a_pod_is_a_clear_error() -> None:
    """Without KUBERNETES_SERVICE_HOST the Kubernetes source fails at once, saying why."""
    env = {"DYN_DISCOVERY_BACKEND": "kubernetes", "POD_NAME": "w", "POD_NAMESPACE": "ns"}
    with pytest.raises(DiscoveryError, match="not running in a Kubernetes pod"):
        discovered({}, env)


@pytest.mark.parametrize(("transport", "address"), [
    ({"tcp": "10.0.0.5:36125/694d/generate"}, ("10.0.0.5", 36125)),
    ({"tcp": "tcp://127.0.0.1:10001"}, ("127.0.0.1", 10001)),
    ({"tcp": "[fd00::5]:36125/694d/generate"}, ("fd00::5", 36125)),
    ({"tcp": "Worker-Host/694d/generate"}, ("worker-host", None)),
    ({"http": "http://10.0.0.5:8081/v1/rpc/generate"}, ("10.0.0.5", 8081)),
    ({"nats_tcp": "dynamo_backend.generate-694d"}, None),
])
def test_transport_address_of_each_request_plane(
        transport: dict[str, str], address: tuple[str, int | None] | None) -> None:
    """The worker's host:port is read from every request-plane transport Dynamo writes."""
    endpoint = DynamoEndpoint("dynamo", "backend", "generate", 7, transport)
    assert transport_address(endpoint) == address


def test_worker_ids_prefer_the_relays_component() -> None:
    """Endpoints of the relay's namespace/component decide; others count only without them."""
    mine = DynamoEndpoint("dynamo", "backend", "generate", 7)
    other = DynamoEndpoint("dynamo", "prefill", "generate", 8)
    assert worker_ids([mine, other], "dynamo", "backend") == ({7}, True)
    assert worker_ids([other], "dynamo", "backend") == ({8}, False)
    assert worker_ids([], "dynamo", "backend") == (set(), False)
