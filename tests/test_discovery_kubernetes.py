"""Kubernetes discovery against a local HTTPS API serving recorded responses (tests/kubeapi.py):
the relay's real httpx client, service-account token and CA, GET, watch stream and RBAC errors.

The recorded DynamoWorkerMetadata carries an instance_id other than the pod-name hash of
worker-0, so a test can tell the resource answered, not the fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from kubeapi import KubeApi, _certificates, worker_metadata

from kvrelay.app import Relay
from kvrelay.config import Config
from kvrelay.discovery import DiscoveryError, InstanceId, Source, select_source
from kvrelay.testing.natsserver import NatsServer

RECORDED_ID = 1207316402170399
REPO = Path(__file__).resolve().parent.parent


def source_for(api: KubeApi, **flags: Any) -> Source:
    env = api.env()
    return select_source(Config.load({**api.flags(), **flags}, env).discovery, env)


async def discover(api: KubeApi, **flags: Any) -> InstanceId:
    return await source_for(api, **flags).resolve()


async def test_reads_the_instance_id_from_the_workers_resource(kube_api: KubeApi) -> None:
    """An existing DynamoWorkerMetadata gives its endpoints' instance_id, in one GET."""
    kube_api.apply(worker_metadata())
    found = await discover(kube_api)
    assert found == InstanceId(RECORDED_ID, "kubernetes",
                               "DynamoWorkerMetadata dynamo/worker-0 spec.data.endpoints")
    assert kube_api.requests == ["get"]


async def test_rbac_403_names_the_missing_permission(kube_api: KubeApi) -> None:
    """A 403 is final and says which verb on which resource the service account lacks."""
    kube_api.forbidden = {"get"}
    with pytest.raises(DiscoveryError) as raised:
        await discover(kube_api)
    message = str(raised.value)
    for needed in ("denies get", "dynamoworkermetadatas.nvidia.com", "namespace dynamo",
                   "system:serviceaccount:dynamo:kvrelay", "Role with verbs get, watch"):
        assert needed in message
    assert kube_api.requests == ["get"]


async def test_waits_through_404_and_the_watch_delivers(kube_api: KubeApi) -> None:
    """404 until the worker creates its resource; the watch brings it without polling."""
    source = source_for(kube_api)
    resolving = asyncio.ensure_future(source.resolve())
    await asyncio.wait_for(kube_api.watching.wait(), 10)
    assert not resolving.done()
    assert source.status == ("waiting for DynamoWorkerMetadata dynamo/worker-0 "
                             "(not created yet: HTTP 404)")
    kube_api.apply(worker_metadata())
    found = await asyncio.wait_for(resolving, 10)
    assert (found.value, found.source) == (RECORDED_ID, "kubernetes")
    assert kube_api.requests == ["get", "watch"]


async def test_resource_without_endpoints_waits_for_the_update(kube_api: KubeApi) -> None:
    """A resource the worker has not registered an endpoint in yet is waited on until it has."""
    empty = worker_metadata()
    empty["spec"]["data"]["endpoints"] = {}
    kube_api.apply(empty)
    source = source_for(kube_api)
    resolving = asyncio.ensure_future(source.resolve())
    await asyncio.wait_for(kube_api.watching.wait(), 10)
    deadline = time.monotonic() + 10
    while "registered no endpoint yet" not in source.status:
        assert time.monotonic() < deadline, source.status
        await asyncio.sleep(0.02)
    kube_api.apply(worker_metadata())  # MODIFIED on the open watch
    assert (await asyncio.wait_for(resolving, 10)).value == RECORDED_ID
    assert kube_api.requests == ["get", "watch"]


async def test_watch_forbidden_falls_back_to_polling(kube_api: KubeApi) -> None:
    """Without watch permission the source polls with GET until the resource appears."""
    kube_api.forbidden = {"watch"}
    resolving = asyncio.ensure_future(discover(kube_api, discovery_retry_max="0.1"))
    deadline = time.monotonic() + 10
    while kube_api.requests.count("get") < 3:
        assert time.monotonic() < deadline, kube_api.requests
        await asyncio.sleep(0.02)
    kube_api.apply(worker_metadata())
    assert (await asyncio.wait_for(resolving, 10)).value == RECORDED_ID
    assert kube_api.requests.count("watch") == 1


async def test_expired_watch_starts_over(kube_api: KubeApi) -> None:
    """A 410 ERROR event ends the watch; the source GETs again and watches anew."""
    kube_api.expire_next_watch = True
    resolving = asyncio.ensure_future(discover(kube_api, discovery_retry_max="0.1"))
    deadline = time.monotonic() + 10
    while kube_api.requests.count("watch") < 2:
        assert time.monotonic() < deadline, kube_api.requests
        await asyncio.sleep(0.02)
    kube_api.apply(worker_metadata())
    assert (await asyncio.wait_for(resolving, 10)).value == RECORDED_ID
    assert kube_api.requests[:4] == ["get", "watch", "get", "watch"]


async def test_gives_up_after_the_discovery_timeout(kube_api: KubeApi) -> None:
    """The wait is bounded; the error says what was missing and for how long."""
    with pytest.raises(DiscoveryError, match=r"worker-0: not found within 0\.5s \(not created yet"):
        await asyncio.wait_for(discover(kube_api, discovery_timeout="0.5"), 10)


async def test_missing_crd_is_named(kube_api: KubeApi) -> None:
    """A 404 that is not about the pod's resource points at the CRD not being installed."""
    kube_api.crd_missing = True
    with pytest.raises(DiscoveryError, match=r"is Dynamo's dynamoworkermetadatas\.nvidia\.com CRD"):
        await asyncio.wait_for(discover(kube_api, discovery_timeout="0.3"), 10)


async def test_rejected_token_is_a_clear_error(kube_api: KubeApi) -> None:
    """The token is sent as a bearer token; a rejected one is a 401 naming the token file."""
    (kube_api.serviceaccount_dir / "token").write_text("expired-token")
    with pytest.raises(DiscoveryError, match=r"rejected the service-account token .*/token"):
        await discover(kube_api)
    assert kube_api.requests == ["unauthorized"]


async def test_untrusted_server_certificate_is_refused(kube_api: KubeApi, tmp_path: Path) -> None:
    """The API server must present a certificate from the service account's CA."""
    other_ca, _, _ = _certificates(tmp_path)
    (kube_api.serviceaccount_dir / "ca.crt").write_bytes(other_ca.read_bytes())
    with pytest.raises(DiscoveryError, match="TLS verification of the Kubernetes API"):
        await discover(kube_api)
    assert kube_api.requests == []


# -- the relay waiting on discovery ----------------------------------------------------------------


async def http_get(port: int, path: str) -> tuple[int, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), msgspec.json.decode(body)


async def test_relay_answers_probes_while_waiting_and_stops_on_signal(kube_api: KubeApi) -> None:
    """/live answers and /health says what discovery waits for; a stop request ends it, exit 0."""
    config = Config.load({**kube_api.flags(), "system_port": "0", "system_host": "127.0.0.1"},
                         kube_api.env())
    relay = Relay(config, env=kube_api.env())
    served = asyncio.ensure_future(relay.serve())
    await asyncio.wait_for(kube_api.watching.wait(), 10)
    assert relay.system is not None
    assert await http_get(relay.system.port, "/live") == (200, {"status": "live"})
    status, body = await http_get(relay.system.port, "/health")
    assert status == 503
    assert body["parts"] == {"discovery": "waiting for DynamoWorkerMetadata dynamo/worker-0 "
                                          "(not created yet: HTTP 404)"}
    started = time.monotonic()
    relay.handle_exit(signal.SIGTERM)
    assert await asyncio.wait_for(served, 5) == 0
    assert time.monotonic() - started < 2
    assert not relay.started.is_set()


async def test_relay_publishes_under_the_discovered_id(kube_api: KubeApi,
                                                       nats_server: NatsServer) -> None:
    """Once the resource appears the relay starts with its ID, logged and exported."""
    env = kube_api.env()
    config = Config.load({**kube_api.flags(), "system_port": "0", "system_host": "127.0.0.1",
                          "nats": nats_server.url, "zmq": ["tcp://127.0.0.1:1"]}, env)
    relay = Relay(config, env=env)
    served = asyncio.ensure_future(relay.serve())
    try:
        await asyncio.wait_for(kube_api.watching.wait(), 10)
        kube_api.apply(worker_metadata())
        await asyncio.wait_for(relay.started.wait(), 10)
        assert relay.identity is not None
        assert (relay.identity.value, relay.identity.source) == (RECORDED_ID, "kubernetes")
        assert relay.publisher is not None
        assert relay.publisher.subject(0) == f"kv.dynamo.backend.{RECORDED_ID}.0"
        labels = {"instance_id": str(RECORDED_ID), "source": "kubernetes"}
        assert relay.metrics.registry.get_sample_value("kvrelay_instance_info", labels) == 1
    finally:
        relay.handle_exit()
        assert await asyncio.wait_for(served, 15) == 0


# -- processes -------------------------------------------------------------------------------------


async def kvrelay(api: KubeApi, *args: str) -> asyncio.subprocess.Process:
    """`python -m kvrelay ...` in the pod environment the API stand-in describes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVRELAY_", "DYN_", "POD_"))}
    env.update(api.env(), PYTHONUNBUFFERED="1",
               KVRELAY_KUBE_SERVICEACCOUNT_DIR=str(api.serviceaccount_dir))
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvrelay", *args, env=env, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def test_sigterm_while_waiting_exits_0_promptly(kube_api: KubeApi) -> None:
    """A relay process waiting for its resource stops at once on SIGTERM, with exit code 0."""
    proc = await kvrelay(kube_api, "run", "--system-host", "127.0.0.1", "--system-port", "0")
    try:
        await asyncio.wait_for(kube_api.watching.wait(), 20)
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert time.monotonic() - started < 3
        assert proc.stderr is not None
        log = (await proc.stderr.read()).decode()
        assert "stopped while waiting for DynamoWorkerMetadata dynamo/worker-0" in log
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


async def test_discover_command_prints_id_and_source(kube_api: KubeApi) -> None:
    """`kvrelay discover` prints the ID and where it came from, exit 0."""
    kube_api.apply(worker_metadata())
    proc = await kvrelay(kube_api, "discover")
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert out.decode().splitlines() == [
        str(RECORDED_ID),
        "source: kubernetes (DynamoWorkerMetadata dynamo/worker-0 spec.data.endpoints)"]


async def test_discover_command_fails_clearly_on_403(kube_api: KubeApi) -> None:
    """`kvrelay discover` exits 1 with the RBAC message when the backend refuses."""
    kube_api.forbidden = {"get"}
    proc = await kvrelay(kube_api, "discover")
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert out == b""
    assert re.search(r"kvrelay discover: kubernetes: Kubernetes RBAC denies get", err.decode())
