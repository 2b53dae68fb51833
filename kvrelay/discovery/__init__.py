"""Worker instance-ID discovery: the ID the relay publishes under, and how it was found.

Sources, first that applies (docs/contract.md section 3), each a `Source`:
1. `ExplicitSource`: --instance-id / KVRELAY_INSTANCE_ID;
2. `KubernetesSource`: DYN_DISCOVERY_BACKEND=kubernetes with POD_NAME and POD_NAMESPACE: the
   worker's DynamoWorkerMetadata custom resource;
3. DYN_DISCOVERY_BACKEND=etcd (ETCD_ENDPOINTS): with `--format dynamo --dynamo-register worker`
   the relay registers the worker itself, so `EtcdLeaseSource` takes a lease of its own and its
   ID is the instance ID, as Dynamo's is; otherwise `EtcdSource`: the worker's registration;
4. `PodNameHashSource`: Dynamo's hash of POD_NAME, else of the hostname.
The relay resolves the ID after its system port is up, so probes answer while it waits.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from kvrelay.config import DiscoverySettings
from kvrelay.discovery.base import DiscoveryError, InstanceId, Source
from kvrelay.discovery.etcd import LEASE_TTL, EtcdLeaseSource, EtcdSource, local_addresses
from kvrelay.discovery.kubernetes import KubernetesSource
from kvrelay.discovery.local import ExplicitSource, PodNameHashSource, hash_pod_name, siphash13

__all__ = [
    "DiscoveryError",
    "EtcdLeaseSource",
    "EtcdSource",
    "ExplicitSource",
    "InstanceId",
    "KubernetesSource",
    "PodNameHashSource",
    "Source",
    "hash_pod_name",
    "select_source",
    "siphash13",
]

log = logging.getLogger("kvrelay.discovery")


def select_source(config: DiscoverySettings, env: Mapping[str, str], *,
                  own_lease: bool = False) -> Source:
    """The first source that applies to this configuration and environment. `own_lease`:
    with etcd, the relay registers the worker itself (`--format dynamo --dynamo-register
    worker`), so its own lease is the instance ID."""
    if config.instance_id is not None:
        return ExplicitSource(config.instance_id)
    backend = config.backend
    if backend == "kubernetes":
        pod_name = env.get("POD_NAME", "")
        pod_namespace = env.get("POD_NAMESPACE", "") or _read(
            Path(config.kube_serviceaccount_dir) / "namespace")
        if pod_name and pod_namespace:
            return KubernetesSource(
                pod_name=pod_name, pod_namespace=pod_namespace,
                api_host=env.get("KUBERNETES_SERVICE_HOST", ""),
                api_port=env.get("KUBERNETES_SERVICE_PORT", "443"),
                serviceaccount_dir=config.kube_serviceaccount_dir,
                namespace=config.namespace, component=config.component,
                timeout=config.discovery_timeout, retry_max=config.discovery_retry_max)
        log.warning("DYN_DISCOVERY_BACKEND=kubernetes needs POD_NAME and POD_NAMESPACE from the "
                    "downward API to find the worker's DynamoWorkerMetadata; using the pod-name "
                    "hash")
    elif backend == "etcd":
        endpoints = config.etcd_endpoint_list()
        if own_lease:
            return EtcdLeaseSource(endpoints=endpoints, ttl=LEASE_TTL,
                                   timeout=config.discovery_timeout,
                                   retry_max=config.discovery_retry_max)
        hosts, port = _host_filter(config.discovery_host, env)
        return EtcdSource(
            endpoints=endpoints,
            namespace=config.namespace, component=config.component, hosts=hosts,
            host_port=port, timeout=config.discovery_timeout,
            retry_max=config.discovery_retry_max)
    elif backend:
        log.info("DYN_DISCOVERY_BACKEND=%s: the relay reads no registration there; using the "
                 "pod-name hash", backend)
    return PodNameHashSource(env)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _host_filter(given: str | None, env: Mapping[str, str]) -> tuple[frozenset[str], int | None]:
    """--discovery-host as (hosts, port), or every address of this host and any port."""
    if not given:
        return local_addresses(env), None
    host, port = given, None
    if given.startswith("["):  # [v6]:port
        host, _, rest = given[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    elif given.count(":") == 1:
        name, _, port_text = given.partition(":")
        host, port = name, int(port_text) if port_text.isdigit() else None
    return frozenset({host.lower()}), port
