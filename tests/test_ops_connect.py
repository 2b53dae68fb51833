"""`kvrelay tail` and `stats` connect to NATS exactly as `run` does: the same flags and
environment variables, credentials and TLS included, and a refusal said as one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nats
import pytest
from harness import REPO

from kvrelay.codec import Codec
from kvrelay.config import Config
from kvrelay.jetstream.stream import ensure_stream
from kvrelay.testing.natsserver import NatsServer
from kvrelay.wire.schema import RelayBatch, Resync, Stored

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

TOKEN = "tok-Ops41-never-shown"
SUBJECT = "kv.opsconnect.backend.21.0"


def cli(*args: str, env: dict[str, str] | None = None,
        timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """`python -m kvrelay ARGS` with only `env` of the relay's variables set."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("KVRELAY_", "DYN_", "NATS_SERVER"))}
    return subprocess.run([sys.executable, "-m", "kvrelay", *args], capture_output=True,
                          text=True, timeout=timeout, env={**clean, **(env or {})}, cwd=REPO,
                          check=False)


def secured(tmp_path: Path, authorization: str) -> NatsServer:
    conf = tmp_path / "nats.conf"
    conf.write_text(f"authorization {{ {authorization} }}\n")
    server = NatsServer(tmp_path / "nats", name="ops", extra_args=["-c", str(conf)])
    server.start()
    return server


async def seed(url: str, batches: int = 3, **connect: str) -> None:
    """`batches` RelayBatches on SUBJECT, the second with a 32-byte block hash."""
    nc = await nats.connect(url, **connect)
    try:
        js = nc.jetstream()
        await ensure_stream(js, Config.load({}, {}).stream, [SUBJECT])
        for seq in range(batches):
            block: int | bytes = bytes(range(32)) if seq == 1 else seq
            events: list[Stored | Resync] = [Stored([block], None, [1] * 16, 16)]
            batch = RelayBatch(instance_id=21, dp_rank=0, epoch=1, seq=seq, ts=1.0,
                               relay_ts=1.002, events=list(events))
            await js.publish(SUBJECT, Codec("msgpack").encode(batch))
    finally:
        await nc.close()


async def test_tail_and_stats_read_nats_server_variable(fresh_nats: NatsServer) -> None:
    """Without --nats, tail and stats use NATS_SERVER (and KVRELAY_NATS first), as run does."""
    await seed(fresh_nats.url)
    tail = cli("tail", "--from-start", "--count", "3", env={"NATS_SERVER": fresh_nats.url})
    assert tail.returncode == 0, tail.stderr
    assert len(tail.stdout.splitlines()) == 3
    stats = cli("stats", "--once", env={"KVRELAY_NATS": fresh_nats.url,
                                        "NATS_SERVER": "nats://127.0.0.1:1"})
    assert stats.returncode == 0, stats.stderr
    assert "21.0" in stats.stdout


async def test_tail_json_prints_one_object_per_batch(fresh_nats: NatsServer) -> None:
    """`tail --json`: a JSON object per line, the RelayBatch's fields, bytes as lowercase hex."""
    await seed(fresh_nats.url)
    result = cli("tail", "--json", "--from-start", "--count", "3", "--nats", fresh_nats.url)
    assert result.returncode == 0, result.stderr
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    assert [o["seq"] for o in objects] == [0, 1, 2]
    assert objects[0]["subject"] == SUBJECT
    assert objects[0]["stream_seq"] == 1
    assert objects[0]["events"][0]["type"] == "stored"
    assert objects[1]["events"][0]["block_hashes"] == [bytes(range(32)).hex()]
    assert objects[2]["events"][0]["block_hashes"] == [2]


async def test_tail_and_stats_with_token(tmp_path: Path) -> None:
    """--nats-token (or KVRELAY_NATS_TOKEN) connects; a wrong or missing token exits 2 saying
    NATS refused the credentials, without a traceback."""
    server = secured(tmp_path, f'token: "{TOKEN}"')
    try:
        await seed(server.url, token=TOKEN)
        ok = cli("tail", "--from-start", "--count", "1", "--nats", server.url,
                 "--nats-token", TOKEN)
        assert ok.returncode == 0, ok.stderr
        ok = cli("stats", "--once", "--nats", server.url,
                 env={"KVRELAY_NATS_TOKEN": TOKEN})
        assert ok.returncode == 0, ok.stderr
        for command in (["tail", "--count", "1"], ["stats", "--once"], ["tail", "--index"]):
            wrong = cli(*command, "--nats", server.url, "--nats-token", "nope")
            assert wrong.returncode == 2, wrong.stderr
            assert "NATS refused kvrelay" in wrong.stderr, wrong.stderr
            assert "check --nats-token" in wrong.stderr, wrong.stderr
            assert "cannot reach" not in wrong.stderr
            assert "Traceback" not in wrong.stderr
            assert "nope" not in wrong.stderr
        none = cli("tail", "--count", "1", "--nats", server.url)
        assert none.returncode == 2, none.stderr
        assert "sent none" in none.stderr, none.stderr
    finally:
        server.stop()


async def test_tail_with_user_and_password(tmp_path: Path) -> None:
    """--nats-user and --nats-password are run's: the right pair reads the stream."""
    server = secured(tmp_path, 'user: ops, password: "pw-Ops-77"')
    try:
        await seed(server.url, user="ops", password="pw-Ops-77")
        ok = cli("tail", "--json", "--from-start", "--count", "1", "--nats", server.url,
                 "--nats-user", "ops", "--nats-password", "pw-Ops-77")
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["seq"] == 0
    finally:
        server.stop()


def test_unreachable_nats_is_said_as_such() -> None:
    """No server at the URL: exit 1, "cannot reach NATS", no traceback."""
    result = cli("tail", "--count", "1", "--nats", "nats://127.0.0.1:1")
    assert result.returncode == 1
    assert "cannot reach NATS at nats://127.0.0.1:1" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [["run", "--instance-id", "1"], ["tail"], ["stats"]])
def test_not_a_nats_url_is_refused_at_start(command: list[str]) -> None:
    """`--nats notaurl` exits 2 at start naming the setting, instead of retrying forever."""
    result = cli(*command, "--nats", "notaurl", timeout=10)
    assert result.returncode == 2, result.stderr
    assert "--nats 'notaurl' is not a NATS URL" in result.stderr
