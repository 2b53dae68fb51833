"""Dynamo's registration records, as the discovery sources read them.

A Dynamo worker registers each of its endpoints as a `DiscoveryInstance::Endpoint`
(ai-dynamo/dynamo lib/runtime/src/discovery/mod.rs and component.rs), JSON like

    {"type": "Endpoint", "namespace": "dynamo", "component": "backend", "endpoint": "generate",
     "instance_id": 7587869231021586437, "transport": {"tcp": "10.0.0.5:36125/694d.../generate"}}

`transport` is one of `{"tcp": "host:port/<id hex>/<endpoint>"}`, `{"http":
"http://host:port/v1/rpc/<endpoint>"}` or `{"nats_tcp": "<subject>"}`. Every endpoint of one
worker process carries the same instance_id, which is the ID its KV events are published under.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import msgspec


class DynamoEndpoint(msgspec.Struct):
    """One registered endpoint of a worker; unknown fields (device_type, ...) are ignored."""

    namespace: str
    component: str
    endpoint: str
    instance_id: int
    transport: dict[str, Any] = {}
    type: str = "Endpoint"


def worker_ids(endpoints: Iterable[DynamoEndpoint], namespace: str,
               component: str) -> tuple[set[int], bool]:
    """The distinct instance IDs, preferring endpoints of the relay's namespace and component.

    Returns the IDs and whether they came from matching endpoints (False: none matched, so the
    IDs of every endpoint given).
    """
    listed = [e for e in endpoints if e.type == "Endpoint"]
    matching = {e.instance_id for e in listed
                if e.namespace == namespace and e.component == component}
    if matching:
        return matching, True
    return {e.instance_id for e in listed}, False


def transport_address(endpoint: DynamoEndpoint) -> tuple[str, int | None] | None:
    """(host, port) the worker serves requests on; None for NATS (no address to match)."""
    transport = endpoint.transport
    if isinstance(transport.get("http"), str):
        url = urlsplit(transport["http"])
        return (url.hostname or "", url.port) if url.hostname else None
    raw = transport.get("tcp")
    if not isinstance(raw, str):
        return None
    address = raw.removeprefix("tcp://").split("/", 1)[0]
    if address.startswith("["):  # [v6]:port
        host, _, rest = address[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, _, port_text = address.rpartition(":")
        if not host:
            host, port_text = address, ""
    return host.lower(), int(port_text) if port_text.isdigit() else None
