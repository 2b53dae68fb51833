"""Worker instance-ID discovery: the ID the relay publishes under, and how it was found.

Sources, first that applies (CONTRACT.md section 3): an explicit setting, then Dynamo's pod-name
hash, which is the ID Dynamo's Kubernetes discovery gives the worker, so relay and worker agree
without talking.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import NamedTuple

log = logging.getLogger("kvrelay.discovery")

_MASK64 = 0xFFFF_FFFF_FFFF_FFFF
POD_NAME_HASH_MASK = 0x001F_FFFF_FFFF_FFFF  # Dynamo keeps IDs below 2**53 for JSON peers


class InstanceId(NamedTuple):
    value: int
    source: str  # "explicit" | "pod-name-hash" | "hostname-hash"
    detail: str


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & _MASK64


def siphash13(data: bytes, k0: int = 0, k1: int = 0) -> int:
    """SipHash-1-3, the algorithm behind Rust's `DefaultHasher` (which uses zero keys)."""
    v0 = k0 ^ 0x736F6D6570736575
    v1 = k1 ^ 0x646F72616E646F6D
    v2 = k0 ^ 0x6C7967656E657261
    v3 = k1 ^ 0x7465646279746573

    def sipround() -> None:
        nonlocal v0, v1, v2, v3
        v0 = (v0 + v1) & _MASK64
        v1 = _rotl(v1, 13) ^ v0
        v0 = _rotl(v0, 32)
        v2 = (v2 + v3) & _MASK64
        v3 = _rotl(v3, 16) ^ v2
        v0 = (v0 + v3) & _MASK64
        v3 = _rotl(v3, 21) ^ v0
        v2 = (v2 + v1) & _MASK64
        v1 = _rotl(v1, 17) ^ v2
        v2 = _rotl(v2, 32)

    tail_start = len(data) - len(data) % 8
    for i in range(0, tail_start, 8):
        m = int.from_bytes(data[i : i + 8], "little")
        v3 ^= m
        sipround()
        v0 ^= m
    b = ((len(data) & 0xFF) << 56) | int.from_bytes(data[tail_start:], "little")
    v3 ^= b
    sipround()
    v0 ^= b
    v2 ^= 0xFF
    for _ in range(3):
        sipround()
    return v0 ^ v1 ^ v2 ^ v3


def hash_pod_name(name: str) -> int:
    """Dynamo's `hash_pod_name`: Rust hashes a str as its UTF-8 bytes then one 0xff byte."""
    return siphash13(name.encode() + b"\xff") & POD_NAME_HASH_MASK


def resolve_instance_id(explicit: int | None, env: Mapping[str, str] | None = None) -> InstanceId:
    """The instance ID to publish under, from the first source that applies."""
    env = os.environ if env is None else env
    if explicit is not None:
        return InstanceId(explicit, "explicit", "--instance-id / KVRELAY_INSTANCE_ID")
    backend = env.get("DYN_DISCOVERY_BACKEND", "")
    if backend in ("kubernetes", "etcd"):
        log.warning(
            "DYN_DISCOVERY_BACKEND=%s: reading the worker's registration is not supported yet; "
            "using the pod-name hash, which is the ID Dynamo's Kubernetes discovery assigns",
            backend,
        )
    pod_name = env.get("POD_NAME")
    if pod_name:
        return InstanceId(hash_pod_name(pod_name), "pod-name-hash", f"POD_NAME={pod_name}")
    host = socket.gethostname()
    return InstanceId(hash_pod_name(host), "hostname-hash", f"hostname={host}")
