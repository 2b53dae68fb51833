"""Scoring benchmark: `KvIndex.overlap_tokens` latency and memory at fleet scale, and the HTTP
scoring service's throughput on one core.

    python -m bench.score_bench [--workers 100] [--blocks 20000] [--tokens 8192] [--http]

On the installed build (compiled where `pip install` compiled it), from a checkout:
`PYTHONPATH=<a directory holding only a link to bench/> python -P -m bench.score_bench`.

Each worker stores `blocks` blocks of `block-size` tokens as requests of `tokens` tokens, in
events of `event-blocks` blocks (vLLM's chunked prefill), the first `shared` of every request a
system prompt common to all workers. Queries are requests of `tokens` tokens plus one: a third
repeat a request some worker holds, a third share only the system prompt, a third share
nothing. `--http` also serves the same index with the scoring service (`kvrelay index`'s)
in a process pinned to one core and loads it from another with keep-alive connections.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from array import array
from collections.abc import Sequence

import msgspec

from bench.procstat import cpu_seconds
from kvrelay.router.index import KvIndex
from kvrelay.wire.schema import BlockHash, RelayBatch, Stored
from kvrelay.wire.tokenkey import token_bytes


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(args: argparse.Namespace) -> tuple[KvIndex, list[array[int]], int]:
    """The index, the requests it holds, and its RSS growth in bytes."""
    rng = random.Random(args.seed)
    size = args.block_size
    per_request = args.tokens // size
    system = [rng.randrange(100_000) for _ in range(int(per_request * args.shared) * size)]
    index = KvIndex()
    requests: list[array[int]] = []  # packed: the RSS growth is the index's
    gc.collect()
    before = rss_bytes()
    for worker in range(args.workers):
        seq = held = 0
        while held < args.blocks:
            count = min(per_request, args.blocks - held)
            tokens = system + [rng.randrange(100_000)
                               for _ in range(per_request * size - len(system))]
            if len(requests) < 1000:
                requests.append(array("I", tokens))
            parent: BlockHash | None = None
            for start in range(0, count, args.event_blocks):
                hashes: list[BlockHash] = [rng.getrandbits(64) for _ in
                                           range(min(args.event_blocks, count - start))]
                event = Stored(hashes, parent, tokens[start * size:(start + len(hashes)) * size],
                               size)
                index.apply(RelayBatch(instance_id=worker, dp_rank=0, epoch=0, seq=seq, ts=0.0,
                                       relay_ts=0.0, events=[event]))
                seq += 1
                parent = hashes[-1]
            held += count
    gc.collect()
    return index, requests, rss_bytes() - before


def traced_bytes_per_block(args: argparse.Namespace) -> float:
    """Bytes the index itself allocates per held (worker, block), by tracemalloc, on a tenth
    of the fleet (at least 2 workers): RSS growth also counts the allocator's fragmentation
    from what building the fleet threw away."""
    import tracemalloc

    small = argparse.Namespace(**{**vars(args), "workers": max(2, args.workers // 10)})
    tracemalloc.start()
    index, requests, _ = build(small)
    del requests
    gc.collect()
    used = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return used / max(1, sum(index.block_count(w) for w in index.workers()))


def queries(args: argparse.Namespace, requests: list[array[int]]) -> list[list[int]]:
    rng = random.Random(args.seed + 1)
    system = list(requests[0][:int(args.tokens // args.block_size * args.shared)
                              * args.block_size])
    out = []
    for i in range(args.queries):
        kind = i % 3
        if kind == 0:
            out.append([*rng.choice(requests), 7])
        elif kind == 1:
            out.append(system + [rng.randrange(100_000)
                                 for _ in range(args.tokens + 1 - len(system))])
        else:
            out.append([rng.randrange(100_000) for _ in range(args.tokens + 1)])
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def serve(args: argparse.Namespace) -> None:
    """The server side of `--http`: build, serve, print the port, run until killed."""
    from prometheus_client import CollectorRegistry

    from kvrelay.router.scoring import ScoringService

    index, _, _ = build(args)

    async def main() -> None:
        service = ScoringService(index, lambda: True, CollectorRegistry(), "127.0.0.1", 0)
        await service.start()
        print(service.port, flush=True)
        await asyncio.Event().wait()

    import uvloop

    uvloop.run(main())


async def load(port: int, bodies: list[bytes], connections: int, duration: float,
               content_type: bytes = b"application/json", rate: float = 0.0
               ) -> tuple[int, list[float]]:
    """Keep-alive connections each sending one request at a time for `duration` seconds: as
    fast as answers come, or at `rate` requests/s in all, each latency then counted from the
    time its request was due (a late send counts its wait)."""
    latencies: list[float] = []
    stop_at = time.monotonic() + duration
    begin = time.perf_counter()

    async def one(n: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = n
        while time.monotonic() < stop_at:
            body = bodies[i % len(bodies)]
            started = time.perf_counter()
            if rate:
                due = begin + i / rate
                if due > started:
                    await asyncio.sleep(due - started)
                started = due
            i += connections
            writer.write(b"POST /score HTTP/1.1\r\nContent-Type: %s\r\nContent-Length: %d"
                         b"\r\n\r\n" % (content_type, len(body)) + body)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.split(b"Content-Length: ", 1)[1].split(b"\r\n", 1)[0])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
        writer.close()

    await asyncio.gather(*(one(n) for n in range(connections)))
    return len(latencies), latencies


def http_bench(args: argparse.Namespace, asked: list[list[int]]) -> None:
    safe = ["-P"] if sys.flags.safe_path else []  # the installed kvrelay, not the checkout's
    command = [sys.executable, *safe, "-m", "bench.score_bench", "--serve",
               *(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k not in ("http", "serve", "traced") and v is not None)]
    cores = sorted(os.sched_getaffinity(0))
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True,
                              preexec_fn=lambda: os.sched_setaffinity(0, {cores[0]}))
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        if len(cores) > 1:
            os.sched_setaffinity(0, set(cores[1:]))
        variants = (("JSON", b"application/json", msgspec.json.encode, False),
                    ("JSON, packed ids", b"application/json", msgspec.json.encode, True),
                    ("msgpack", b"application/msgpack", msgspec.msgpack.encode, False),
                    ("msgpack, packed ids", b"application/msgpack", msgspec.msgpack.encode,
                     True))
        for name, content_type, encode, packed in variants:
            bodies = [encode({"token_bytes": token_bytes(q)} if packed
                             else {"token_ids": q}) for q in asked]
            asyncio.run(load(port, bodies, args.connections, 2.0, content_type))  # warm up
            cpu = cpu_seconds(server.pid)
            count, latencies = asyncio.run(load(port, bodies, args.connections, args.duration,
                                                content_type))
            per_request = (cpu_seconds(server.pid) - cpu) / max(count, 1)
            print(f"HTTP scorer on one core, {name} ({args.connections} keep-alive "
                  f"connections, {args.tokens + 1}-token requests): "
                  f"{count / args.duration:,.0f} requests/s, "
                  f"p50 {statistics.median(latencies) * 1e3:.2f} ms, "
                  f"p99 {percentile(latencies, 0.99) * 1e3:.2f} ms; server CPU "
                  f"{per_request * 1e6:,.0f} us per request, so "
                  f"{1 / max(per_request, 1e-9):,.0f} requests/s per core")
            if args.rate and count / args.duration >= args.rate:
                count, latencies = asyncio.run(load(port, bodies, args.connections,
                                                    args.duration, content_type, args.rate))
                print(f"  at {args.rate:,.0f} requests/s offered: {count / args.duration:,.0f} "
                      f"answered/s, p50 {statistics.median(latencies) * 1e3:.2f} ms, "
                      f"p99 {percentile(latencies, 0.99) * 1e3:.2f} ms")
    finally:
        server.kill()
        server.wait()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--blocks", type=int, default=20_000, help="blocks held per worker")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per request")
    parser.add_argument("--event-blocks", type=int, default=16, help="blocks per stored event")
    parser.add_argument("--shared", type=float, default=0.25,
                        help="fraction of each request that is a system prompt all share")
    parser.add_argument("--queries", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--http", action="store_true", help="also load the HTTP service")
    parser.add_argument("--traced", action="store_true",
                        help="also count the index's own allocations with tracemalloc")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=2000.0,
                        help="with --http, also load at this many requests/s where the "
                             "service keeps up, for its latency there (0: no)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args)
        return
    index, requests, grown = build(args)
    pairs = sum(index.block_count(w) for w in index.workers())
    asked = queries(args, requests)
    latencies: dict[int, list[float]] = {0: [], 1: [], 2: []}
    for i, query in enumerate(asked):
        started = time.perf_counter()
        index.overlap_tokens(query)
        latencies[i % 3].append(time.perf_counter() - started)
    every = [t for values in latencies.values() for t in values]
    print(json.dumps({"workers": args.workers, "blocks_per_worker": args.blocks,
                      "worker_blocks": pairs, "tokens": args.tokens}))
    print(f"memory: {grown / 2**20:,.0f} MiB RSS growth, {grown / max(pairs, 1):.0f} bytes per "
          "held (worker, block)")
    if args.traced:
        print(f"memory allocated by the index: {traced_bytes_per_block(args):.0f} bytes per "
              "held (worker, block) (tracemalloc, a tenth of the workers)")
    for kind, name in ((0, "held request"), (1, "system prompt only"), (2, "no prefix")):
        values = latencies[kind]
        print(f"overlap_tokens, {name}: p50 {statistics.median(values) * 1e3:.3f} ms, "
              f"p99 {percentile(values, 0.99) * 1e3:.3f} ms")
    print(f"overlap_tokens, all: p99 {percentile(every, 0.99) * 1e3:.3f} ms")
    if args.http:
        del index
        http_bench(args, asked)


if __name__ == "__main__":
    main()
