"""The worker's ID from its etcd registration, through etcd's v3 JSON gateway.

What Dynamo does (ai-dynamo/dynamo):
- lib/runtime/src/discovery/kv_store.rs: endpoints are registered in the bucket "v1/instances"
  under `<namespace>/<component>/<endpoint>/<instance_id hex>` (EndpointInstanceId::to_path in
  lib/runtime/src/discovery/mod.rs); the value is the JSON `DiscoveryInstance::Endpoint`
  (dynamo.py). The process's instance ID is `connection_id()`, which for etcd is its lease ID.
- lib/runtime/src/storage/kv/etcd.rs: a bucket is a key prefix joined with "/", so the full key
  is `v1/instances/dynamo/backend/generate/694d9a2b5c0e1f03`, written with the worker's lease
  (the key disappears when the worker dies and the lease expires).

Which registration is this worker's: the lease ID is random, so nothing in the key ties it to a
pod. What does is the request-plane address in `transport` (`tcp` host:port or `http` URL),
which Dynamo fills with the worker's own IP. The relay picks the worker under
`v1/instances/<namespace>/<component>/` whose address is one of this host's addresses (POD_IP,
the hostname's addresses, the primary interface's, loopback), or exactly the one given with
--discovery-host (host or host:port, for several workers on one host). Several workers matching
(a restarted worker's old lease not expired yet) keep the relay waiting until one is left.

`--format dynamo --dynamo-register worker` has no worker registration to read: the relay is the
one registering. `EtcdLeaseSource` then grants the relay's own lease (Dynamo's 10 s TTL), whose
ID is the instance ID, as a Dynamo process's is; kvrelay/dynamo/etcd.py attaches the records to it.
`EtcdGateway` is the JSON-gateway client both use.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import socket
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

import httpx
import msgspec

from kvrelay.discovery.base import DiscoveryError, InstanceId, Pacing, Source
from kvrelay.discovery.dynamo import DynamoEndpoint, transport_address

log = logging.getLogger("kvrelay.discovery")

INSTANCES_BUCKET = "v1/instances"
LEASE_TTL = 10  # seconds: Dynamo's primary lease (lib/runtime/src/transports/etcd.rs)
AUTH_ERRORS = ("user name is empty", "permission denied", "invalid auth token")


class _KeyValue(msgspec.Struct):
    key: str
    value: str = ""


class _RangeResponse(msgspec.Struct):
    kvs: list[_KeyValue] = []


def prefix_range_end(prefix: bytes) -> bytes:
    """etcd's range_end for "every key starting with prefix": the prefix plus one."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return b"\x00"  # the whole keyspace
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


def local_addresses(env: Mapping[str, str]) -> frozenset[str]:
    """Every address a worker on this host (or in this pod) may advertise."""
    found = {"127.0.0.1", "::1", "localhost"}
    if env.get("POD_IP"):
        found.add(env["POD_IP"])
    for name in {socket.gethostname(), socket.getfqdn()}:
        found.add(name)
        with contextlib.suppress(OSError):
            found.update(str(info[4][0]) for info in socket.getaddrinfo(name, None))
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # picks the primary interface; sends nothing
        found.add(probe.getsockname()[0])
    return frozenset(a.lower() for a in found)


class EtcdUnavailable(OSError):
    """No etcd endpoint gave an answer; the message names each one and what went wrong."""


class EtcdRefused(Exception):
    """etcd refused the request for want of credentials, which the relay does not send."""


class EtcdGateway:
    """etcd's v3 JSON gateway (`/v3/...`, keys and values base64) on the first endpoint of
    ETCD_ENDPOINTS that answers."""

    def __init__(self, endpoints: Iterable[str], timeout: float = 5.0) -> None:
        self.endpoints = [e if "://" in e else f"http://{e}" for e in endpoints]
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(timeout))

    @property
    def where(self) -> str:
        return ", ".join(_netloc(e) for e in self.endpoints)

    async def call(self, path: str, body: Mapping[str, object]) -> bytes:
        """POST `body` to `path`; the body of the first 200 answer."""
        problems: list[str] = []
        for endpoint in self.endpoints:
            try:
                response = await self._client.post(f"{endpoint.rstrip('/')}{path}", json=body)
            except httpx.TransportError as exc:
                problems.append(f"{_netloc(endpoint)}: {exc!r}")
                continue
            if response.status_code == 200:
                return response.content
            text = response.text[:200]
            if any(marker in text for marker in AUTH_ERRORS):
                raise EtcdRefused(f"etcd at {_netloc(endpoint)} refused {path} (HTTP "
                                  f"{response.status_code}: {text}); etcd authentication is "
                                  "not supported by the relay")
            problems.append(f"{_netloc(endpoint)}: HTTP {response.status_code} {text}")
        raise EtcdUnavailable("no etcd endpoint answered: " + "; ".join(problems))

    async def range_prefix(self, prefix: str) -> list[tuple[str, bytes]]:
        """(key, value) of every key starting with `prefix`."""
        raw = prefix.encode()
        content = await self.call("/v3/kv/range", {"key": b64(raw),
                                                   "range_end": b64(prefix_range_end(raw))})
        try:
            found = msgspec.json.decode(content, type=_RangeResponse).kvs
        except msgspec.DecodeError as exc:
            raise EtcdUnavailable(f"etcd at {self.where}: not a range response ({exc})") from None
        return [(base64.b64decode(kv.key).decode(errors="replace"), base64.b64decode(kv.value))
                for kv in found]

    async def aclose(self) -> None:
        await self._client.aclose()


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


class EtcdSource(Source):
    """Reads the worker's endpoint registration under Dynamo's `v1/instances` prefix."""

    name = "etcd"

    def __init__(self, *, endpoints: Iterable[str], namespace: str, component: str,
                 hosts: frozenset[str], host_port: int | None, timeout: float,
                 retry_max: float) -> None:
        self._endpoints = list(endpoints)
        self._prefix = f"{INSTANCES_BUCKET}/{namespace}/{component}/"
        self._hosts = hosts
        self._port = host_port
        self._timeout, self._retry_max = timeout, retry_max
        super().__init__()

    @property
    def target(self) -> str:
        where = ", ".join(sorted(self._hosts)) if len(self._hosts) <= 3 else "this host"
        if self._port is not None:
            where += f" port {self._port}"
        return f"etcd registration under {self._prefix} from {where}"

    async def resolve(self) -> InstanceId:
        pacing = Pacing(self, self._timeout, self._retry_max)
        gateway = EtcdGateway(self._endpoints)
        try:
            while True:
                try:
                    records = await gateway.range_prefix(self._prefix)
                except EtcdUnavailable as exc:
                    reason = str(exc)
                except EtcdRefused as exc:
                    raise DiscoveryError(str(exc)) from None
                else:
                    found, reason = self._pick(records)
                    if found is not None:
                        return found
                await pacing.wait(reason)
        finally:
            await gateway.aclose()

    def _pick(self, records: list[tuple[str, bytes]]) -> tuple[InstanceId | None, str]:
        """This host's worker among the registrations, or why none can be chosen yet."""
        ours: dict[int, tuple[str, str]] = {}  # instance id -> (key, address)
        elsewhere: set[str] = set()
        for key, data in records:
            try:
                endpoint = msgspec.json.decode(data, type=DynamoEndpoint)
            except (msgspec.DecodeError, ValueError) as exc:
                log.warning("discovery: skipping %s: not a Dynamo endpoint record (%s)", key, exc)
                continue
            served_at = transport_address(endpoint)
            if served_at is None:
                elsewhere.add(f"{key} (transport {sorted(endpoint.transport)}: no address)")
                continue
            host, port = served_at
            if host in self._hosts and (self._port is None or port == self._port):
                ours.setdefault(endpoint.instance_id, (key, f"{host}:{port}"))
            else:
                elsewhere.add(f"{host}:{port}")
        if len(ours) == 1:
            value, (key, address) = ours.popitem()
            return InstanceId(value, self.name, f"{key} (transport {address})"), ""
        if ours:
            listed = ", ".join(f"{value} ({key})" for value, (key, _) in sorted(ours.items()))
            return None, (f"{len(ours)} workers registered from this host: {listed}; waiting for "
                          "a stale lease to expire (pass --discovery-host HOST:PORT or "
                          "--instance-id to choose)")
        if not records:
            return None, "no worker has registered yet"
        others = ", ".join(sorted(elsewhere)[:5])
        return None, f"none of the {len(records)} registrations is from this host ({others})"


class _LeaseGrant(msgspec.Struct):
    ID: str = "0"
    TTL: str = "0"
    error: str = ""


async def grant_lease(gateway: EtcdGateway, ttl: int) -> int:
    """A new lease of `ttl` seconds; its ID."""
    content = await gateway.call("/v3/lease/grant", {"TTL": ttl})
    try:
        grant = msgspec.json.decode(content, type=_LeaseGrant)
    except msgspec.DecodeError as exc:
        raise EtcdUnavailable(f"etcd at {gateway.where}: not a lease grant ({exc})") from None
    if not int(grant.ID):
        raise EtcdUnavailable(f"etcd at {gateway.where} granted no lease: {grant.error!r}")
    return int(grant.ID)


class EtcdLeaseSource(Source):
    """The relay's own etcd lease, its ID the instance ID, as a Dynamo process's
    `connection_id()` is: for `--format dynamo --dynamo-register worker`, where the relay
    registers the worker itself and attaches the records to this lease."""

    name = "etcd-lease"

    def __init__(self, *, endpoints: Iterable[str], ttl: int, timeout: float,
                 retry_max: float) -> None:
        self._endpoints = list(endpoints)
        self._ttl = ttl
        self._timeout, self._retry_max = timeout, retry_max
        super().__init__()

    @property
    def target(self) -> str:
        return f"a lease from etcd at {', '.join(self._endpoints)}"

    async def resolve(self) -> InstanceId:
        pacing = Pacing(self, self._timeout, self._retry_max)
        gateway = EtcdGateway(self._endpoints)
        try:
            while True:
                try:
                    lease = await grant_lease(gateway, self._ttl)
                except EtcdUnavailable as exc:
                    await pacing.wait(str(exc))
                    continue
                except EtcdRefused as exc:
                    raise DiscoveryError(str(exc)) from None
                return InstanceId(lease, self.name, f"lease {lease:x} ({self._ttl}s TTL) "
                                  f"granted by etcd at {gateway.where}", lease=lease)
        finally:
            await gateway.aclose()


def _netloc(endpoint: str) -> str:
    return urlsplit(endpoint).netloc or endpoint
