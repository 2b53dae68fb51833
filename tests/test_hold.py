"""Replies held for the relay's next wake-up (kvrelay/natsio/hold.py), on a real nats-server:
a held socket's replies wait until they are read by hand or the linger passes, after which the
loop watches the socket again; a socket the server closed while held is released and its close
reported; a TLS socket is never held; and a relay fed at a paced rate reads each JetStream ack
in the wake-up of vLLM's next batch."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import nats
from harness import (
    ANY_PORT,
    eventually,
    join,
    metric,
    nats_client,
    new_instance_id,
    read_stream,
    running_relay,
    seqs,
    subject_of,
)
from nats.aio.msg import Msg
from test_natsio import listening, nothing
from test_security import Pki, pki, server_with, tls_block  # noqa: F401  (pki: a fixture)

from kvrelay.config import NatsSettings
from kvrelay.natsio.link import DirectLink
from kvrelay.natsio.options import nats_options
from kvrelay.testing.natsserver import NatsServer
from kvrelay.testing.synthetic import SyntheticVllm


async def replying_link(url: str, nc: Any, subject: str, linger: float,
                        options: dict[str, Any] | None = None,
                        disconnected: Any = nothing) -> tuple[DirectLink, str, list[bytes]]:
    """A direct link holding replies up to `linger` s, its inbox, and the replies it read;
    `nc` answers every message on `subject`."""
    link = DirectLink(linger=linger)
    await link.connect(options or {"servers": [url]}, nothing, disconnected, nothing)
    replies: list[bytes] = []
    inbox = await link.open_inbox(lambda _subject, data: replies.append(data), wildcard=True)
    await listening(nc, subject, ANSWERED.setdefault(subject, []), answer=True)
    return link, inbox, replies


def held(link: DirectLink) -> bool:
    return link.replies_held


ANSWERED: dict[str, list[Msg]] = {}  # subject -> what its responder answered


async def answered(link: DirectLink, nc: Any, subject: str, inbox: str, data: bytes) -> None:
    """Publish `data` with a reply subject and hold; return once its answer has been sent
    back to the link's socket (the responder `nc` flushed it, a round trip later)."""
    got = ANSWERED[subject]
    link.put(subject, data, f"{inbox}{data.decode()}")
    link.flush()
    link.hold_replies()
    await eventually(lambda: any(m.data == data for m in got), "the message at the responder")
    await nc.flush()
    await asyncio.sleep(0.1)  # the answer crosses the loopback


async def test_held_replies_wait_until_read(nats_server: NatsServer, nc: Any) -> None:
    """Held, a reply that reached the socket is not read by the loop; `read_replies` hands it
    over at once; released, replies are read as they arrive again."""
    subject = "hold.read"
    link, inbox, replies = await replying_link(nats_server.url, nc, subject, linger=30.0)
    try:
        await answered(link, nc, subject, inbox, b"1")
        assert link.replies_held
        assert replies == []
        link.read_replies()
        assert replies == [b"1"]
        assert held(link)  # reading by hand keeps the hold
        link.release_replies()
        assert not held(link)
        link.put(subject, b"2", f"{inbox}2")
        await eventually(lambda: replies == [b"1", b"2"], "a reply read as it arrives")
    finally:
        link.release_replies()
        assert link.nc is not None
        await link.nc.close()


async def test_the_linger_reads_and_releases(nats_server: NatsServer, nc: Any) -> None:
    """Nothing reads a held socket by hand: its replies are read `linger` seconds after the
    hold, and the socket is watched again (an idle relay keeps no timer)."""
    subject = "hold.linger"
    link, inbox, replies = await replying_link(nats_server.url, nc, subject, linger=0.5)
    try:
        await answered(link, nc, subject, inbox, b"1")
        assert replies == []
        await eventually(lambda: replies == [b"1"], "the reply after the linger", within=3)
        assert not link.replies_held
    finally:
        assert link.nc is not None
        await link.nc.close()


async def test_no_linger_never_holds(nats_server: NatsServer, nc: Any) -> None:
    """`--reply-linger 0`: the socket is never held, replies are read as they arrive."""
    subject = "hold.none"
    link, inbox, replies = await replying_link(nats_server.url, nc, subject, linger=0.0)
    try:
        link.put(subject, b"1", f"{inbox}1")
        link.flush()
        link.hold_replies()
        assert not link.replies_held
        await eventually(lambda: replies == [b"1"], "the reply as it arrives")
    finally:
        assert link.nc is not None
        await link.nc.close()


async def test_a_socket_closed_while_held_is_released(fresh_nats: NatsServer) -> None:
    """The server goes away while the socket is held: reads by hand take what came before the
    close, then find it closed, let the loop watch the socket again, and nats-py reports the
    disconnect."""
    lost = asyncio.Event()

    async def disconnected() -> None:
        lost.set()

    async with nats_client(fresh_nats.url) as nc:
        link, inbox, replies = await replying_link(
            fresh_nats.url, nc, "hold.closed", linger=30.0,
            options={"servers": [fresh_nats.url], "max_reconnect_attempts": 0},
            disconnected=disconnected)
        try:
            await answered(link, nc, "hold.closed", inbox, b"1")
            fresh_nats.stop()
            await asyncio.sleep(0.3)
            assert not lost.is_set()  # held: nothing watches the socket
            link.read_replies()
            assert replies == [b"1"]  # what came before the close
            link.read_replies()
            assert not link.replies_held
            await asyncio.wait_for(lost.wait(), 10)
        finally:
            link.release_replies()
            assert link.nc is not None
            await link.nc.close()


async def test_tls_is_never_held(tmp_path: Path, pki: Pki) -> None:  # noqa: F811
    """A TLS socket carries records, not the protocol: it is read as it arrives."""
    server = server_with(tmp_path, tls_block(pki))
    try:
        settings = NatsSettings(servers=server.url, nats_tls_ca=str(pki.ca),
                                nats_tls_cert=str(pki.client_cert),
                                nats_tls_key=str(pki.client_key))
        options = nats_options(settings)
        nc = await nats.connect(**options)
        link, inbox, replies = await replying_link(server.url, nc, "hold.tls", linger=30.0,
                                                   options=options)
        try:
            link.put("hold.tls", b"1", f"{inbox}1")
            link.flush()
            link.hold_replies()
            assert not link.replies_held
            await eventually(lambda: replies == [b"1"], "the reply as it arrives")
        finally:
            assert link.nc is not None
            await link.nc.close()
            await nc.close()
    finally:
        server.stop()


async def test_a_relay_reads_each_ack_with_the_next_batch(fresh_nats: NatsServer) -> None:
    """A relay at rest after a batch holds its socket: JetStream stored the batch, but its ack
    waits on the socket (not yet counted as published) until vLLM's next batch wakes the
    relay, which reads it then; with `--reply-linger 0` the ack is read as it arrives."""
    for linger, read_at_once in ((1.0, False), (0.0, True)):
        instance = new_instance_id()
        with SyntheticVllm(ANY_PORT) as vllm:
            async with running_relay(nats=fresh_nats.url, instance_id=instance,
                                     zmq=[vllm.address], reply_linger=linger) as relay:
                await join(vllm, relay)
                vllm.publish_next()
                async with nats_client(fresh_nats.url) as client:
                    got = await read_stream(client, subject_of(instance), 1)
                assert seqs(got) == [(0, 0)]
                await asyncio.sleep(0.3)
                published = metric(relay, "kvrelay_batches_published_total")
                assert published == (1 if read_at_once else 0), linger
                vllm.publish_next()
                await eventually(lambda: metric(relay, "kvrelay_batches_published_total") >= 1,
                                 "the first ack, read with the second batch", within=2)
