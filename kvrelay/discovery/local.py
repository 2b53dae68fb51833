"""Sources that need nothing but this process: an explicit ID, and Dynamo's pod-name hash.

The hash is the ID Dynamo's Kubernetes discovery gives a worker (`hash_pod_name` in
ai-dynamo/dynamo lib/runtime/src/discovery/kube/utils.rs), so relay and worker agree without
talking: Rust's `DefaultHasher` (SipHash-1-3 with zero keys) over the name as Rust hashes a
`str`, masked to 53 bits.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping

from kvrelay.discovery.base import InstanceId, Source

_MASK64 = 0xFFFF_FFFF_FFFF_FFFF
POD_NAME_HASH_MASK = 0x001F_FFFF_FFFF_FFFF  # Dynamo keeps IDs below 2**53 for JSON peers


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


class ExplicitSource(Source):
    """--instance-id / KVRELAY_INSTANCE_ID: the operator knows best."""

    name = "explicit"

    def __init__(self, value: int) -> None:
        self._value = value
        super().__init__()

    @property
    def target(self) -> str:
        return "--instance-id / KVRELAY_INSTANCE_ID"

    async def resolve(self) -> InstanceId:
        return InstanceId(self._value, self.name, self.target)


class PodNameHashSource(Source):
    """Dynamo's pod-name hash of POD_NAME (downward API), else of the hostname."""

    name = "pod-name-hash"

    def __init__(self, env: Mapping[str, str]) -> None:
        pod_name = env.get("POD_NAME", "")
        if pod_name:
            self._label, self._pod_name, self._detail = (
                "pod-name-hash", pod_name, f"POD_NAME={pod_name}")
        else:
            host = socket.gethostname()
            self._label, self._pod_name, self._detail = (
                "hostname-hash", host, f"hostname={host}")
        super().__init__()

    @property
    def target(self) -> str:
        return f"hash of {self._detail}"

    async def resolve(self) -> InstanceId:
        return InstanceId(hash_pod_name(self._pod_name), self._label, self._detail)
