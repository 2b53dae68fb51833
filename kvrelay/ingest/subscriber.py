"""The native reader's sockets: connect (and reconnect) to a vLLM PUB, or accept those that
connect, each spoken to by a ZMTP Connection (kvrelay/ingest/zmtp.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

from kvrelay.config.endpoint import parse_endpoint
from kvrelay.ingest.zmtp import Connection, MessageSink
from kvrelay.ingest.zmtpwire import ProtocolError

log = logging.getLogger("kvrelay.zmtp")


class Subscriber:
    """Every PUB at one endpoint: connect and reconnect to it, or accept those that connect.

    `max_message` bounds a message (its frames together); a larger one is skipped unread and
    `refused(size)` hears of it. `heartbeat` > 0: PING each 3.1 PUB that often and drop it when
    nothing comes back within that time. `went_away()` hears of each PUB that had attached and
    is gone, after the last of its messages was handed on.
    """

    def __init__(self, endpoint: str, bind: bool, topic: bytes, deliver: MessageSink,
                 name: str, *, max_message: int, heartbeat: float = 0.0,
                 refused: Callable[[int], None] | None = None,
                 went_away: Callable[[], None] | None = None) -> None:
        self.address = parse_endpoint(endpoint, bind)
        self.endpoint = endpoint
        self.bind = bind
        self._topic = topic
        self._deliver = deliver
        self._name = name
        self._max_message = max_message
        self._heartbeat = heartbeat
        self._refused = refused
        self._went_away = went_away
        self.peers = 0
        self.attachments = 0  # handshakes completed, ever: 1 + reconnections, when connecting
        self.listening = False
        self._stopping = False  # the relay is closing the connections itself
        self._connections: set[Connection] = set()
        self._lost: asyncio.Event = asyncio.Event()

    @property
    def subscribed(self) -> bool:
        """Bound, or connecting (a vLLM that is not up yet is waited for, not an error)."""
        return self.listening or not self.bind

    def _connection(self) -> Connection:
        connection = Connection(self._topic, self._deliver, self._on_attached, self._on_closed,
                                max_message=self._max_message, heartbeat=self._heartbeat,
                                refused=self._refused)
        self._connections.add(connection)
        return connection

    def _on_attached(self, connection: Connection) -> None:
        self.peers += 1
        self.attachments += 1
        log.info("vLLM publisher attached on %s", self._name)

    def _on_closed(self, connection: Connection, exc: Exception | None) -> None:
        self._connections.discard(connection)
        if connection.ready:
            self.peers = max(0, self.peers - 1)
            if self._went_away is not None:
                self._went_away()
            if self._stopping:  # the relay closed it: nothing went away
                log.debug("closed the connection of the vLLM publisher on %s", self._name)
            else:
                log.warning("vLLM publisher went away from %s%s", self._name,
                            f" ({exc})" if isinstance(exc, ProtocolError) else "")
        elif exc is not None:
            log.warning("%s: %s", self._name, exc)
        self._lost.set()

    async def run(self, retry: Callable[[str], None]) -> None:
        """Until cancelled. `retry(message)` hears of each failed attempt (to log at a rate)."""
        mode = "bound to" if self.bind else "connecting to"
        log.info("ZMQ SUB (native ZMTP) %s %s", mode, self._name)
        try:
            if self.bind:
                await self._listen()
            else:
                await self._connect_forever(retry)
        finally:
            self._stopping = True
            for connection in list(self._connections):
                connection.close()

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        delay = 0.1
        while True:
            try:
                if self.address.transport == "ipc":
                    # A socket file left by a previous run is replaced, as libzmq does.
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.address.path)
                    server = await loop.create_unix_server(self._connection, self.address.path)
                else:
                    server = await loop.create_server(self._connection,
                                                      self.address.host or None,
                                                      self.address.port, reuse_address=True)
                break
            except OSError as exc:
                log.error("cannot bind %s: %s; retrying in %.1fs", self.endpoint, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self.listening = True
        try:
            await asyncio.Future()  # serve until cancelled
        finally:
            self.listening = False
            server.close()

    async def _connect_forever(self, retry: Callable[[str], None]) -> None:
        loop = asyncio.get_running_loop()
        delay = 0.1
        while True:
            self._lost.clear()
            try:
                if self.address.transport == "ipc":
                    await loop.create_unix_connection(self._connection, self.address.path)
                else:
                    await loop.create_connection(self._connection, self.address.host,
                                                 self.address.port)
            except OSError as exc:
                retry(f"no vLLM publisher at {self.endpoint} yet ({exc.strerror or exc}); "
                      "retrying")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            await self._lost.wait()
            # Back soon: a restarting vLLM binds again within seconds.
            delay = 0.1
            await asyncio.sleep(delay)
