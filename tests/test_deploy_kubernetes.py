"""The Kubernetes manifests in deploy/kubernetes: rendered with kustomize, checked by
deploy/validate.py (schemas, references, the relay's own settings), and their settings run
through a real relay against a real nats-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from harness import http_get

from deploy import validate
from kvrelay.discovery import hash_pod_name
from kvrelay.testing.natsserver import NatsServer, free_port
from kvrelay.testing.synthetic import SyntheticVllm, block_stored
from kvrelay.wire.relaybatch import decode_relay_batches, decode_resume_point

pytestmark = pytest.mark.deploy

REPO = Path(__file__).resolve().parent.parent
OVERLAYS = ("sidecar", "standalone")  # the overlays whose pods are plain workloads
DYNAMO = "dynamo-operator"  # pods made by Dynamo's operator from a DynamoGraphDeployment
SCORING = "scoring"  # the scoring service, `kvrelay index --http`
STREAM_FILE = REPO / "deploy" / "nats" / "stream.json"
Obj = dict[str, Any]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    """Each overlay rendered once by kustomize."""
    return {name: validate.render(validate.OVERLAYS / name)
            for name in (*OVERLAYS, DYNAMO, SCORING)}


def kind(objects: list[Obj], wanted: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == wanted]


def workload(objects: list[Obj]) -> Obj:
    (found,) = [o for o in objects if o["kind"] in validate.WORKLOAD_KINDS]
    return found


def pod_spec(objects: list[Obj]) -> Obj:
    spec: Obj = workload(objects)["spec"]["template"]["spec"]
    return spec


def container(objects: list[Obj], name: str) -> Obj:
    (found,) = [c for c in validate.all_containers(pod_spec(objects)) if c["name"] == name]
    return found


def worker_template(objects: list[Obj]) -> Obj:
    """The pod template Dynamo's operator makes of the graph's worker service."""
    (graph,) = kind(objects, "DynamoGraphDeployment")
    (template,) = [t for w, t in validate.dynamo_pod_templates(graph)
                   if w["metadata"]["name"].endswith("/VllmDecodeWorker")]
    return template


def graph_relay(objects: list[Obj]) -> Obj:
    """The relay sidecar as written in the graph's extraPodSpec (edits reach the graph)."""
    (graph,) = kind(objects, "DynamoGraphDeployment")
    extra = graph["spec"]["services"]["VllmDecodeWorker"]["extraPodSpec"]
    (found,) = [c for c in extra["initContainers"] if c["name"] == "kvrelay"]
    result: Obj = found
    return result


def env_entry(c: Obj, name: str) -> Obj:
    found: list[Obj] = [e for e in c["env"] if e["name"] == name]
    assert len(found) == 1, f"{name}: {len(found)} entries"
    return found[0]


def mebibytes(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1.0, "Gi": 1024.0}
    return float(quantity[:-2]) * units[quantity[-2:]]


def millicores(quantity: str) -> float:
    return float(quantity[:-1]) if quantity.endswith("m") else float(quantity) * 1000


def breakage_cases(table: list[tuple[str, Callable[[list[Obj]], None], str]]
                   ) -> list[Any]:
    """A table of (id, breakage, expected problem) as pytest parameters."""
    return [pytest.param(breakage, expected, id=name) for name, breakage, expected in table]


def assert_reported(objects: list[Obj], breakage: Callable[[list[Obj]], None],
                    expected: str) -> None:
    """`breakage` done to a copy of `objects` makes the checks report `expected`."""
    broken = copy.deepcopy(objects)
    breakage(broken)
    problems = validate.check(broken, [validate.MIN_KUBERNETES])
    assert any(expected in p for p in problems), problems


# -- the shipped overlays ----------------------------------------------------------------------


@pytest.mark.parametrize("overlay", [*OVERLAYS, DYNAMO])
def test_overlay_passes_every_check(rendered: dict[str, list[Obj]], overlay: str) -> None:
    """Each overlay passes schemas (oldest and newest Kubernetes), references, relay settings,
    and its alerts pass promtool's checks and unit tests."""
    objects = rendered[overlay]
    expected = ({"DynamoGraphDeployment", "PodMonitor", "PrometheusRule"} if overlay == DYNAMO
                else {"ServiceAccount", "ConfigMap", "Service", "ServiceMonitor", "Deployment",
                      "PrometheusRule"})
    assert {o["kind"] for o in objects} >= expected
    assert validate.check(objects, validate.kubernetes_versions()) == []


def test_scoring_overlay_passes_every_check(rendered: dict[str, list[Obj]]) -> None:
    """The scoring service's overlay passes schemas, references and its own checks: `kvrelay
    index` with arguments it takes, probed on the port it serves, scraped by a ServiceMonitor,
    locked down as the relay is."""
    objects = rendered[SCORING]
    assert {o["kind"] for o in objects} == {"ConfigMap", "Service", "ServiceMonitor",
                                            "Deployment"}
    assert validate.check(objects, validate.kubernetes_versions()) == []
    assert _index(objects)["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod_spec(objects)["automountServiceAccountToken"] is False


def _index(objects: list[Obj]) -> Obj:
    return container(objects, validate.INDEX_CONTAINER)


SCORING_BREAKAGES: list[tuple[str, Callable[[list[Obj]], None], str]] = [
    ("entrypoint-run", lambda o: _index(o).pop("command"), "not kvrelay index"),
    ("unknown-flag", lambda o: _index(o)["args"].append("--no-such-flag"),
     "unrecognized arguments: --no-such-flag"),
    ("no-port", lambda o: _index(o).update(args=["index"]),
     "the following arguments are required: --http"),
    ("other-port", lambda o: _index(o).update(args=["index", "--http", "9000"]),
     "the service serves /health on 9000"),
    ("ready-on-live", lambda o: _index(o)["readinessProbe"]["httpGet"].update(path="/live"),
     "readinessProbe asks /live"),
    ("no-liveness", lambda o: _index(o).pop("livenessProbe"), "no livenessProbe on /live"),
]


@pytest.mark.parametrize(("breakage", "expected"), breakage_cases(SCORING_BREAKAGES))
def test_broken_scoring_fails(rendered: dict[str, list[Obj]],
                              breakage: Callable[[list[Obj]], None], expected: str) -> None:
    """Each kind of mistake in the scoring service's container is reported."""
    assert_reported(rendered[SCORING], breakage, expected)


def test_native_sidecar_needs_kubernetes_1_29(rendered: dict[str, list[Obj]]) -> None:
    """Kubernetes 1.27's schema refuses the native sidecar: schemas are applied per version."""
    problems = validate.check(rendered["sidecar"], ["1.27"])
    assert any("restartPolicy" in p and "was unexpected" in p for p in problems), problems


def test_sidecar_is_native_with_downward_identity(rendered: dict[str, list[Obj]]) -> None:
    """Beside plain vLLM the relay is a native sidecar named by its pod (the pod-name hash):
    no discovery backend that waits for Dynamo's resources, no token in any container."""
    spec = pod_spec(rendered["sidecar"])
    (relay,) = [c for c in spec["initContainers"] if c["name"] == "kvrelay"]
    assert relay["restartPolicy"] == "Always"
    assert [c["name"] for c in spec["containers"]] == ["vllm"]
    for name, path in (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")):
        assert env_entry(relay, name)["valueFrom"]["fieldRef"]["fieldPath"] == path
    assert "DYN_DISCOVERY_BACKEND" not in {e["name"] for e in relay["env"]}
    assert spec["automountServiceAccountToken"] is False
    assert not validate.token_volumes(spec)


def test_dynamo_operator_sidecar_avoids_the_worker_ports(rendered: dict[str, list[Obj]]
                                                         ) -> None:
    """In operator-managed pods the relay keeps off the worker's 9090 "system" port, reads
    Dynamo's KV event port, and finds its instance through Kubernetes discovery."""
    template = worker_template(rendered[DYNAMO])
    spec = template["spec"]
    (main,) = spec["containers"]
    (relay,) = spec["initContainers"]
    relay_ports = {(p["name"], p["containerPort"]) for p in relay["ports"]}
    main_ports = {(p["name"], p["containerPort"]) for p in main["ports"]}
    assert ("system", 9090) in main_ports
    assert not {n for n, _ in relay_ports} & {n for n, _ in main_ports}
    assert not {n for _, n in relay_ports} & {n for _, n in main_ports}
    assert env_entry(relay, "KVRELAY_SYSTEM_PORT")["value"] == "9190"
    assert env_entry(relay, "DYN_DISCOVERY_BACKEND")["value"] == "kubernetes"
    assert env_entry(relay, "KVRELAY_ZMQ")["value"] == "tcp://127.0.0.1:20080"
    (monitor,) = kind(rendered[DYNAMO], "PodMonitor")
    assert monitor["spec"]["podMetricsEndpoints"][0]["portNumber"] == 9190
    assert monitor["spec"]["selector"]["matchLabels"].items() <= template["metadata"][
        "labels"].items()


def test_standalone_without_readiness_probe_fails(rendered: dict[str, list[Obj]]) -> None:
    """A standalone relay must keep its /health readiness probe (only a sidecar drops it)."""
    objects = copy.deepcopy(rendered["standalone"])
    container(objects, "kvrelay").pop("readinessProbe")
    problems = validate.check(objects, [validate.MIN_KUBERNETES])
    assert any("no readinessProbe on /health" in p for p in problems), problems


def test_discovery_role_is_least_privilege(rendered: dict[str, list[Obj]]) -> None:
    """Only get and watch on DynamoWorkerMetadata are granted, and only beside Dynamo's
    workers; the plain sidecar and standalone get no API access."""
    sidecar, standalone, dynamo = rendered["sidecar"], rendered["standalone"], rendered[DYNAMO]
    (role,) = kind(dynamo, "Role")
    assert role["rules"] == [{"apiGroups": ["nvidia.com"], "resources": ["dynamoworkermetadatas"],
                              "verbs": ["get", "watch"]}]
    for objects in (sidecar, standalone, dynamo):
        assert not kind(objects, "ClusterRole")
        assert not kind(objects, "ClusterRoleBinding")
    for objects in (sidecar, standalone):
        assert not kind(objects, "Role")
        assert not kind(objects, "RoleBinding")
        assert pod_spec(objects)["automountServiceAccountToken"] is False


def test_standalone_zmq_port_admits_only_vllm(rendered: dict[str, list[Obj]]) -> None:
    """The standalone relay binds its ZMQ port; a NetworkPolicy admits only vLLM pods to it."""
    objects = rendered["standalone"]
    (policy,) = kind(objects, "NetworkPolicy")
    labels = workload(objects)["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    zmq_rules = [r for r in policy["spec"]["ingress"]
                 if 5557 in {p["port"] for p in r.get("ports", [])}]
    assert zmq_rules == [{"from": [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "vllm"}}}], "ports": [{"port": 5557, "protocol": "TCP"}]}]
    assert env_entry(container(objects, "kvrelay"), "KVRELAY_ZMQ_BIND")["value"] == "tcp://*:5557"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_relay_container_is_locked_down_and_small(rendered: dict[str, list[Obj]],
                                                  overlay: str) -> None:
    """The relay runs non-root, read-only, without capabilities, with sidecar-sized resources."""
    objects = rendered[overlay]
    relay = container(objects, "kvrelay")
    context = {**pod_spec(objects).get("securityContext", {}), **relay["securityContext"]}
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] != 0
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    resources = relay["resources"]
    assert mebibytes(resources["requests"]["memory"]) <= mebibytes(
        resources["limits"]["memory"]) <= 256
    assert millicores(resources["requests"]["cpu"]) <= 250


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_nats_secrets_come_from_a_secret(rendered: dict[str, list[Obj]], overlay: str) -> None:
    """NATS credentials reach the relay only by Secret reference; no Secret value is shipped."""
    objects = rendered[overlay]
    relay = container(objects, "kvrelay")
    for name in ("KVRELAY_NATS_USER", "KVRELAY_NATS_PASSWORD", "KVRELAY_NATS_TOKEN"):
        entry = env_entry(relay, name)
        assert "value" not in entry
        assert entry["valueFrom"]["secretKeyRef"]["name"] == "kvrelay-nats"
    (mount,) = relay["volumeMounts"]
    (volume,) = [v for v in pod_spec(objects)["volumes"] if v["name"] == mount["name"]]
    assert mount["readOnly"] is True
    assert volume["secret"]["secretName"] == "kvrelay-nats"
    assert not kind(objects, "Secret")
    (configmap,) = kind(objects, "ConfigMap")
    assert not {"KVRELAY_NATS_PASSWORD", "KVRELAY_NATS_TOKEN"} & set(configmap["data"])


# -- broken manifests fail -----------------------------------------------------------------------


def _relay(objects: list[Obj]) -> Obj:
    return container(objects, "kvrelay")


def _vllm_config(objects: list[Obj], **changes: Any) -> None:
    args = container(objects, "vllm")["args"]
    index = args.index("--kv-events-config") + 1
    args[index] = json.dumps({**json.loads(args[index]), **changes})


def _set_env(objects: list[Obj], name: str, value: str) -> None:
    relay = _relay(objects)
    relay["env"] = [e for e in relay["env"] if e["name"] != name] + [
        {"name": name, "value": value}]


def _token_in(objects: list[Obj], name: str) -> None:
    """A projected service account token volume, mounted in container `name`."""
    pod_spec(objects)["volumes"].append({"name": "token", "projected": {"sources": [
        {"serviceAccountToken": {"path": "token"}}]}})
    container(objects, name).setdefault("volumeMounts", []).append(
        {"name": "token", "mountPath": validate.SERVICE_ACCOUNT_DIR})


BREAKAGES: list[tuple[str, Callable[[list[Obj]], None], str]] = [
    ("misspelled-field",
     lambda o: _relay(o)["securityContext"].update(readOnlyRootFileSystem=True),
     "'readOnlyRootFileSystem' was unexpected"),
    ("wrong-type",
     lambda o: _relay(o)["ports"][0].update(containerPort="9090"),
     "'9090' is not of type 'integer'"),
    ("unknown-kind",
     lambda o: o.append({"apiVersion": "example.com/v1", "kind": "Widget",
                         "metadata": {"name": "w"}}),
     "no schema for example.com/v1 Widget"),
    ("servicemonitor-unknown-field",
     lambda o: kind(o, "ServiceMonitor")[0]["spec"]["endpoints"][0].update(targetport=9090),
     "spec.endpoints[0].targetport: unknown field"),
    ("servicemonitor-bad-interval",
     lambda o: kind(o, "ServiceMonitor")[0]["spec"]["endpoints"][0].update(
         interval="15 seconds"),
     "String should match pattern"),
    ("servicemonitor-port",
     lambda o: kind(o, "ServiceMonitor")[0]["spec"]["endpoints"][0].update(port="metrics"),
     "endpoint port 'metrics' is not a port of Service/kvrelay"),
    ("service-target-port",
     lambda o: kind(o, "Service")[0]["spec"]["ports"][0].update(targetPort="metrics"),
     "targetPort 'metrics' is no container port"),
    ("service-selector",
     lambda o: kind(o, "Service")[0]["spec"].update(selector={"app": "nothing"}),
     "matches no pod template"),
    ("missing-configmap",
     lambda o: _relay(o)["envFrom"][0]["configMapRef"].update(name="kvrelay-settings"),
     "ConfigMap 'kvrelay-settings' is not defined"),
    ("missing-service-account",
     lambda o: pod_spec(o).update(serviceAccountName="worker"),
     "ServiceAccount 'worker' is not defined"),
    ("missing-volume",
     lambda o: _relay(o)["volumeMounts"][0].update(name="nats-secrets"),
     "mounts volume 'nats-secrets'"),
    ("unknown-setting",
     lambda o: _set_env(o, "KVRELAY_NATS_SERVER", "nats://nats:4222"),
     "KVRELAY_NATS_SERVER is not a setting the relay reads"),
    ("invalid-setting",
     lambda o: _set_env(o, "KVRELAY_DP_RANKS", "0"),
     "the relay refuses its settings: KVRELAY_DP_RANKS must be at least 1"),
    ("unknown-flag",
     lambda o: _relay(o).update(args=["--natz", "nats://nats:4222"]),
     "unrecognized arguments: --natz"),
    ("probe-path",
     lambda o: _relay(o)["livenessProbe"]["httpGet"].update(path="/healthz"),
     "livenessProbe asks /healthz on port 9090; the relay serves /live on 9090"),
    ("probe-port",
     lambda o: _set_env(o, "KVRELAY_SYSTEM_PORT", "9091"),
     "startupProbe asks /live on port 9090; the relay serves /live on 9091"),
    ("sidecar-readiness",
     lambda o: _relay(o).update(readinessProbe={"httpGet": {"path": "/health", "port": 9090}}),
     "a sidecar's readinessProbe would take the vLLM worker out of its Service"),
    ("sidecar-no-startup-probe",
     lambda o: _relay(o).pop("startupProbe"),
     "no startupProbe on /live"),
    ("sidecar-without-restart-policy",
     lambda o: _relay(o).pop("restartPolicy"),
     "never finishes"),
    ("short-grace-period",
     lambda o: pod_spec(o).update(terminationGracePeriodSeconds=10),
     "terminationGracePeriodSeconds 10 leaves no time"),
    ("vllm-port",
     lambda o: _vllm_config(o, endpoint="tcp://*:5559"),
     "vLLM publishes on tcp://*:5559, the relay reads tcp://127.0.0.1:5557"),
    ("vllm-connects",
     lambda o: _vllm_config(o, endpoint="tcp://127.0.0.1:5557"),
     "so the relay must bind (--zmq-bind)"),
    ("vllm-no-replay",
     lambda o: _vllm_config(o, replay_endpoint=None),
     "vLLM replays on None, the relay asks tcp://127.0.0.1:5558"),
    ("vllm-unknown-field",
     lambda o: _vllm_config(o, replay_port=5558),
     "--kv-events-config has no field 'replay_port'"),
    ("vllm-events-off",
     lambda o: _vllm_config(o, enable_kv_cache_events=False),
     "KV events are off"),
    ("service-named-sidecar-port",
     lambda o: kind(o, "Service")[0]["spec"]["ports"][0].update(targetPort="system"),
     "targetPort 'system' names a port of a native-sidecar init container only"),
    ("token-in-every-container",
     lambda o: pod_spec(o).pop("automountServiceAccountToken"),
     "every container gets the service account token"),
    ("kubernetes-discovery-beside-plain-vllm",
     lambda o: _set_env(o, "DYN_DISCOVERY_BACKEND", "kubernetes"),
     "DYN_DISCOVERY_BACKEND=kubernetes, but no container of the pod is a Dynamo worker"),
    ("kubernetes-discovery-without-token",
     lambda o: _set_env(o, "DYN_DISCOVERY_BACKEND", "kubernetes"),
     "DYN_DISCOVERY_BACKEND=kubernetes, but no service account token is mounted"),
    ("token-where-unused",
     lambda o: _token_in(o, "vllm"),
     "container vllm: holds a service account token it does not use"),
    ("port-clash",
     lambda o: _relay(o)["ports"].append({"name": "http", "containerPort": 8000}),
     "containers kvrelay and vllm both declare port 8000"),
    ("alert-unknown-metric",
     lambda o: kind(o, "PrometheusRule")[0]["spec"]["groups"][0]["rules"][0].update(
         expr="kvrelay_is_ready == 0"),
     "kvrelay_is_ready is not a metric the relay exports"),
    ("alert-does-not-parse",
     lambda o: kind(o, "PrometheusRule")[0]["spec"]["groups"][0]["rules"][0].update(
         expr="max by (pod) kvrelay_ready) == 0"),
     "promtool check rules"),
    ("alert-fails-its-unit-test",
     lambda o: kind(o, "PrometheusRule")[0]["spec"]["groups"][0]["rules"][0].update(
         {"for": "10m"}),
     "promtool test rules"),
    ("prometheusrule-unknown-field",
     lambda o: kind(o, "PrometheusRule")[0]["spec"]["groups"][0].update(evaluation="1m"),
     "spec.groups[0].evaluation: unknown field"),
]


@pytest.mark.parametrize(("breakage", "expected"), breakage_cases(BREAKAGES))
def test_broken_manifest_fails(rendered: dict[str, list[Obj]],
                               breakage: Callable[[list[Obj]], None], expected: str) -> None:
    """Each kind of mistake in the sidecar overlay is reported, saying what is wrong."""
    assert_reported(rendered["sidecar"], breakage, expected)


def _standalone_policy(objects: list[Obj]) -> Obj:
    policy: Obj = kind(objects, "NetworkPolicy")[0]
    return policy


STANDALONE_BREAKAGES: list[tuple[str, Callable[[list[Obj]], None], str]] = [
    ("no-network-policy",
     lambda o: o.remove(_standalone_policy(o)),
     "binds ZMQ port 5557 with no NetworkPolicy"),
    ("zmq-open-to-all",
     lambda o: _standalone_policy(o)["spec"]["ingress"][0].pop("from"),
     "admits every source to ZMQ port 5557"),
    ("zmq-open-to-a-namespace",
     lambda o: _standalone_policy(o)["spec"]["ingress"][0].update(
         {"from": [{"namespaceSelector": {}}]}),
     "admits every source to ZMQ port 5557"),
]


@pytest.mark.parametrize(("breakage", "expected"), breakage_cases(STANDALONE_BREAKAGES))
def test_broken_standalone_fails(rendered: dict[str, list[Obj]],
                                 breakage: Callable[[list[Obj]], None], expected: str) -> None:
    """A ZMQ port the standalone relay binds must be closed to all but vLLM pods."""
    assert_reported(rendered["standalone"], breakage, expected)


def _graph_env(objects: list[Obj], name: str, value: str) -> None:
    relay = graph_relay(objects)
    relay["env"] = [e for e in relay["env"] if e["name"] != name] + [
        {"name": name, "value": value}]


DYNAMO_BREAKAGES: list[tuple[str, Callable[[list[Obj]], None], str]] = [
    ("relay-on-the-system-port",
     lambda o: graph_relay(o)["ports"][0].update(containerPort=9090),
     "containers kvrelay and main both declare port 9090"),
    ("relay-port-named-system",
     lambda o: graph_relay(o)["ports"][0].update(name="system"),
     "containers kvrelay and main both declare port 'system'"),
    ("relay-reads-vllm-default-port",
     lambda o: _graph_env(o, "KVRELAY_ZMQ", "tcp://127.0.0.1:5557"),
     "Dynamo's worker publishes on tcp://*:20080, the relay reads tcp://127.0.0.1:5557"),
    ("relay-asks-for-replay",
     lambda o: _graph_env(o, "KVRELAY_REPLAY", "tcp://127.0.0.1:5558"),
     "Dynamo's worker opens no replay socket"),
    ("relay-unknown-field",
     lambda o: graph_relay(o).update(restartPolicyy="Always"),
     "'restartPolicyy' was unexpected"),
    ("podmonitor-wrong-port",
     lambda o: kind(o, "PodMonitor")[0]["spec"]["podMetricsEndpoints"][0].update(
         portNumber=9090),
     "PodMonitor/kvrelay: endpoint port 9090 is no port of the kvrelay container"),
    ("podmonitor-selector",
     lambda o: kind(o, "PodMonitor")[0]["spec"]["selector"].update(
         matchLabels={"app": "nothing"}),
     "PodMonitor/kvrelay: selector {'app': 'nothing'} matches no pod template"),
]


@pytest.mark.parametrize(("breakage", "expected"), breakage_cases(DYNAMO_BREAKAGES))
def test_broken_dynamo_graph_fails(rendered: dict[str, list[Obj]],
                                   breakage: Callable[[list[Obj]], None], expected: str) -> None:
    """Each kind of mistake in the operator-managed example is reported."""
    assert_reported(rendered[DYNAMO], breakage, expected)


@pytest.fixture
def overlay_copy(tmp_path: Path) -> Path:
    """A copy of deploy/kubernetes to break on disk; returns its sidecar overlay."""
    shutil.copytree(REPO / "deploy" / "kubernetes", tmp_path / "kubernetes")
    return tmp_path / "kubernetes" / "overlays" / "sidecar"


def run_validator(*overlays: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "deploy" / "validate.py"),
                           *map(str, overlays)], capture_output=True, text=True, timeout=120,
                          check=False)


def test_validator_command_fails_on_a_broken_file(overlay_copy: Path) -> None:
    """deploy/validate.py exits 1 naming a wrong field in a manifest on disk, 0 without it."""
    assert run_validator(overlay_copy).returncode == 0
    manifest = overlay_copy / "vllm-worker.yaml"
    manifest.write_text(manifest.read_text().replace("periodSeconds: 10", "periodSecond: 10"))
    result = run_validator(overlay_copy)
    assert result.returncode == 1
    assert "'periodSecond' was unexpected" in result.stdout, result.stdout


def test_validator_command_reports_render_errors(overlay_copy: Path) -> None:
    """An overlay kustomize cannot render fails validation with kustomize's error."""
    kustomization = overlay_copy / "kustomization.yaml"
    kustomization.write_text(kustomization.read_text().replace("vllm-worker.yaml",
                                                               "vllm-workers.yaml"))
    result = run_validator(overlay_copy)
    assert result.returncode == 1
    assert "kustomize failed" in result.stdout
    assert "vllm-workers.yaml" in result.stdout


# -- the sidecar's settings drive a real relay -------------------------------------------------


def ro_wrapper(probe_paths: list[Path]) -> list[str]:
    """A command prefix running its command in a mount namespace where every filesystem but
    /proc, /sys and /dev is read-only (a read-only root filesystem, no writable /tmp); it exits
    97 if any of `probe_paths` can still be written."""
    script = (
        'for m in $(cut -d" " -f5 /proc/self/mountinfo | sort -u); do '
        'case "$m" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*) continue;; esac; '
        'mount -o remount,bind,ro "$m" || exit 98; done; '
        'for p in ' + " ".join(f'"{p}"' for p in probe_paths) + '; do '
        'if touch "$p/.kvrelay-rw-probe" 2>/dev/null; then echo "writable: $p"; exit 97; fi; '
        'done; exec "$@"')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "ro"]


def can_remount_read_only() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -o remount,bind,ro /"], capture_output=True, check=False)
    return probe.returncode == 0


def remap_port(endpoint: str, port: int) -> str:
    return re.sub(r":\d+$", f":{port}", endpoint)


class Rehearsal:
    """The sidecar pod's relay settings with its ports moved to free ones on this machine."""

    def __init__(self, objects: list[Obj], nats_url: str) -> None:
        spec = pod_spec(objects)
        relay = container(objects, "kvrelay")
        configmaps = {o["metadata"]["name"]: o["data"] for o in kind(objects, "ConfigMap")}
        env = {k: v for k, v in validate.relay_environment(relay, configmaps).items()
               if v is not None}
        args = container(objects, "vllm")["args"]
        kv = json.loads(args[args.index("--kv-events-config") + 1])
        pub, replay, system = free_port(), free_port(), free_port()
        self.vllm_endpoint = remap_port(kv["endpoint"], pub)
        self.vllm_replay = remap_port(kv["replay_endpoint"], replay)
        self.topic = kv["topic"].encode()
        env["KVRELAY_ZMQ"] = remap_port(env["KVRELAY_ZMQ"], pub)
        env["KVRELAY_REPLAY"] = remap_port(env["KVRELAY_REPLAY"], replay)
        env["KVRELAY_SYSTEM_PORT"] = str(system)
        env["NATS_SERVER"] = nats_url
        # Used as they are: the plain-vLLM sidecar needs no Kubernetes API (the pod-name hash).
        self.env = env
        self.system_port = system
        self.grace = float(spec["terminationGracePeriodSeconds"])
        self.health_path = "/health"
        self.subject = (f"kv.{env['DYN_NAMESPACE']}.{env['DYN_COMPONENT']}."
                        f"{hash_pod_name(env['POD_NAME'])}.0")
        self.stream = env["KVRELAY_STREAM"]


async def http_status(port: int, path: str) -> int:
    status, _ = await http_get(port, path)
    return status


def relay_process(env: dict[str, str], log: Path, prefix: list[str]
                  ) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    return kvrelay_process(["run"], env, log, prefix)


@contextlib.contextmanager
def kvrelay_process(args: list[str], env: dict[str, str], log: Path, prefix: list[str]
                    ) -> Iterator[subprocess.Popen[bytes]]:
    """`kvrelay ARGS` with `env` (and none of this process's kvrelay or Dynamo variables)."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("KVRELAY_", "DYN_", "NATS_SERVER", "POD_"))}
    with log.open("ab") as out:
        proc = subprocess.Popen([*prefix, sys.executable, "-m", "kvrelay", *args],
                                env={**base, **env, "PYTHONUNBUFFERED": "1"}, cwd="/",
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


async def until(cond: Callable[[], Any], what: str, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def stream_from_file(url: str) -> AsyncIterator[Any]:
    """A NATS connection to a server whose stream was created from deploy/nats/stream.json,
    as `nats stream add --config` does: the file's JSON on the JetStream API."""
    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=2)
    try:
        config = json.loads(STREAM_FILE.read_text())
        reply = await nc.request(f"$JS.API.STREAM.CREATE.{config['name']}",
                                 STREAM_FILE.read_bytes(), timeout=5)
        assert "error" not in json.loads(reply.data), reply.data
        yield nc
    finally:
        await nc.close()


async def rehearse(objects: list[Obj], server: NatsServer, tmp_path: Path,
                   prefix: list[str]) -> None:
    """Run the relay with the manifest's settings beside a synthetic vLLM configured by the
    manifest's --kv-events-config; check probes, delivery and a clean stop."""
    plan = Rehearsal(objects, server.url)
    log = tmp_path / "relay.log"
    async with stream_from_file(server.url) as nc:
        js = nc.jetstream()
        with SyntheticVllm(plan.vllm_endpoint, replay_endpoint=plan.vllm_replay,
                           topic=plan.topic) as vllm, \
                relay_process(plan.env, log, prefix) as proc:

            async def ready() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"relay exited {proc.returncode}:\n{log.read_text()}")
                with contextlib.suppress(OSError, IndexError, ValueError):
                    return await http_status(plan.system_port, plan.health_path) == 200
                return False

            await until(ready, "the readiness probe to pass")
            assert await http_status(plan.system_port, "/live") == 200

            async def messages() -> int:
                info = await js.stream_info(plan.stream, subjects_filter=plan.subject)
                return int(info.state.messages)

            async def stored() -> int:
                """Batches stored: the last one's seq + 1 (a message may hold a pack)."""
                if await messages() == 0:
                    return 0
                last = await js.get_last_msg(plan.stream, plan.subject)
                return decode_resume_point(last.data).seq + 1

            async def arrived() -> bool:
                if await stored() == 0:
                    vllm.publish_next()  # until the first lands; replay fills what ZMQ lost
                return await stored() > 0

            await until(arrived, f"a batch on {plan.subject}")
            vllm.publish_next()
            vllm.publish_next()
            expected = vllm.seq
            await until(lambda: _at_least(stored, expected), f"{expected} batches")
            sub = await js.pull_subscribe(plan.subject, stream=plan.stream)
            batches = [b for m in await sub.fetch(await messages(), timeout=5)
                       for b in decode_relay_batches(m.data)]
            assert [b.seq for b in batches] == list(range(expected))
            assert {b.instance_id for b in batches} == {hash_pod_name(plan.env["POD_NAME"])}
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, plan.grace) == 0, log.read_text()
            assert time.monotonic() - started < plan.grace


async def _at_least(count: Callable[[], Any], n: int) -> bool:
    return bool(await count() >= n)


@pytest.mark.integration
async def test_sidecar_settings_drive_a_real_relay(rendered: dict[str, list[Obj]],
                                                   fresh_nats: NatsServer,
                                                   tmp_path: Path) -> None:
    """The sidecar's settings run a real relay: ready, every batch under the pod ID, clean stop."""
    await rehearse(rendered["sidecar"], fresh_nats, tmp_path, [])


@pytest.mark.integration
@pytest.mark.skipif(not can_remount_read_only(),
                    reason="needs unshare and mount (root in a mount namespace) for a read-only /")
async def test_relay_runs_on_a_read_only_filesystem(rendered: dict[str, list[Obj]],
                                                    fresh_nats: NatsServer,
                                                    tmp_path: Path) -> None:
    """With every filesystem read-only, /tmp included, the relay still relays and drains."""
    probes = [Path("/"), Path("/tmp"), REPO, Path(sys.prefix), tmp_path]
    await rehearse(rendered["sidecar"], fresh_nats, tmp_path, ro_wrapper(probes))


# -- the scoring service's settings serve a real relay's stream --------------------------------


@pytest.mark.integration
async def test_scoring_settings_score_what_a_real_relay_publishes(
        rendered: dict[str, list[Obj]], fresh_nats: NatsServer, tmp_path: Path) -> None:
    """The scoring service run with its manifest's command and settings (on a read-only
    filesystem where this machine allows one) beside a relay run with the sidecar's, both from
    the same ConfigMap: ready once caught up with the stream deploy/nats/stream.json makes, it
    scores the blocks vLLM stored through the relay, and stops cleanly within its grace."""
    objects = rendered[SCORING]
    index = _index(objects)
    configmaps = {o["metadata"]["name"]: o["data"] for o in kind(objects, "ConfigMap")}
    env = {k: v for k, v in validate.relay_environment(index, configmaps).items()
           if v is not None}
    env["NATS_SERVER"] = fresh_nats.url
    port = free_port()
    args = [*index["command"][1:], *index["args"]]
    args[args.index("--http") + 1] = str(port)
    grace = float(pod_spec(objects)["terminationGracePeriodSeconds"])
    prefix = ro_wrapper([Path("/"), Path("/tmp"), REPO, tmp_path]) \
        if can_remount_read_only() else []
    plan = Rehearsal(rendered["sidecar"], fresh_nats.url)
    worker = f"{hash_pod_name(plan.env['POD_NAME'])}.0"
    tokens = list(range(1000, 1032))  # two blocks of 16
    log = tmp_path / "index.log"
    async with stream_from_file(fresh_nats.url) as nc, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        js = nc.jetstream()
        with SyntheticVllm(plan.vllm_endpoint, replay_endpoint=plan.vllm_replay,
                           topic=plan.topic) as vllm, \
                relay_process(plan.env, tmp_path / "relay.log", []), \
                kvrelay_process(args, env, log, prefix) as proc:
            async def ready() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"exited {proc.returncode}:\n{log.read_text()}")
                with contextlib.suppress(httpx.HTTPError):
                    return (await http.get("/health")).status_code == 200
                return False

            await until(ready, "the scoring service's readiness probe to pass")

            async def relayed() -> bool:
                info = await js.stream_info(plan.stream, subjects_filter=plan.subject)
                if info.state.messages == 0:
                    vllm.publish_next()  # until the first lands (ZMQ's late joiner)
                return bool(info.state.messages)

            await until(relayed, f"a batch on {plan.subject}")
            vllm.publish([block_stored([7_000_001, 7_000_002], None, tokens)])

            async def scored() -> bool:
                answer = await http.post("/score", json={"token_ids": [*tokens, 0]})
                assert answer.status_code == 200, answer.text
                return bool(answer.json().get(worker) == 2)

            await until(scored, f"two blocks scored for worker {worker}")
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, grace) == 0, log.read_text()
            assert time.monotonic() - started < grace
