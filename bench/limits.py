"""Raw limits of the parts a relay is made of, measured in the same run with the same payloads.

Each is measured in its own processes (sender and receiver apart), the fast way LIMITS.md
describes: ZMQ PUB -> SUB with blocking receives; nats-py core publish without a flush per
message; JetStream one awaited publish at a time (the naive relay's way) and with a window of
4,000 pending acks on one wildcard inbox with `Nats-Msg-Id` (kvrelay's way).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

import msgspec
import nats
import nats.js.errors
import uvloop
import zmq
from nats.aio.msg import Msg
from nats.js.api import StorageType, StreamConfig

from bench.workload import Pool, ts_field
from kvrelay.codec import Codec
from kvrelay.testing.natsserver import NatsServer, free_port
from kvrelay.wire.schema import RelayBatch

WINDOW: Final = 4000
SUBJECT: Final = "limits.bench"
_SPAWN = multiprocessing.get_context("spawn")
_STOP = b"stop"


def sample_payloads(pool: Pool, count: int = 1024) -> tuple[list[bytes], list[bytes]]:
    """Up to `count` vLLM batches of `pool`'s cycle, and the RelayBatch kvrelay would publish
    for each."""
    codec = Codec()
    vllm = [pool.payload(i, ts_field(time.time()))
            for i in range(pool.prefix, pool.prefix + min(count, pool.cycle))]
    relayed = []
    for seq, payload in enumerate(vllm):
        decoded = codec.decode(payload)
        relayed.append(codec.encode(RelayBatch(
            instance_id=1, dp_rank=0, epoch=0, seq=seq, ts=decoded.ts, relay_ts=time.time(),
            events=list(decoded.events))))
    return vllm, relayed


# -- process plumbing -----------------------------------------------------------------------------


def _returning(conn: Connection, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """Process entry: send back what `fn` returns, or the error it raised."""
    try:
        conn.send(("ok", fn(*args)))
    except Exception as exc:
        conn.send(("error", repr(exc)))


def launch(fn: Callable[..., Any], *args: Any) -> tuple[multiprocessing.process.BaseProcess,
                                                      Connection]:
    """Run `fn(*args)` in a process of its own; `outcome` collects what it returns."""
    parent, child = _SPAWN.Pipe()
    proc = _SPAWN.Process(target=_returning, args=(child, fn, args), daemon=True)
    proc.start()
    return proc, parent


def launch_listening(fn: Callable[..., Any], *args: Any, timeout: float = 30.0
                     ) -> tuple[multiprocessing.process.BaseProcess, Connection]:
    """`launch` for a receiver: `fn(*args, conn)` says when it listens, and this waits for it."""
    parent, child = _SPAWN.Pipe()
    proc = _SPAWN.Process(target=_returning, args=(child, fn, (*args, child)), daemon=True)
    proc.start()
    if not parent.poll(timeout):
        proc.kill()
        raise RuntimeError(f"{fn.__name__} did not start listening")
    parent.recv()
    return proc, parent


def outcome(proc: multiprocessing.process.BaseProcess, conn: Connection, timeout: float) -> Any:
    """What a launched measurement returned (its error raised here); the process is reaped."""
    try:
        if not conn.poll(timeout):
            raise RuntimeError("a limit measurement did not finish in time")
        status, value = conn.recv()
        if status != "ok":
            raise RuntimeError(value)
        return value
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()


def run_async(coro: Any) -> Any:
    """Run `coro` on a fresh uvloop loop, as the relay runs."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


# -- ZMQ ------------------------------------------------------------------------------------------


def _zmq_send(endpoint: str, payloads: list[bytes], duration: float) -> int:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.XPUB)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    if not sock.poll(10_000, zmq.POLLIN):
        raise TimeoutError("no subscriber")
    sock.recv()
    sent = 0
    n = len(payloads)
    end = time.perf_counter() + duration
    while time.perf_counter() < end:
        for _ in range(256):
            sock.send_multipart([b"kv-events", sent.to_bytes(8, "big"), payloads[sent % n]])
            sent += 1
    for _ in range(50):  # the SUB may be behind and drop some; it needs only one
        time.sleep(0.02)
        sock.send_multipart([_STOP])
    sock.close()
    ctx.term()
    return sent


def _zmq_receive(endpoint: str, timeout: float) -> float:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.setsockopt(zmq.RCVTIMEO, int(timeout * 1000))
    sock.connect(endpoint)
    count = 0
    first = last = 0.0
    try:
        while True:
            frames = sock.recv_multipart()
            if len(frames) == 1:
                break
            last = time.perf_counter()
            if not count:
                first = last
            count += 1
    except zmq.Again:
        pass
    sock.close(linger=0)
    ctx.term()
    return (count - 1) / (last - first) if count > 1 else 0.0


def zmq_limit(payloads: list[bytes], duration: float) -> float:
    """Messages/s a SUB takes from a PUB in another process, vLLM's frames and payloads."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    receiver = launch(_zmq_receive, endpoint, duration + 10)
    sender = launch(_zmq_send, endpoint, payloads, duration)
    outcome(*sender, duration + 30)
    return float(outcome(*receiver, duration + 30))


# -- NATS -----------------------------------------------------------------------------------------


async def _core_publish(url: str, payloads: list[bytes], duration: float) -> float:
    nc = await nats.connect(url)
    n, sent = len(payloads), 0
    start = time.perf_counter()
    end = start + duration
    while time.perf_counter() < end:
        for _ in range(256):
            await nc.publish(SUBJECT, payloads[sent % n])
            sent += 1
    await nc.flush()
    elapsed = time.perf_counter() - start
    await nc.close()
    return sent / elapsed


async def _core_subscribe(url: str, conn: Connection, duration: float) -> int:
    nc = await nats.connect(url)
    received = 0

    async def count(_msg: Msg) -> None:
        nonlocal received
        received += 1

    await nc.subscribe(SUBJECT, cb=count, pending_msgs_limit=-1, pending_bytes_limit=-1)
    await nc.flush()
    conn.send("subscribed")
    await asyncio.sleep(duration + 2)
    await nc.close()
    return received


def _subscriber(url: str, duration: float, conn: Connection) -> int:
    return int(run_async(_core_subscribe(url, conn, duration)))


async def _ensure_stream(js: Any) -> None:
    with contextlib.suppress(nats.js.errors.BadRequestError):
        await js.add_stream(StreamConfig(name="LIMITS", subjects=["limits.>"],
                                         storage=StorageType.FILE))


async def _js_await(url: str, payloads: list[bytes], duration: float) -> float:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await _ensure_stream(js)
    n, sent = len(payloads), 0
    start = time.perf_counter()
    while time.perf_counter() - start < duration:
        await js.publish(SUBJECT, payloads[sent % n])
        sent += 1
    elapsed = time.perf_counter() - start
    await nc.close()
    return sent / elapsed


async def _js_window(url: str, payloads: list[bytes], duration: float) -> float:
    nc = await nats.connect(url)
    await _ensure_stream(nc.jetstream())
    window = asyncio.Semaphore(WINDOW)
    inbox = nc.new_inbox() + "."
    acked = 0
    ack_decoder = msgspec.json.Decoder()

    async def on_ack(msg: Msg) -> None:
        nonlocal acked
        if "error" not in ack_decoder.decode(msg.data):
            acked += 1
        window.release()

    await nc.subscribe(inbox + "*", cb=on_ack)
    n, sent = len(payloads), 0
    start = time.perf_counter()
    while time.perf_counter() - start < duration:
        await window.acquire()
        await nc.publish(SUBJECT, payloads[sent % n], reply=f"{inbox}{sent}",
                         headers={"Nats-Msg-Id": f"limits.{sent}"})
        sent += 1
    for _ in range(WINDOW):  # wait for the acks still outstanding
        await window.acquire()
    elapsed = time.perf_counter() - start
    await nc.close()
    return acked / elapsed


def _in_loop(fn: Callable[..., Any], *args: Any) -> float:
    return float(run_async(fn(*args)))


def nats_limits(payloads: list[bytes], duration: float) -> dict[str, float]:
    """Core publish, awaited JetStream publish and windowed JetStream publish, in msg/s."""
    with tempfile.TemporaryDirectory(prefix="kvrelay-limits-") as tmp, \
            NatsServer(Path(tmp) / "nats", name="limits") as server:
        subscriber = launch_listening(_subscriber, server.url, duration)
        core = outcome(*launch(_in_loop, _core_publish, server.url, payloads, duration),
                       duration + 60)
        outcome(*subscriber, duration + 30)
        awaited = outcome(*launch(_in_loop, _js_await, server.url, payloads, duration),
                          duration + 60)
        windowed = outcome(*launch(_in_loop, _js_window, server.url, payloads, duration),
                           duration + 60)
    return {"nats_core_publish": core, "jetstream_publish_await": awaited,
            "jetstream_publish_window": windowed}


def measure_limits(vllm: list[bytes], relayed: list[bytes], duration: float
                   ) -> dict[str, float]:
    """Every raw limit, msg/s, with `sample_payloads`' vLLM batches and RelayBatches."""
    return {"zmq_pub_sub": zmq_limit(vllm, duration), **nats_limits(relayed, duration)}
