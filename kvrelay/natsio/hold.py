"""Replies read in the relay's own wake-ups: at a sidecar's rate, none of their own.

A JetStream ack (or a `--format dynamo` marker's return) reaches the socket a fraction of a
millisecond after its publish. Read as it arrives, it wakes the relay a second time for every
vLLM batch. In the steady state (everything published, nothing awaited but replies) the
publisher holds the socket (`hold`): the event loop stops watching it, and what came is read
by hand when the relay wakes for the next batch anyway (`read`). `linger` seconds after the
last hold without a next batch, what came is read and the hold ends: the loop watches the
socket again, so an idle relay has no timer of its own. Anything that awaits the server (a
backlog, a request, a reconnect, the drain) `release`s the socket first.

Only a plain TCP socket under nats-py's TcpTransport is held (`holdable_socket`); TLS and
websockets are read as they arrive.
"""

from __future__ import annotations

import asyncio
import os
from typing import Final

from nats.aio.client import Client

from kvrelay.natsio.outbox import holdable_socket

READ_SIZE: Final = 1 << 16


class ReplyHold:
    """The hold on one connection's socket (see the module's docstring)."""

    def __init__(self, linger: float) -> None:
        self.linger = linger  # 0: never held
        self._transport: asyncio.Transport | None = None  # the socket held, None when not
        self._fd = -1
        self._protocol: asyncio.Protocol | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def held(self) -> bool:
        return self._transport is not None

    def hold(self, nc: Client | None) -> None:
        """Hold the socket of `nc` (if it can be) for `linger` seconds from now."""
        if self._transport is None:
            if self.linger <= 0 or nc is None:
                return
            found = holdable_socket(nc)
            if found is None:
                return
            self._transport, self._fd, self._protocol = found
            self._transport.pause_reading()
            if self._loop is None:  # (asking for the running loop costs a getpid())
                self._loop = asyncio.get_running_loop()
        elif self._timer is not None:
            self._timer.cancel()
        assert self._loop is not None
        self._timer = self._loop.call_later(self.linger, self._lingered)

    def read(self) -> None:
        """Hand nats-py's protocol what came on the held socket; a closed or failed socket
        is released (the loop's own read then reports it)."""
        transport = self._transport
        if transport is None:
            return
        if transport.is_closing():  # its descriptor may be another socket's by now
            self.release()
            return
        protocol = self._protocol
        assert protocol is not None
        while True:
            try:
                data = os.read(self._fd, READ_SIZE)
            except BlockingIOError:
                return
            except OSError:
                self.release()
                return
            if not data:  # the server closed it
                self.release()
                return
            protocol.data_received(data)
            if len(data) < READ_SIZE or self._transport is not transport:
                return

    def release(self) -> None:
        """The loop watches the socket again (nothing if it is not held)."""
        transport = self._transport
        if transport is None:
            return
        self._transport = self._protocol = None
        self._fd = -1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not transport.is_closing():
            transport.resume_reading()

    def _lingered(self) -> None:
        self._timer = None
        self.read()
        self.release()
