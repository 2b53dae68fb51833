"""InboxClient: reply-inbox messages handled as the socket's bytes arrive, every other message
through nats-py, nothing lost or reordered on either side (real nats-server)."""

from __future__ import annotations

import asyncio
from typing import Any

import nats
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.transport import TcpTransport
from strategies import REPLY_INBOX, REPLY_SID, chunkings, nats_operations

from kvrelay.natsio.outbox import InboxClient, subscription_sid
from kvrelay.testing.natsserver import NatsServer


class CountingClient(InboxClient):
    """Counts the reply-inbox messages that took nats-py's parser instead of the direct path."""

    parsed = 0

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                           headers: bytes | None) -> None:
        if sid == self.inbox_sid:
            self.parsed += 1
        await super()._process_msg(sid, subject, reply, data, headers)


async def routed_client(url: str, reconnected: asyncio.Event | None = None
                        ) -> tuple[CountingClient, str, list[tuple[bytes, bytes]]]:
    client = CountingClient()

    async def on_reconnected() -> None:
        if reconnected is not None:
            reconnected.set()

    await client.connect(url, max_reconnect_attempts=-1, reconnected_cb=on_reconnected)
    inbox = client.new_inbox() + "."
    got: list[tuple[bytes, bytes]] = []
    sid = subscription_sid(await client.subscribe(inbox + "*"))
    client.route_inbox(inbox, sid, lambda subject, data: got.append((subject, data)))
    return client, inbox, got


async def until(check: Any, within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_replies_and_other_messages_both_arrive_in_order(nats_server: NatsServer) -> None:
    """Replies interleaved with another subscription's messages, small and over a read long:
    each side gets all of its own, in order, and most replies skip nats-py's parser."""
    client, inbox, got = await routed_client(nats_server.url)
    others: list[bytes] = []

    async def on_other(msg: Any) -> None:
        others.append(msg.data)

    await client.subscribe("other.subject", cb=on_other)
    await client.flush()
    sender = await nats.connect(nats_server.url)
    try:
        sent: list[tuple[bytes, bytes]] = []
        for n in range(3000):
            size = 200_000 if n % 500 == 7 else 40  # some replies are cut across reads
            reply = (f"{inbox}{n}".encode(), str(n).encode().ljust(size, b"."))
            sent.append(reply)
            await sender.publish(reply[0].decode(), reply[1])
            if n % 3 == 0:
                await sender.publish("other.subject", str(n).encode())
        await sender.flush()
        await until(lambda: len(got) >= len(sent) and len(others) >= 1000)
        assert got == sent
        assert others == [str(n).encode() for n in range(0, 3000, 3)]
        assert client.parsed < len(sent) / 2, f"{client.parsed} of {len(sent)} parsed by nats-py"
        assert client.stats["in_msgs"] == len(sent) + len(others)
    finally:
        await sender.close()
        await client.close()


async def test_direct_path_survives_a_reconnect(fresh_nats: NatsServer) -> None:
    """After NATS restarts, the new socket's replies take the direct path too."""
    reconnected = asyncio.Event()
    client, inbox, got = await routed_client(fresh_nats.url, reconnected)
    try:
        fresh_nats.restart()
        await asyncio.wait_for(reconnected.wait(), 20)
        await client.flush()
        sender = await nats.connect(fresh_nats.url)
        try:
            before = client.parsed
            for n in range(500):
                await sender.publish(f"{inbox}{n}", b"ack")
            await sender.flush()
            await until(lambda: len(got) >= 500)
            assert [subject for subject, _ in got] == [f"{inbox}{n}".encode() for n in range(500)]
            assert client.parsed - before < 250
        finally:
            await sender.close()
    finally:
        await client.close()


async def test_a_failing_handler_does_not_stop_reading(nats_server: NatsServer) -> None:
    """A handler that raises is logged; the replies after it still arrive."""
    client = InboxClient()
    await client.connect(nats_server.url)
    inbox = client.new_inbox() + "."
    got: list[bytes] = []

    def handler(subject: bytes, data: bytes) -> None:
        if data == b"bad":
            raise ValueError("unreadable")
        got.append(data)

    client.route_inbox(inbox, subscription_sid(await client.subscribe(inbox + "*")), handler)
    sender = await nats.connect(nats_server.url)
    try:
        for data in (b"1", b"bad", b"2"):
            await sender.publish(f"{inbox}x", data)
        await sender.flush()
        await until(lambda: len(got) >= 2)
        assert got == [b"1", b"2"]
    finally:
        await sender.close()
        await client.close()


@settings(deadline=None, max_examples=200)
@given(operations=st.lists(nats_operations(), max_size=30), data=st.data())
async def test_any_cut_of_the_stream_splits_the_same_way(
        operations: list[tuple[bytes, bool]], data: st.DataObject) -> None:
    """However the socket's bytes are cut into reads, replies reach the handler and every other
    operation reaches nats-py's reader whole, each side in order."""
    stream = b"".join(op for op, _ in operations)
    cuts = data.draw(chunkings(len(stream)))
    client = InboxClient()
    reader = asyncio.StreamReader()
    transport = TcpTransport()  # type: ignore[no-untyped-call]
    transport._io_reader = reader
    client._transport = transport
    handled: list[bytes] = []
    client.route_inbox(REPLY_INBOX, REPLY_SID, lambda subject, payload: handled.append(subject))
    client._read_inbox_first()
    for start, stop in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        reader.feed_data(stream[start:stop])
    replies = [op.split(b" ", 2)[1] for op, is_reply in operations if is_reply]
    assert handled == replies
    reached_nats_py: bytearray = reader._buffer  # type: ignore[attr-defined]
    assert bytes(reached_nats_py) == b"".join(op for op, is_reply in operations if not is_reply)
