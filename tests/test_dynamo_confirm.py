"""How `--format dynamo` confirms what it published: markers through the relay's own inbox, one
out at a time, each confirming everything published before it. Real nats-server, real ZMQ."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import nats
import pytest
from dynamo_support import (
    ANY_PORT,
    eventually,
    kv_event_reader,
    publisher,
    running_dynamo_relay,
)
from harness import is_ready, join, metric
from nats.aio.msg import Msg

from kvrelay.dynamo.confirm import MARKER_INTERVAL
from kvrelay.testing.natsserver import NatsServer
from kvrelay.testing.synthetic import SyntheticVllm, WorkloadFactory

pytestmark = pytest.mark.integration

_instance_ids = iter(range(2**63 + 7001, 2**64))


@asynccontextmanager
async def inbox_counter(url: str) -> AsyncIterator[list[bytes]]:
    """Every message published on any `_INBOX.` subject (the relay's markers), as it arrives."""
    seen: list[bytes] = []
    nc = await nats.connect(url, connect_timeout=2)

    async def count(msg: Msg) -> None:
        seen.append(msg.data)

    try:
        await nc.subscribe("_INBOX.>", cb=count)
        await nc.flush()
        yield seen
    finally:
        await nc.close()


async def test_a_burst_is_confirmed_by_few_markers(fresh_nats: NatsServer,
                                                   tmp_path: Path) -> None:
    """A burst of batches is confirmed by far fewer markers than batches (one is out at a
    time, and its return confirms everything published before it), and nothing is
    published twice."""
    burst = 200
    async with kv_event_reader(fresh_nats.url) as reader, inbox_counter(fresh_nats.url) as markers:
        with SyntheticVllm(ANY_PORT, factory=WorkloadFactory(seed=11)) as vllm:
            async with running_dynamo_relay(tmp_path, nats=fresh_nats.url,
                                            instance_id=next(_instance_ids),
                                            zmq=[vllm.address]) as relay:
                await eventually(lambda: is_ready(relay), "relay ready")
                await join(vllm, relay)
                for _ in range(burst):
                    vllm.publish_next()
                await eventually(lambda: metric(relay, "kvrelay_batches_published_total")
                                 == burst, "the burst confirmed")
                assert publisher(relay).in_flight == 0
                assert metric(relay, "kvrelay_publish_in_flight") == 0
                assert metric(relay, "kvrelay_dynamo_republished_total") == 0
                pid = publisher(relay).publisher_id(0)
                messages = publisher(relay).messages_sent(0)
                await eventually(lambda: len([m for m in reader.messages
                                              if m.publisher_id == pid]) == messages,
                                 "every message at the reader")
    assert 1 <= len(markers) < burst // 4, f"{len(markers)} markers for {burst} batches"
    sequences = [m.sequence for m in reader.messages if m.publisher_id == pid]
    assert sequences == list(range(len(sequences)))
    assert len(sequences) == messages


async def test_a_window_half_full_sends_its_marker_at_once(fresh_nats: NatsServer,
                                                           tmp_path: Path) -> None:
    """A window of 2 messages, a burst of 100 batches one per message: a marker goes as soon as
    the window is half full instead of at its interval, so the burst is through in well under
    the 50 intervals it would otherwise take, confirmed, in order, once each."""
    burst = 100
    async with kv_event_reader(fresh_nats.url) as reader:
        with SyntheticVllm(ANY_PORT, factory=WorkloadFactory(seed=12)) as vllm:
            async with running_dynamo_relay(tmp_path, nats=fresh_nats.url,
                                            instance_id=next(_instance_ids),
                                            zmq=[vllm.address], max_in_flight=2,
                                            dynamo_batches_per_message=1) as relay:
                await eventually(lambda: is_ready(relay), "relay ready")
                await join(vllm, relay)
                start = time.monotonic()
                for _ in range(burst):
                    vllm.publish_next()
                await eventually(lambda: metric(relay, "kvrelay_batches_published_total")
                                 == burst, "the burst confirmed", within=20)
                took = time.monotonic() - start
                assert metric(relay, "kvrelay_dynamo_republished_total") == 0
                pid = publisher(relay).publisher_id(0)
    assert took < burst // 2 * MARKER_INTERVAL / 2, f"{took:.2f}s for {burst} batches"
    sequences = [m.sequence for m in reader.messages if m.publisher_id == pid]
    assert sequences == list(range(burst))


PASSWORD = "confirm-secret"


def _auth_config(inbox_allowed: bool) -> str:
    """The relay's user, denied publishing to `_INBOX.>` (its markers) unless allowed."""
    relay_perms = "" if inbox_allowed else ', permissions: { publish: { deny: ["_INBOX.>"] } }'
    return ("authorization { users = [\n"
            f'  {{ user: relay, password: "{PASSWORD}"{relay_perms} }}\n'
            f'  {{ user: reader, password: "{PASSWORD}" }}\n'
            "] }\n")


@pytest.fixture
def guarded_nats(tmp_path: Path) -> Iterator[tuple[NatsServer, Path]]:
    """A server whose configuration file a test may rewrite and reload."""
    conf = tmp_path / "nats.conf"
    conf.write_text(_auth_config(inbox_allowed=False))
    # No --name: nats-server reloads only a configuration the command line does not override.
    server = NatsServer(tmp_path / "nats", jetstream=False, extra_args=["-c", str(conf)])
    server.start()
    try:
        yield server, conf
    finally:
        server.stop()


async def test_lost_markers_republish_the_window_whole_and_in_order(
        guarded_nats: tuple[NatsServer, Path], tmp_path: Path) -> None:
    """Markers the server drops (the connection stays up) are never confirmed: after the ack
    timeout the whole window goes again, in order, each time; once markers pass, everything
    is confirmed and the republishing stops."""
    server, conf = guarded_nats
    reader_url = server.url.replace("nats://", f"nats://reader:{PASSWORD}@")
    async with kv_event_reader(reader_url) as reader:
        with SyntheticVllm(ANY_PORT, factory=WorkloadFactory(seed=12)) as vllm:
            async with running_dynamo_relay(tmp_path / "kv", nats=server.url,
                                            nats_user="relay", nats_password=PASSWORD,
                                            instance_id=next(_instance_ids),
                                            zmq=[vllm.address], ack_timeout=0.3,
                                            reconnect_wait_max=0.2) as relay:
                await eventually(lambda: is_ready(relay), "relay ready")
                await join(vllm, relay)
                for sent in range(1, 6):  # one message each: each waits for the last
                    vllm.publish_next()
                    await eventually(lambda n=sent: publisher(relay).in_flight == n,  # type: ignore[misc]
                                     f"message {sent} in flight")
                pid = publisher(relay).publisher_id(0)

                def arrived() -> list[int]:
                    return [m.sequence for m in reader.messages if m.publisher_id == pid]

                await eventually(lambda: len(arrived()) >= 15, "the window published 3 times")
                assert metric(relay, "kvrelay_batches_published_total") == 0
                assert metric(relay, "kvrelay_publish_in_flight") == 5
                assert metric(relay, "kvrelay_nats_reconnects_total") == 0
                conf.write_text(_auth_config(inbox_allowed=True))
                assert server.pid is not None
                os.kill(server.pid, signal.SIGHUP)  # nats-server reloads its configuration
                await eventually(lambda: metric(relay, "kvrelay_batches_published_total")
                                 == 5, "every batch confirmed once markers pass")
                republished = metric(relay, "kvrelay_dynamo_republished_total")
                for confirmed in (6, 7):  # one message each: each waits for the last
                    vllm.publish_next()
                    await eventually(lambda n=confirmed: metric(  # type: ignore[misc]
                        relay, "kvrelay_batches_published_total") == n, "a later batch confirmed")
                await eventually(lambda: arrived()[-1:] == [6], "the later batches arrived")
                assert metric(relay, "kvrelay_dynamo_republished_total") == republished
    sequences = arrived()
    rounds, rest = divmod(len(sequences) - 2, 5)
    assert rest == 0, sequences
    assert rounds >= 3, sequences
    assert sequences == [*range(5)] * rounds + [5, 6]
    assert republished == 5 * (rounds - 1)
