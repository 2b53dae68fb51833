"""Replies read in groups: a publisher's acks (or markers) read once per interval while a flow
lasts, not with a wake-up each.

A publisher that sends a message every few milliseconds and reads each reply as it comes wakes
twice per message: once for the message, once for its reply. While a flow lasts, the reply
socket's low-water mark (SO_RCVLOWAT) is raised, so the kernel holds replies back from the event
loop until GROUP_BYTES of them are waiting; the publisher reads them all (the mark back at one
byte) when it next writes after GROUP_INTERVAL has passed or GROUP_MESSAGES messages went since
the last read, or at once when its window is half full (`urgent`). A timer reads them if no
write comes (the flow stopped), and after that the socket stays at one byte until the next
write: an idle publisher reads a PING or an -ERR as it comes and has no timer running. Anything
that arrives on the connection while replies are held (a PING, an INFO, a reply to a request)
waits at most GROUP_INTERVAL twice.

What it costs: a reply is read up to GROUP_INTERVAL (twice, when the flow stops) after it came,
so what a window holds is confirmed that much later; publishers time their lag at publishing
and their publish latency at reading.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import Final, Protocol

from mypy_extensions import mypyc_attr

log = logging.getLogger("kvrelay.natsio")

# Replies wait at most this long after the next write (a steady flow reads them at a write,
# with no wake-up of their own); the timer reads them after twice this when no write comes. At
# a sidecar's 100 batches/s, a read per ten batches (50 ms made it five: about 5% more CPU per
# batch).
GROUP_INTERVAL: Final = 0.1
# A write reads what waits once this many messages went since the last read, whatever the
# time: a fast flow's window is confirmed as it goes (a `--format dynamo` marker is small, so
# GROUP_BYTES alone would leave its return waiting the interval while the window fills).
GROUP_MESSAGES: Final = 128
# The kernel wakes the loop once this much is waiting (about 150 JetStream acks): a burst never
# waits for the interval.
GROUP_BYTES: Final = 16 << 10


class _Transport(Protocol):
    def is_closing(self) -> bool: ...

    def get_extra_info(self, name: str, default: object = None) -> object: ...


@mypyc_attr(native_class=False)  # a subclass of a class with __slots__
class _Borrowed(socket.socket):
    """A socket object on a descriptor another owns: it never closes it, not even when it is
    collected."""

    def __del__(self) -> None:
        self.detach()


class ReplyGroups:
    """The grouping of one connection's socket (a new one for each connection)."""

    def __init__(self, transport: _Transport, urgent: Callable[[], bool]) -> None:
        # A socket object of its own on the transport's descriptor, used only while the
        # transport is open (the descriptor is still its then); the transport's own (uvloop's
        # PseudoSocket) builds a Python socket object for each setsockopt.
        self._transport = transport
        fileno_of = getattr(transport.get_extra_info("socket"), "fileno", None)
        fileno: int = fileno_of() if callable(fileno_of) else -1
        self._sock: socket.socket | None = _Borrowed(fileno=fileno) if fileno >= 0 else None
        self._urgent = urgent  # the publisher's window is half full: read replies at once
        self._loop = asyncio.get_running_loop()
        self._holding = False  # the low-water mark is up
        self._reading = False  # down so that what waits is read; up again once it was
        self._due = 0.0  # when a write reads what waits
        self._written = 0  # messages written since the mark went up
        self._timer: asyncio.TimerHandle | None = None
        self.failed = False

    def wrote(self, messages: int) -> None:
        """The publisher wrote `messages` to the socket: hold their replies, or read what waits
        if the interval passed, GROUP_MESSAGES went, or the window is half full."""
        if self._urgent():
            if self._holding:
                self._read(again=True)
        elif not self._holding:
            if not self._reading and not self.failed:
                self._hold()
        else:
            self._written += messages
            if self._written >= GROUP_MESSAGES or time.monotonic() >= self._due:
                self._read(again=True)

    def read(self) -> None:
        """The socket was read: hold again if this was a read the publisher asked for and its
        window has room (while it is half full, replies are read as they come)."""
        if self._reading and not self._urgent():
            self._reading = False
            self._hold()

    def close(self) -> None:
        """The connection is gone."""
        self.failed = True
        self._cancel()
        if self._sock is not None:
            self._sock.detach()
            self._sock = None

    def _hold(self) -> None:
        if not self._set(GROUP_BYTES):
            return
        self._holding = True
        self._written = 0
        self._due = time.monotonic() + GROUP_INTERVAL
        self._cancel()
        self._timer = self._loop.call_later(2 * GROUP_INTERVAL, self._read, False)

    def _read(self, again: bool) -> None:
        """Let the loop read what waits (lowering the mark wakes it if anything does); hold
        again after that read when `again` (the flow goes on)."""
        self._cancel()
        self._holding = False
        self._reading = again
        self._set(1)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _set(self, low_water: int) -> bool:
        if self._sock is None or self._transport.is_closing():
            self.close()  # the descriptor may soon be another socket's
            return False
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, low_water)
        except (OSError, ValueError) as exc:  # closed; or a kernel without it: read each reply
            if not self.failed:
                log.debug("cannot set the reply socket's low-water mark: %s", exc)
            self.failed = True
            self._holding = self._reading = False
            return False
        return True
