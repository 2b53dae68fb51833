"""kvrelay: relay vLLM KV-cache events from ZMQ to NATS JetStream, in order and without gaps."""

from __future__ import annotations

import importlib.machinery
import importlib.util

__version__ = "0.1.0"


def compiled_modules(names: list[str]) -> list[str]:
    """Which of these modules (dotted, below `kvrelay`) load from a compiled extension
    (KVRELAY_COMPILE=1 builds), without importing them."""
    compiled = []
    for name in names:
        spec = importlib.util.find_spec(f"kvrelay.{name}")
        origin = spec.origin if spec is not None else None
        if origin is not None and origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
            compiled.append(name)
    return compiled


def build() -> str:
    """'compiled' when the per-batch path is mypyc-compiled, else 'python'."""
    return "compiled" if compiled_modules(["jetstream.publisher"]) else "python"
