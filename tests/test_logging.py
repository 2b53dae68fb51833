"""What the relay logs for operators: JSON lines on request, a summary every interval and at
exit, replays and resync announcements, the right name for a bad setting, and no warning for
what the relay did itself."""

from __future__ import annotations

import io
import json
import logging
import signal
import subprocess
import sys
from collections.abc import Callable

import pytest
from harness import (
    ANY_PORT,
    REPO,
    RelayProcess,
    eventually,
    join,
    metric,
    nats_client,
    new_instance_id,
    publish,
    read_stream,
    running_relay,
    subject_of,
)

from kvrelay.system.logs import JsonFormatter
from kvrelay.testing.natsserver import NatsServer, free_port
from kvrelay.testing.synthetic import SyntheticVllm

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

Procs = Callable[[list[str]], RelayProcess]


def messages(caplog: pytest.LogCaptureFixture, level: int | None = None) -> list[str]:
    return [r.getMessage() for r in caplog.records if level is None or r.levelno == level]


async def test_log_format_json(nats_server: NatsServer, relay_procs: Procs) -> None:
    """--log-format json: every line the relay logs is one JSON object with ts, level, logger
    and message."""
    proc = relay_procs(["--nats", nats_server.url, "--zmq", f"tcp://127.0.0.1:{free_port()}",
                        "--instance-id", str(new_instance_id()), "--log-format", "json",
                        "--log-level", "debug"])
    await proc.healthy(within=15)
    proc.proc.send_signal(signal.SIGTERM)
    assert await proc.exited(15) == 0, proc.output()
    lines = [line for line in proc.output().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    assert len(records) > 5
    for record in records:
        assert {"ts", "level", "logger", "message"} <= set(record), record
    assert any(r["message"].startswith("connected to NATS") for r in records)
    assert records[-1]["message"] == "stopped"


def test_json_lines_carry_the_exception() -> None:
    """A record with an exception has its traceback in `exception`, on the same line."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("kvrelay.test-json")
    logger.addHandler(handler)
    try:
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            logger.error("it failed: %s", "here", exc_info=True)
    finally:
        logger.removeHandler(handler)
    [line] = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["level"] == "ERROR"
    assert record["logger"] == "kvrelay.test-json"
    assert record["message"] == "it failed: here"
    assert "ValueError: boom" in record["exception"]


async def test_summary_every_interval_and_at_exit(nats_server: NatsServer,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A summary line at INFO every --summary-interval (batches, events, drops, resyncs, lag
    p99, buffer), and one for the whole run at exit."""
    instance = new_instance_id()
    caplog.set_level(logging.INFO, logger="kvrelay")
    with SyntheticVllm(ANY_PORT) as vllm:
        async with running_relay(nats=nats_server.url, zmq=[vllm.address], instance_id=instance,
                                 summary_interval=0.3) as relay:
            await join(vllm, relay)
            publish(vllm, 4)
            async with nats_client(nats_server.url) as nc:
                await read_stream(nc, subject_of(instance), 4, settle=0)
            await eventually(lambda: any(m.startswith("summary (last") and "batches 4," in m
                                         for m in messages(caplog, logging.INFO)),
                             "a summary line counting the 4 batches")
    summaries = [m for m in messages(caplog, logging.INFO) if m.startswith("summary")]
    assert any("lag p99 <= " in m for m in summaries), summaries
    assert "drops 0, resyncs 0" in summaries[0]
    final = summaries[-1]
    assert final.startswith("summary at exit (whole run"), summaries
    assert "batches 4, events " in final
    assert "buffer 0 batches (0 bytes)" in final


async def test_replays_and_resyncs_are_logged(nats_server: NatsServer,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """A replay request is logged at DEBUG and its outcome at INFO; replayed batches count as
    received."""
    instance = new_instance_id()
    caplog.set_level(logging.DEBUG, logger="kvrelay")
    with SyntheticVllm(ANY_PORT, replay_endpoint=ANY_PORT) as vllm:
        async with running_relay(nats=nats_server.url, zmq=[vllm.address],
                                 replay=[vllm.replay_address], instance_id=instance) as relay:
            await join(vllm, relay)
            await eventually(lambda: not relay._sources[0].sequencer.holding, "resumed")
            publish(vllm, 2)
            vllm.skip(3)
            publish(vllm, 1)
            async with nats_client(nats_server.url) as nc:
                await read_stream(nc, subject_of(instance), 6, settle=0)
            received = metric(relay, "kvrelay_batches_received_total", dp_rank="0")
    debug = messages(caplog, logging.DEBUG)
    info = messages(caplog, logging.INFO)
    assert any("replay socket" in m and "from seq 2" in m for m in debug), debug
    assert any(m.startswith("vLLM replayed 4 batches from seq 2") for m in info), info
    assert not [m for m in info if m.startswith("announcing resync")]  # the replay filled it
    assert received == 7  # 3 live, 4 replayed (seqs 2 to 5: 5 was read live too)


async def test_resync_for_a_gap_is_logged(nats_server: NatsServer,
                                          caplog: pytest.LogCaptureFixture) -> None:
    """Without a replay socket a gap is announced, and the announcement logged at INFO."""
    instance = new_instance_id()
    caplog.set_level(logging.INFO, logger="kvrelay")
    with SyntheticVllm(ANY_PORT) as vllm:
        async with running_relay(nats=nats_server.url, zmq=[vllm.address],
                                 instance_id=instance) as relay:
            await join(vllm, relay)
            publish(vllm, 1)
            vllm.skip(2)
            publish(vllm, 1)
            async with nats_client(nats_server.url) as nc:
                await read_stream(nc, subject_of(instance), 2, settle=0)
    assert any(m.startswith("announcing resync (gap, seqs 1..2 missed)")
               for m in messages(caplog, logging.INFO)), messages(caplog)


async def test_clean_stop_is_no_warning(nats_server: NatsServer,
                                        caplog: pytest.LogCaptureFixture) -> None:
    """The relay closing vLLM's connection on a clean stop logs no "went away" warning; vLLM
    going away does."""
    caplog.set_level(logging.INFO, logger="kvrelay")
    with SyntheticVllm(ANY_PORT) as vllm:
        async with running_relay(nats=nats_server.url, zmq=[vllm.address],
                                 instance_id=new_instance_id()) as relay:
            await join(vllm, relay)
    assert not [m for m in messages(caplog, logging.WARNING) if "went away" in m]
    vllm = SyntheticVllm(ANY_PORT).start()
    try:
        async with running_relay(nats=nats_server.url, zmq=[vllm.address],
                                 instance_id=new_instance_id()) as relay:
            await join(vllm, relay)
            vllm.close()
            await eventually(lambda: any("went away" in m
                                         for m in messages(caplog, logging.WARNING)),
                             "a warning that vLLM went away")
    finally:
        vllm.close()


def test_invalid_dynamo_variable_is_named() -> None:
    """An invalid DYN_NAMESPACE is reported by the variable's name, not as --namespace."""
    env = {k: v for k, v in __import__("os").environ.items()
           if not k.startswith(("KVRELAY_", "DYN_", "NATS_SERVER"))}
    result = subprocess.run([sys.executable, "-m", "kvrelay", "run", "--instance-id", "1"],
                            env={**env, "DYN_NAMESPACE": "Not_Valid"}, capture_output=True,
                            text=True, cwd=REPO, timeout=20, check=False)
    assert result.returncode == 2
    assert "DYN_NAMESPACE must match" in result.stderr
    assert "--namespace" not in result.stderr
