"""KV index benchmark: apply rate, decode + apply rate, overlap query latency, memory per block.

    python -m bench.index_bench [--workers 100] [--blocks 100000] [--shared 0.25]

Each worker stores `blocks` blocks as prompt chains of `chain` blocks, four per stored event
(as vLLM writes a scheduler step), and evicts the oldest beyond its capacity; the first
`shared` of every chain is a prefix common to all workers (a system prompt), the rest its own.
Queries are chains that every worker holds some leading part of.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Sequence

from kvrelay.codec import Codec
from kvrelay.router.index import KvIndex
from kvrelay.wire.relaybatch import decode_relay_batches
from kvrelay.wire.schema import BlockHash, RelayBatch, Removed, Stored

EVENT_BLOCKS = 4


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker_batches(worker: int, blocks: int, chain: int, shared: int, capacity: int,
                   rng: random.Random) -> list[RelayBatch]:
    """One worker's batches: chains of `chain` blocks (the first `shared` common to all)."""
    batches: list[RelayBatch] = []
    held: list[BlockHash] = []
    stored = 0
    seq = 0
    while stored < blocks:
        hashes: list[BlockHash] = [0xC0FFEE00 + i for i in range(shared)]
        hashes += [rng.getrandbits(64) for _ in range(chain - shared)]
        parent: BlockHash | None = None
        for start in range(0, chain, EVENT_BLOCKS):
            part = hashes[start:start + EVENT_BLOCKS]
            events: list[Stored | Removed] = [Stored(part, parent, [1] * 16 * len(part), 16,
                                                     medium="GPU", group_idx=0)]
            parent = part[-1]
            held += part
            stored += len(part)
            if len(held) > capacity:
                events.append(Removed(held[:len(held) - capacity], medium="GPU", group_idx=0))
                del held[:len(held) - capacity]
            batches.append(RelayBatch(instance_id=worker, dp_rank=0, epoch=0, seq=seq, ts=1.0,
                                      relay_ts=1.0, events=list(events)))
            seq += 1
    return batches


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--blocks", type=int, default=20_000, help="blocks stored per worker")
    parser.add_argument("--capacity", type=int, default=0,
                        help="blocks a worker holds before evicting (0: --blocks)")
    parser.add_argument("--chain", type=int, default=32, help="blocks per prompt chain")
    parser.add_argument("--shared", type=float, default=0.25,
                        help="fraction of each chain common to all workers")
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    capacity = args.capacity or args.blocks
    shared = int(args.chain * args.shared)

    codec = Codec("msgpack")
    sample = worker_batches(10**6, min(args.blocks, 20_000), args.chain, shared, capacity, rng)
    payloads = [codec.encode(b) for b in sample]
    scratch = KvIndex()
    started = time.perf_counter()
    for stream_seq, payload in enumerate(payloads, 1):
        for batch in decode_relay_batches(payload):
            scratch.apply(batch, stream_seq)
    decode_apply = time.perf_counter() - started
    del scratch, sample

    index = KvIndex()
    before = rss_bytes()
    apply_seconds = 0.0
    events = 0
    held_chains: list[list[BlockHash]] = []
    for worker in range(args.workers):
        batches = worker_batches(worker, args.blocks, args.chain, shared, capacity, rng)
        events += sum(len(b.events) for b in batches)
        started = time.perf_counter()
        for b in batches:
            index.apply(b)
        apply_seconds += time.perf_counter() - started
        last = [h for b in batches[-(args.chain // EVENT_BLOCKS):] for e in b.events
                if isinstance(e, Stored) for h in e.block_hashes]
        held_chains.append(last)
    grown = rss_bytes() - before
    pairs = sum(index.status(w).blocks for w in index.workers())

    queries = [[*rng.choice(held_chains)[:rng.randint(1, args.chain)], rng.getrandbits(64)]
               for _ in range(args.queries)]
    latencies: list[float] = []
    for query in queries:
        started = time.perf_counter()
        index.overlap(query)
        latencies.append(time.perf_counter() - started)
    latencies.sort()

    print(f"workers {args.workers}, blocks stored per worker {args.blocks}, held "
          f"(worker, block) pairs {pairs:,}, distinct blocks {index.distinct_blocks():,}")
    print(f"apply: {events / apply_seconds:,.0f} events/s, "
          f"{args.workers * args.blocks / apply_seconds:,.0f} blocks/s")
    print(f"decode + apply (msgpack RelayBatch, {EVENT_BLOCKS} blocks/event): "
          f"{len(payloads) / decode_apply:,.0f} batches/s")
    print(f"overlap ({args.chain}-block chains, {args.queries} queries): p50 "
          f"{statistics.median(latencies) * 1e6:.1f} us, p99 "
          f"{latencies[int(len(latencies) * 0.99)] * 1e6:.1f} us")
    print(f"memory: {grown / 2**20:,.0f} MiB RSS growth, {grown / max(pairs, 1):.0f} bytes per "
          "held (worker, block) pair")


if __name__ == "__main__":
    main()
