"""Confirmation on core NATS for `--format dynamo`: markers through the publisher's own inbox.

Core NATS has no acks. The server handles a connection's messages in order, so once a marker
published after some messages comes back to the publisher's inbox, the server has passed those
messages to every subscriber. One marker is out at a time and markers go at most every
MARKER_INTERVAL (sooner when the publisher's window is half full): a returning marker
confirms everything published before it, so a burst of messages costs one round trip, not one
each. A marker rides in the socket write of the messages it follows (kvrelay/natsio/link.py)
whenever it can.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Final, Generic, TypeVar

from kvrelay.natsio.link import Link

# The time between two markers while the window has room: confirmations of a steady flow come
# in groups, and markers ride in the socket writes of the messages they follow. At a sidecar's
# rate (a batch every few ms or more) a marker per message would wake the relay twice per batch;
# at 50 ms one returns per five batches at 100/s, and while a flow lasts the relay reads it at
# its next write after GROUP_INTERVAL (kvrelay/natsio/replies.py), with no wake-up of its own.
# (Markers every 200 ms, before replies were read in groups, lowered the maximum rate on a
# 2-core machine from 101-111k to 64-90k batches/s.) A publisher whose window is half full
# sends its marker at once (`pressed`). What is unconfirmed is kept for republishing meanwhile.
MARKER_INTERVAL: Final = 0.05

Mark = TypeVar("Mark")


class Markers(Generic[Mark]):
    """The markers of one publisher. `published(mark)` after each message; `on_confirmed(mark)`
    hears of the last message a returning marker covers."""

    def __init__(self, link: Link, can_send: Callable[[], bool],
                 on_confirmed: Callable[[Mark], None], pressed: Callable[[], bool]) -> None:
        self._link = link
        self._can_send = can_send
        self._pressed = pressed  # the publisher's window is filling: no waiting for the interval
        self._on_confirmed = on_confirmed
        self._inbox = ""
        self._last: Mark | None = None  # the last message published
        self._unmarked = False  # published since the last marker went
        self._out = 0  # token of the marker out, 0 when none is
        self._covers: Mark | None = None  # the last message published before it
        self.sent_at = 0.0  # when the marker out went
        self._next_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._tokens = 0

    def bind(self, inbox: str) -> None:
        """Send markers to `inbox` (the publisher subscribes to it and hands replies to
        `on_reply`)."""
        self._inbox = inbox

    @property
    def out(self) -> bool:
        return self._out != 0

    def published(self, mark: Mark) -> None:
        """Note a message just published; call `follow` once a turn's messages are out."""
        self._last = mark
        self._unmarked = True

    def follow(self) -> None:
        """Have a marker follow what was published. It goes with this turn's messages once
        MARKER_INTERVAL has passed since the last one, or the window is half full; should no
        later messages take it along within another MARKER_INTERVAL, a timer sends it alone (a
        flow that stopped). A returning marker sends the next one only if the window is
        half full: otherwise it waits for the next message (replies are read as a write
        ends, kvrelay/natsio/replies.py, so a marker sent then would take a write of its
        own)."""
        if self._out or not self._unmarked:
            return
        now = time.monotonic()
        if now >= self._next_at or self._pressed():
            self._send(now)
        else:
            self._arm(self._next_at - now + MARKER_INTERVAL)

    def forget(self) -> None:
        """What was published may be lost (it is published again): a marker still to come
        back confirms nothing."""
        self._last = self._covers = None
        self._unmarked = False
        self._out = 0
        self.cancel()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def on_reply(self, subject: bytes, data: bytes) -> None:
        """A message on the inbox: if it is the marker out, confirm what it covers."""
        try:
            token = int(data)
        except ValueError:
            return
        if token != self._out:
            return  # from before a republish: what it covered is published again
        covers = self._covers
        self._out = 0
        self._covers = None
        if covers is not None:
            self._on_confirmed(covers)
        if not self._unmarked:
            return
        if self._pressed():
            self._send(time.monotonic())
        else:
            self._arm(MARKER_INTERVAL)  # the next message takes the marker along

    def _arm(self, delay: float) -> None:
        """Send the marker alone after `delay` unless a message takes it along first."""
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(delay, self._due)

    def _due(self) -> None:
        self._timer = None
        if not self._out and self._unmarked:
            self._send(time.monotonic())

    def _send(self, now: float) -> None:
        self.cancel()
        if not self._can_send():
            return  # the publisher publishes everything again on reconnecting
        self._tokens += 1
        self._out = self._tokens
        self._covers = self._last
        self._unmarked = False
        self.sent_at = now
        self._next_at = now + MARKER_INTERVAL
        self._link.put(self._inbox, b"%d" % self._tokens)
