"""The publisher skeleton both outputs share; an output fills in what differs.

Shared here: the NATS connection and what its callbacks do (a refusal before the first
connection is fatal, a loss of connection drops what nats-py had not written so the output's
own ordered resend comes first), the publish loop's wake-ups and retry backoff, the drain wait
and the close. An output (JetStream's windowed publisher, `--format dynamo`'s confirmed core
NATS publisher) says how a frame becomes a message, what a reply means, how it catches up after
a failure, and what it adds to /health. The relay sees every output through this interface.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable

from nats.aio.client import Client

from kvrelay.config import NatsSettings, PublishSettings
from kvrelay.ingest.buffer import Buffer
from kvrelay.ingest.sequencer import Frame
from kvrelay.natsio.link import NatsPyIncompatible, new_link
from kvrelay.natsio.options import nats_options
from kvrelay.natsio.outbox import InboxHandler
from kvrelay.publish.common import NatsRefused, refusal, wait_until_sent
from kvrelay.ratelimit import RateLimitedLog
from kvrelay.system.metrics import Metrics
from kvrelay.wire.schema import ResumePoint

BACKOFF_START = 0.05


class Output(ABC):
    """Takes Frames from ingest and keeps them flowing into NATS, in order."""

    def __init__(self, nats: NatsSettings, publish: PublishSettings, buffer: Buffer,
                 metrics: Metrics, log: logging.Logger) -> None:
        self._nats = nats
        self._settings = publish
        # Read per message: kept here rather than looked up on the settings each time.
        self._max_in_flight = publish.max_in_flight
        self._max_in_flight_bytes = publish.max_in_flight_bytes
        self._max_payload = 1 << 20  # the server's, read on each (re)connect
        self._buffer = buffer
        self._metrics = metrics
        self._log = log
        self._warn = RateLimitedLog(log)
        self._nc: Client | None = None
        self._link = new_link(nats.engine)
        self._link.group_replies(self._half_full)
        self._wake = asyncio.Event()
        self._parked = False  # the publish loop waits for work: a producer may send directly
        self._retry_at: float | None = None
        self._watched = asyncio.Event()  # set when something awaits confirmation or a retry
        self._watch_armed = False  # `_watched` was set since the watch last went to sleep
        self._backoff = BACKOFF_START
        self._connected_once = False
        self.connected = False
        self.last_error = "not connected yet"
        # The loop the output runs on (asking for it each batch costs a getpid() syscall).
        self._loop = asyncio.get_running_loop()
        self._gathered: list[Frame] = []  # taken in this turn, sent together at its end
        self._in_turn = False  # a source hands over a read (`begin_turn`): it ends the turn
        # A configuration NATS (or the output's peer) will never accept: the relay exits (2).
        self.fatal: asyncio.Future[Exception] = self._loop.create_future()

    # -- what an output provides ---------------------------------------------------------------

    @abstractmethod
    async def connect(self, dp_ranks: list[int]) -> None:
        """Everything before publishing (`_connect_nats` among it), retrying until it can."""

    @abstractmethod
    def subject(self, dp_rank: int) -> str:
        """Where a rank's batches go."""

    @abstractmethod
    async def resume_point(self, dp_rank: int) -> ResumePoint | None:
        """The last (epoch, seq) this output holds for a rank, None if nothing to resume."""

    @abstractmethod
    def _groups(self, frames: list[Frame]) -> list[list[Frame]]:
        """Frames in hand as the messages they make (`group_frames`)."""

    @abstractmethod
    def _send_group(self, group: list[Frame]) -> bool:
        """Publish one message of frames (a group of `_groups`) right now, without waiting;
        False if none of them could go (counted)."""

    @abstractmethod
    def _per_message(self) -> int:
        """The most batches of a rank one message carries."""

    @property
    @abstractmethod
    def in_flight(self) -> int:
        """Messages published and not yet confirmed."""

    @property
    @abstractmethod
    def in_flight_bytes(self) -> int:
        """Payload bytes of the messages published and not yet confirmed."""

    @abstractmethod
    def readiness(self) -> dict[str, str]:
        """What this output adds to /health: each part and "ok", or what is wrong."""

    @abstractmethod
    def abandon(self) -> int:
        """Count what could not be delivered as dropped at shutdown; returns the batches."""

    @abstractmethod
    def _unsent(self) -> bool:
        """Batches buffered or unconfirmed remain."""

    @abstractmethod
    def _side_tasks(self) -> list[Awaitable[None]]:
        """What runs beside the publish loop (ack watchdogs, record keep-alives)."""

    def _can_publish(self) -> bool:
        """Beyond a connection: whatever else must be up before publishing."""
        return True

    @abstractmethod
    async def _publish_pending(self, retrying: bool) -> None:
        """One turn of the publish loop while online: catch up after a failure (`retrying`:
        the backoff after one just ran out), then move what the buffer holds into NATS."""

    @abstractmethod
    def _connection_lost(self) -> None:
        """NATS went away: what was published and not confirmed may be lost."""

    def _connection_back(self) -> None:
        """NATS is back."""
        self._wake.set()

    # -- the steady state: a turn's frames, sent together ----------------------------------------

    def begin_turn(self) -> None:
        """A source hands over what one read of its socket held: `end_turn` follows."""
        self._in_turn = True

    def end_turn(self) -> None:
        """The read's frames are all taken: send what was gathered, now."""
        self._in_turn = False
        if self._gathered:
            self.send_gathered()

    def take(self, frame: Frame) -> None:
        """Ingest's hand-off, each frame in order. In the steady state (nothing buffered or owed
        before it, the publish loop idle, room in the window, NATS up) the frame is gathered
        with the others of this turn and they are sent together right after it
        (`send_gathered`: at `end_turn`, or in the loop's next turn for a frame handed over
        outside a read): a frame alone in its turn goes alone, never waiting for more.
        Anything else goes through the buffer and `notify`."""
        buffer = self._buffer
        if not buffer and not buffer.owes(frame.dp_rank) and self._sending_here() \
                and self._room():
            self._gathered.append(frame)
            if len(self._gathered) == 1 and not self._in_turn:
                self._loop.call_soon(self.send_gathered)
            return
        self.send_gathered()  # what came before this frame goes first
        buffer.put(frame)
        self.notify()

    def send_gathered(self) -> None:
        """Send the frames gathered in this turn: one message per rank (`_groups`)."""
        frames = self._gathered
        if not frames:
            return
        self._gathered = []
        if not (self._sending_here() and self._room()):
            for frame in frames:  # the buffer is empty: `take` sends these before buffering
                self._buffer.put(frame)
            self.notify()
            return
        self._link.collect()  # these publishes leave in one write, below
        try:
            self._send_now([frames] if len(frames) == 1 else self._groups(frames))
        finally:
            self._link.flush()  # now, not in another turn of the loop
        if self._buffer:  # the window filled up: the publish loop sends the rest
            self._wake.set()

    def notify(self) -> None:
        """Called by the buffer's producer: there is something to send.

        In the steady state (the publish loop idle, room in the window, NATS up) the frames
        are sent right here, in the producer's turn: no wake-up of the publish task per batch.
        Anything else is left to the publish loop, in order.
        """
        if self._sending_here():
            buffer = self._buffer
            while buffer and self._room():
                self._send_now(self._buffered_groups())
            if not buffer:
                return
        self._wake.set()

    def _send_now(self, groups: list[list[Frame]]) -> bool:
        """Publish messages of frames (`_groups`) right now, the first because the caller saw
        `_room()`, each further one while the window has room; what does not fit goes back to
        the front of the buffer, in order. True if anything was published."""
        published = False
        for index, group in enumerate(groups):
            if index and not self._window_open():
                self._buffer.restore([frame for rest in groups[index:] for frame in rest])
                break
            published = self._send_group(group) or published
        return published

    def _buffered_groups(self) -> list[list[Frame]]:
        """The oldest frames of the buffer, as the messages they make."""
        return self._groups(self._buffer.pop_upto(self._per_message()))

    @property
    def metrics(self) -> Metrics:
        return self._metrics

    @property
    def buffer(self) -> Buffer:
        """Where frames wait while they cannot be published at once."""
        return self._buffer

    @property
    def retry_due(self) -> bool:
        """A failure was seen: the loop catches up once the backoff has passed."""
        return self._retry_at is not None

    # -- the connection ------------------------------------------------------------------------

    def _online(self) -> bool:
        # nats-py's own state flips before our callback runs; trust it for sending.
        return self.connected and self._link.online()

    async def _connect_nats(self, on_reply: InboxHandler, wildcard: bool) -> str | None:
        """Connect through the link (nats-py retries forever) with the shared callbacks, and
        open the reply inbox (see `Link.open_inbox`); None when the installed nats-py cannot
        carry `--nats-engine direct` (fatal: the relay exits saying what is missing)."""
        self._log.info("connecting to NATS at %s", self._nats.redacted_servers())
        self._nc = nc = await self._link.connect(nats_options(self._nats), self._on_error,
                                                 self._on_disconnected, self._on_reconnected)
        self._connected_once = True
        self._max_payload = nc.max_payload
        try:
            return await self._link.open_inbox(on_reply, wildcard)
        except NatsPyIncompatible as exc:
            self.last_error = str(exc)
            await nc.close()
            if not self.fatal.done():
                self.fatal.set_result(exc)
            return None

    async def _on_error(self, exc: Exception) -> None:
        self._metrics.nats_errors.inc()
        self.last_error = f"NATS: {exc!r}"
        if not self._connected_once and (reason := refusal(exc, self._nats)) is not None:
            # Refused before ever connecting: misconfigured, not unreachable. (Once connected,
            # a refusal while reconnecting is retried: the buffer is worth keeping.)
            if not self.fatal.done():
                self.fatal.set_result(NatsRefused(reason))
            return
        self._warn.warning("nats", "NATS at %s: %r (the relay keeps buffering and retrying)",
                           self._nats.redacted_servers(), exc)

    async def _on_disconnected(self) -> None:
        if self.connected:
            self._log.warning("disconnected from NATS; buffering until it is back")
        self.connected = False
        self.last_error = "disconnected from NATS"
        self._connection_lost()
        # nats-py would send the commands it had not written yet right after reconnecting,
        # before the output's ordered resend, so later batches could land before earlier ones
        # lost with the old socket. The output holds them all: forget what was not written
        # and let the resend put them back in order.
        self._link.discard()

    async def _on_reconnected(self) -> None:
        self._metrics.nats_reconnects.inc()
        if self._nc is not None:  # another server of the cluster may say another
            self._max_payload = self._nc.max_payload
        self.connected = True
        self._log.info("reconnected to NATS; publishing %d unconfirmed messages again",
                       self.in_flight)
        self._connection_back()

    def _schedule_retry(self, delay: float | None = None) -> None:
        """Run the loop again after `delay`, or after a backoff that grows while failures go
        on (reset by `_succeeded`)."""
        if delay is None:
            delay = self._backoff
            self._backoff = min(self._backoff * 2, self._nats.reconnect_wait_max)
        if self._retry_at is None:
            self._retry_at = time.monotonic() + delay
        self._wake.set()
        self._watched.set()

    def _succeeded(self) -> None:
        self._backoff = BACKOFF_START

    # -- the watch ---------------------------------------------------------------------------

    @abstractmethod
    def _awaiting_confirmation(self) -> bool:
        """Something was sent and is not confirmed yet (the output's window)."""

    @abstractmethod
    def _check_confirmations(self) -> None:
        """Called while online every quarter of the ack timeout (at most 0.25 s) as long as
        something awaits confirmation: act on what waited past the ack timeout."""

    async def _watch(self) -> None:
        """Wake the loop when a retry is due and have the output check its confirmations.
        With nothing awaiting confirmation and no retry waiting it waits on `_watched` without a
        timer, so an idle relay does not wake up at all; an output sets `_watched` when it puts
        something in its window."""
        period = self._settings.ack_timeout / 4
        while True:
            if self._retry_at is None and not self._awaiting_confirmation():
                self._watched.clear()
                self._watch_armed = False
                await self._watched.wait()
            retry_at = self._retry_at
            await asyncio.sleep(period if retry_at is None  # a steady flow: 1 wake-up per period
                                else min(period, max(0.0, retry_at - time.monotonic())))
            if self._retry_at is not None and time.monotonic() >= self._retry_at:
                self._wake.set()
            if self._online():
                self._check_confirmations()

    def _arm_watch(self) -> None:
        """Something now awaits confirmation: the watch runs. Once per sleep of the watch, not
        once per message: setting an asyncio Event is a call into interpreted code."""
        if not self._watch_armed:
            self._watch_armed = True
            self._watched.set()

    # -- the publish loop ----------------------------------------------------------------------

    async def run(self) -> None:
        """Publish until cancelled: a wake-up per backlog, a failure or a retry that is due."""
        side = [asyncio.ensure_future(task) for task in self._side_tasks()]
        try:
            while True:
                self._parked = True
                await self._wake.wait()
                self._parked = False
                self._wake.clear()
                if not self._online() or not self._can_publish():
                    continue
                retrying = self._retry_at is not None
                if self._retry_at is not None:
                    if time.monotonic() < self._retry_at:
                        continue
                    self._retry_at = None
                await self._publish_pending(retrying)
        finally:
            self._parked = False
            for task in side:
                task.cancel()

    def _sending_here(self) -> bool:
        """The publish loop idle with nothing to retry, NATS and the output up: a producer's
        turn may publish itself."""
        return self._parked and self._retry_at is None and self._online() \
            and self._can_publish()

    def _window_open(self) -> bool:
        """Room in the window for one more message (`--max-in-flight`, and
        `--max-in-flight-bytes`, which one message alone may pass)."""
        return self.in_flight < self._max_in_flight \
            and self.in_flight_bytes < self._max_in_flight_bytes

    def _half_full(self) -> bool:
        """Half of the window's bound (`--max-in-flight`, `--max-in-flight-bytes`) is taken."""
        return 2 * self.in_flight >= self._max_in_flight \
            or 2 * self.in_flight_bytes >= self._max_in_flight_bytes

    def _room(self) -> bool:
        """Room in the window and in the link for one more message."""
        return self._window_open() and self._link.writable()

    # -- shutdown ------------------------------------------------------------------------------

    async def flush(self, within: float) -> bool:
        """Wait until nothing is buffered or unconfirmed; False if `within` seconds pass."""
        return await wait_until_sent(self._unsent, self._wake, within)

    async def close(self) -> None:
        self.connected = False
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.close()
