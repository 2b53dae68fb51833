"""ZMTP 3 SUB on the event loop: vLLM's PUB stream read without libzmq's I/O thread.

With libzmq, every batch wakes its I/O thread, which reads the TCP socket and signals the
socket's mailbox, which wakes the event loop, which then takes the message out frame by frame
(a receive and a `getsockopt(RCVMORE)` per frame, and an exception to learn it is empty). Here
the event loop reads the TCP (or IPC) socket itself and splits frames out of what arrived: one
wake-up per read, however many messages it holds.

Only what a SUB needs from a PUB is spoken (NULL mechanism): the greeting, READY, the
subscription, data frames, and heartbeats (RFC 37, ZMTP 3.1): every PING is answered with a PONG
echoing its context, and a PING's TTL is honoured: when nothing at all arrives within it, the
connection is taken for dead, closed and made again, as libzmq does. A peer speaking anything else
is closed with a clear error and retried.

The greeting says 3.0, and the subscription goes as 3.0's message (\x01 + topic). libzmq (every
4.x that vLLM's pyzmq ships) heartbeats a 3.0 peer exactly as a 3.1 one: its heartbeat timer
starts once the handshake is done whatever the peer's version, its PINGs reach a 3.0 peer, and it
answers that peer's PINGs (zmtp_engine.cpp, stream_engine_base.cpp). Saying 3.1 would oblige the
SUB to subscribe with a SUBSCRIBE command, which libzmq PUBs before 4.3.0 ignore: they would send
nothing. Our own PINGs (`heartbeat`, off by default) go only to a peer that greeted as 3.1 or
later, since 3.0 has no PING.

A message larger than `max_message` (its frames together) is refused as the header of the frame
that crosses the bound arrives: that frame and the rest of the message are skipped as their bytes
come in, never kept, and the message goes on as its first frames with `REFUSED` for the rest
(vLLM's [topic, seq, payload]: the seq stays in line, the publisher drops the batch unread), so
the read buffer never holds more than that bound and a read. A command that large resets the
connection.

While the relay is behind, it reads ahead of what it hands on, as libzmq's I/O thread does: a
large read (more waited in the kernel) is split into messages at once (PINGs answered there and
then) and its messages handed on for at most `DRAIN_TURN` seconds per turn of the event loop, so
the socket is read again between turns. Otherwise a PING would wait behind the backlog in the
kernel's buffer, and a PUB with a heartbeat timeout shorter than that backlog would drop the
relay. Reading pauses while `READ_AHEAD` messages or `max_message` bytes wait, as libzmq's SUB
stops reading at its RCVHWM.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import cast

from kvrelay.ingest.zmtpwire import (
    COMMAND,
    GREETING,
    GREETING_SIZE,
    LONG,
    MAX_CONTEXT,
    MORE,
    READY,
    REFUSED,
    ProtocolError,
    Silent,
    TooLarge,
    command,
    frame,
    ping_ttl,
    properties,
)

log = logging.getLogger("kvrelay.zmtp")

Messages = list[list[bytes]]  # whole ZMQ messages, each a list of frames
MessageSink = Callable[[Messages], None]

HANDSHAKE_TIMEOUT = 5.0
# A timer may run before the loop has read what arrived while it was busy (uvloop runs timers
# before polling sockets): silence is confirmed once more after this long before it counts.
CONFIRM = 0.01
LARGE_READ = 1 << 14  # a read this large means more is waiting in the kernel: read ahead
DRAIN_SLICE = 64  # messages handed on at a time while reading ahead
DRAIN_TURN = 0.05  # seconds of handing on per turn of the event loop before reading again
READ_AHEAD = 10_000  # messages read ahead at most (libzmq's SUB: RCVHWM), then reading pauses


class Connection(asyncio.Protocol):
    """One peer PUB: handshake, subscribe, then hand every whole message to `deliver`;
    `refused(size)` hears of each message skipped for its size."""

    def __init__(self, topic: bytes, deliver: MessageSink,
                 attached: Callable[[Connection], None],
                 closed: Callable[[Connection, Exception | None], None], *,
                 max_message: int, heartbeat: float = 0.0,
                 refused: Callable[[int], None] | None = None) -> None:
        self._topic = topic
        self._deliver = deliver
        self._attached = attached
        self._closed = closed
        self._refused = refused
        self._max_message = max_message
        self._heartbeat = heartbeat  # seconds between our PINGs; 0: none
        self._transport: asyncio.Transport | None = None
        self._greeted = False
        self._peer_minor = 0  # the peer's ZMTP 3.x minor version, from its greeting
        self.ready = False
        self._parts: list[bytes] = []
        self._room = max_message  # bytes the message in `_parts` may still take; -1: skipped
        self._skipped = 0  # bytes of the message being skipped, so far
        self._skip = 0  # bytes of a skipped frame still to come, discarded as they arrive
        self._rest = bytearray()  # an incomplete frame (or greeting) waiting for more bytes
        self._need = 0  # bytes `_rest` must hold before parsing is worth trying again
        self._error: Exception | None = None
        self._timer: asyncio.TimerHandle | None = None
        # Liveness: reads are counted; a watch started at read N finds the peer silent when
        # the count is still N as it expires.
        self._reads = 0
        self._ttl_watch: asyncio.TimerHandle | None = None  # the peer's PING TTL
        self._pong_watch: asyncio.TimerHandle | None = None  # an answer to our PING
        self._pinger: asyncio.TimerHandle | None = None
        # Read ahead: whole messages not handed on yet, each read's with its size in bytes.
        self._ahead: deque[tuple[Messages, int]] = deque()
        self._ahead_messages = 0
        self._ahead_bytes = 0
        self._draining = False
        self._paused = False
        self._lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not registered as asyncio.Transport: no isinstance here.
        self._transport = transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(GREETING)
        self._timer = asyncio.get_running_loop().call_later(
            HANDSHAKE_TIMEOUT, self._fail, ProtocolError("no ZMTP handshake within "
                                                         f"{HANDSHAKE_TIMEOUT:.0f}s"))

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._timer, self._ttl_watch, self._pong_watch, self._pinger):
            if timer is not None:
                timer.cancel()
        self._lost = True
        if self._ahead:  # now, before a new connection's messages can come
            self._deliver([m for messages, _ in self._ahead for m in messages])
            self._ahead.clear()
        self._closed(self, self._error or exc)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _fail(self, error: Exception) -> None:
        self._error = self._error or error
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        self._reads += 1
        if self._skip:  # the body of a frame over the bound: never kept
            if len(data) <= self._skip:
                self._skip -= len(data)
                return
            data = data[self._skip:]
            self._skip = 0
        rest = self._rest
        if rest:
            rest += data
            if len(rest) < self._need:
                return
            data = bytes(rest)
            rest.clear()
        try:
            pos = 0 if self.ready else self._handshake(data)
            if pos >= 0:
                self._frames(data, pos)
        except ProtocolError as exc:
            self._fail(exc)

    def _frames(self, data: bytes, pos: int) -> None:
        """Split frames out of `data` from `pos`; whole messages go to `deliver` in one call,
        or, behind, a slice per turn."""
        end = len(data)
        messages: Messages = []
        try:
            self._split(data, pos, end, messages)
        finally:  # what came whole before a protocol error is still delivered
            if messages and (self._ahead or end >= LARGE_READ):
                self._read_ahead(messages, end - pos)
            elif messages:
                self._deliver(messages)

    def _read_ahead(self, messages: Messages, size: int) -> None:
        self._ahead.append((messages, size))
        self._ahead_messages += len(messages)
        self._ahead_bytes += size
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().call_soon(self._drain)
        if not self._paused and (self._ahead_messages >= READ_AHEAD
                                 or self._ahead_bytes >= self._max_message):
            self._paused = True
            assert self._transport is not None
            self._transport.pause_reading()

    def _drain(self) -> None:
        """Hand on what was read ahead for a while; come back next turn for the rest."""
        deadline = time.perf_counter() + DRAIN_TURN
        try:
            while self._ahead:
                self._deliver(self._slice())
                if time.perf_counter() >= deadline:
                    break
        finally:
            if self._ahead:
                asyncio.get_running_loop().call_soon(self._drain)
            else:
                self._draining = False

    def _slice(self) -> Messages:
        """Up to DRAIN_SLICE messages off what was read ahead; reading resumes below half."""
        ahead = self._ahead
        taken: Messages = []
        while ahead and len(taken) < DRAIN_SLICE:
            messages, size = ahead[0]
            room = DRAIN_SLICE - len(taken)
            if len(messages) > room:  # a large read's messages go over several turns
                part = size * room // len(messages)
                ahead[0] = (messages[room:], size - part)
                messages, size = messages[:room], part
            else:
                ahead.popleft()
            taken += messages
            self._ahead_messages -= len(messages)
            self._ahead_bytes -= size
        if self._paused and not self._lost and self._ahead_messages < READ_AHEAD // 2 \
                and self._ahead_bytes < self._max_message // 2:
            self._paused = False
            assert self._transport is not None
            self._transport.resume_reading()
        return taken

    def _split(self, data: bytes, pos: int, end: int, messages: Messages) -> None:
        parts = self._parts
        room = self._room
        need = 0
        while pos < end:
            flags = data[pos]
            if flags & LONG:
                if end - pos < 9:
                    need = 9
                    break
                if data[pos + 1] | data[pos + 2] | data[pos + 3] | data[pos + 4]:
                    size = int.from_bytes(data[pos + 1:pos + 9], "big")  # 4 GiB or more
                else:  # read in place: no slice, no method call
                    size = (data[pos + 5] << 24 | data[pos + 6] << 16 | data[pos + 7] << 8
                            | data[pos + 8])
                start = pos + 9
            else:
                if end - pos < 2:
                    need = 2
                    break
                size = data[pos + 1]
                start = pos + 2
            stop = start + size
            if flags & COMMAND or not self.ready:
                if size > self._max_message:
                    raise TooLarge(size, self._max_message)
            elif size > room:  # skipped before a byte of it is kept, and its message with it
                self._skipped += size
                if flags & MORE:
                    room = -1
                else:
                    messages.append([*parts, REFUSED])
                    if self._refused is not None:
                        self._refused(sum(map(len, parts)) + self._skipped)
                    parts = self._parts = []
                    room = self._max_message
                    self._skipped = 0
                if stop > end:
                    self._skip = stop - end
                    pos = end
                    break
                pos = stop
                continue
            if stop > end:
                need = stop - pos
                break
            if flags & COMMAND:
                self._on_command(data[start:stop], stop < end)
            elif not self.ready:
                raise ProtocolError("a message before READY")
            else:
                parts.append(data[start:stop])
                if flags & MORE:
                    room -= size
                else:
                    messages.append(parts)
                    parts = self._parts = []
                    room = self._max_message
            pos = stop
        self._room = room
        if pos < end:
            self._rest += data[pos:]
            self._need = need

    def _handshake(self, data: bytes) -> int:
        """Consume the peer's greeting; the offset of its first frame, -1 while incomplete."""
        if self._greeted:
            return 0
        if len(data) < GREETING_SIZE:
            if data[:1] not in (b"", b"\xff"):
                raise ProtocolError("the peer is not a ZMTP 3 socket")
            self._rest += data
            self._need = GREETING_SIZE
            return -1
        if data[0] != 0xFF or data[9] & 1 != 1:
            raise ProtocolError("the peer is not a ZMTP 3 socket")
        if data[10] < 3:
            raise ProtocolError(f"the peer speaks ZMTP {data[10]}.x, not 3")
        self._peer_minor = 255 if data[10] > 3 else data[11]
        mechanism = data[12:32].rstrip(b"\x00")
        if mechanism != b"NULL":
            raise ProtocolError(f"the peer wants the {mechanism.decode(errors='replace')} "
                                "security mechanism; only NULL is spoken natively")
        self._greeted = True
        assert self._transport is not None
        self._transport.write(READY)
        return GREETING_SIZE

    def _on_command(self, body: bytes, followed: bool) -> None:
        """One command; `followed`: more bytes came in the same read after it."""
        if not body or len(body) < 1 + body[0]:
            raise ProtocolError("a malformed command")
        name, rest = body[1:1 + body[0]], body[1 + body[0]:]
        if name == b"PING" and self.ready:
            self._on_ping(rest, followed)
        elif name == b"READY" and not self.ready:
            kind = properties(rest).get(b"socket-type", b"")
            if kind not in (b"PUB", b"XPUB"):
                raise ProtocolError(f"the peer is a {kind.decode(errors='replace')} socket, "
                                    "not a PUB")
            self.ready = True
            if self._timer is not None:
                self._timer.cancel()
            assert self._transport is not None
            self._transport.write(frame(b"\x01" + self._topic))  # ZMTP 3.0's subscribe message
            if self._heartbeat > 0 and self._peer_minor >= 1:
                self._pinger = asyncio.get_running_loop().call_later(self._heartbeat, self._ping)
            self._attached(self)
        elif name == b"ERROR":
            raise ProtocolError(f"the peer sent ERROR: {rest[1:].decode(errors='replace')}")
        elif not self.ready:
            raise ProtocolError(f"{name.decode(errors='replace')} before READY")
        # PONG is traffic like any other; SUBSCRIBE and the like mean nothing to a SUB: ignored.

    def _on_ping(self, body: bytes, followed: bool) -> None:
        """Answer with a PONG echoing the context; watch for the TTL the peer asks for."""
        if len(body) < 2:
            raise ProtocolError("a PING without its TTL")
        assert self._transport is not None
        self._transport.write(command(b"PONG", body[2:2 + MAX_CONTEXT]))
        ttl = int.from_bytes(body[:2], "big") / 10
        if self._ttl_watch is not None:
            self._ttl_watch.cancel()  # this PING is traffic: the previous TTL is met
            self._ttl_watch = None
        if ttl > 0:
            # Bytes after the PING in this same read are traffic after it already.
            mark = self._reads - 1 if followed else self._reads
            self._ttl_watch = asyncio.get_running_loop().call_later(
                ttl, self._expire, mark, f"nothing from the peer within the {ttl:g}s TTL of "
                "its PING", False, True)

    def _ping(self) -> None:
        """Our heartbeat: a PING; nothing at all back within a heartbeat means a dead peer."""
        assert self._transport is not None
        loop = asyncio.get_running_loop()
        self._transport.write(command(b"PING", ping_ttl(self._heartbeat).to_bytes(2, "big")))
        if self._pong_watch is None:
            self._pong_watch = loop.call_later(
                self._heartbeat, self._expire, self._reads,
                f"nothing from the peer within {self._heartbeat:g}s of a PING", False, False)
        self._pinger = loop.call_later(self._heartbeat, self._ping)

    def _expire(self, mark: int, why: str, confirming: bool, peers_ttl: bool) -> None:
        """A watch ran out: close the connection if nothing arrived since read `mark` (while
        reading is paused, what the peer sent waits unread: no verdict)."""
        if self._reads != mark or self._paused:
            handle = None
        elif not confirming:
            handle = asyncio.get_running_loop().call_later(
                CONFIRM, self._expire, mark, why, True, peers_ttl)
        else:
            self._fail(Silent(why))
            return
        if peers_ttl:
            self._ttl_watch = handle
        else:
            self._pong_watch = handle
