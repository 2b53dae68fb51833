"""Outbox: a publisher's NATS protocol commands, written in one socket write per loop turn.

nats-py's publish() queues each command and wakes a flusher task, which writes and awaits the
socket's drain: at one vLLM batch per turn, that task's wake-up and the write cost more than
the batch itself. The outbox takes finished commands (PUB/HPUB bytes), and at the end of the
turn writes them all with one call on nats-py's transport. Order with nats-py's own queue holds:
while nats-py has commands not yet written, the outbox's go behind them in that queue.

This is the one module of kvrelay that touches private names of nats-py (and of asyncio's
streams). INTERNALS lists them all with what each must be; `incompatibilities` checks them on a
connected client (kvrelay/natsio/link.py does at connect, tests/test_natsio.py on every
nats-py the tests run with), so a nats-py release that drops or changes one is named, not
silently followed.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Final

import nats.protocol.parser
from mypy_extensions import mypyc_attr
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.aio.transport import TcpTransport, Transport
from nats.protocol.parser import AWAITING_CONTROL_LINE, Parser

from kvrelay.natsio.replies import ReplyGroups

log = logging.getLogger("kvrelay.outbox")

InboxHandler = Callable[[bytes, bytes], None]

# Every private name this module relies on: (owner, name, what it must be), the owner being
# the class (or module) that has it, what it must be a type's name or "method(parameters)".
INTERNALS: Final = (
    ("Client", "_process_msg", "method(sid, subject, reply, data, headers)"),
    ("Client", "_process_connect_init", "method()"),
    ("Client", "_transport", "Transport"),
    ("Client", "_ps", "Parser"),
    ("Client", "_pending", "list"),
    ("Client", "_pending_data_size", "int"),
    ("Client", "_flush_queue", "Queue"),
    ("Client", "_flusher_task", "Future"),
    ("Client", "_status", "int"),
    ("Client", "CONNECTED", "int"),
    ("Parser", "buf", "bytearray"),
    ("Parser", "state", "int"),
    ("nats.protocol.parser", "AWAITING_CONTROL_LINE", "int"),
    ("Subscription", "_id", "int"),
    ("TcpTransport", "_io_reader", "StreamReader"),
    ("TcpTransport", "_io_writer", "StreamWriter"),
    ("StreamReader", "_buffer", "bytearray"),
    ("StreamReader", "feed_data", "method(data)"),
)

_KINDS: Final[dict[str, type]] = {
    "Transport": Transport, "Parser": Parser, "list": list, "int": int,
    "Queue": asyncio.Queue, "Future": asyncio.Future, "bytearray": bytearray,
    "StreamReader": asyncio.StreamReader, "StreamWriter": asyncio.StreamWriter,
}


def check_internals(owners: Mapping[str, object]) -> list[str]:
    """What of INTERNALS the objects in `owners` (by owner name) lack or have otherwise; an
    owner left out is not checked."""
    problems = []
    for owner, name, kind in INTERNALS:
        if owner not in owners:
            continue
        where = f"{owner}.{name}"
        try:
            value = _as_nats_py_has_it(owners[owner], name)
        except AttributeError:
            problems.append(f"{where} is missing")
            continue
        if kind.startswith("method("):
            want = kind[len("method("):-1]
            if not callable(value):
                problems.append(f"{where} is {type(value).__name__}, not a method")
                continue
            try:
                got = ", ".join(inspect.signature(value).parameters)
            except (TypeError, ValueError):
                continue  # a builtin without a signature: callable is all one can check
            if got != want:
                problems.append(f"{where} takes ({got}), not ({want})")
        elif not isinstance(value, _KINDS[kind]):
            problems.append(f"{where} is {type(value).__name__}, not {kind}")
    return problems


def _as_nats_py_has_it(owner: object, name: str) -> object:
    """`owner`'s `name`; a method as nats-py's (or asyncio's) class defines it, not as a
    kvrelay subclass overrides it or kvrelay patches it on the instance."""
    for cls in type(owner).__mro__:
        if cls.__module__.startswith("kvrelay."):
            continue
        found = cls.__dict__.get(name)
        if callable(found):
            bound: object = found.__get__(owner, type(owner))
            return bound
    return getattr(owner, name)


def internals_of(nc: Client, sub: Subscription) -> dict[str, object]:
    """The owners of INTERNALS for a connected client and one of its subscriptions; the
    socket's parts only when it is TCP (a websocket takes nats-py's own path)."""
    owners: dict[str, object] = {"Client": nc, "Subscription": sub,
                                 "nats.protocol.parser": nats.protocol.parser}
    parser = getattr(nc, "_ps", None)
    if parser is not None:
        owners["Parser"] = parser
    transport = getattr(nc, "_transport", None)
    if isinstance(transport, TcpTransport):
        owners["TcpTransport"] = transport
        reader = getattr(transport, "_io_reader", None)
        if reader is not None:
            owners["StreamReader"] = reader
    return owners


def incompatibilities(nc: Client, sub: Subscription) -> list[str]:
    """What of INTERNALS this connected client and its subscription lack or have otherwise."""
    return check_internals(internals_of(nc, sub))


def subscription_sid(sub: Subscription) -> int:
    """The ID nats-py gave the subscription (what the server puts in its MSG lines)."""
    sid: int = sub._id
    return sid


def discard_unwritten(nc: Client) -> bool:
    """Forget the commands nats-py has not written yet (it would send them first after a
    reconnect, ahead of the publisher's ordered resend). False, touching nothing, when nats-py
    does not keep them as INTERNALS says."""
    if not isinstance(getattr(nc, "_pending", None), list) \
            or not isinstance(getattr(nc, "_pending_data_size", None), int):
        return False
    nc._pending = []
    nc._pending_data_size = 0
    return True


def _msg_size(data: bytes, space: int, eol: int, sid: bytes) -> int:
    """The size a `MSG <subject> <sid> <size>` line (no reply-to) gives, its subject ending at
    `space` and the line at `eol`, `sid` being b" <sid> "; -1 for another sid or anything
    else. Read in place, with no split and no int(): one of these comes per publish."""
    at = space + len(sid)
    if at >= eol or not data.startswith(sid, space):
        return -1
    size = 0
    for i in range(at, eol):
        digit = data[i] - 48
        if digit < 0 or digit > 9:
            return -1
        size = size * 10 + digit
    return size


_CONNECTED: Final[int] = getattr(Client, "CONNECTED", 1)  # checked with INTERNALS

_MAX_CUT_LINE = 1 << 16  # a protocol line longer than this without its end is not NATS


def _operation_end(data: bytes, pos: int, eol: int) -> int:
    """Where the protocol operation at `pos`, whose first line ends at `eol`, ends (possibly
    past `data`); -1 if it is not one nats-py would read."""
    if data.startswith(b"MSG ", pos) or data.startswith(b"HMSG ", pos):
        size = data[pos:eol].rsplit(b" ", 1)[-1]
        return eol + 4 + int(size) if size.isdigit() else -1
    return eol + 2  # PING, PONG, +OK, -ERR, INFO: one line


@mypyc_attr(allow_interpreted_subclasses=True)  # tests count what reaches nats-py's parser
class InboxClient(Client):
    """nats-py's client with the messages of one subscription (the publisher's reply inbox)
    handed straight to a plain function, `inbox_handler(subject, data)`.

    nats-py would wake its read task for each read of the socket, parse with regular
    expressions, build a Msg for each message and pass it through a queue to a task of its own;
    at one reply per published message that costs more than handling the reply. Here each read
    of the socket is split into protocol operations before nats-py's reader sees it: replies
    are handled right there, every other operation (PING, INFO, -ERR, other subscriptions'
    messages) goes on to nats-py whole and in order, and an operation cut by the end of a read
    waits for its rest. Replies may so be handled before other subscriptions' messages that
    came just ahead of them; nothing in the relay orders the two.
    """

    inbox_sid = -1
    inbox_handler: InboxHandler | None = None
    replies_urgent: Callable[[], bool] | None = None  # set: replies are read in groups
    replies: ReplyGroups | None = None
    _reply_msg_prefix = b""  # "MSG <inbox>": what starts a reply-inbox message on the wire
    _inbox_sid_bytes = b""  # b" <sid> ", as it stands between subject and size

    def route_inbox(self, subject: str, sid: int, handler: InboxHandler) -> None:
        """Messages of subscription `sid`, on `subject` (or subjects starting with it), go to
        `handler`."""
        self.inbox_sid = sid
        self.inbox_handler = handler
        self._reply_msg_prefix = b"MSG " + subject.encode()
        self._inbox_sid_bytes = b" %d " % sid

    async def _process_connect_init(self) -> None:
        await super()._process_connect_init()
        self._group_replies()  # a new socket after each (re)connect: group its replies
        self._read_inbox_first()  # and hook its reader

    def _group_replies(self) -> None:
        if self.replies is not None:
            self.replies.close()
            self.replies = None
        writer = _socket_writer(self)
        if self.replies_urgent is not None and writer is not None:
            self.replies = ReplyGroups(writer.transport, self.replies_urgent)

    def _read_inbox_first(self) -> None:
        transport = self._transport
        if not isinstance(transport, TcpTransport) or transport._io_reader is None:
            return  # websocket: nats-py's path only
        reader = transport._io_reader
        feed = reader.feed_data
        buffered: bytearray = reader._buffer  # type: ignore[attr-defined]  # one, kept for life
        parser = self._ps
        cut = bytearray()  # an operation cut by the end of a read, kept until the rest arrives
        # nats-py is handed whole protocol operations only, so it never holds half of one when
        # a read begins. Until that is known (just hooked, or after garbage), it gets it all.
        synced = False
        groups = self.replies

        def feed_inbox_first(data: bytes) -> None:
            nonlocal synced
            if cut:
                data = bytes(cut) + data
                cut.clear()
            if not synced:
                if buffered or parser.buf or parser.state != AWAITING_CONTROL_LINE:
                    feed(data)
                    return
                synced = True
            handler = self.inbox_handler
            prefix = self._reply_msg_prefix
            sid = self._inbox_sid_bytes
            stats = self.stats
            pos, end = 0, len(data)
            others = -1  # start of a run of operations for nats-py
            while pos < end:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    break
                if handler is not None and data.startswith(prefix, pos):
                    space = data.find(b" ", pos + len(prefix), eol)  # the subject's end
                    size = _msg_size(data, space, eol, sid) if space > 0 else -1
                    if size >= 0:
                        start = eol + 2
                        stop = start + size
                        if stop + 2 > end:
                            break
                        if others >= 0:
                            feed(data[others:pos])
                            others = -1
                        stats["in_msgs"] += 1
                        stats["in_bytes"] += stop - start
                        try:
                            handler(data[pos + 4:space], data[start:stop])
                        except Exception:
                            log.exception("could not handle a message on the reply inbox")
                        pos = stop + 2
                        continue
                after = _operation_end(data, pos, eol)
                if after < 0:  # not the protocol: nats-py's parser says so and reconnects
                    synced = False
                    feed(data[pos if others < 0 else others:])
                    return
                if after > end:
                    break
                if others < 0:
                    others = pos
                pos = after
            if others >= 0:
                feed(data[others:pos])
            if pos < end:
                if end - pos > _MAX_CUT_LINE and data.find(b"\r\n", pos) < 0:
                    synced = False  # a line this long is garbage: nats-py reports it
                    feed(data[pos:])
                    return
                cut.extend(data[pos:])
            if groups is not None:
                groups.read()

        reader.feed_data = feed_inbox_first  # type: ignore[method-assign, assignment]

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                           headers: bytes | None) -> None:
        if sid != self.inbox_sid or self.inbox_handler is None:
            # nats-py annotates headers as bytes but passes None for MSG
            await super()._process_msg(sid, subject, reply, data, headers)  # type: ignore[arg-type]
            return
        try:
            self.inbox_handler(subject, data)
        except Exception:  # this runs in nats-py's read loop, which an exception would end
            log.exception("could not handle a message on the reply inbox")


class Outbox:
    """Commands for one nats-py connection, written at the end of the event loop's turn."""

    def __init__(self, limit: int = 8 << 20) -> None:
        self._limit = limit  # bytes the socket may hold unwritten before publishers wait
        self._nc: Client | None = None
        self._out: list[bytes] = []
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: asyncio.StreamWriter | None = None  # the socket's, and its transport
        self._transport: asyncio.WriteTransport | None = None
        self._msgs = 0  # put since the last flush, for nats-py's stats
        self._bytes = 0

    def bind(self, nc: Client) -> None:
        """The connection to write to; called on the event loop that writes."""
        self._nc = nc
        self._loop = asyncio.get_running_loop()  # (get_running_loop asks the OS for the pid)

    def online(self) -> bool:
        """nats-py's connection is up: its state read directly (`Client.is_connected` is
        interpreted code, asked per message; the relay never drains a connection, the other
        state it counts as connected)."""
        nc = self._nc
        return nc is not None and nc._status == _CONNECTED

    def writable(self) -> bool:
        """Room for more: nats-py's flusher runs and neither its queue nor the socket's buffer
        is past the limit (past it, publishers take nats-py's awaiting path)."""
        nc = self._nc
        if nc is None:
            return False
        flusher = nc._flusher_task
        if flusher is None or flusher.done() or nc._pending_data_size >= self._limit:
            return False
        transport = self._socket_transport(nc)
        return transport is None or transport.get_write_buffer_size() < self._limit

    def _socket_transport(self, nc: Client) -> asyncio.WriteTransport | None:
        """The socket's transport (None unless TCP), kept while its writer is the same
        (StreamWriter.transport is interpreted code; the writer only changes with the
        connection)."""
        writer = _socket_writer(nc)
        if writer is not self._writer:
            self._writer = writer
            self._transport = writer.transport if writer is not None else None
        return self._transport

    def put(self, command: bytes, payload_size: int) -> None:
        """Send `command` (one whole protocol command) with this turn's others."""
        self._out.append(command)
        self._msgs += 1
        self._bytes += payload_size
        if not self._scheduled:
            self._scheduled = True
            (self._loop or asyncio.get_running_loop()).call_soon(self.flush)

    def collect(self) -> None:
        """The caller writes what it puts with `flush` before its turn ends: no end-of-turn
        write is scheduled for it."""
        self._scheduled = True

    def flush(self) -> None:
        """Write what this turn collected; called before any publish that goes through
        nats-py's own queue, so the order on the wire is the order of the calls."""
        self._scheduled = False
        if not self._out:
            return
        data = b"".join(self._out)
        self._out = []
        if not self.online():
            self._msgs = self._bytes = 0
            return  # the publisher's window resends it after the reconnect
        nc = self._nc
        assert nc is not None  # online
        stats = nc.stats
        msgs = self._msgs
        stats["out_msgs"] += msgs
        stats["out_bytes"] += self._bytes
        self._msgs = self._bytes = 0
        transport = self._socket_transport(nc)
        if nc._pending_data_size == 0 and transport is not None and not transport.is_closing():
            transport.write(data)
            groups = nc.replies if isinstance(nc, InboxClient) else None
            if groups is not None:
                groups.wrote(msgs)
            return
        nc._pending.append(data)
        nc._pending_data_size += len(data)
        flush_queue = nc._flush_queue
        if flush_queue is not None and flush_queue.empty():
            flush_queue.put_nowait(asyncio.get_running_loop().create_future())

    def discard(self) -> None:
        """Forget what was not written (the connection it was meant for is gone)."""
        self._out = []
        self._msgs = self._bytes = 0


def _socket_writer(nc: Client) -> asyncio.StreamWriter | None:
    transport = nc._transport
    if not isinstance(transport, TcpTransport):
        return None
    writer: asyncio.StreamWriter | None = transport._io_writer
    return writer
