"""The scoring service (`kvrelay index --http`): POST /score over an index kept live from the
stream, its probes and metrics, and an HTTP layer that survives split, pipelined and malformed
requests."""

from __future__ import annotations

import asyncio
import base64
import re
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import nats
import pytest
from harness import REPO
from prometheus_client import CollectorRegistry

from kvrelay.codec import Codec
from kvrelay.config import Config
from kvrelay.jetstream.stream import ensure_stream
from kvrelay.router.index import KvIndex
from kvrelay.router.scoring import ScoringService
from kvrelay.testing.natsserver import NatsServer
from kvrelay.wire.schema import BlockHash, RelayBatch, Stored

NS, COMP, BS = "scoretest", "backend", 4
TOKENS = list(range(100, 112))  # three blocks


def stored_batch(instance: int, seq: int, tokens: list[int], parent: int | None,
                 hashes: list[BlockHash]) -> RelayBatch:
    return RelayBatch(instance_id=instance, dp_rank=0, epoch=0, seq=seq, ts=1.0,
                      relay_ts=time.time(), events=[Stored(hashes, parent, tokens, BS)])


@pytest.fixture
def index_proc(fresh_nats: NatsServer, tmp_path: Path
               ) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """`kvrelay index --http 0` against the fresh server, with the port it logged."""
    log = tmp_path / "index.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvrelay", "index", "--nats", fresh_nats.url, "--namespace",
             NS, "--component", COMP, "--http", "0", "--host", "127.0.0.1"],
            stdout=out, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        deadline = time.monotonic() + 15
        while not (found := re.search(r"scoring service on http://[^:]+:(\d+)", log.read_text())):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield proc, int(found.group(1))
    finally:
        proc.terminate()
        proc.wait(10)


async def test_service_scores_live_and_reports_readiness(
        fresh_nats: NatsServer, index_proc: tuple[subprocess.Popen[str], int]) -> None:
    """Not ready until the stream exists; then scores follow what each worker stores, on one
    kept-alive connection, and bad requests are answered 400 and counted."""
    proc, port = index_proc
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        assert (await http.get("/live")).status_code == 200
        assert (await http.get("/health")).status_code == 503
        nc = await nats.connect(fresh_nats.url)
        try:
            js = nc.jetstream()
            await ensure_stream(js, Config.load({}, {}).stream, ["kv.>"])
            codec = Codec("msgpack")
            await js.publish(f"kv.{NS}.{COMP}.1.0", codec.encode(
                stored_batch(1, 0, TOKENS, None, [11, 12, 13])))
            await js.publish(f"kv.{NS}.{COMP}.2.0", codec.encode(
                stored_batch(2, 0, TOKENS[:4], None, [21])))
            deadline = time.monotonic() + 10
            while (await http.get("/health")).status_code != 200:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            expected = {"1.0": 3, "2.0": 1}
            for _ in range(50):  # until the second worker's batch is applied
                answer = await http.post("/score", json={"token_ids": [*TOKENS, 0]})
                if answer.json() == expected:
                    break
                await asyncio.sleep(0.1)
            assert answer.status_code == 200
            assert answer.json() == expected
            answer = await http.post("/score", json={"token_ids": TOKENS, "lora_name": None})
            assert answer.json() == {"1.0": 2, "2.0": 1}
            answer = await http.post("/score", json={"token_ids": [*TOKENS, 0],
                                                     "lora_name": "other"})
            assert answer.json() == {"1.0": 0, "2.0": 0}
            await js.publish(f"kv.{NS}.{COMP}.2.0", codec.encode(
                stored_batch(2, 1, TOKENS[4:], 21, [22, 23])))
            for _ in range(50):
                answer = await http.post("/score", json={"token_ids": [*TOKENS, 0]})
                if answer.json() == {"1.0": 3, "2.0": 3}:
                    break
                await asyncio.sleep(0.1)
            assert answer.json() == {"1.0": 3, "2.0": 3}
        finally:
            await nc.close()
        packed = base64.b64encode(struct.pack(f"<{len(TOKENS) + 1}I", *TOKENS, 0)).decode()
        answer = await http.post("/score", json={"token_bytes": packed})
        assert answer.json() == {"1.0": 3, "2.0": 3}
        for bad in (b"{", b'{"token_ids": "x"}', b'{"token_ids": [-1]}', b'{"tokens": []}',
                    b"{}", b'{"token_ids": [1], "token_bytes": ""}',
                    b'{"token_bytes": "AQID"}'):
            answer = await http.post("/score", content=bad)
            assert answer.status_code == 400, bad
            assert "error" in answer.json()
        assert (await http.get("/score")).status_code == 405
        metrics = (await http.get("/metrics")).text
    assert 'kvrelay_scorer_requests_total{outcome="bad_request"} 7.0' in metrics
    assert "kvrelay_scorer_score_seconds_count" in metrics
    assert "kvrelay_scorer_workers 2.0" in metrics
    assert "kvrelay_scorer_index_blocks 6.0" in metrics
    assert "kvrelay_consumer_batches_total" in metrics
    assert proc.poll() is None


async def test_http_layer_handles_split_pipelined_and_bad_requests() -> None:
    """Requests split across packets and pipelined on one connection are each answered in
    order; a msgpack body (packed ids) is answered in msgpack, with a worker that joined; an
    oversized body gets 413 and a chunked one 400, both closing the connection."""
    index = KvIndex()
    index.apply(stored_batch(1, 0, TOKENS, None, [11, 12, 13]))
    service = ScoringService(index, lambda: True, CollectorRegistry(), "127.0.0.1", 0,
                             max_body=1000)
    await service.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        body = msgspec.json.encode({"token_ids": [*TOKENS, 0]})
        request = (b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: "
                   + str(len(body)).encode() + b"\r\n\r\n" + body)
        writer.write(request[:10])
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(request[10:] + request + b"GET /live HTTP/1.1\r\n\r\n")
        await writer.drain()
        answers = []
        for _ in range(3):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
            answers.append((head.split(b" ")[1], await reader.readexactly(length)))
        assert answers == [(b"200", b'{"1.0":3}'), (b"200", b'{"1.0":3}'),
                           (b"200", b'{"status":"live"}')]
        index.apply(stored_batch(2, 0, TOKENS[:4], None, [21]))  # a worker joins
        packed = msgspec.msgpack.encode({"token_bytes": struct.pack("<13I", *TOKENS, 0),
                                         "cache_salt": None})
        writer.write(b"POST /score HTTP/1.1\r\nContent-Type: application/msgpack\r\n"
                     b"Content-Length: " + str(len(packed)).encode() + b"\r\n\r\n" + packed)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"Content-Type: application/msgpack" in head
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        assert msgspec.msgpack.decode(await reader.readexactly(length)) == {"1.0": 3, "2.0": 1}
        writer.write(b"POST /score HTTP/1.1\r\nContent-Length: 5000\r\n\r\n")
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413")
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        writer.write(b"POST /score HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 400")
        assert await reader.read() is not None
        writer.close()
    finally:
        await service.stop()
