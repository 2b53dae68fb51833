"""Outbox: a publisher's NATS protocol commands, written in one socket write per loop turn.

nats-py's publish() queues each command and wakes a flusher task, which writes and awaits the
socket's drain: at one vLLM batch per turn, that task's wake-up and the write cost more than
the batch itself. The outbox takes finished commands (PUB/HPUB bytes), and at the end of the
turn writes them all with one call on nats-py's transport. Order with nats-py's own queue holds:
while nats-py has commands not yet written, the outbox's go behind them in that queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.transport import TcpTransport

log = logging.getLogger("kvrelay.outbox")

InboxHandler = Callable[[bytes, bytes], None]


class InboxClient(Client):
    """nats-py's client with the messages of one subscription (the publisher's reply inbox)
    handed straight to a plain function, `inbox_handler(subject, data)`.

    nats-py would build a Msg for each and pass it through a queue to a task of its own; at one
    reply per published message that hop costs more than handling the reply. Every other
    subscription takes nats-py's own path.
    """

    inbox_sid = -1
    inbox_handler: InboxHandler | None = None

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                           headers: bytes) -> None:
        if sid != self.inbox_sid or self.inbox_handler is None:
            await super()._process_msg(sid, subject, reply, data, headers)
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

    def bind(self, nc: Client) -> None:
        self._nc = nc

    def writable(self) -> bool:
        """Room for more: nats-py's flusher runs and neither its queue nor the socket's buffer
        is past the limit (past it, publishers take nats-py's awaiting path)."""
        nc = self._nc
        if nc is None:
            return False
        flusher = nc._flusher_task
        if flusher is None or flusher.done() or nc._pending_data_size >= self._limit:
            return False
        transport = _socket_transport(nc)
        return transport is None or transport.get_write_buffer_size() < self._limit

    def put(self, command: bytes, payload_size: int) -> None:
        """Send `command` (one whole protocol command) with this turn's others."""
        self._out.append(command)
        nc = self._nc
        if nc is not None:
            nc.stats["out_msgs"] += 1
            nc.stats["out_bytes"] += payload_size
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write what this turn collected; called before any publish that goes through
        nats-py's own queue, so the order on the wire is the order of the calls."""
        self._scheduled = False
        if not self._out:
            return
        data = b"".join(self._out)
        self._out = []
        nc = self._nc
        if nc is None or not nc.is_connected:
            return  # the publisher's window resends it after the reconnect
        transport = _socket_transport(nc)
        if nc._pending_data_size == 0 and transport is not None and not transport.is_closing():
            transport.write(data)
            return
        nc._pending.append(data)
        nc._pending_data_size += len(data)
        flush_queue = nc._flush_queue
        if flush_queue is not None and flush_queue.empty():
            flush_queue.put_nowait(asyncio.get_running_loop().create_future())

    def discard(self) -> None:
        """Forget what was not written (the connection it was meant for is gone)."""
        self._out = []


def _socket_transport(nc: Client) -> asyncio.WriteTransport | None:
    transport = nc._transport
    if not isinstance(transport, TcpTransport) or transport._io_writer is None:
        return None
    writer: asyncio.StreamWriter = transport._io_writer
    return writer.transport
