"""`kvrelay check`: each line, passing and failing, against real nats-server, real ZMQ sockets,
a real system server, and the local Kubernetes API for discovery."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import zmq
import zmq.asyncio
from kubeapi import KubeApi
from nats.js.api import StreamConfig

from kvrelay.config import Config, SourceSpec
from kvrelay.ops.doctor import (
    Finding,
    check_discovery,
    check_jetstream,
    check_system_port,
    check_tcp,
    check_zmq,
)
from kvrelay.system.health import SystemServer
from kvrelay.system.metrics import Metrics
from kvrelay.testing.natsserver import NatsServer, free_port
from kvrelay.testing.synthetic import SyntheticVllm

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
SUBJECTS = ["kv.dynamo.backend.42.0"]


# -- NATS reachable --------------------------------------------------------------------------------


async def test_nats_reachable(nats_server: NatsServer) -> None:
    """A running nats-server: TCP connects and NATS greets."""
    found = await check_tcp("127.0.0.1", nats_server.port, 2.0)
    assert found == Finding("ok", f"NATS 127.0.0.1:{nats_server.port}",
                            "reachable (TCP connect and NATS greeting)")


async def test_nats_connection_refused() -> None:
    """Nothing listening is "connection refused", and the line says nothing listens there."""
    port = free_port()
    found = await check_tcp("127.0.0.1", port, 2.0)
    assert found.level == "FAIL"
    assert found.detail.startswith("connection refused: 127.0.0.1 is up but nothing listens on "
                                   f"port {port}")


@pytest.fixture
def dropping_port() -> Iterator[int]:
    """A port whose SYNs are dropped, as a firewall does: a listener with a full accept queue."""
    with socket.socket() as server, socket.socket() as filler:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = int(server.getsockname()[1])
        filler.connect(("127.0.0.1", port))  # the one pending connection the queue holds
        yield port


async def test_nats_timeout_points_at_a_firewall(dropping_port: int) -> None:
    """A connect timeout is named as dropped packets, usually a firewall or security group."""
    found = await check_tcp("127.0.0.1", dropping_port, 0.5)
    assert found.level == "FAIL"
    assert found.detail.startswith("TCP connect timed out after 0.5s")
    assert f"firewall or security group blocking port {dropping_port}" in found.detail


async def test_something_else_on_the_nats_port() -> None:
    """A listener that never greets like NATS is called out as not a NATS server."""
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        found = await check_tcp("127.0.0.1", port, 0.5)
    assert found.level == "FAIL"
    assert "no NATS greeting came" in found.detail


# -- JetStream and the stream ----------------------------------------------------------------------


def config(**flags: Any) -> Config:
    return Config.load({"instance_id": "42", **flags}, {})


@contextlib.asynccontextmanager
async def jetstream(server: NatsServer) -> AsyncIterator[Any]:
    nc = await nats.connect(server.url)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


async def test_jetstream_enabled_and_stream_absent_is_creatable(fresh_nats: NatsServer) -> None:
    """JetStream answers; an absent stream whose subjects nothing else takes is fine."""
    found = await check_jetstream(config(nats=fresh_nats.url), SUBJECTS, 2.0)
    assert found == [Finding("ok", "JetStream", "enabled (0 streams)"),
                     Finding("ok", "stream KV_EVENTS",
                             "absent; the relay will create it (kv.>)")]


async def test_existing_stream_that_covers_the_subjects(fresh_nats: NatsServer) -> None:
    """An existing stream taking kv.> covers the relay's subjects."""
    async with jetstream(fresh_nats) as js:
        await js.add_stream(StreamConfig(name="KV_EVENTS", subjects=["kv.>"]))
    found = await check_jetstream(config(nats=fresh_nats.url), SUBJECTS, 2.0)
    assert found[1] == Finding("ok", "stream KV_EVENTS", "exists and covers kv.dynamo.backend.42.0")


async def test_existing_stream_that_misses_the_subjects(fresh_nats: NatsServer) -> None:
    """A stream of that name taking other subjects fails, saying what to add."""
    async with jetstream(fresh_nats) as js:
        await js.add_stream(StreamConfig(name="KV_EVENTS", subjects=["other.>"]))
    found = await check_jetstream(config(nats=fresh_nats.url), SUBJECTS, 2.0)
    assert found[1].level == "FAIL"
    assert "do not cover kv.dynamo.backend.42.0; add kv.> to it" in found[1].detail


async def test_absent_stream_blocked_by_an_overlapping_one(fresh_nats: NatsServer) -> None:
    """JetStream refuses overlapping streams: another stream on kv.> makes ours uncreatable."""
    async with jetstream(fresh_nats) as js:
        await js.add_stream(StreamConfig(name="EVENTS", subjects=["kv.dynamo.>"]))
    found = await check_jetstream(config(nats=fresh_nats.url, stream="KV_NEW"), SUBJECTS, 2.0)
    assert found[1].level == "FAIL"
    assert "stream EVENTS already takes ['kv.dynamo.>'], which overlaps kv.>" in found[1].detail


async def test_jetstream_disabled(tmp_path: Path) -> None:
    """A server without -js fails the JetStream line with how to enable it."""
    with NatsServer(tmp_path / "plain", jetstream=False) as server:
        found = await check_jetstream(config(nats=server.url), SUBJECTS, 2.0)
    assert found[0].level == "FAIL"
    assert found[0].detail.startswith("not enabled on the server: start nats-server with -js")
    assert found[1] == Finding("skip", "stream KV_EVENTS", "needs JetStream")


async def test_nats_credentials_refused(tmp_path: Path) -> None:
    """A server that wants credentials the relay lacks fails the connect line."""
    with NatsServer(tmp_path / "auth", extra_args=["--user", "u", "--pass", "p"]) as server:
        found = await check_jetstream(config(nats=server.url), SUBJECTS, 2.0)
    assert found[0].level == "FAIL"
    assert found[0].what == "NATS connect"
    assert "Authorization" in found[0].detail


# -- ZMQ -------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def zmq_context() -> AsyncIterator[zmq.asyncio.Context]:
    ctx = zmq.asyncio.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)


@contextlib.asynccontextmanager
async def publishing(vllm: SyntheticVllm, raw: list[bytes] | None = None) -> AsyncIterator[None]:
    """Keep vLLM publishing (a batch every 20 ms) so a late subscriber sees one."""
    async def loop() -> None:
        while True:
            vllm.send_raw(raw) if raw is not None else vllm.publish_next()
            await asyncio.sleep(0.02)

    task = asyncio.ensure_future(loop())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def spec(endpoint: str, *, bind: bool = False, replay: str | None = None) -> SourceSpec:
    return SourceSpec(endpoint, bind, replay, 0)


async def test_zmq_frame_arrives() -> None:
    """A publishing vLLM gives an ok line with the batch seq it saw."""
    with SyntheticVllm("tcp://127.0.0.1:*") as vllm:
        async with zmq_context() as ctx, publishing(vllm):
            found = await check_zmq(ctx, spec(vllm.address), b"", 5.0)
    assert found.level == "ok"
    assert found.detail.startswith("vLLM is publishing (batch seq ")


async def test_zmq_no_frame_says_how_long() -> None:
    """Nothing publishing: "no frame in Ns", and why an idle engine looks the same."""
    async with zmq_context() as ctx:
        found = await check_zmq(ctx, spec(f"tcp://127.0.0.1:{free_port()}"), b"", 0.3)
    assert found.level == "FAIL"
    assert found.detail.startswith("no frame in 0.3s; check that vLLM runs with")
    assert "an idle engine publishes nothing" in found.detail


async def test_zmq_idle_engine_with_replay_is_a_warning() -> None:
    """No frame but vLLM's replay socket answers: the engine is up and idle, a warning."""
    with SyntheticVllm("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*") as vllm:
        assert vllm.replay_address is not None
        async with zmq_context() as ctx:
            found = await check_zmq(ctx, spec(vllm.address, replay=vllm.replay_address), b"", 0.3)
        assert vllm.replay_requests == 1
    assert found.level == "warn"
    assert "the engine is up and idle" in found.detail


async def test_zmq_no_frame_and_dead_replay() -> None:
    """No frame and no replay answer fails, naming both."""
    dead_replay = f"tcp://127.0.0.1:{free_port()}"
    async with zmq_context() as ctx:
        found = await check_zmq(ctx, spec(f"tcp://127.0.0.1:{free_port()}", replay=dead_replay),
                                b"", 0.3)
    assert found.level == "FAIL"
    assert f"no answer from the replay socket {dead_replay}" in found.detail


async def test_zmq_messages_that_are_not_vllm_frames() -> None:
    """Something publishing other messages on the endpoint is called out."""
    with SyntheticVllm("tcp://127.0.0.1:*") as vllm:
        async with zmq_context() as ctx, publishing(vllm, raw=[b"hello"]):
            found = await check_zmq(ctx, spec(vllm.address), b"", 5.0)
    assert found.level == "FAIL"
    assert found.detail.startswith("a message of 1 frames arrived, not vLLM's")


async def test_zmq_bind_endpoint_in_use() -> None:
    """--zmq-bind on an endpoint someone holds fails, suggesting a running relay."""
    async with zmq_context() as ctx:
        holder = ctx.socket(zmq.SUB)
        try:
            holder.bind("tcp://127.0.0.1:*")
            taken = holder.getsockopt_string(zmq.LAST_ENDPOINT)
            found = await check_zmq(ctx, spec(taken, bind=True), b"", 0.3)
        finally:
            holder.close(linger=0)
    assert found.level == "FAIL"
    assert found.detail.startswith("cannot bind: Address already in use (is a relay already")


# -- discovery -------------------------------------------------------------------------------------


async def test_discovery_resolves() -> None:
    """A source that answers gives the ID and how it was found."""
    found, identity = await check_discovery(config(), {}, 1.0)
    assert found == Finding("ok", "discovery",
                            "instance ID 42 (explicit: --instance-id / KVRELAY_INSTANCE_ID)")
    assert identity is not None


async def test_discovery_backend_refusing(kube_api: KubeApi) -> None:
    """A backend that refuses (RBAC 403) fails the line with its message."""
    kube_api.forbidden = {"get"}
    env = kube_api.env()
    found, identity = await check_discovery(Config.load(kube_api.flags(), env), env, 2.0)
    assert found.level == "FAIL"
    assert found.detail.startswith("kubernetes: Kubernetes RBAC denies get on "
                                   "dynamoworkermetadatas.nvidia.com")
    assert identity is None


async def test_discovery_still_waiting(kube_api: KubeApi) -> None:
    """A worker not registered within the check's bound fails, saying what it waited for."""
    env = kube_api.env()
    found, _ = await check_discovery(Config.load(kube_api.flags(), env), env, 0.5)
    assert found == Finding("FAIL", "discovery", (
        "still waiting for DynamoWorkerMetadata dynamo/worker-0 (not created yet: HTTP 404) "
        "after 0.5s"))


# -- system port -----------------------------------------------------------------------------------


async def test_system_port_of_a_running_relay() -> None:
    """A relay's system server on the port: ok, with its readiness."""
    parts = {"nats": "ok", "zmq": "not subscribed: tcp://127.0.0.1:5557"}
    server = SystemServer("127.0.0.1", 0, Metrics(), lambda: parts)
    await server.start()
    try:
        cfg = config(system_host="127.0.0.1", system_port=str(server.port))
        found = await check_system_port(cfg, 2.0)
        assert found.level == "ok"
        assert found.detail == ("a relay answers /live (not ready: "
                                "{'zmq': 'not subscribed: tcp://127.0.0.1:5557'})")
        parts["zmq"] = "ok"
        assert (await check_system_port(cfg, 2.0)).detail == "a relay answers /live (ready)"
    finally:
        await server.stop()


async def test_system_port_free_is_a_warning() -> None:
    """Nothing on the port (no relay yet) is a warning, not a failure."""
    found = await check_system_port(config(system_host="0.0.0.0",
                                           system_port=str(free_port())), 2.0)
    assert found.level == "warn"
    assert found.detail.startswith("nothing listens: no relay is running here")


async def test_system_port_taken_by_something_else() -> None:
    """Another HTTP server on the port fails: the relay could not bind it."""
    async def not_a_relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(not_a_relay, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        found = await check_system_port(config(system_port=str(port)), 2.0)
    assert found.level == "FAIL"
    assert found.detail.startswith("something other than a relay answers (HTTP 404 for /live)")


# -- the command -----------------------------------------------------------------------------------


async def kvrelay_check(*args: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KVRELAY_", "DYN_", "POD_", "NATS_SERVER"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvrelay", "check", "--timeout", "5", *args, env=env, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_check_command_all_passing(nats_server: NatsServer) -> None:
    """Every dependency in order: one line each and exit 0 (a free system port only warns)."""
    with SyntheticVllm("tcp://127.0.0.1:*") as vllm:
        async with publishing(vllm):
            code, out = await kvrelay_check(
                "--nats", nats_server.url, "--zmq", vllm.address, "--instance-id", "7",
                "--system-port", str(free_port()))
    lines = out.splitlines()
    assert code == 0, out
    assert [line.split(" ", 1)[0] for line in lines] == [
        "ok", "ok", "ok", "ok", "ok", "warn", "all"]
    assert lines[1].startswith("ok   JetStream: enabled")
    assert lines[4] == ("ok   discovery: instance ID 7 "
                        "(explicit: --instance-id / KVRELAY_INSTANCE_ID)")
    assert lines[-1] == "all checks passed"


async def test_check_command_exits_1_on_failure() -> None:
    """An unreachable NATS fails, JetStream is skipped, and the exit code is 1."""
    port = free_port()
    code, out = await kvrelay_check("--nats", f"nats://127.0.0.1:{port}", "--zmq",
                                    f"tcp://127.0.0.1:{free_port()}", "--timeout", "0.3")
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith(f"FAIL NATS 127.0.0.1:{port}: connection refused")
    assert lines[1] == "skip JetStream: NATS is not reachable"
    assert lines[-1] == "2 check(s) failed"
