"""The floor: the relay anyone would write first, to show what kvrelay's design buys.

Per vLLM publisher: await each ZMQ message, decode the batch, and for each event await one
JetStream publish (one message per event, no window, no dedup id, no gap handling). Run as
`python -m bench.naive`; prints READY once connected and subscribed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Sequence
from typing import Any, Final

import msgspec
import nats
import nats.js.errors
import uvloop
import zmq
import zmq.asyncio
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

STREAM: Final = "NAIVE"
SUBJECTS: Final = "naive.>"
READY: Final = "READY"

_decode = msgspec.msgpack.Decoder().decode
_encode = msgspec.msgpack.Encoder().encode


def subject(worker_id: int, dp_rank: int) -> str:
    return f"naive.{worker_id}.{dp_rank}"


async def relay_rank(sock: zmq.asyncio.Socket, js: JetStreamContext, worker_id: int,
                     dp_rank: int) -> None:
    subj = subject(worker_id, dp_rank)
    while True:
        _topic, raw_seq, payload = await sock.recv_multipart()
        seq = int.from_bytes(raw_seq, "big")
        batch: Any = _decode(payload)
        ts, events = (batch[0], batch[1]) if isinstance(batch, list) else (
            batch["ts"], batch["events"])
        for index, event in enumerate(events):
            await js.publish(subj, _encode((ts, seq, index, event)))


async def main_async(zmq_endpoint: str, dp_ranks: int, nats_url: str, worker_id: int) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    with contextlib.suppress(nats.js.errors.BadRequestError):  # another created it first
        await js.add_stream(StreamConfig(name=STREAM, subjects=[SUBJECTS],
                                         storage=StorageType.FILE))
    ctx = zmq.asyncio.Context()
    host, port = zmq_endpoint.rsplit(":", 1)
    tasks = []
    for rank in range(dp_ranks):
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(f"{host}:{int(port) + rank}")
        tasks.append(asyncio.ensure_future(relay_rank(sock, js, worker_id, rank)))
    print(READY, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    ctx.destroy(linger=0)
    await nc.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.naive", description=__doc__)
    parser.add_argument("--zmq", required=True, help="endpoint of DP rank 0; rank r on port+r")
    parser.add_argument("--dp-ranks", type=int, default=1)
    parser.add_argument("--nats", required=True)
    parser.add_argument("--worker-id", type=int, required=True)
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main_async(args.zmq, args.dp_ranks, args.nats, args.worker_id))


if __name__ == "__main__":
    main()
