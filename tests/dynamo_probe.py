"""NVIDIA Dynamo's own parts (ai-dynamo-runtime) in a process of their own, for the interop test.

    python dynamo_probe.py router NAMESPACE COMPONENT ENDPOINT BLOCK_SIZE
    python dynamo_probe.py relay NAMESPACE COMPONENT ENDPOINT BLOCK_SIZE ZMQ_ENDPOINT WORKER_ID

with Dynamo's environment (DYN_DISCOVERY_BACKEND=file with DYN_FILE_KV, or etcd with
ETCD_ENDPOINTS; DYN_REQUEST_PLANE=tcp, DYN_EVENT_PLANE=nats, NATS_SERVER). Both print
{"ready": true} once running.
- router: Dynamo's KvRouter; answers one JSON line per request line on stdin:
  {"overlap": [token ids], "lora_name": null} -> {"<worker_id>/<dp_rank>": device blocks
  matched} for every worker rank it admits; {"dump": true} -> its indexer as `dump_events()`
  returns it (a list of RouterEvents).
- relay: Dynamo's KvEventPublisher reading vLLM's ZMQ PUB (Dynamo's own relay), publishing
  until stdin closes.
Their own process keeps Dynamo's Rust runtime (threads, logging) out of the test process.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any


async def router(namespace: str, component: str, endpoint: str, block_size: int) -> None:
    from dynamo.llm import KvRouter, KvRouterConfig
    from dynamo.runtime import DistributedRuntime

    loop = asyncio.get_running_loop()
    runtime = DistributedRuntime(loop, os.environ["DYN_DISCOVERY_BACKEND"], "tcp",
                                 event_plane="nats")
    kv_router = KvRouter(runtime.endpoint(f"{namespace}.{component}.{endpoint}"), block_size,
                         KvRouterConfig())
    print(json.dumps({"ready": True}), flush=True)
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            request = json.loads(line)
            answer: Any
            if "dump" in request:
                answer = json.loads(await kv_router.dump_events())
            else:
                scores = await kv_router.get_overlap_scores(
                    request["overlap"], lora_name=request.get("lora_name"))
                answer = {f"{row['worker_id']}/{row['dp_rank']}": row["device_blocks"]
                          for row in scores["workers"]}
            print(json.dumps(answer), flush=True)
    finally:
        runtime.shutdown()


async def relay(namespace: str, component: str, endpoint: str, block_size: int,
                zmq_endpoint: str, worker_id: int) -> None:
    from dynamo.llm import KvEventPublisher
    from dynamo.runtime import DistributedRuntime

    loop = asyncio.get_running_loop()
    runtime = DistributedRuntime(loop, os.environ["DYN_DISCOVERY_BACKEND"], "tcp",
                                 event_plane="nats")
    publisher = KvEventPublisher(runtime.endpoint(f"{namespace}.{component}.{endpoint}"),
                                 worker_id=worker_id, kv_block_size=block_size,
                                 zmq_endpoint=zmq_endpoint)
    print(json.dumps({"ready": True}), flush=True)
    try:
        while await loop.run_in_executor(None, sys.stdin.readline):
            pass
    finally:
        publisher.shutdown()
        runtime.shutdown()


if __name__ == "__main__":
    role, ns, comp, ep, size, *rest = sys.argv[1:]
    if role == "router":
        asyncio.run(router(ns, comp, ep, int(size)))
    else:
        asyncio.run(relay(ns, comp, ep, int(size), rest[0], int(rest[1])))
