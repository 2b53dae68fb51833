"""`kvrelay score`: a relay process relays a synthetic vLLM's blocks into JetStream and the
command, run as users run it, scores the worker by a request's token ids, from the stream and
from the scoring service's snapshot alone."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nats
import pytest
from harness import (
    ANY_PORT,
    COMP,
    NS,
    REPO,
    RelayProcess,
    last_seq,
    nats_client,
    new_instance_id,
    read_stream,
    run_cli,
    subject_of,
)

from kvrelay.codec import Codec
from kvrelay.config import Config
from kvrelay.jetstream.stream import ensure_stream
from kvrelay.ops.score import parse_tokens
from kvrelay.router.index import decode_snapshot
from kvrelay.testing.natsserver import NatsServer
from kvrelay.testing.synthetic import SyntheticVllm, block_removed, block_stored
from kvrelay.wire.names import SNAPSHOT_BUCKET
from kvrelay.wire.schema import RelayBatch, Stored
from kvrelay.wire.tokenkey import block_keys

BS = 16
TOKEN = "tok-Score7-never-shown"
PROMPT = list(range(1000, 1000 + 3 * BS))  # three whole blocks
OTHER = list(range(5000, 5000 + 2 * BS))


def score(url: str, tokens: list[int] | str, *extra: str) -> tuple[int, str, str]:
    listed = tokens if isinstance(tokens, str) else ",".join(map(str, tokens))
    done = run_cli(["score", "--nats", url, "--namespace", NS, "--component", COMP,
                    "--tokens", listed, *extra], timeout=30)
    return done.returncode, done.stdout, done.stderr


async def relay_prompts(nats_url: str, relay_procs: Callable[[list[str]], RelayProcess],
                        vllm: SyntheticVllm, instance: int) -> RelayProcess:
    """A relay whose worker stored PROMPT (three blocks, in two steps) and OTHER under a LoRA
    adapter, all in JetStream (what ZMQ's slow joiner dropped is replayed)."""
    assert vllm.replay_address is not None
    proc = relay_procs(["--nats", nats_url, "--zmq", vllm.address, "--replay",
                        vllm.replay_address, "--instance-id", str(instance), "--namespace", NS,
                        "--component", COMP])
    await proc.healthy()
    vllm.publish([block_stored([11, 12], None, PROMPT[:2 * BS], block_size=BS)])
    vllm.publish([block_stored([13], 12, PROMPT[2 * BS:], block_size=BS)])
    vllm.publish([block_stored([21, 22], None, OTHER, block_size=BS, lora_name="sql",
                               lora_id=1, extra_keys=[["sql"], ["sql"]])])
    async with nats_client(nats_url) as client:
        for _ in range(100):  # until one arrives: a gap before it is replayed
            vllm.publish([block_removed([999])])
            if await last_seq(client, subject_of(instance)) is not None:
                break
            await asyncio.sleep(0.1)
        got = await read_stream(client, subject_of(instance), 4, within=10)
    assert [r.batch.seq for r in got[:3]] == [0, 1, 2], proc.output()
    return proc


async def test_score_prints_each_workers_leading_blocks(
        fresh_nats: NatsServer, relay_procs: Callable[[list[str]], RelayProcess]) -> None:
    """Scores count leading whole blocks held, never the last token's block, per adapter."""
    instance = new_instance_id()
    with SyntheticVllm(ANY_PORT, replay_endpoint=ANY_PORT) as vllm:
        await relay_prompts(fresh_nats.url, relay_procs, vllm, instance)
        worker = f"{instance}.0"
        loop = asyncio.get_running_loop()
        cases = [
            ([*PROMPT, 7], (), 3),
            (PROMPT, (), 2),  # the third block holds the last token
            ([*PROMPT[:BS + 3], 9, 9], (), 1),
            ([7, *PROMPT], (), 0),
            ([*OTHER, 1], (), 0),  # stored under an adapter
            ([*OTHER, 1], ("--lora-name", "sql"), 2),
            ([*PROMPT, 7], ("--cache-salt", "tenant"), 0),
        ]
        for tokens, extra, expected in cases:
            code, out, err = await loop.run_in_executor(
                None, score, fresh_nats.url, tokens, "--json", *extra)
            assert code == 0, err
            assert json.loads(out) == {worker: expected}, (tokens, extra)
        code, out, err = await loop.run_in_executor(None, score, fresh_nats.url, [*PROMPT, 7])
        assert code == 0, err
        assert out.splitlines()[1:] == [f"{worker}\t3"]


async def test_score_reads_the_index_services_snapshot(
        fresh_nats: NatsServer, relay_procs: Callable[[list[str]], RelayProcess],
        tmp_path: Path) -> None:
    """The scoring service (`kvrelay index`) writes the workers' snapshots, a last time when
    it stops; they carry the blocks' token keys, and with the stream's messages purged up to
    them, `score` still answers from the snapshot alone."""
    instance = new_instance_id()
    with SyntheticVllm(ANY_PORT, replay_endpoint=ANY_PORT) as vllm:
        await relay_prompts(fresh_nats.url, relay_procs, vllm, instance)
        log = tmp_path / "index.log"
        with log.open("w") as sink:
            service = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "kvrelay", "index", "--nats", fresh_nats.url,
                "--namespace", NS, "--component", COMP, "--http", "0", "--host", "127.0.0.1",
                "--snapshot-interval", "3600", "--snapshot-events", "0",
                stdout=sink, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            for _ in range(300):
                if "caught up" in log.read_text() or service.returncode is not None:
                    break
                await asyncio.sleep(0.05)
            assert "caught up" in log.read_text(), log.read_text()
            service.send_signal(signal.SIGTERM)
            async with asyncio.timeout(15):
                assert await service.wait() == 0, log.read_text()
        finally:
            if service.returncode is None:
                service.kill()
                await service.wait()
    nc = await nats.connect(fresh_nats.url)
    try:
        js = nc.jetstream()
        kv = await js.key_value(SNAPSHOT_BUCKET)
        entry = await kv.get(f"{NS}.{COMP}.{instance}.0")
        assert entry.value is not None
        snapshot = decode_snapshot(entry.value)
        keys = {k for tier in snapshot.tiers for chain in tier.keys for k in chain}
        assert set(block_keys(PROMPT, BS)) <= keys
        assert set(block_keys(OTHER, BS, lora_name="sql")) <= keys
        await js.purge_stream("KV_EVENTS", seq=snapshot.stream_seq + 1)
        info = await js.stream_info("KV_EVENTS")
        assert info.state.messages == 0
    finally:
        await nc.close()
    loop = asyncio.get_running_loop()
    code, out, err = await loop.run_in_executor(
        None, score, fresh_nats.url, [*PROMPT, 7], "--json")
    assert code == 0, err
    assert json.loads(out) == {f"{instance}.0": 3}


def test_score_exits_1_without_nats_or_stream(fresh_nats: NatsServer) -> None:
    """No server at the URL, or no stream there: exit 1 with the reason, no traceback."""
    code, out, err = score(fresh_nats.url, [1, 2, 3], "--stream", "NO_SUCH")
    assert (code, out) == (1, "")
    assert "NO_SUCH" in err
    assert "Traceback" not in err
    fresh_nats.stop()
    code, out, err = score(fresh_nats.url, [1, 2, 3], "--connect-wait", "1")
    assert (code, out) == (1, "")
    assert "cannot reach NATS" in err
    assert "Traceback" not in err


def test_score_rejects_bad_tokens(fresh_nats: NatsServer) -> None:
    """Token ids that are not uint32 integers are a usage error (exit 2) naming the culprit."""
    for bad in ("1,x,3", "1,-2", str(2**32), ""):
        code, _, err = score(fresh_nats.url, bad)
        assert code == 2, (bad, err)
        assert "kvrelay score: error" in err


async def test_score_connects_as_run_does(tmp_path: Path) -> None:
    """`score` takes run's connection settings: a token from KVRELAY_NATS_TOKEN and the URL
    from NATS_SERVER reach a secured server; a wrong token is a refusal (exit 2)."""
    conf = tmp_path / "nats.conf"
    conf.write_text(f'authorization {{ token: "{TOKEN}" }}\n')
    server = NatsServer(tmp_path / "nats", name="score", extra_args=["-c", str(conf)])
    server.start()
    try:
        nc = await nats.connect(server.url, token=TOKEN)
        try:
            js = nc.jetstream()
            await ensure_stream(js, Config.load({}, {}).stream, ["kv.>"])
            batch = RelayBatch(instance_id=4, dp_rank=0, epoch=0, seq=0, ts=1.0, relay_ts=1.0,
                               events=[Stored([1, 2], None, PROMPT[:2 * BS], BS)])
            await js.publish(f"kv.{NS}.{COMP}.4.0", Codec("msgpack").encode(batch))
        finally:
            await nc.close()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("KVRELAY_", "DYN_", "NATS_SERVER"))}
        args = [sys.executable, "-m", "kvrelay", "score", "--namespace", NS, "--component",
                COMP, "--tokens", ",".join(map(str, [*PROMPT, 1])), "--json"]
        loop = asyncio.get_running_loop()
        done = await loop.run_in_executor(None, lambda: subprocess.run(
            args, capture_output=True, text=True, timeout=30, cwd=REPO, check=False,
            env={**env, "NATS_SERVER": server.url, "KVRELAY_NATS_TOKEN": TOKEN}))
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"4.0": 2}
        done = await loop.run_in_executor(None, lambda: subprocess.run(
            [*args, "--nats-token", "wrong"], capture_output=True, text=True, timeout=30,
            cwd=REPO, check=False, env={**env, "NATS_SERVER": server.url}))
        assert done.returncode == 2, done.stderr
        assert "refused" in done.stderr
        assert "Traceback" not in done.stderr
    finally:
        server.stop()


def test_tokens_file_forms(tmp_path: Path) -> None:
    """A tokens file may hold a JSON array or ids separated by commas, spaces or newlines;
    anything else names the first bad item."""
    assert parse_tokens("[1, 2, 3]") == [1, 2, 3]
    assert parse_tokens("1,2\n3  4,\n") == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="'x'"):
        parse_tokens("1 x 3")
    with pytest.raises(ValueError, match="no token ids"):
        parse_tokens(" \n")
    with pytest.raises(ValueError, match="True"):
        parse_tokens("[1, true]")
    path = tmp_path / "tokens.txt"
    path.write_text("5 6 7")
    done = run_cli(["score", "--nats", "nats://127.0.0.1:1", "--tokens-file", str(path),
                    "--connect-wait", "0.5"])
    assert done.returncode == 1, done.stderr  # read the file, then could not reach NATS
    assert "cannot reach NATS" in done.stderr
    done = run_cli(["score", "--tokens-file", str(tmp_path / "missing.txt")])
    assert done.returncode == 2
    assert "kvrelay score: error" in done.stderr
