"""Shared fixtures: real nats-server processes, so tests see real JetStream behaviour."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.natsserver import NatsServer


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One JetStream server shared by the whole run; tests must not kill or pause it."""
    with NatsServer(tmp_path_factory.mktemp("nats-session"), name="session") as server:
        yield server


@pytest.fixture
def fresh_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A private JetStream server a test may kill, restart or pause; always stopped after."""
    server = NatsServer(tmp_path / "nats", name="fresh")
    server.start()
    try:
        yield server
    finally:
        server.stop()
