"""The canary on nats-py's internals: every private name kvrelay/natsio/outbox.py relies on
(its INTERNALS) exists and is what it must be on the nats-py installed, checked on a client
connected to a real nats-server; and the check names what a nats-py release took away."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.subscription import Subscription

from kvrelay.natsio.outbox import (
    INTERNALS,
    check_internals,
    incompatibilities,
    internals_of,
)
from kvrelay.testing.natsserver import NatsServer


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
