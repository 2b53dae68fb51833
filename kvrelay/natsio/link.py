"""Link: a publisher's NATS connection, the way both outputs publish and hear replies.

A publisher connects through a Link, routes its reply inbox to a plain function, publishes in
the steady state with `put` (no await: what a loop turn puts leaves together) and, when the
link is not `writable` or order needs it, with the awaiting `publish` and `request`, which go
after everything put before them. `discard` forgets what was not written when the connection
drops, so the publisher's ordered resend is the first thing on the new socket.

Two ways, chosen by `--nats-engine`:
- `direct` (DirectLink): commands written to the socket once per loop turn and replies read
  off the socket as it is read (kvrelay/natsio/outbox.py, the one module that touches nats-py's
  internals, checked at connect);
- `public` (PublicLink): nats-py's `publish()` and a subscription callback; only a disconnect
  still goes through outbox.py (no public API drops what nats-py has not written), and only
  where nats-py keeps that as tested.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from kvrelay.natsio.outbox import (
    InboxClient,
    InboxHandler,
    Outbox,
    discard_unwritten,
    incompatibilities,
    subscription_sid,
)

log = logging.getLogger("kvrelay.natsio")

Callback = Callable[..., Awaitable[None]]

OUTBOX_LIMIT = 8 << 20  # bytes a link may hold unwritten before publishers wait


class NatsPyIncompatible(Exception):
    """The installed nats-py lacks what `--nats-engine direct` relies on."""


Headers = dict[str, str] | bytes  # bytes: the block as an HPUB carries it (`header_block`)


def header_block(headers: dict[str, str]) -> bytes:
    """Headers as an HPUB carries them."""
    lines = "".join(f"{key}: {value}\r\n" for key, value in headers.items())
    return f"NATS/1.0\r\n{lines}\r\n".encode()


def header_dict(block: bytes) -> dict[str, str]:
    """`header_block` read back, for nats-py's API."""
    lines = block.decode().split("\r\n")[1:]
    return dict(line.split(": ", 1) for line in lines if line)


class Link:
    """One publisher's connection to NATS (see the module's docstring)."""

    def __init__(self, new_client: Callable[[], Client] = Client) -> None:
        self.nc: Client | None = None
        self._new_client = new_client

    async def connect(self, options: dict[str, Any], error_cb: Callback,
                      disconnected_cb: Callback, reconnected_cb: Callback) -> Client:
        """Connect with nats-py's options and callbacks (retrying as they say)."""
        nc = self._new_client()
        self._prepare(nc)
        await nc.connect(**options, error_cb=error_cb, disconnected_cb=disconnected_cb,
                         reconnected_cb=reconnected_cb)
        self.nc = nc
        return nc

    def _prepare(self, nc: Client) -> None:
        """Set up a new client before it connects."""

    async def open_inbox(self, handler: InboxHandler, wildcard: bool) -> str:
        """Subscribe to a new inbox and hand its messages to `handler(subject, data)`, in
        order. Returns the reply subject, or with `wildcard` the prefix of reply subjects (the
        inbox and a dot: replies go to the prefix and a token of the caller's)."""
        raise NotImplementedError

    def group_replies(self, urgent: Callable[[], bool]) -> None:
        """Read the replies in groups while a flow lasts (kvrelay/natsio/replies.py), at once
        while `urgent()`; from the next connection on. Only the direct link groups them."""

    def online(self) -> bool:
        """nats-py's connection is up (its own state, which flips before its callbacks run)."""
        nc = self.nc
        return nc is not None and nc.is_connected

    def writable(self) -> bool:
        """Room for `put`: connected, and not too much written and not yet sent."""
        raise NotImplementedError

    def put(self, subject: str, payload: bytes, reply: str = "",
            headers: Headers | None = None) -> None:
        """Publish without awaiting; leaves with the loop turn's others. Only when `writable`
        and the payload is within the server's max_payload. The steady state passes headers
        as a ready block (bytes): the direct link writes it as it is."""
        raise NotImplementedError

    def collect(self) -> None:
        """What is put until the next `flush` leaves with it (nothing else is scheduled)."""

    def flush(self) -> None:
        """Send what was put in this turn now rather than at its end."""

    async def publish(self, subject: str, payload: bytes, reply: str = "",
                      headers: dict[str, str] | None = None) -> None:
        """Publish after everything put before; raises nats-py's errors."""
        raise NotImplementedError

    async def request(self, subject: str, payload: bytes, headers: dict[str, str],
                      within: float) -> Msg:
        """nats-py's request(), after everything put before."""
        raise NotImplementedError

    def discard(self) -> None:
        """Forget what was not written yet (the connection it was meant for is gone)."""
        raise NotImplementedError


class DirectLink(Link):
    """Commands written once per loop turn, replies read off the socket (outbox.py)."""

    def __init__(self, limit: int = OUTBOX_LIMIT,
                 new_client: Callable[[], InboxClient] = InboxClient) -> None:
        super().__init__(new_client)
        self._outbox = Outbox(limit)
        self._urgent: Callable[[], bool] | None = None

    def group_replies(self, urgent: Callable[[], bool]) -> None:
        self._urgent = urgent

    def _prepare(self, nc: Client) -> None:
        if isinstance(nc, InboxClient):
            nc.replies_urgent = self._urgent

    async def connect(self, options: dict[str, Any], error_cb: Callback,
                      disconnected_cb: Callback, reconnected_cb: Callback) -> Client:
        nc = await super().connect(options, error_cb, disconnected_cb, reconnected_cb)
        self._outbox.bind(nc)
        return nc

    async def open_inbox(self, handler: InboxHandler, wildcard: bool) -> str:
        nc = self.nc
        assert isinstance(nc, InboxClient)
        inbox = nc.new_inbox() + ("." if wildcard else "")
        sub = await nc.subscribe(inbox + "*" if wildcard else inbox)
        missing = incompatibilities(nc, sub)
        if missing:
            raise NatsPyIncompatible(
                "the installed nats-py lacks what --nats-engine direct relies on ("
                + "; ".join(missing) + "); install a nats-py version kvrelay was tested with "
                "(pyproject.toml) or use --nats-engine public")
        nc.route_inbox(inbox, subscription_sid(sub), handler)
        return inbox

    def online(self) -> bool:
        return self._outbox.online()

    def writable(self) -> bool:
        return self._outbox.writable()

    def put(self, subject: str, payload: bytes, reply: str = "",
            headers: Headers | None = None) -> None:
        target = f"{subject} {reply}" if reply else subject
        if headers is None:
            command = b"".join((f"PUB {target} {len(payload)}\r\n".encode(), payload, b"\r\n"))
        else:
            head = headers if isinstance(headers, bytes) else header_block(headers)
            size = len(head) + len(payload)
            command = b"".join((f"HPUB {target} {len(head)} {size}\r\n".encode(), head, payload,
                                b"\r\n"))
        self._outbox.put(command, len(payload))

    def collect(self) -> None:
        self._outbox.collect()

    def flush(self) -> None:
        self._outbox.flush()

    async def publish(self, subject: str, payload: bytes, reply: str = "",
                      headers: dict[str, str] | None = None) -> None:
        assert self.nc is not None
        self._outbox.flush()  # what the steady state queued goes first
        await self.nc.publish(subject, payload, reply=reply, headers=headers)

    async def request(self, subject: str, payload: bytes, headers: dict[str, str],
                      within: float) -> Msg:
        assert self.nc is not None
        self._outbox.flush()
        return await self.nc.request(subject, payload, headers=headers, timeout=within)

    def discard(self) -> None:
        self._outbox.discard()
        if self.nc is not None:
            discard_unwritten(self.nc)


class PublicLink(Link):
    """nats-py's public API only: `publish()` from a task that sends each turn's puts in
    order, and a subscription callback for the inbox."""

    def __init__(self, limit: int = OUTBOX_LIMIT) -> None:
        super().__init__()
        self._limit = limit
        self._queue: deque[tuple[str, bytes, str, dict[str, str] | None]] = deque()
        self._queued = 0  # payload bytes in the queue
        self._sender: asyncio.Task[None] | None = None

    async def open_inbox(self, handler: InboxHandler, wildcard: bool) -> str:
        nc = self.nc
        assert nc is not None

        async def on_msg(msg: Msg) -> None:
            try:
                handler(msg.subject.encode(), msg.data)
            except Exception:  # nats-py's callback task would log and go on; say which
                log.exception("could not handle a message on the reply inbox")

        inbox = nc.new_inbox() + ("." if wildcard else "")
        await nc.subscribe(inbox + "*" if wildcard else inbox, cb=on_msg)
        return inbox

    def writable(self) -> bool:
        nc = self.nc
        return nc is not None and nc.is_connected \
            and self._queued + nc.pending_data_size < self._limit

    def put(self, subject: str, payload: bytes, reply: str = "",
            headers: Headers | None = None) -> None:
        if isinstance(headers, bytes):
            headers = header_dict(headers)
        self._queue.append((subject, payload, reply, headers))
        self._queued += len(payload)
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        nc = self.nc
        assert nc is not None
        queue = self._queue
        try:
            while queue:
                subject, payload, reply, headers = queue.popleft()
                self._queued -= len(payload)
                await nc.publish(subject, payload, reply=reply, headers=headers)
        except Exception as exc:  # the publisher's window resends after the reconnect
            log.warning("publish failed: %r; %d queued publishes left to the resend", exc,
                        len(queue))
            queue.clear()
            self._queued = 0
        finally:
            self._sender = None

    async def _sent(self) -> None:
        """Wait until what was put has gone to nats-py."""
        while self._sender is not None:
            await asyncio.shield(self._sender)

    async def publish(self, subject: str, payload: bytes, reply: str = "",
                      headers: dict[str, str] | None = None) -> None:
        assert self.nc is not None
        await self._sent()
        await self.nc.publish(subject, payload, reply=reply, headers=headers)

    async def request(self, subject: str, payload: bytes, headers: dict[str, str],
                      within: float) -> Msg:
        assert self.nc is not None
        await self._sent()
        return await self.nc.request(subject, payload, headers=headers, timeout=within)

    def discard(self) -> None:
        self._queue.clear()
        self._queued = 0
        # No public API forgets what nats-py has not written: where its internals are as
        # tested, the outbox's function does; elsewhere it may go out ahead of the resend.
        if self.nc is not None and not discard_unwritten(self.nc):
            log.warning("cannot drop the publishes nats-py did not write before the disconnect; "
                        "they may arrive ahead of the resend")


def new_link(engine: str) -> Link:
    return PublicLink() if engine == "public" else DirectLink()
