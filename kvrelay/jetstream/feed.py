"""The pipe between the relay and its snapshot process: frames one way, report lines the other.

Relay to snapshot process, on the child's stdin: frames of a fixed 15-byte head (body length
u32, kind u8, DP rank u16, stream sequence u64, little-endian) and a body. The first frame is
SETUP (the settings, JSON); then STORED (the body a stored batch's payload, as JetStream holds
it), GAP (stored batches of the rank were not passed on), READY (the stream exists) and FINAL
(the body the seconds left for the last snapshot, as text). End of file: stop.

Snapshot process to relay, on its stdout: one JSON array per line, the `Reports` call and its
arguments, e.g. `["written", 0, 1234, 56789, 1764000000.0]`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Final

import msgspec

from kvrelay.jetstream.reports import Reports

HEAD: Final = struct.Struct("<IBHQ")
SETUP: Final = 0
STORED: Final = 1
GAP: Final = 2
READY: Final = 3
FINAL: Final = 4
KINDS: Final = frozenset((SETUP, STORED, GAP, READY, FINAL))


def frame(kind: int, body: bytes = b"", dp_rank: int = 0, stream_seq: int = 0) -> bytes:
    return HEAD.pack(len(body), kind, dp_rank, stream_seq) + body


class FrameReader:
    """Splits the bytes of the pipe into frames, however they were cut."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
        """The frames (kind, DP rank, stream sequence, body) completed by `data`; ValueError
        on a frame of unknown kind (not this protocol)."""
        buf = self._buf
        buf += data
        start, size, head = 0, len(buf), HEAD.size
        try:
            while size - start >= head:
                length, kind, dp_rank, stream_seq = HEAD.unpack_from(buf, start)
                end = start + head + length
                if end > size:
                    break
                if kind not in KINDS:
                    raise ValueError(f"not a snapshot feed frame (kind {kind})")
                yield kind, dp_rank, stream_seq, bytes(buf[start + head:end])
                start = end
        finally:
            del buf[:start]


_CALLS: Final = ("failed", "built", "written", "live")


class LineReports(Reports):
    """Reports written as lines by `write` (the snapshot process's side)."""

    def __init__(self, write: Callable[[bytes], object]) -> None:
        self._write = write

    def _send(self, *call: object) -> None:
        self._write(msgspec.json.encode(call) + b"\n")

    def failed(self, reason: str) -> None:
        self._send("failed", reason)

    def built(self, cpu: float) -> None:
        self._send("built", cpu)

    def written(self, dp_rank: int, stream_seq: int, size: int, at: float) -> None:
        self._send("written", dp_rank, stream_seq, size, at)

    def live(self, dp_rank: int, stream_seq: int) -> None:
        self._send("live", dp_rank, stream_seq)


def replay_line(line: bytes, reports: Reports) -> bool:
    """Make the call a report line records on `reports`; False when the line is not one."""
    try:
        call = msgspec.json.decode(line)
        if not isinstance(call, list) or not call or call[0] not in _CALLS:
            return False
        getattr(reports, call[0])(*call[1:])
    except (msgspec.DecodeError, TypeError, ValueError):
        return False
    return True
