"""Dynamo's own KV router (ai-dynamo-runtime) in a process of its own, for the interop test.

Usage: python dynamo_router_probe.py NAMESPACE COMPONENT ENDPOINT BLOCK_SIZE, with Dynamo's
environment (DYN_DISCOVERY_BACKEND=file, DYN_FILE_KV, DYN_REQUEST_PLANE=tcp,
DYN_EVENT_PLANE=nats, NATS_SERVER). Prints {"ready": true} once the router runs, then answers
one JSON line per request line on stdin:
- {"overlap": [token ids], "lora_name": null}: {"<worker_id>/<dp_rank>": device blocks matched}
  for every worker rank the router admits;
- {"dump": true}: the router's indexer as `dump_events()` returns it (a list of RouterEvents).
Its own process keeps Dynamo's Rust runtime (threads, logging) out of the test process.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any


async def serve(namespace: str, component: str, endpoint: str, block_size: int) -> None:
    from dynamo.llm import KvRouter, KvRouterConfig
    from dynamo.runtime import DistributedRuntime

    loop = asyncio.get_running_loop()
    runtime = DistributedRuntime(loop, "file", "tcp", event_plane="nats")
    router = KvRouter(runtime.endpoint(f"{namespace}.{component}.{endpoint}"), block_size,
                      KvRouterConfig())
    print(json.dumps({"ready": True}), flush=True)
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            request = json.loads(line)
            answer: Any
            if "dump" in request:
                answer = json.loads(await router.dump_events())
            else:
                scores = await router.get_overlap_scores(
                    request["overlap"], lora_name=request.get("lora_name"))
                answer = {f"{row['worker_id']}/{row['dp_rank']}": row["device_blocks"]
                          for row in scores["workers"]}
            print(json.dumps(answer), flush=True)
    finally:
        runtime.shutdown()


if __name__ == "__main__":
    ns, comp, ep, size = sys.argv[1:5]
    asyncio.run(serve(ns, comp, ep, int(size)))
