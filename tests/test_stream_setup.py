"""The stream the relay creates or verifies: JetStream's own reason when it refuses, and the
subjects under `--subject-prefix`, which every reader honours."""

from __future__ import annotations

import asyncio
import json
import logging

import msgspec
import nats
import pytest
from harness import (
    ANY_PORT,
    COMP,
    NS,
    eventually,
    http_get,
    join,
    nats_client,
    new_instance_id,
    publish,
    read_stream,
    run_cli,
    running_relay,
)
from nats.js.api import StreamConfig

from kvrelay.router.consumer import KvConsumer
from kvrelay.testing.natsserver import NatsServer, free_port
from kvrelay.testing.synthetic import SyntheticVllm

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def test_refused_stream_says_jetstreams_reason(fresh_nats: NatsServer,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Another stream already takes kv.>: the relay logs JetStream's description and err_code
    (not BadRequestError()), and /health says it while the relay is not ready."""
    caplog.set_level(logging.WARNING, logger="kvrelay")
    nc = await nats.connect(fresh_nats.url)
    try:
        await nc.jetstream().add_stream(StreamConfig(name="OTHER", subjects=["kv.>"]))
    finally:
        await nc.close()
    async with running_relay(nats=fresh_nats.url, zmq=[f"tcp://127.0.0.1:{free_port()}"],
                             instance_id=new_instance_id()) as relay:
        await eventually(lambda: "subjects overlap" in caplog.text, "the refusal logged")
        assert relay.system is not None
        status, body = await http_get(relay.system.port, "/health")
    assert status == 503
    stream = json.loads(body)["parts"]["stream"]
    assert "subjects overlap" in stream
    assert "err_code 10065" in stream
    assert "--subject-prefix" in stream
    assert "BadRequestError()" not in caplog.text
    assert "err_code 10065" in caplog.text


async def test_subject_prefix(nats_server: NatsServer) -> None:
    """--subject-prefix names the subjects and the created stream's (`<prefix>.>`); tail,
    stats and KvConsumer read them with the same prefix."""
    instance = new_instance_id()
    subject = f"acme.kv.{NS}.{COMP}.{instance}.0"
    with SyntheticVllm(ANY_PORT) as vllm:
        async with running_relay(nats=nats_server.url, zmq=[vllm.address], instance_id=instance,
                                 stream="ACME_KV", subject_prefix="acme.kv") as relay:
            await join(vllm, relay)
            publish(vllm, 2)
            async with nats_client(nats_server.url) as nc:
                got = await read_stream(nc, subject, 2, settle=0, stream="ACME_KV")
                info = await nc.jetstream().stream_info("ACME_KV")
    assert [r.subject for r in got] == [subject, subject]
    assert info.config.subjects == ["acme.kv.>"]

    tail = await asyncio.to_thread(run_cli, [
        "tail", "--nats", nats_server.url, "--stream", "ACME_KV", "--subject-prefix",
        "acme.kv", "--from-start", "--count", "2", "--json"])
    assert tail.returncode == 0, tail.stderr
    assert {msgspec.json.decode(line)["subject"] for line in tail.stdout.splitlines()} == {
        subject}
    stats = await asyncio.to_thread(run_cli, [
        "stats", "--nats", nats_server.url, "--stream", "ACME_KV", "--subject-prefix",
        "acme.kv", "--once"])
    assert stats.returncode == 0, stats.stderr
    assert f"{instance}.0" in stats.stdout
    async with KvConsumer(nats_server.url, NS, COMP, stream="ACME_KV",
                          subject_prefix="acme.kv") as consumer:
        await asyncio.wait_for(consumer.ready(), 10)
        assert consumer.subject == f"acme.kv.{NS}.{COMP}.>"
        assert (instance, 0) in consumer.index.workers()


def test_subject_prefix_must_be_subject_tokens() -> None:
    """A prefix with a wildcard or an empty token is refused at start (exit 2)."""
    for bad in ("kv.>", "kv..x", "a b"):
        result = run_cli(["run", "--instance-id", "1", "--subject-prefix", bad])
        assert result.returncode == 2, result.stderr
        assert "--subject-prefix must be subject tokens" in result.stderr
