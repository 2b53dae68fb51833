"""Dynamo's own relay, hosted the way a Dynamo vLLM worker hosts it, for comparison.

A DistributedRuntime (file discovery, TCP request plane, NATS event plane, all from the
environment the caller sets) with endpoint <namespace>/<component>/generate, and one
`dynamo.llm.KvEventPublisher` per DP rank subscribed to that rank's vLLM ZMQ PUB. Dynamo then
publishes RouterEvents on core NATS. Run as `python -m bench.dynamo_relay` (needs the
`bench` extra); prints READY and the version of Dynamo's runtime it loaded once the publishers
exist.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import Sequence
from typing import Final

READY: Final = "READY"
BLOCK_SIZE: Final = 16
ENVIRONMENT: Final = ("DYN_DISCOVERY_BACKEND", "DYN_FILE_KV", "DYN_REQUEST_PLANE",
                      "DYN_EVENT_PLANE", "NATS_SERVER")


async def main_async(args: argparse.Namespace) -> None:
    from dynamo import _core
    from dynamo.llm import KvEventPublisher
    from dynamo.runtime import DistributedRuntime

    loop = asyncio.get_running_loop()
    runtime = DistributedRuntime(loop, os.environ["DYN_DISCOVERY_BACKEND"],
                                 os.environ["DYN_REQUEST_PLANE"])
    endpoint = runtime.endpoint(f"{args.namespace}.{args.component}.generate")
    host, port = args.zmq.rsplit(":", 1)
    publishers = [
        KvEventPublisher(endpoint, worker_id=args.worker_id, kv_block_size=BLOCK_SIZE,
                         dp_rank=rank, zmq_endpoint=f"{host}:{int(port) + rank}", zmq_topic="")
        for rank in range(args.dp_ranks)
    ]
    version = getattr(_core, "__version__", "(version unknown)")  # not in its type stub
    print(f"{READY} ai-dynamo-runtime {version}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    del publishers
    runtime.shutdown()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dynamo_relay", description=__doc__)
    parser.add_argument("--zmq", required=True, help="endpoint of DP rank 0; rank r on port+r")
    parser.add_argument("--dp-ranks", type=int, default=1)
    parser.add_argument("--worker-id", type=int, required=True)
    parser.add_argument("--namespace", default="dynamo")
    parser.add_argument("--component", default="backend")
    args = parser.parse_args(argv)
    missing = [name for name in ENVIRONMENT if not os.environ.get(name)]
    if missing:
        parser.error(f"set {', '.join(missing)} (see DYNAMO.md)")
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main_async(args))


if __name__ == "__main__":
    main()
