"""The worker's ID from its DynamoWorkerMetadata custom resource, through the in-cluster API.

What Dynamo does (ai-dynamo/dynamo):
- lib/runtime/src/discovery/kube/crd.rs: kind DynamoWorkerMetadata, group nvidia.com, version
  v1alpha1, plural dynamoworkermetadatas, namespaced; `spec.data` is the worker's serialized
  `DiscoveryMetadata`, written by server-side apply (field manager "dynamo-worker"), owned by the
  pod. CRD: deploy/helm/charts/crds/templates/nvidia.com_dynamoworkermetadatas.yaml.
- lib/runtime/src/discovery/metadata.rs: `DiscoveryMetadata` = {"endpoints": {key:
  DiscoveryInstance}, "model_cards": {...}, ...}, keys "namespace/component/endpoint" (1.2 adds
  "/<id hex>"); each endpoint carries `instance_id` (see dynamo.py; recorded example:
  lib/runtime/src/discovery/kube/fixtures/v1_2_dwm.json).
- lib/runtime/src/discovery/kube/utils.rs: the CR is named after the pod (POD_NAME), in
  POD_NAMESPACE; with DYN_KUBE_DISCOVERY_MODE=container a container other than the main one
  gets "<pod>-<container>" and its own ID. The relay reads the pod's CR (pod mode, the default).

The relay GETs the CR; while it is missing (or lists no endpoint yet) it watches it
(`?watch=true&fieldSelector=metadata.name=<pod>`, newline-delimited JSON events, no
resourceVersion so an existing object arrives as ADDED) and falls back to polling when watching
is not allowed. A 403 is final: it names the permission the service account lacks.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path
from typing import Any, NoReturn

import httpx
import msgspec

from kvrelay.discovery.base import DiscoveryError, InstanceId, Pacing, Source
from kvrelay.discovery.dynamo import DynamoEndpoint, worker_ids

log = logging.getLogger("kvrelay.discovery")

SERVICEACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
GROUP, VERSION, PLURAL = "nvidia.com", "v1alpha1", "dynamoworkermetadatas"
WATCH_SECONDS = 60  # server-side bound of one watch request; a new one follows


class _Status(msgspec.Struct):
    """A Kubernetes `Status`: the body of every API error."""

    message: str = ""
    reason: str = ""
    code: int = 0
    details: dict[str, Any] = {}


class _Meta(msgspec.Struct):
    name: str = ""


class _Data(msgspec.Struct):
    endpoints: dict[str, DynamoEndpoint] | None = None


class _Spec(msgspec.Struct):
    data: _Data | None = None


class _Metadata(msgspec.Struct):
    metadata: _Meta = msgspec.field(default_factory=_Meta)
    spec: _Spec | None = None


class _WatchEvent(msgspec.Struct):
    type: str
    object: msgspec.Raw


class _NotYet(Exception):
    """The CR is missing or not usable yet; the message says how."""


class _WatchForbidden(Exception):
    """The service account may get the CR but not watch it."""


class KubernetesSource(Source):
    """Reads DynamoWorkerMetadata `<namespace>/<pod>` and takes the worker's instance_id."""

    name = "kubernetes"

    def __init__(self, *, pod_name: str, pod_namespace: str, api_host: str, api_port: str,
                 serviceaccount_dir: str, namespace: str, component: str, timeout: float,
                 retry_max: float) -> None:
        self._pod = pod_name
        self._ns = pod_namespace
        host = f"[{api_host}]" if ":" in api_host else api_host
        self._base = f"https://{host}:{api_port}" if api_host else ""
        self._sa_dir = Path(serviceaccount_dir)
        self._namespace, self._component = namespace, component
        self._timeout, self._retry_max = timeout, retry_max
        super().__init__()

    @property
    def target(self) -> str:
        return f"DynamoWorkerMetadata {self._ns}/{self._pod}"

    @property
    def _path(self) -> str:
        return f"/apis/{GROUP}/{VERSION}/namespaces/{self._ns}/{PLURAL}"

    async def resolve(self) -> InstanceId:
        if not self._base:
            raise DiscoveryError("DYN_DISCOVERY_BACKEND=kubernetes but KUBERNETES_SERVICE_HOST "
                                 "is not set: the relay is not running in a Kubernetes pod")
        pacing = Pacing(self, self._timeout, self._retry_max)
        can_watch = True
        async with httpx.AsyncClient(base_url=self._base, verify=self._tls(),
                                     timeout=httpx.Timeout(10.0)) as client:
            while True:
                try:
                    return await self._get(client)
                except _NotYet as missing:
                    reason = str(missing)
                pacing.waiting(reason)
                if can_watch and pacing.remaining() > 0:
                    try:
                        return await self._watch(client, pacing, reason)
                    except _NotYet as missing:
                        reason = str(missing)
                    except _WatchForbidden as exc:
                        can_watch = False
                        log.warning("discovery: %s; polling instead", exc)
                await pacing.wait(reason)

    # -- requests ------------------------------------------------------------------------------

    def _tls(self) -> ssl.SSLContext:
        ca = self._sa_dir / "ca.crt"
        try:
            return ssl.create_default_context(cafile=str(ca))
        except (OSError, ssl.SSLError) as exc:
            raise DiscoveryError(f"cannot load the cluster CA {ca}: {exc}; is the service-account "
                                 "token mounted (automountServiceAccountToken)?") from None

    def _headers(self) -> dict[str, str]:
        token_file = self._sa_dir / "token"
        try:  # read every time: the kubelet rotates bound tokens on disk
            token = token_file.read_text().strip()
        except OSError as exc:
            raise DiscoveryError(f"cannot read the service-account token {token_file}: "
                                 f"{exc.strerror}") from None
        return {"Authorization": f"Bearer {token}", "Accept": "application/json"}

    async def _get(self, client: httpx.AsyncClient) -> InstanceId:
        try:
            response = await client.get(f"{self._path}/{self._pod}", headers=self._headers())
        except httpx.TransportError as exc:
            raise _NotYet(self._unreachable(exc)) from None
        if response.status_code == 200:
            return self._instance(response.content)
        self._fail(response.status_code, response.content, "get")

    async def _watch(self, client: httpx.AsyncClient, pacing: Pacing,
                     reason: str) -> InstanceId:
        """Follow the resource until it is usable, the watch ends, or the deadline passes;
        _NotYet carries the latest reason for waiting."""
        seconds = max(1, int(min(WATCH_SECONDS, pacing.remaining())))
        params = {"watch": "true", "fieldSelector": f"metadata.name={self._pod}",
                  "timeoutSeconds": str(seconds)}
        try:
            async with asyncio.timeout(pacing.remaining()), client.stream(
                    "GET", self._path, params=params, headers=self._headers(),
                    timeout=httpx.Timeout(10.0, read=seconds + 10.0)) as resp:
                if resp.status_code != 200:
                    body = await resp.aread()
                    if resp.status_code == 403:
                        raise _WatchForbidden(self._forbidden(body, "watch"))
                    self._fail(resp.status_code, body, "watch")
                log.debug("discovery: watching %s", self.target)
                async for line in resp.aiter_lines():
                    if not line.strip():
                        continue
                    try:
                        return self._event(line)
                    except _NotYet as not_yet:
                        reason = str(not_yet)
                        pacing.waiting(reason)
        except httpx.TransportError as exc:
            raise _NotYet(self._unreachable(exc)) from None
        except TimeoutError:
            pass  # the deadline: the caller gives up with the reason
        raise _NotYet(reason)

    # -- responses -----------------------------------------------------------------------------

    def _event(self, line: str) -> InstanceId:
        try:
            event = msgspec.json.decode(line, type=_WatchEvent)
        except msgspec.DecodeError as exc:
            raise _NotYet(f"unreadable watch event: {exc}") from None
        if event.type == "ERROR":  # e.g. 410 Gone: the caller starts over with a GET
            status = _decode_status(bytes(event.object))
            raise _NotYet(f"watch error {status.code}: {status.message}")
        if event.type == "DELETED":
            raise _NotYet("the resource was deleted")
        if event.type not in ("ADDED", "MODIFIED"):
            raise _NotYet(f"watch event {event.type}")
        return self._instance(bytes(event.object))

    def _instance(self, body: bytes) -> InstanceId:
        try:
            cr = msgspec.json.decode(body, type=_Metadata)
        except msgspec.DecodeError as exc:
            raise _NotYet(f"spec.data is not Dynamo's DiscoveryMetadata: {exc}") from None
        if cr.metadata.name and cr.metadata.name != self._pod:
            raise _NotYet(f"an event for {cr.metadata.name}")
        endpoints = (cr.spec.data.endpoints if cr.spec and cr.spec.data else None) or {}
        ids, matched = worker_ids(endpoints.values(), self._namespace, self._component)
        if not ids:
            raise _NotYet("the worker has registered no endpoint yet")
        if len(ids) > 1:
            raise DiscoveryError(f"{self.target} lists several instance IDs {sorted(ids)}; "
                                 "pass --instance-id to choose")
        if not matched:
            log.info("discovery: no endpoint of %s/%s in %s; using the worker's other endpoints",
                     self._namespace, self._component, self.target)
        value = ids.pop()
        return InstanceId(value, self.name, f"{self.target} spec.data.endpoints")

    def _fail(self, status: int, body: bytes, verb: str) -> NoReturn:
        """Raise _NotYet for what waiting may fix, DiscoveryError for what it cannot."""
        parsed = _decode_status(body)
        if status == 404:
            if parsed.details.get("name") == self._pod:
                raise _NotYet("not created yet: HTTP 404")
            raise _NotYet(f"HTTP 404 {parsed.message or 'not found'}: is Dynamo's "
                          f"{PLURAL}.{GROUP} CRD installed?")
        if status == 403:
            raise DiscoveryError(self._forbidden(body, verb))
        if status == 401:
            raise DiscoveryError(f"the Kubernetes API rejected the service-account token in "
                                 f"{self._sa_dir}/token (HTTP 401: {parsed.message})")
        if status == 429 or status >= 500:
            raise _NotYet(f"HTTP {status} {parsed.message}".rstrip())
        raise DiscoveryError(f"{verb} {self.target}: HTTP {status} {parsed.message}".rstrip())

    def _forbidden(self, body: bytes, verb: str) -> str:
        message = _decode_status(body).message
        return (f"Kubernetes RBAC denies {verb} on {PLURAL}.{GROUP} in namespace {self._ns} "
                f"(HTTP 403: {message}); grant the pod's service account a Role with verbs "
                f"get, watch on resource {PLURAL} in apiGroup {GROUP}")

    def _unreachable(self, exc: httpx.TransportError) -> str:
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
            raise DiscoveryError(f"TLS verification of the Kubernetes API at {self._base} "
                                 f"failed with {self._sa_dir}/ca.crt: {exc}") from None
        return f"cannot reach the Kubernetes API at {self._base}: {exc!r}"


def _decode_status(body: bytes) -> _Status:
    try:
        return msgspec.json.decode(body, type=_Status)
    except msgspec.DecodeError:
        return _Status(message=body[:200].decode(errors="replace"))
