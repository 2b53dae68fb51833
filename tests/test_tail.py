"""`kvrelay tail`: operators see each published RelayBatch as one line."""

from __future__ import annotations

import io

import msgspec
import nats

from kvrelay.codec import Codec
from kvrelay.config import Config
from kvrelay.jetstream.stream import ensure_stream
from kvrelay.ops.tail import tail_async
from kvrelay.testing.natsserver import NatsServer
from kvrelay.wire.schema import RelayBatch, Resync, Stored

SUBJECT = "kv.tailtest.backend.11.0"


async def test_tail_from_start_prints_one_line_per_batch(fresh_nats: NatsServer) -> None:
    """--from-start prints every batch on the subject in order, with epoch, seq and events."""
    nc = await nats.connect(fresh_nats.url)
    try:
        js = nc.jetstream()
        await ensure_stream(js, Config.load({}, {}).stream, [SUBJECT])
        codecs = [Codec("msgpack"), Codec("json")]
        for seq in range(4):
            events: list[Stored | Resync] = [Stored([seq, seq + 100], None, [1] * 32, 16)]
            if seq == 2:
                events.insert(0, Resync("gap", 0, 1))
            batch = RelayBatch(instance_id=11, dp_rank=0, epoch=3, seq=seq, ts=1.0,
                               relay_ts=1.001, events=list(events))
            await js.publish(SUBJECT, codecs[seq % 2].encode(batch))
        await js.publish(SUBJECT, msgspec.msgpack.encode(["not", "a", "batch"]))
    finally:
        await nc.close()

    out = io.StringIO()
    code = await tail_async(fresh_nats.url, "KV_EVENTS", "kv.tailtest.>", from_start=True,
                            count=5, out=out)
    lines = out.getvalue().splitlines()
    assert code == 0
    assert len(lines) == 5
    assert [line.split()[2] for line in lines[:4]] == ["seq=0", "seq=1", "seq=2", "seq=3"]
    assert all(line.startswith(f"{SUBJECT} epoch=3 ") for line in lines[:4])
    assert "lag=1.0ms" in lines[0]
    assert "stored(blocks=2" in lines[1]
    assert "resync(reason=gap, missed_from=0, missed_to=1)" in lines[2]
    assert "undecodable" in lines[4]


async def test_tail_reports_unreachable_nats(fresh_nats: NatsServer) -> None:
    """With no server at the URL, tail says so and exits 1 instead of hanging."""
    fresh_nats.stop()
    out = io.StringIO()
    code = await tail_async(fresh_nats.url, "KV_EVENTS", "kv.>", from_start=True, count=1,
                            out=out)
    assert code == 1
    assert out.getvalue() == ""


async def test_tail_reports_missing_stream(fresh_nats: NatsServer) -> None:
    """A stream that does not exist is a clear error (exit 1), not a traceback."""
    code = await tail_async(fresh_nats.url, "NO_SUCH", "kv.>", from_start=True, count=1,
                            out=io.StringIO())
    assert code == 1
