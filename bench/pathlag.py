"""Lag of the NATS path alone, at an offered rate: no relay, so the floor any relay stands on.

A paced publisher (the feeder's bursts, one per tick) sends kvrelay's payloads straight into
nats-server and a subscriber in another process times each message from its send time:
- core: core publish -> core subscription, the path of Dynamo's plane (`dynamo`,
  `kvrelay-dynamo`);
- JetStream: windowed publish with `Nats-Msg-Id` into a file stream -> ordered push consumer,
  the path of `kvrelay` and the consumer the bench reads it with.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import tempfile
import time
from array import array
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Final

import nats
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy, StorageType, StreamConfig

from bench.consumer import percentiles
from bench.limits import WINDOW, launch, launch_listening, outcome, run_async
from kvrelay.testing.natsserver import NatsServer

SUBJECT: Final = "pathlag.bench"
STREAM: Final = "PATHLAG"
PATHS: Final = ("core", "jetstream")
_STAMP = struct.Struct("<d")
_SETTLE = 10.0  # seconds the subscriber waits past the run for stragglers


async def _receive(url: str, jetstream: bool, expected: int, duration: float,
                   conn: Connection) -> list[float]:
    nc = await nats.connect(url)
    lags: list[float] = []
    done = asyncio.Event()

    async def on_msg(msg: Msg) -> None:
        lags.append(time.time() - _STAMP.unpack_from(msg.data)[0])
        if len(lags) >= expected:
            done.set()

    if jetstream:
        await nc.jetstream().subscribe(SUBJECT, stream=STREAM, cb=on_msg,
                                       ordered_consumer=True, deliver_policy=DeliverPolicy.NEW)
    else:
        await nc.subscribe(SUBJECT, cb=on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1)
    await nc.flush()
    conn.send("subscribed")
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), duration + _SETTLE)
    await nc.close()
    # The first second is warm-up, as in a trial: connections and the stream settle first.
    measured = array("d", lags[min(len(lags) // 2, int(expected / max(duration, 1.0))):])
    if not measured:
        raise RuntimeError("nothing arrived on the NATS path")
    return [v * 1000 for v in percentiles(measured, (50.0, 99.0))[:2]]


def _receiver(url: str, jetstream: bool, expected: int, duration: float,
              conn: Connection) -> list[float]:
    lags: list[float] = run_async(_receive(url, jetstream, expected, duration, conn))
    return lags


async def _send(url: str, jetstream: bool, payloads: list[bytes], rate: float,
                duration: float, tick: float) -> int:
    nc = await nats.connect(url)
    window = asyncio.Semaphore(WINDOW)
    inbox = nc.new_inbox() + "."

    async def on_ack(_msg: Msg) -> None:
        window.release()

    await nc.subscribe(inbox + "*", cb=on_ack)
    per_tick = max(1, round(rate * tick))
    total, sent, n = round(rate * duration), 0, len(payloads)
    due = time.perf_counter()
    while sent < total:
        for _ in range(min(per_tick, total - sent)):
            data = _STAMP.pack(time.time()) + payloads[sent % n]
            if jetstream:
                await window.acquire()
                await nc.publish(SUBJECT, data, reply=f"{inbox}{sent}",
                                 headers={"Nats-Msg-Id": f"pathlag.{sent}"})
            else:
                await nc.publish(SUBJECT, data)
            sent += 1
        due += tick
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
    await nc.flush()
    for _ in range(WINDOW if jetstream else 0):  # the acks still outstanding
        await window.acquire()
    await nc.close()
    return sent


def _sender(url: str, jetstream: bool, payloads: list[bytes], rate: float, duration: float,
            tick: float) -> int:
    return int(run_async(_send(url, jetstream, payloads, rate, duration, tick)))


async def _make_stream(url: str) -> None:
    nc = await nats.connect(url)
    with contextlib.suppress(nats.js.errors.BadRequestError):
        await nc.jetstream().add_stream(StreamConfig(
            name=STREAM, subjects=[SUBJECT], storage=StorageType.FILE, duplicate_window=120.0))
    await nc.close()


def measure_path_lag(payloads: list[bytes], rate: float, duration: float,
                     tick: float = 0.001) -> dict[str, float]:
    """p50 and p99 lag in ms of each NATS path at `rate` messages/s: `core_p50_ms`, ..."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="kvrelay-pathlag-") as tmp, \
            NatsServer(Path(tmp) / "nats", name="pathlag") as server:
        run_async(_make_stream(server.url))
        for path in PATHS:
            jetstream = path == "jetstream"
            receiver = launch_listening(_receiver, server.url, jetstream,
                                        round(rate * duration), duration)
            outcome(*launch(_sender, server.url, jetstream, payloads, rate, duration, tick),
                    duration + 60)
            p50, p99 = outcome(*receiver, duration + _SETTLE + 30)
            out[f"{path}_p50_ms"], out[f"{path}_p99_ms"] = p50, p99
    return out
