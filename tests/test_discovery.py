"""Instance-ID discovery: the pod-name hash Dynamo uses, and the order of sources."""

from __future__ import annotations

import socket

import pytest

from relay.discovery import hash_pod_name, resolve_instance_id, siphash13

# CONTRACT.md section 3: Dynamo's hash_pod_name over these names.
POD_NAME_VECTORS = [
    ("worker-0", 1186445869714687),
    ("worker-99999", 7410589986301036),
    ("deployment-with-hash-suffix-a1b2c3d4e5f6", 2590930466072916),
    ("fake-name-1-0-worker-nrdfv", 1009006049675451),
]


@pytest.mark.parametrize(("name", "expected"), POD_NAME_VECTORS)
def test_pod_name_hash_matches_dynamo(name: str, expected: int) -> None:
    """hash_pod_name gives exactly the IDs Dynamo's Kubernetes discovery assigns."""
    assert hash_pod_name(name) == expected


def test_siphash13_covers_every_tail_length() -> None:
    """Inputs of every length mod 8 hash to distinct values (the tail word is mixed in)."""
    digests = {siphash13(bytes(range(n))) for n in range(17)}
    assert len(digests) == 17


def test_explicit_id_wins() -> None:
    """--instance-id beats POD_NAME."""
    found = resolve_instance_id(42, {"POD_NAME": "worker-0"})
    assert (found.value, found.source) == (42, "explicit")


def test_pod_name_used_when_no_explicit_id() -> None:
    """POD_NAME from the downward API gives the pod-name hash."""
    found = resolve_instance_id(None, {"POD_NAME": "worker-0"})
    assert (found.value, found.source) == (1186445869714687, "pod-name-hash")


def test_hostname_used_without_pod_name() -> None:
    """Outside Kubernetes the hostname stands in for the pod name, as in Dynamo."""
    found = resolve_instance_id(None, {})
    assert found.source == "hostname-hash"
    assert found.value == hash_pod_name(socket.gethostname())
