"""The canary on nats-py's internals: every private name kvrelay/natsio/outbox.py relies on
(its INTERNALS) exists and is what it must be on the nats-py installed, checked on a client
connected to a real nats-server; the check names what a nats-py release took away or changed,
and the relay refuses to publish through it. Then both links (`--nats-engine`): order, replies,
discard."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from harness import eventually, new_instance_id
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from kvrelay.config import Config
from kvrelay.ingest.budget import Budget
from kvrelay.ingest.buffer import Buffer
from kvrelay.jetstream.publisher import Publisher
from kvrelay.natsio.link import DirectLink, NatsPyIncompatible, header_block, new_link
from kvrelay.natsio.outbox import (
    INTERNALS,
    InboxClient,
    check_internals,
    incompatibilities,
    internals_of,
)
from kvrelay.system.metrics import Metrics
from kvrelay.testing.natsserver import NatsServer
from kvrelay.wire.names import Worker


@pytest.fixture
async def connected(nats_server: NatsServer) -> AsyncIterator[tuple[Client, Subscription]]:
    """nats-py's own Client (not kvrelay's subclass, whose overrides would hide nats-py's
    methods), connected, with one subscription."""
    nc = Client()
    await nc.connect(nats_server.url)
    try:
        yield nc, await nc.subscribe(nc.new_inbox())
    finally:
        await nc.close()


class Without:
    """Stands in for `real`, lacking attribute `name`."""

    def __init__(self, real: object, name: str) -> None:
        self._real = real
        self._lacks = name

    def __getattr__(self, name: str) -> Any:
        if name == self._lacks:
            raise AttributeError(name)
        return getattr(self._real, name)


async def test_nats_py_has_every_internal_kvrelay_relies_on(
        connected: tuple[Client, Subscription]) -> None:
    """Each of INTERNALS exists on the installed nats-py, connected over TCP, and is of the
    kind the outbox expects; none goes unchecked."""
    owners = internals_of(*connected)
    assert {owner for owner, _, _ in INTERNALS} <= owners.keys()
    problems = check_internals(owners)
    assert not problems, "nats-py changed what kvrelay/natsio/outbox.py relies on: " + \
        "; ".join(problems)


@pytest.mark.parametrize(("owner", "name"), [(owner, name) for owner, name, _ in INTERNALS],
                         ids=[f"{owner}.{name}" for owner, name, _ in INTERNALS])
async def test_the_canary_names_a_missing_internal(
        connected: tuple[Client, Subscription], owner: str, name: str) -> None:
    """Against a stand-in lacking one of INTERNALS, the check reports exactly that one, by
    owner and name."""
    owners = internals_of(*connected)
    owners[owner] = Without(owners[owner], name)
    assert check_internals(owners) == [f"{owner}.{name} is missing"]


class Reordered(Client):
    """nats-py's Client as a release might change it: `_process_msg` taking `data` before
    `reply`."""

    async def _process_msg(  # type: ignore[override]  # the change the canary must see
            self, sid: int, subject: bytes, data: bytes, reply: bytes, headers: bytes) -> None:
        await super()._process_msg(sid, subject, reply, data, headers)


async def test_the_canary_names_a_changed_internal(
        connected: tuple[Client, Subscription]) -> None:
    """An internal of another type, or a method whose parameters moved, is named with what
    it is and what it must be."""
    nc, sub = connected
    nc._pending = ()  # type: ignore[assignment]  # as a release might keep it
    try:
        assert incompatibilities(nc, sub) == ["Client._pending is tuple, not list"]
    finally:
        nc._pending = []
    owners = internals_of(nc, sub)
    owners["Client"] = Reordered()
    assert [p for p in check_internals(owners) if "_process_msg" in p] == [
        "Client._process_msg takes (sid, subject, data, reply, headers), "
        "not (sid, subject, reply, data, headers)"]


async def nothing(*_: Any) -> None:
    pass


class Changed(InboxClient):
    """kvrelay's client on a nats-py whose `_process_msg` takes `data` before `reply`."""

    async def _process_msg(  # type: ignore[override]  # the change under test
            self, sid: int, subject: bytes, data: bytes, reply: bytes,
            headers: bytes | None) -> None:
        await super()._process_msg(sid, subject, reply, data, headers)


async def test_a_direct_link_refuses_a_changed_nats_py(
        nats_server: NatsServer) -> None:
    """--nats-engine direct on a nats-py whose internals changed stops at connect with an
    error that names what changed, instead of publishing through it."""
    link = DirectLink(new_client=Changed)
    nc = await link.connect({"servers": [nats_server.url], "allow_reconnect": False}, nothing,
                            nothing, nothing)
    try:
        with pytest.raises(NatsPyIncompatible,
                           match=r"Client\._process_msg takes \(sid, subject, data, reply"):
            await link.open_inbox(lambda subject, data: None, wildcard=True)
    finally:
        await nc.close()


async def test_the_publisher_on_a_changed_nats_py_is_fatal(nats_server: NatsServer) -> None:
    """The JetStream publisher on such a nats-py reports it as fatal (the relay exits 2) with
    the name of what changed, and does not come online."""
    config = Config.load({"nats": nats_server.url}, {})
    metrics = Metrics()
    publisher = Publisher(Worker("dynamo", "backend", new_instance_id()), config.nats,
                          config.publish, config.stream, Buffer(Budget(10, 1 << 20), metrics),
                          metrics)
    publisher._link = DirectLink(new_client=Changed)
    await publisher.connect([0])
    assert publisher.fatal.done()
    assert "Client._process_msg takes (sid, subject, data, reply, headers)" in str(
        publisher.fatal.result())
    assert not publisher.connected
    await publisher.close()


async def listening(nc: Any, subject: str, got: list[Msg], answer: bool = False) -> None:
    """Subscribe `got` to `subject` (with `answer`: replying with each message's data) and
    return once the server routes it: a probe through it came back (nats-py's flush() does
    not say so: its PING can pass the SUB)."""

    async def collect(msg: Msg) -> None:
        if msg.data == b"probe":
            probed.set()
            return
        got.append(msg)
        if answer and msg.reply:
            await nc.publish(msg.reply, msg.data)

    probed = asyncio.Event()
    await nc.subscribe(subject, cb=collect)
    await nc.publish(subject, b"probe")
    await asyncio.wait_for(probed.wait(), 10)


@pytest.mark.parametrize("engine", ["direct", "public"])
async def test_a_link_sends_in_call_order_and_routes_replies(
        nats_server: NatsServer, nc: Any, engine: str) -> None:
    """Publishes put in a turn, an awaited one after them and puts after that reach a
    subscriber in call order with their headers (given as a dict or a ready block), and
    replies reach the inbox handler, with either --nats-engine."""
    link = new_link(engine)
    await link.connect({"servers": [nats_server.url]}, nothing, nothing, nothing)
    replies: list[bytes] = []
    inbox = await link.open_inbox(lambda subject, data: replies.append(data), wildcard=True)
    subject = f"natsio.order.{engine}"
    got: list[Msg] = []
    await listening(nc, subject, got, answer=True)
    try:
        for n in range(100):  # headers as a dict, or as the ready block the steady state uses
            headers = {"Nats-Msg-Id": str(n)}
            link.put(subject, b"%d" % n, f"{inbox}{n}",
                     header_block(headers) if n % 2 else headers)
        await link.publish(subject, b"100", headers={"Nats-Msg-Id": "100"})
        for n in range(101, 200):
            link.put(subject, b"%d" % n)
        link.flush()
        await eventually(lambda: len(got) >= 200, "200 messages", within=20)
        await eventually(lambda: len(replies) >= 100, "100 replies", within=20)
        assert [m.data for m in got] == [b"%d" % n for n in range(200)]
        assert [m.headers for m in got[:101]] == [{"Nats-Msg-Id": str(n)} for n in range(101)]
        assert all(not m.headers for m in got[101:])
        assert replies == [b"%d" % n for n in range(100)]
    finally:
        assert link.nc is not None
        await link.nc.close()


@pytest.mark.parametrize("engine", ["direct", "public"])
async def test_discard_forgets_what_was_not_written(
        nats_server: NatsServer, nc: Any, engine: str) -> None:
    """What was put and then discarded in the same turn never reaches the server; what is put
    after it does."""
    link = new_link(engine)
    await link.connect({"servers": [nats_server.url]}, nothing, nothing, nothing)
    subject = f"natsio.discard.{engine}"
    got: list[Msg] = []
    await listening(nc, subject, got)
    try:
        for n in range(10):
            link.put(subject, b"%d" % n)
        link.discard()
        link.put(subject, b"after")
        await eventually(lambda: len(got) >= 1, "the publish after the discard")
        assert link.nc is not None
        await link.nc.flush()
        await nc.flush()
        assert [m.data for m in got] == [b"after"]
    finally:
        assert link.nc is not None
        await link.nc.close()
