"""Replies read in groups (kvrelay/natsio/replies.py): on a real loopback TCP socket the event
loop is not woken for held replies, reads them at a write once the interval passed, at once
when the window is half full, and by its timer when the flow stops; a relay under a steady flow
wakes once per batch, not twice."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import scrape
from test_idle import relay_process, wakeups

from kvrelay.natsio.replies import GROUP_INTERVAL, GROUP_MESSAGES, ReplyGroups
from kvrelay.testing.natsserver import NatsServer
from kvrelay.testing.synthetic import SyntheticVllm

REPLY = b"MSG _INBOX.x.1 1 26\r\n" + b'{"stream":"S","seq":1234}' + b"\r\n"


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected loopback TCP pair: (the publisher's end, the server's end)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
    client.setblocking(False)
    with client, peer:
        yield client, peer


class SocketTransport:
    """What ReplyGroups asks of a transport, over a plain socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.sock if name == "socket" else default


class Reader:
    """Counts the loop's read callbacks on a socket, reading what it finds."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.wakes = 0
        self.got = b""
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        self.wakes += 1
        self.got += self.sock.recv(1 << 16)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())


@contextlib.contextmanager
def grouped(client: socket.socket, urgent: Callable[[], bool]
            ) -> Iterator[tuple[Reader, ReplyGroups]]:
    """The loop reading `client` (counted), and a grouping of its replies; both closed after."""
    reader = Reader(client)
    groups = ReplyGroups(SocketTransport(client), urgent)
    try:
        yield reader, groups
    finally:
        groups.close()
        reader.close()


async def test_held_replies_are_read_at_a_write_after_the_interval(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """While a flow lasts, replies below the byte mark do not wake the loop; the first write
    after the interval lets the loop read them all in one go."""
    client, peer = pair
    with grouped(client, lambda: False) as (reader, groups):
        groups.wrote(1)  # the flow starts: replies are held
        for _ in range(5):
            peer.sendall(REPLY)
            await asyncio.sleep(0.005)
        assert reader.wakes == 0
        assert reader.got == b""
        await asyncio.sleep(GROUP_INTERVAL)
        groups.wrote(1)  # past the interval: read what waits
        await asyncio.sleep(0.01)
        assert reader.got == REPLY * 5
        assert reader.wakes == 1
        groups.read()  # the publisher's read: hold again
        peer.sendall(REPLY)
        await asyncio.sleep(0.02)
        assert reader.got == REPLY * 5


async def test_a_fast_flow_reads_replies_every_group_of_messages(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """Within the interval, the write that brings the messages written since the last read to
    GROUP_MESSAGES reads what waits (a fast flow's small replies do not wait the interval while
    its window fills)."""
    client, peer = pair
    with grouped(client, lambda: False) as (reader, groups):
        groups.wrote(1)  # the flow starts: replies are held
        peer.sendall(REPLY)
        groups.wrote(GROUP_MESSAGES - 1)
        await asyncio.sleep(0.01)
        assert reader.got == b""
        groups.wrote(1)
        await asyncio.sleep(0.01)
        assert reader.got == REPLY
        groups.read()  # held again, the count from zero
        peer.sendall(REPLY)
        groups.wrote(GROUP_MESSAGES - 1)
        await asyncio.sleep(0.01)
        assert reader.got == REPLY


async def test_a_half_full_window_reads_replies_at_once(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """`urgent` (the window half full) makes a write read what waits, and keeps the mark down
    after that read: replies then come as they arrive."""
    client, peer = pair
    urgent = False
    with grouped(client, lambda: urgent) as (reader, groups):
        groups.wrote(1)
        peer.sendall(REPLY)
        await asyncio.sleep(0.01)
        assert reader.got == b""
        urgent = True
        groups.wrote(1)
        await asyncio.sleep(0.01)
        assert reader.got == REPLY
        groups.read()  # still urgent: the mark stays down
        peer.sendall(REPLY)
        await asyncio.sleep(0.01)
        assert reader.got == REPLY * 2


async def test_a_stopped_flow_has_its_replies_read_by_the_timer(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """No write after the last reply: the timer reads it within twice the interval, and the
    socket then stays at one byte (an idle publisher reads a PING as it comes)."""
    client, peer = pair
    with grouped(client, lambda: False) as (reader, groups):
        groups.wrote(1)
        peer.sendall(REPLY)
        await asyncio.sleep(GROUP_INTERVAL)
        assert reader.got == b""
        await asyncio.sleep(GROUP_INTERVAL * 1.5)
        assert reader.got == REPLY
        groups.read()  # the timer's read does not hold again
        peer.sendall(b"PING\r\n")
        await asyncio.sleep(0.01)
        assert reader.got == REPLY + b"PING\r\n"


async def test_a_burst_past_the_byte_mark_wakes_the_loop(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """Replies held past GROUP_BYTES wake the loop without waiting for the interval."""
    client, peer = pair
    with grouped(client, lambda: False) as (reader, groups):
        groups.wrote(1)
        peer.sendall(REPLY * 1000)  # 48 KB
        await asyncio.sleep(0.02)
        assert len(reader.got) >= 16 << 10


def test_a_closing_transport_turns_grouping_off(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """Once the transport is closing (its descriptor may soon be another socket's), the
    grouping sets nothing more and stays off, with no exception."""
    client, _ = pair
    transport = SocketTransport(client)

    async def main() -> bool:
        groups = ReplyGroups(transport, lambda: False)
        transport.closing = True
        groups.wrote(1)
        return groups.failed

    assert asyncio.run(main())
    assert client.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1


@pytest.mark.parametrize("output", ["jetstream", "dynamo"])
async def test_a_steady_flow_wakes_the_relay_once_per_batch(
        output: str, nats_server: NatsServer, tmp_path: Path) -> None:
    """At 100 batches/s the relay's main thread wakes for each batch and reads its acks (or
    markers) at those wake-ups: under 1.4 wake-ups per batch (2 when each ack wakes it); it
    writes each batch to NATS in one write, which also carries any marker `--format dynamo`
    sends (under 1.08 writes per batch; a marker in a write of its own every 50 ms makes
    1.2); and every batch is still confirmed once the flow stops."""
    with SyntheticVllm("tcp://127.0.0.1:*") as vllm:
        relay = relay_process(output, vllm, nats_server, tmp_path)
        try:
            await relay.healthy(within=20)
            loop = asyncio.get_running_loop()
            for _ in range(20):
                vllm.publish_next()
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
            before, batches = wakeups(relay.proc.pid), 300
            wrote = writes(relay.proc.pid)
            next_at = loop.time()
            for _ in range(batches):
                vllm.publish_next()
                next_at += 0.01
                await asyncio.sleep(max(0.0, next_at - loop.time()))
            woken = wakeups(relay.proc.pid) - before
            wrote = writes(relay.proc.pid) - wrote
            for _ in range(100):
                if await scrape(relay.system_port, "kvrelay_batches_published_total") \
                        >= batches + 20:
                    break
                await asyncio.sleep(0.05)
            assert await scrape(relay.system_port, "kvrelay_batches_published_total") \
                == batches + 20
            assert woken / batches < 1.4, f"{woken} wake-ups for {batches} batches"
            assert wrote / batches < 1.08, f"{wrote} writes for {batches} batches"
        finally:
            relay.stop()


def writes(pid: int) -> int:
    """Write system calls the process's main thread made (the loop's writes to sockets; logs
    and the system port are quiet meanwhile)."""
    with open(f"/proc/{pid}/task/{pid}/io") as f:
        for line in f:
            if line.startswith("syscw:"):
                return int(line.split()[1])
    raise LookupError("no syscw in /proc")


def test_the_grouping_never_closes_the_connection(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """The grouping's socket object borrows the transport's descriptor: closed or collected,
    it leaves the descriptor open (the connection is the transport's to close)."""
    client, peer = pair

    async def main() -> None:
        ReplyGroups(SocketTransport(client), lambda: False).close()
        ReplyGroups(SocketTransport(client), lambda: False)  # collected without a close
        gc.collect()

    asyncio.run(main())
    peer.sendall(b"PING\r\n")
    client.setblocking(True)
    client.settimeout(5)
    assert client.recv(16) == b"PING\r\n"
