"""End to end with the real vLLM engine on the CPU: vLLM's KV events relayed to JetStream, and
the router's scores for a request's token ids checked against the prefix-cache hits vLLM itself
reports for that request (`usage.prompt_tokens_details.cached_tokens`).

vLLM is installed on first use into a cached venv outside the repository (tests/vllm_engine.py);
the test is skipped only where that install cannot work. It runs once per CI run, in the plain
Python pass (.ci/run leaves the `vllm_engine` marker out of the compiled pass).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import nats.js.errors
import pytest
from harness import REPO, RelayProcess, http_get, nats_client, read_stream, run_cli, scrape
from prometheus_client.parser import text_string_to_metric_families
from vllm_engine import (
    BLOCK_SIZE,
    LORA_NAME,
    Unavailable,
    VllmServer,
    build_lora,
    build_model,
    cached_tokens,
    ensure_venv,
    lora_args,
    running_server,
    server_command,
)

from kvrelay.router.consumer import KvConsumer
from kvrelay.router.index import KvIndex, WorkerKey
from kvrelay.testing.natsserver import NatsServer, free_port
from kvrelay.wire.schema import Stored

pytestmark = [pytest.mark.integration, pytest.mark.vllm_engine,
              pytest.mark.timeout(3600)]  # a first run installs vLLM (several minutes)

NS = "kvtest"
COMP = "vllm"  # a component of its own: scores list only this test's worker
INSTANCE = 2**63 + 777_001
WORKER: WorkerKey = (INSTANCE, 0)
STREAM = "KV_EVENTS"


class Engine(NamedTuple):
    vllm: VllmServer
    relay: RelayProcess
    nats_url: str
    scorer_port: int  # `kvrelay index --http`, the scoring service
    startup_seconds: float


@contextlib.contextmanager
def scoring_service(nats_url: str, log: Path) -> Iterator[int]:
    """`kvrelay index --http 0` following this test's component; yields its port once /health
    says it caught up; always stopped after."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvrelay", "index", "--nats", nats_url, "--namespace", NS,
             "--component", COMP, "--http", "0", "--host", "127.0.0.1"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
            env={**{k: v for k, v in os.environ.items()
                    if not k.startswith(("KVRELAY_", "DYN_", "NATS_SERVER"))},
                 "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 30
        port = 0
        while port == 0:
            assert proc.poll() is None, log.read_text()
            found = re.search(r"scoring service on http://[^:/]+:(\d+)", log.read_text())
            with contextlib.suppress(httpx.HTTPError):
                if found and httpx.get(f"http://127.0.0.1:{found[1]}/health").status_code == 200:
                    port = int(found[1])
            assert time.monotonic() < deadline, f"scoring service not ready:\n{log.read_text()}"
            time.sleep(0.1)
        yield port
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    """The cached vLLM venv's python, installed on first use; skip only where it cannot be."""
    try:
        return ensure_venv()
    except Unavailable as exc:
        pytest.skip(f"vLLM cannot be installed here: {exc}")


@pytest.fixture(scope="module")
def engine(vllm_python: Path, nats_server: NatsServer,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """vLLM serving the tiny model and a LoRA adapter of it with prefix caching and KV events,
    and `kvrelay run` relaying those events into JetStream as worker INSTANCE."""
    folder = tmp_path_factory.mktemp("vllm")
    build_model(vllm_python, folder / "model")
    adapter = build_lora(vllm_python, folder / "lora")
    port, events, replay = free_port(), free_port("0.0.0.0"), free_port("0.0.0.0")
    command = server_command(vllm_python, folder / "model", port, events, replay,
                             lora_args(adapter))
    with running_server(command, port, folder / "vllm.log") as (vllm, startup):
        relay = RelayProcess(
            ["--nats", nats_server.url, "--zmq", f"tcp://127.0.0.1:{events}",
             "--replay", f"tcp://127.0.0.1:{replay}", "--instance-id", str(INSTANCE),
             "--namespace", NS, "--component", COMP], folder / "relay.log")
        try:
            asyncio.run(relay.healthy(within=30))
            print(f"vLLM ready {startup:.0f} s after it started; relay healthy")
            with scoring_service(nats_server.url, folder / "scorer.log") as scorer:
                yield Engine(vllm, relay, nats_server.url, scorer, startup)
        finally:
            relay.stop()


def prompt(rng: random.Random, n: int) -> list[int]:
    """n token ids of the tiny model's byte alphabet (the tokenizer knows every one)."""
    return [rng.randrange(3, 250) for _ in range(n)]


async def served_sequence(port: int) -> float:
    """The stream sequence the scoring service applied last (its /metrics; it keeps HTTP
    connections open, so read with a real client, not harness.scrape)."""
    async with httpx.AsyncClient() as client:
        body = (await client.get(f"http://127.0.0.1:{port}/metrics", timeout=5)).text
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == "kvrelay_consumer_stream_sequence":
                return float(sample.value)
    return 0.0


async def caught_up(engine: Engine, consumer: KvConsumer, nc: Any, within: float = 60) -> None:
    """Wait until the relay published every batch vLLM sent, the consumer and the scoring
    service applied them, and nothing moved for a second (vLLM's publisher thread sends a
    step's events after the step)."""
    js = nc.jetstream()
    subject = f"kv.{NS}.{COMP}.{INSTANCE}.0"
    deadline = time.monotonic() + within
    last: tuple[float, float, int, int, float] | None = None
    since = time.monotonic()
    while True:
        port = engine.relay.system_port
        received = await scrape(port, "kvrelay_batches_received_total", dp_rank="0")
        published = await scrape(port, "kvrelay_batches_published_total")
        try:
            stream_seq = int((await js.get_last_msg(STREAM, subject)).seq or 0)
        except nats.js.errors.NotFoundError:  # no message on the subject yet
            stream_seq = 0
        served = await served_sequence(engine.scorer_port)
        state = (received, published, stream_seq, consumer.stream_seq, served)
        settled = (received == published and consumer.stream_seq >= stream_seq
                   and served >= stream_seq)
        if not settled or state != last:
            last, since = state, time.monotonic()
        elif time.monotonic() - since >= 1.0:
            return
        assert time.monotonic() < deadline, f"not caught up after {within} s: {state}"
        await asyncio.sleep(0.1)


def index_blocks(index: KvIndex, tokens: Sequence[int], **keys: Any) -> int:
    """This worker's leading blocks for `tokens` by the router's in-process index."""
    return index.overlap_tokens(tokens, **keys).get(WORKER, 0)


def cli_blocks(engine: Engine, tokens: Sequence[int], *, lora_name: str | None = None,
               cache_salt: str | None = None) -> int:
    """This worker's leading blocks for `tokens` by `kvrelay score --json`."""
    keys = [*(["--lora-name", lora_name] if lora_name else []),
            *(["--cache-salt", cache_salt] if cache_salt else [])]
    done = run_cli(["score", "--nats", engine.nats_url, "--namespace", NS, "--component", COMP,
                    "--tokens", ",".join(map(str, tokens)), "--json", *keys], timeout=60)
    assert done.returncode == 0, done.stderr
    scores: dict[str, int] = json.loads(done.stdout)
    return scores.get(f"{INSTANCE}.0", 0)


def service_blocks(engine: Engine, tokens: Sequence[int], *, lora_name: str | None = None,
                   cache_salt: str | None = None) -> int:
    """This worker's leading blocks for `tokens` by the scoring service's POST /score."""
    body = {"token_ids": list(tokens), "lora_name": lora_name, "cache_salt": cache_salt}
    response = httpx.post(f"http://127.0.0.1:{engine.scorer_port}/score", json=body, timeout=10)
    assert response.status_code == 200, response.text
    scores: dict[str, int] = response.json()
    return scores.get(f"{INSTANCE}.0", 0)


async def test_scores_match_vllm_prefix_cache_hits(engine: Engine) -> None:
    """For prompts sharing prefixes of 0 to 3 blocks, the router's score computed before each
    request (in-process, by `kvrelay score` and by the scoring service) equals the blocks
    vLLM's cache gave it."""
    rng = random.Random(17)
    base = prompt(rng, 100)
    steps = [  # (what, token ids, leading blocks vLLM can reuse)
        ("cold", base, 0),
        ("the same prompt again", base, (100 - 1) // BLOCK_SIZE),
        ("two blocks shared", base[:64] + prompt(rng, 40), 2),
        ("one block shared", base[:32] + prompt(rng, 70), 1),
        ("nothing shared", prompt(rng, 90), 0),
        ("three full cached blocks: the last token's block is recomputed", base[:96], 2),
        ("a longer prompt on the cached prefix", base + prompt(rng, 50), 3),
    ]
    async with nats_client(engine.nats_url) as nc, KvConsumer(
            engine.nats_url, NS, COMP, instance_id=INSTANCE) as consumer:
        await asyncio.wait_for(consumer.ready(), 30)
        await caught_up(engine, consumer, nc)
        seen = []
        for what, tokens, blocks in steps:
            by_index = index_blocks(consumer.index, tokens)
            by_cli = cli_blocks(engine, tokens)
            by_service = service_blocks(engine, tokens)
            hit = cached_tokens(await asyncio.to_thread(engine.vllm.complete, tokens))
            seen.append((what, len(tokens), by_index, by_cli, by_service, hit))
            assert hit == blocks * BLOCK_SIZE, f"vLLM itself: {seen}"
            assert by_index == by_cli == by_service == hit // BLOCK_SIZE, f"{what}: {seen}"
            await caught_up(engine, consumer, nc)


async def test_cache_salt_is_its_own_prefix(engine: Engine) -> None:
    """A request with a cache_salt matches neither the unsalted cached prefix nor another
    salt's, in vLLM and in the router alike, and matches its own salt's blocks."""
    tokens = prompt(random.Random(23), 100)
    full = (len(tokens) - 1) // BLOCK_SIZE
    steps = [  # (cache salt, blocks vLLM reuses)
        (None, 0),
        ("salt-a", 0),
        ("salt-a", full),
        (None, full),
        ("salt-b", 0),
    ]
    async with nats_client(engine.nats_url) as nc, KvConsumer(
            engine.nats_url, NS, COMP, instance_id=INSTANCE) as consumer:
        await asyncio.wait_for(consumer.ready(), 30)
        await caught_up(engine, consumer, nc)
        for salt, blocks in steps:
            by_index = index_blocks(consumer.index, tokens, cache_salt=salt)
            by_cli = cli_blocks(engine, tokens, cache_salt=salt)
            by_service = service_blocks(engine, tokens, cache_salt=salt)
            extra = {} if salt is None else {"cache_salt": salt}
            hit = cached_tokens(await asyncio.to_thread(engine.vllm.complete, tokens, **extra))
            assert hit == blocks * BLOCK_SIZE, f"vLLM itself, salt {salt!r}"
            assert by_index == by_cli == by_service == blocks, (
                f"router, salt {salt!r}: {by_index}, {by_cli}, {by_service}")
            await caught_up(engine, consumer, nc)


async def test_lora_is_its_own_prefix(engine: Engine) -> None:
    """A LoRA request matches neither the base model's cached prefix nor the reverse, in vLLM
    and in the router alike, and matches its own adapter's blocks."""
    tokens = prompt(random.Random(29), 100)
    full = (len(tokens) - 1) // BLOCK_SIZE
    steps = [  # (adapter, blocks vLLM reuses)
        (None, 0),
        (LORA_NAME, 0),
        (LORA_NAME, full),
        (None, full),
    ]
    async with nats_client(engine.nats_url) as nc, KvConsumer(
            engine.nats_url, NS, COMP, instance_id=INSTANCE) as consumer:
        await asyncio.wait_for(consumer.ready(), 30)
        await caught_up(engine, consumer, nc)
        for lora, blocks in steps:
            by_index = index_blocks(consumer.index, tokens, lora_name=lora)
            by_cli = cli_blocks(engine, tokens, lora_name=lora)
            by_service = service_blocks(engine, tokens, lora_name=lora)
            extra = {} if lora is None else {"model": lora}
            hit = cached_tokens(await asyncio.to_thread(engine.vllm.complete, tokens, **extra))
            assert hit == blocks * BLOCK_SIZE, f"vLLM itself, adapter {lora!r}"
            assert by_index == by_cli == by_service == blocks, (
                f"router, adapter {lora!r}: {by_index}, {by_cli}, {by_service}")
            await caught_up(engine, consumer, nc)


async def test_salted_adapter_blocks_on_the_wire(engine: Engine) -> None:
    """A salted LoRA request's blocks reach JetStream as vLLM 0.32 describes them (the adapter
    name in every block's extra keys, the salt after it in the first block's only), and score
    only for that adapter and salt together."""
    tokens = prompt(random.Random(31), 100)
    keys = {"lora_name": LORA_NAME, "cache_salt": "salt-c"}
    async with nats_client(engine.nats_url) as nc, KvConsumer(
            engine.nats_url, NS, COMP, instance_id=INSTANCE) as consumer:
        await asyncio.wait_for(consumer.ready(), 30)
        await caught_up(engine, consumer, nc)
        reply = await asyncio.to_thread(engine.vllm.complete, tokens, model=LORA_NAME,
                                        cache_salt="salt-c")
        assert cached_tokens(reply) == 0
        await caught_up(engine, consumer, nc)
        got = await read_stream(nc, f"kv.{NS}.{COMP}.{INSTANCE}.0", 1, settle=0.5)
        stored = [e for r in got for e in r.batch.events
                  if isinstance(e, Stored) and e.token_ids == tokens[:96]]
        assert len(stored) == 1, stored
        event = stored[0]
        assert (event.parent_block_hash, event.block_size, event.lora_name) == (
            None, BLOCK_SIZE, LORA_NAME)
        assert len(event.block_hashes) * BLOCK_SIZE == len(event.token_ids)
        assert event.extra_keys == [[LORA_NAME, "salt-c"], [LORA_NAME], [LORA_NAME]]
        full = (len(tokens) - 1) // BLOCK_SIZE
        assert index_blocks(consumer.index, tokens, **keys) == full
        assert cli_blocks(engine, tokens, **keys) == full
        assert service_blocks(engine, tokens, **keys) == full
        assert index_blocks(consumer.index, tokens, lora_name=LORA_NAME) == 0
        assert index_blocks(consumer.index, tokens, cache_salt="salt-c") == 0
        reply = await asyncio.to_thread(engine.vllm.complete, tokens, model=LORA_NAME,
                                        cache_salt="salt-c")
        assert cached_tokens(reply) == full * BLOCK_SIZE


async def test_reannounced_hits_keep_the_scores(engine: Engine) -> None:
    """A request asking vLLM to report its cache hits (`kv_cache_report_mode: full`) makes it
    store the hit blocks again, from block 0 with no parent; the router's scores stay equal
    to vLLM's hits."""
    rng = random.Random(37)
    tokens = prompt(rng, 100)
    longer = tokens + prompt(rng, 40)
    subject = f"kv.{NS}.{COMP}.{INSTANCE}.0"
    full_report = {"vllm_xargs": {"kv_cache_report_mode": "full"}}
    steps = [  # (token ids, request options, blocks vLLM reuses)
        (tokens, {}, 0),
        (longer, full_report, 3),
        (longer, {}, (len(longer) - 1) // BLOCK_SIZE),
        (tokens, full_report, 3),
    ]
    async with nats_client(engine.nats_url) as nc, KvConsumer(
            engine.nats_url, NS, COMP, instance_id=INSTANCE) as consumer:
        await asyncio.wait_for(consumer.ready(), 30)
        await caught_up(engine, consumer, nc)
        for i, (request, options, blocks) in enumerate(steps):
            by_index = index_blocks(consumer.index, request)
            by_service = service_blocks(engine, request)
            hit = cached_tokens(await asyncio.to_thread(engine.vllm.complete, request, **options))
            assert hit == blocks * BLOCK_SIZE, f"vLLM itself, step {i}"
            assert by_index == by_service == blocks, f"router, step {i}: {by_index}, {by_service}"
            await caught_up(engine, consumer, nc)
        got = await read_stream(nc, subject, 1, settle=0.5)
        again = [e for r in got for e in r.batch.events if isinstance(e, Stored)
                 and e.parent_block_hash is None and e.token_ids[:96] == tokens[:96]]
        assert len(again) == 3, again  # stored once, then re-announced by both full reports


async def test_relay_stays_healthy(engine: Engine) -> None:
    """After the engine's traffic the relay is healthy and read every batch without error."""
    status, body = await http_get(engine.relay.system_port, "/health")
    assert status == 200, body
    port = engine.relay.system_port
    assert await scrape(port, "kvrelay_batches_received_total", dp_rank="0") > 0
    assert await scrape(port, "kvrelay_gaps_total") == 0
