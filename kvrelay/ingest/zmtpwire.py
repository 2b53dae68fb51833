"""ZMTP 3 as bytes, for the native reader (kvrelay/ingest/zmtp.py): frames, commands, the greeting
and READY a SUB sends, the errors that close a connection, and what stands in for a message
refused unread."""

from __future__ import annotations

import math

MORE, LONG, COMMAND = 1, 2, 4  # a frame's flags
GREETING_SIZE = 64
# Signature, version 3.0, mechanism NULL, as-server 0, filler.
GREETING = (b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00")
            + b"\x00" + bytes(31))
MAX_CONTEXT = 16  # a PING's context is at most 16 bytes; libzmq echoes no more either
# libzmq keeps a PING's TTL in milliseconds in 16 bits: above 65.5 s it wraps around, so the
# TTL sent with our own PINGs stays below that.
MAX_TTL_DECISECONDS = 655

# The last frame of a message refused for its size (--max-batch-bytes), in place of what was
# skipped unread: the message keeps its place in the stream (its seq is known), and the
# publisher drops it as `too_large` before any decoding (`kvrelay.publish.common.read_frame`),
# knowing it by identity: a vLLM payload of the same bytes is another object. 0xc1 is the one
# byte msgpack never uses: no decoder reads these bytes as a vLLM batch.
REFUSED = b"\xc1 refused unread: above --max-batch-bytes"


class ProtocolError(Exception):
    """The peer does not speak ZMTP 3 PUB with the NULL mechanism."""


class TooLarge(ProtocolError):
    """The peer announced a command (or a frame before READY) above the bound: refused
    unread, the connection reset."""

    def __init__(self, size: int, bound: int) -> None:
        super().__init__(f"refused a frame of {size} bytes, over the bound of {bound} bytes")
        self.size = size


class Silent(ProtocolError):
    """Nothing arrived from the peer within the time a heartbeat allowed."""


def ping_ttl(heartbeat: float) -> int:
    """The TTL our PINGs carry, in deciseconds: three heartbeats, capped where libzmq reads it
    right."""
    return min(MAX_TTL_DECISECONDS, math.ceil(heartbeat * 30))


def frame(body: bytes, flags: int = 0) -> bytes:
    """One frame: flags, then a 1-byte size or (long) an 8-byte one, then the body."""
    if len(body) < 256:
        return bytes([flags, len(body)]) + body
    return bytes([flags | LONG]) + len(body).to_bytes(8, "big") + body


def command(name: bytes, body: bytes) -> bytes:
    return frame(bytes([len(name)]) + name + body, COMMAND)


def properties(body: bytes) -> dict[bytes, bytes]:
    """The metadata of a READY command, by lower-cased name."""
    props: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(body):
        size = body[pos]
        name = body[pos + 1:pos + 1 + size]
        pos += 1 + size
        if pos + 4 > len(body):
            raise ProtocolError("truncated READY properties")
        value_size = int.from_bytes(body[pos:pos + 4], "big")
        props[name.lower()] = body[pos + 4:pos + 4 + value_size]
        pos += 4 + value_size
    return props


READY = command(b"READY", b"\x0bSocket-Type" + (3).to_bytes(4, "big") + b"SUB")
