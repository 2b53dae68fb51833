"""The nats-server harness really runs JetStream, survives restarts and can be stalled."""

import asyncio

import nats
import pytest
from nats.errors import TimeoutError as NatsTimeoutError

from kvrelay.testing.natsserver import NatsServer


async def test_session_server_serves_jetstream(nats_server: NatsServer) -> None:
    """The shared server accepts a client and answers JetStream API calls."""
    nc = await nats.connect(nats_server.url)
    try:
        info = await nc.jetstream().account_info()
        assert info.limits is not None
    finally:
        await nc.close()


async def test_restart_keeps_port_and_stream_data(fresh_nats: NatsServer) -> None:
    """A restarted server comes back on the same port with its file-stored stream intact."""
    nc = await nats.connect(fresh_nats.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="KEEP", subjects=["keep.>"])
        for i in range(3):
            await js.publish("keep.x", f"m{i}".encode())
    finally:
        await nc.close()

    port = fresh_nats.port
    fresh_nats.restart()
    assert fresh_nats.running
    assert fresh_nats.port == port

    nc = await nats.connect(fresh_nats.url)
    try:
        js = nc.jetstream()
        assert (await js.stream_info("KEEP")).state.messages == 3
        msgs = [await js.get_msg("KEEP", seq) for seq in (1, 2, 3)]
        assert [m.data for m in msgs] == [b"m0", b"m1", b"m2"]
    finally:
        await nc.close()


async def test_pause_times_out_publish_and_resume_recovers(fresh_nats: NatsServer) -> None:
    """While paused a publish ack never arrives; after resume publishing works again."""
    nc = await nats.connect(fresh_nats.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="STALL", subjects=["stall"])
        fresh_nats.pause()
        try:
            with pytest.raises((NatsTimeoutError, asyncio.TimeoutError)):
                await js.publish("stall", b"lost?", timeout=0.5)
        finally:
            fresh_nats.resume()
        ack = await js.publish("stall", b"after", timeout=5)
        assert ack.stream == "STALL"
    finally:
        await nc.close()


async def test_kill_then_start_serves_same_url(fresh_nats: NatsServer) -> None:
    """A SIGKILLed server can be started again and accepts clients at the same URL."""
    url = fresh_nats.url
    fresh_nats.kill()
    assert not fresh_nats.running
    fresh_nats.start()
    assert fresh_nats.url == url
    nc = await nats.connect(url)
    await nc.close()
