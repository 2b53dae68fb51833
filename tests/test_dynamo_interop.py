"""Interop with NVIDIA Dynamo's own KV router: kvrelay in `--format dynamo` feeds the router of
the ai-dynamo-runtime wheel, unchanged, through a real nats-server and Dynamo's file discovery.

Dynamo's parts run in processes of their own (tests/dynamo_probe.py). After each phase the
test waits until the router's indexer (`dump_events()`) holds, for each worker rank, exactly the
blocks Dynamo's rules keep of what vLLM stored and removed (RouterModel), then checks with
`get_overlap_scores` that a request for every block ever stored matches as many blocks as are
still held on its path: the router hashes the request's tokens itself, so this proves the
relay's tokens_hash too.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from dynamo_support import (
    ANY_PORT,
    COMP,
    ENDPOINT,
    NS,
    Block,
    RouterModel,
    eventually,
    held_by_router,
    kv_event_reader,
    publisher,
    running_dynamo_relay,
    u64,
)
from etcdserver import EtcdServer
from harness import is_ready, join, metric

from kvrelay.dynamo.wire import DynamoEventData, DynamoStoreData, RouterEvent
from kvrelay.ingest.sequencer import Frame
from kvrelay.testing.natsserver import NatsServer
from kvrelay.testing.synthetic import SyntheticVllm, block_removed, block_stored, encode_batch

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("dynamo") is None,
                       reason="Dynamo's router is not installed (pip install "
                              "'kvrelay[dynamo-interop]', the ai-dynamo-runtime wheel)"),
]

HERE = Path(__file__).resolve().parent
CAPTURE = HERE.parent / "schemas" / "vectors" / "input" / "vllm-0.32-int-hashes.msgpack"
WORKER = 2**63 + 77  # worker IDs above 2**63 occur; JSON and msgpack must keep them exact
BLOCK = 16
CANARY = 2**40  # block hash of the batches that wait for a late subscriber


class DynamoProcess:
    """A part of Dynamo in its own process (tests/dynamo_probe.py), one JSON line per request."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(HERE / "dynamo_probe.py"), *args],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env, text=True)

    async def read(self, within: float = 30.0) -> Any:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), within)
        if not line:
            raise AssertionError(f"Dynamo's process exited:\n{self.log_tail()}")
        return json.loads(line)

    async def ask(self, request: dict[str, Any]) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return await self.read()

    async def overlap(self, tokens: list[int], lora_name: str | None = None) -> dict[str, int]:
        answer: dict[str, int] = await self.ask({"overlap": tokens, "lora_name": lora_name})
        return answer

    async def dump(self) -> list[dict[str, Any]]:
        answer: list[dict[str, Any]] = await self.ask({"dump": True})
        return answer

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@contextlib.contextmanager
def dynamo(role: str, nats_url: str, file_kv: Path, log: Path, *args: str,
           etcd: str | None = None) -> Iterator[DynamoProcess]:
    """Dynamo's router or relay, on file discovery in `file_kv` (or etcd at `etcd`) and NATS
    as its event plane."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DYN_", "NATS_", "ETCD_"))}
    env.update(DYN_DISCOVERY_BACKEND="file", DYN_FILE_KV=str(file_kv), DYN_REQUEST_PLANE="tcp",
               DYN_EVENT_PLANE="nats", NATS_SERVER=nats_url, DYN_SYSTEM_PORT="-1",
               DYN_LOG="warn")
    if etcd is not None:
        env.update(DYN_DISCOVERY_BACKEND="etcd", ETCD_ENDPOINTS=etcd)
    process = DynamoProcess([role, NS, COMP, ENDPOINT, str(BLOCK), *args], env, log)
    try:
        yield process
    finally:
        process.close()


class Rank:
    """One vLLM DP rank: its publisher and the state Dynamo's router must reach from it."""

    def __init__(self, vllm: SyntheticVllm) -> None:
        self.vllm = vllm
        self.model = RouterModel(BLOCK)
        self.history: dict[int, Block] = {}  # every block ever stored, for overlap queries

    def publish(self, events: list[Any]) -> None:
        self.vllm.publish(events)
        self.apply(events)

    def apply(self, events: list[Any]) -> None:
        for event in events:
            self.model.apply(event)
            if event["type"] == "BlockStored":
                scratch = RouterModel(BLOCK)
                scratch.apply({**event, "parent_block_hash": None})
                parent = event["parent_block_hash"]
                for h, block in scratch.blocks.items():
                    if block.parent is None and parent is not None:
                        block.parent = u64(parent)
                    self.history[h] = block

    def path(self, block: int) -> tuple[list[int], list[int]]:
        """The blocks from the root to `block` and their tokens, as vLLM stored them."""
        chain: list[int] = []
        at: int | None = block
        while at is not None and at in self.history:
            chain.append(at)
            at = self.history[at].parent
        chain.reverse()
        return chain, [t for h in chain for t in self.history[h].tokens]

    def expected_overlap(self, chain: list[int]) -> int:
        """Blocks of the chain the router still holds in place, counted from the root."""
        held = 0
        for h in chain:
            kept = self.model.blocks.get(h)
            if kept is None or kept.parent != self.history[h].parent:
                break
            held += 1
        return held


async def settle(router: DynamoProcess, ranks: dict[int, Rank], what: str,
                 worker: int = WORKER) -> None:
    """Wait until the router's indexer holds exactly each rank's modelled blocks, then check
    the overlap of every block ever stored, as the router scores a request for it."""
    deadline = time.monotonic() + 20
    while True:
        dump = await router.dump()
        got = {r: held_by_router(dump, worker, r) for r in ranks}
        want = {r: rank.model.held() for r, rank in ranks.items()}
        if got == want:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: the router holds {got}, expected {want}\n"
                                 f"{router.log_tail()}")
        await asyncio.sleep(0.1)
    for r, rank in ranks.items():
        for block in rank.history:
            chain, tokens = rank.path(block)
            scores = await router.overlap(tokens, rank.history[block].lora_name)
            assert scores.get(f"{worker}/{r}", 0) == rank.expected_overlap(chain), (
                what, r, block, scores)


async def until_admitted(router: DynamoProcess, ranks: dict[int, Rank], relay: Any,
                         worker: int = WORKER) -> None:
    """Store a canary block on each rank until the router applies it, then remove it: from
    then on the router has bound the relay's event sources and drops nothing."""
    canaries = {r: ([900_000 + r], [60_000 + 16 * r + i for i in range(BLOCK)]) for r in ranks}
    deadline = time.monotonic() + 20
    while True:
        dump = await router.dump()
        missing = [r for r in ranks
                   if u64(canaries[r][0][0]) not in held_by_router(dump, worker, r)]
        if not missing:
            break
        assert time.monotonic() < deadline, (
            f"the router never applied events of ranks {missing}; relay readiness "
            f"{relay.readiness()}\n{router.log_tail()}")
        for r in missing:
            ranks[r].publish([block_stored(canaries[r][0], None, canaries[r][1])])
        await asyncio.sleep(0.3)
    for r, rank in ranks.items():
        rank.publish([block_removed(canaries[r][0])])
        del rank.history[u64(canaries[r][0][0])]


class Chains:
    """Deterministic prefix trees: chains from a root or branching off a block held before."""

    def __init__(self, seed: int, hash_kind: str) -> None:
        self.rng = random.Random(seed)
        self.hash_kind = hash_kind

    def _hash(self) -> int | bytes:
        if self.hash_kind == "bytes":
            return self.rng.randbytes(32)
        value = self.rng.getrandbits(64)
        return value - (1 << 64) if self.hash_kind == "int64" and value >= 1 << 63 else value

    def store(self, length: int, parent: int | bytes | None = None, **fields: Any
              ) -> tuple[list[int | bytes], dict[str, Any]]:
        hashes = [self._hash() for _ in range(length)]
        tokens = [self.rng.randrange(32_000) for _ in range(length * BLOCK)]
        return hashes, block_stored(hashes, parent, tokens, **fields)


@contextlib.asynccontextmanager
async def vllm_ranks(count: int) -> AsyncIterator[dict[int, Rank]]:
    vllms = [SyntheticVllm(ANY_PORT, dp_rank=r).start() for r in range(count)]
    try:
        yield {r: Rank(v) for r, v in enumerate(vllms)}
    finally:
        for vllm in vllms:
            vllm.close()


async def test_dynamos_router_holds_exactly_what_vllm_stored(
        fresh_nats: NatsServer, tmp_path: Path) -> None:
    """Dynamo's KvRouter, fed only by kvrelay, holds per worker rank exactly the blocks vLLM
    stored and did not remove (real vLLM frames, bytes hashes, a LoRA adapter, a gap, a
    clear), matches requests against them, and forgets the worker when the relay stops."""
    file_kv = tmp_path / "dynamo_store_kv"
    capture = msgspec.msgpack.decode(CAPTURE.read_bytes())
    with dynamo("router", fresh_nats.url, file_kv, tmp_path / "router.log") as router:
        assert await router.read() == {"ready": True}
        async with vllm_ranks(2) as ranks:
            async with running_dynamo_relay(
                    file_kv, nats=fresh_nats.url, instance_id=WORKER,
                    zmq=[ranks[0].vllm.address, ranks[1].vllm.address]) as relay:
                await eventually(lambda: is_ready(relay), "relay ready")
                for rank in ranks.values():
                    await join(rank.vllm, relay)
                await until_admitted(router, ranks, relay)

                # Rank 0: vLLM 0.32's own frames, byte for byte; rank 1: trees of chains
                # with 32-byte hashes, evicted at a leaf, in the middle and at a root.
                ranks[0].vllm.publish_payload(capture[0][2])
                ranks[0].apply(msgspec.msgpack.decode(capture[0][2])[1])
                trees = Chains(seed=5, hash_kind="bytes")
                a, stored_a = trees.store(4)
                b, stored_b = trees.store(3)
                c, stored_c = trees.store(2, parent=a[1])
                d, stored_d = trees.store(5)
                _, stored_e = trees.store(2, parent=d[2])
                ranks[1].publish([stored_a])
                ranks[1].publish([stored_b, stored_c])
                ranks[1].publish([block_removed([a[3]])])
                ranks[1].publish([stored_d, block_removed([b[0]])])
                ranks[1].publish([stored_e, block_removed([d[4]])])
                await settle(router, ranks, "first batches")
                assert len(ranks[1].model.blocks) == 11

                for _, _, payload in capture[1:40]:
                    ranks[0].vllm.publish_payload(payload)
                    ranks[0].apply(msgspec.msgpack.decode(payload)[1])
                signed = Chains(seed=6, hash_kind="int64")
                f, stored_f = signed.store(3)
                _, stored_g = signed.store(2, parent=f[0])
                ranks[0].publish([stored_f, stored_g])
                lora, stored_lora = trees.store(3, lora_id=1, lora_name="my-lora")
                ranks[1].publish([stored_lora, block_removed([c[0]])])
                await settle(router, ranks, "real frames, signed hashes and a LoRA chain")
                assert len(ranks[0].model.blocks) == 5
                assert len(ranks[1].model.blocks) == 12
                lora_tokens = ranks[1].path(u64(lora[-1]))[1]
                scores = await router.overlap(lora_tokens)
                assert scores.get(f"{WORKER}/1", 0) == 0  # the adapter's blocks, not the base's

                # Batches in hand at once go as one message, which the router applies whole.
                messages = publisher(relay).messages_sent(1)
                m, stored_m = trees.store(2)
                _, stored_n = trees.store(2, parent=m[1])
                for seq, events in enumerate([[stored_m], [stored_n]]):
                    payload = encode_batch(events, 1.0, dp_rank=1)
                    publisher(relay).take(Frame(1, 0, seq, payload, time.time(), ()))
                    ranks[1].apply(events)  # both taken in this one turn of the loop
                await settle(router, ranks, "two batches in one message")
                assert publisher(relay).messages_sent(1) == messages + 1

                # A gap on rank 1 (no replay): the next batch starts with `cleared`.
                ranks[1].vllm.skip(2)
                ranks[1].model.blocks.clear()
                h, stored_h = trees.store(3)
                _, stored_i = trees.store(2, parent=h[0])
                ranks[1].publish([stored_h])
                ranks[1].publish([stored_i])
                # vLLM clears rank 0's cache.
                ranks[0].vllm.publish_payload(capture[40][2])
                ranks[0].apply(msgspec.msgpack.decode(capture[40][2])[1])
                await settle(router, ranks, "after a gap and a clear")
                assert (len(ranks[0].model.blocks), len(ranks[1].model.blocks)) == (0, 5)
                assert metric(relay, "kvrelay_resyncs_total", reason="gap") == 1
                assert metric(relay, "kvrelay_events_dropped_total",
                              reason="untranslatable") == 0

            assert not any(p.is_file() for p in file_kv.rglob("*")), "records left behind"
            deadline = time.monotonic() + 20
            while any(key.startswith(f"{WORKER}/")
                      for key in await router.overlap(list(range(BLOCK)))):
                assert time.monotonic() < deadline, "the router kept the stopped worker"
                await asyncio.sleep(0.2)


def is_canary(event: RouterEvent) -> bool:
    data = event.event.data
    return (isinstance(data, DynamoEventData) and isinstance(data.stored, DynamoStoreData)
            and data.stored.blocks[0].block_hash == CANARY)


async def test_same_router_events_as_dynamos_own_relay(
        fresh_nats: NatsServer, tmp_path: Path) -> None:
    """Fed the same vLLM frames, kvrelay and Dynamo 1.6.1's own ZMQ relay (KvEventPublisher)
    publish the same RouterEvents, field for field, one message per batch (Dynamo's default,
    --dynamo-batches-per-message 1 here), in the same order:
    real vLLM 0.32 frames, int64 hashes, a LoRA adapter, a cache salt, CPU blocks, a cut
    block."""
    capture = msgspec.msgpack.decode(CAPTURE.read_bytes())
    chains = Chains(seed=9, hash_kind="int64")
    batches = [payload for _, _, payload in capture]
    variants: list[dict[str, Any]] = [{"lora_id": 1, "lora_name": "my-lora"},
                                      {"cache_salt": "tenant-a"}, {"medium": "CPU"},
                                      {"medium": None}, {}]
    for fields in variants:
        hashes, stored = chains.store(2, **fields)
        batches.append(encode_batch([stored], 1.0))
        batches.append(encode_batch([block_removed(hashes[1:], medium=fields.get(
            "medium", "GPU"))], 1.0))
    short = block_stored([11, 12], None, list(range(100, 124)))  # 1.5 blocks of tokens
    batches.append(encode_batch([short], 1.0))
    canary = [block_stored([CANARY], None, list(range(BLOCK)))]
    async with kv_event_reader(fresh_nats.url) as reader:
        with SyntheticVllm(ANY_PORT) as vllm, dynamo(
                "relay", fresh_nats.url, tmp_path / "dynamo-kv", tmp_path / "relay.log",
                vllm.address, str(WORKER)) as theirs:
            assert await theirs.read() == {"ready": True}
            async with running_dynamo_relay(tmp_path / "kvrelay-kv", nats=fresh_nats.url,
                                            instance_id=WORKER, zmq=[vllm.address],
                                            dynamo_batches_per_message=1) as relay:
                await eventually(lambda: is_ready(relay), "relay ready")
                await join(vllm, relay)
                ours = publisher(relay).publisher_id(0)
                deadline = time.monotonic() + 30
                while not {m.publisher_id for m in reader.messages} - {ours}:
                    assert time.monotonic() < deadline, (
                        f"Dynamo's relay published nothing\n{theirs.log_tail()}")
                    vllm.publish(canary)  # until Dynamo's late ZMQ subscriber is attached
                    await asyncio.sleep(0.2)
                for payload in batches:
                    vllm.publish_payload(payload)

                def after_canaries(publisher_id: int) -> list[Any]:
                    return [[msgspec.to_builtins(e) for e in m.events]
                            for m in reader.messages if m.publisher_id == publisher_id
                            and not is_canary(m.events[0])]

                await eventually(lambda: all(
                    len(after_canaries(p)) == len(batches) for p in
                    {m.publisher_id for m in reader.messages}), "both relays done", within=20)
    theirs_id = next(p for p in {m.publisher_id for m in reader.messages} if p != ours)
    mine, dynamos = after_canaries(ours), after_canaries(theirs_id)
    for messages in (mine, dynamos):
        ids = [e["event"]["event_id"] for m in messages for e in m]
        assert ids == list(range(ids[0], ids[0] + len(ids)))
        for event in (e for m in messages for e in m):
            event["event"]["event_id"] = 0
    assert mine == dynamos



async def test_dynamos_router_on_etcd_discovery(
        fresh_nats: NatsServer, etcd_server: EtcdServer, tmp_path: Path) -> None:
    """With DYN_DISCOVERY_BACKEND=etcd on both sides, Dynamo's KvRouter admits the worker the
    relay registers in etcd under its lease (the lease ID as instance ID), holds exactly the
    blocks vLLM stored on each rank, and forgets the worker once the relay revokes the lease."""
    with dynamo("router", fresh_nats.url, tmp_path / "unused", tmp_path / "router.log",
                etcd=etcd_server.url) as router:
        assert await router.read() == {"ready": True}
        async with vllm_ranks(2) as ranks:
            async with running_dynamo_relay(
                    tmp_path / "unused", nats=fresh_nats.url, discovery_backend="etcd",
                    etcd_endpoints=etcd_server.url,
                    zmq=[ranks[0].vllm.address, ranks[1].vllm.address]) as relay:
                assert relay.identity is not None
                assert relay.identity.source == "etcd-lease"
                worker = relay.identity.value
                await eventually(lambda: is_ready(relay), "relay ready")
                assert len(etcd_server.keys("v1/")) == 6  # instance, card, 2 x (channel, source)
                for rank in ranks.values():
                    await join(rank.vllm, relay)
                await until_admitted(router, ranks, relay, worker)
                trees = Chains(seed=11, hash_kind="bytes")
                a, stored_a = trees.store(4)
                _, stored_b = trees.store(2, parent=a[1])
                signed = Chains(seed=12, hash_kind="int64")
                _, stored_c = signed.store(3)
                ranks[0].publish([stored_a])
                ranks[0].publish([stored_b, block_removed([a[3]])])
                ranks[1].publish([stored_c])
                await settle(router, ranks, "stored over etcd discovery", worker)
                assert (len(ranks[0].model.blocks), len(ranks[1].model.blocks)) == (5, 3)
            assert etcd_server.keys("v1/") == [], "records left in etcd"
            deadline = time.monotonic() + 20
            while any(key.startswith(f"{worker}/")
                      for key in await router.overlap(list(range(BLOCK)))):
                assert time.monotonic() < deadline, "the router kept the stopped worker"
                await asyncio.sleep(0.2)
