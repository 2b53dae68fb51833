"""JetStream fast-ingest batches (nats-server 2.14+, `allow_batched`) against per-message acks.

Two parts, both against a real nats-server:

``probe`` drives the fast-ingest protocol by hand and prints every reply the server sends
(subject, headers, payload): the ack cadence, a batch left idle past the server's timeout, a
ping, a gap in the batch sequence, a duplicate `Nats-Msg-Id`, an expected-last-subject-sequence
check, a server restart, a stream without `allow_batched`. Point `--server-bin` at an older
nats-server to see what a server without fast ingest answers.

``bench`` publishes ~450-byte payloads (four blocks' worth) on two subjects, as the relay does
(same HPUB bytes, same outbox, same headers), once with a JetStream ack per message (window of
4,000 on one wildcard inbox, the acks handed straight to a handler the way the relay's client
does) and once as one long fast-ingest batch with flow N; at fixed rates and flat out,
interleaved, and reports the publisher's CPU seconds per 1,000 stored messages, medians of the
repeats.

    python -m bench.fastingest_probe probe
    python -m bench.fastingest_probe bench --seconds 8 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec
import uvloop
from nats.aio.client import Client
from nats.aio.msg import Msg

from bench.procstat import cpu_seconds
from kvrelay.natsio.outbox import InboxClient, Outbox, subscription_sid
from kvrelay.testing.natsserver import NatsServer

STREAM: Final = "FI"
SUBJECTS: Final = ("kv.ns.comp.1.0", "kv.ns.comp.1.1")  # two DP ranks of one instance
PAYLOAD: Final = bytes(range(256)) * 2  # 512 bytes: ~450 of events plus the batch envelope
PAYLOAD_SIZE: Final = 450
WINDOW: Final = 4000

# Fast-ingest operations, the fifth-from-last token of the reply subject.
START, APPEND, COMMIT, COMMIT_EOB, PING = 0, 1, 2, 3, 4


class FlowFrame(msgspec.Struct):
    """Anything the server sends to a fast-ingest reply subject (flow ack, gap, error, or the
    batch's final ack, which has no `type`)."""

    type: str = ""
    seq: int = 0
    msgs: int = 0
    last_seq: int = 0
    stream: str = ""
    batch: str = ""
    count: int = 0
    error: dict[str, object] | None = None


class PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict[str, object] | None = None


_FRAME = msgspec.json.Decoder(FlowFrame)
_PUBACK = msgspec.json.Decoder(PubAck)


def fast_reply(inbox: str, flow: int, gap: str, seq: int, op: int) -> str:
    """`<inbox>.<flow>.<gap>.<batch seq>.<op>.$FI`: the whole fast-ingest protocol on the way in
    (the inbox's last token is the batch id)."""
    return f"{inbox}.{flow}.{gap}.{seq}.{op}.$FI"


def hpub(subject: str, reply: str, headers: dict[str, str], payload: bytes) -> bytes:
    """One HPUB command, built the way the relay's publisher builds it."""
    header = "".join(f"{key}: {value}\r\n" for key, value in headers.items())
    head = f"NATS/1.0\r\n{header}\r\n".encode()
    return b"".join((f"HPUB {subject} {reply} {len(head)} {len(head) + len(payload)}\r\n"
                     .encode(), head, payload, b"\r\n"))


async def create_stream(nc: Client, name: str, subjects: list[str], *, batched: bool,
                        replicas: int = 1) -> dict[str, object]:
    """Create a file stream with the raw API (nats-py's StreamConfig has no `allow_batched`)."""
    config: dict[str, object] = {"name": name, "subjects": subjects, "storage": "file",
                                 "num_replicas": replicas}
    if batched:
        config["allow_batched"] = True
    reply = await nc.request(f"$JS.API.STREAM.CREATE.{name}", json.dumps(config).encode(),
                             timeout=5)
    answer: dict[str, object] = json.loads(reply.data)
    return answer


async def stream_state(nc: Client, name: str) -> dict[str, int]:
    info = json.loads((await nc.request(f"$JS.API.STREAM.INFO.{name}", b"", timeout=5)).data)
    state: dict[str, int] = info["state"]
    return state


# -- probe ---------------------------------------------------------------------------------


class ProbeBatch:
    """One fast-ingest batch driven by hand; every reply is printed as it arrives."""

    def __init__(self, nc: Client, flow: int, gap: str, clock: Callable[[], float]) -> None:
        self.nc = nc
        self.flow = flow
        self.gap = gap
        self.inbox = nc.new_inbox()
        self.seq = 0
        self._clock = clock

    async def open(self) -> None:
        await self.nc.subscribe(self.inbox + ".>", cb=self._show)

    async def _show(self, msg: Msg) -> None:
        tail = msg.subject[len(self.inbox) + 1:]
        print(f"  {self._clock():7.3f}s  <- {tail}  headers={msg.headers}  {msg.data.decode()}")

    async def send(self, subject: str, op: int | None = None, *, skip: int = 0,
                   headers: dict[str, str] | None = None, payload: bytes = PAYLOAD) -> None:
        """The next message (batch sequence + 1 + skip); a ping reuses the current sequence."""
        if op != PING:
            self.seq += 1 + skip
        if op is None:
            op = START if self.seq == 1 else APPEND
        await self.nc.publish(subject, payload, headers=headers,
                              reply=fast_reply(self.inbox, self.flow, self.gap, self.seq, op))

    async def settle(self, seconds: float = 0.3) -> None:
        await self.nc.flush()
        await asyncio.sleep(seconds)


async def probe(server_bin: str | None, idle: float) -> None:
    with tempfile.TemporaryDirectory() as store:
        if server_bin:  # NatsServer finds its binary there
            os.environ["KVRELAY_NATS_SERVER_BIN"] = server_bin
        server = NatsServer(Path(store))
        server.start()
        try:
            await _probe(server, idle)
        finally:
            server.stop()


async def _probe(server: NatsServer, idle: float) -> None:
    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    nc = Client()
    await nc.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=1,
                     reconnected_cb=on_reconnect)
    print(f"nats-server {nc.connected_server_version}")
    start = time.monotonic()

    def clock() -> float:
        return time.monotonic() - start

    created = await create_stream(nc, STREAM, ["kv.>"], batched=True)
    print(f"create {STREAM} with allow_batched: error={created.get('error')}")
    if created.get("error"):
        await create_stream(nc, STREAM, ["kv.>"], batched=False)
        print(f"created {STREAM} without allow_batched")
    await create_stream(nc, "PLAIN", ["plain.>"], batched=False)

    async def batch(flow: int, gap: str = "fail") -> ProbeBatch:
        b = ProbeBatch(nc, flow, gap, clock)
        await b.open()
        return b

    def msg_id(i: int) -> dict[str, str]:
        return {"Nats-Msg-Id": f"1.{i % 2}.0.{i}"}

    print("\n== 1. flow 10, 25 messages over two subjects with Nats-Msg-Id, a ping, "
          "a duplicate Msg-Id, an end-of-batch commit")
    b = await batch(10)
    for i in range(25):
        await b.send(SUBJECTS[i % 2], headers=msg_id(i))
    await b.settle()
    print("  ping (op 4) after 25 stored:")
    await b.send(SUBJECTS[0], PING, payload=b"")
    await b.settle()
    print("  a duplicate Nats-Msg-Id (of message 3) as batch seq 26:")
    await b.send(SUBJECTS[1], headers=msg_id(3))
    await b.settle()
    await b.send(SUBJECTS[0], COMMIT_EOB, payload=b"")
    await b.settle()
    print(f"  stream: {await stream_state(nc, STREAM)}")

    print("\n== 2. flow 100, 250 messages, Nats-Expected-Last-Subject-Sequence right then "
          "wrong, commit with a message")
    b = await batch(100)
    for i in range(250):
        await b.send(SUBJECTS[i % 2])
    await b.settle()
    last = (await stream_state(nc, STREAM))["last_seq"]
    print(f"  expected-last-subject-sequence {last} (right) on {SUBJECTS[1]}:")
    await b.send(SUBJECTS[1], headers={"Nats-Expected-Last-Subject-Sequence": str(last)})
    await b.settle()
    print("  expected-last-subject-sequence 1 (wrong):")
    await b.send(SUBJECTS[1], headers={"Nats-Expected-Last-Subject-Sequence": "1"})
    await b.settle()
    print("  commit (op 2) after the failed check:")
    await b.send(SUBJECTS[0], COMMIT)
    await b.settle()

    for gap in ("fail", "ok"):
        print(f"\n== 3. gap mode {gap}: batch seqs 1-5, then 8 (6 and 7 never sent), 9, 10-12, "
              "end of batch")
        b = await batch(10, gap)
        for _ in range(5):
            await b.send(SUBJECTS[0])
        await b.send(SUBJECTS[0], skip=2)
        await b.settle()
        for _ in range(4):
            await b.send(SUBJECTS[0])
        await b.settle()
        await b.send(SUBJECTS[0], COMMIT_EOB, payload=b"")
        await b.settle()

    print(f"\n== 4. idle {idle:.1f}s after 12 messages, then one more and an end of batch")
    b = await batch(10)
    for _ in range(12):
        await b.send(SUBJECTS[0])
    await b.settle(idle)
    await b.send(SUBJECTS[0])
    await b.settle()
    await b.send(SUBJECTS[0], COMMIT_EOB, payload=b"")
    await b.settle()

    print(f"\n== 5. idle {idle:.1f}s with a ping every 4s, then one more and an end of batch")
    b = await batch(10)
    for _ in range(3):
        await b.send(SUBJECTS[0])
    waited = 0.0
    while waited < idle:
        await b.settle(4.0)
        waited += 4.0
        await b.send(SUBJECTS[0], PING, payload=b"")
    await b.settle()
    await b.send(SUBJECTS[0])
    await b.settle()
    await b.send(SUBJECTS[0], COMMIT_EOB, payload=b"")
    await b.settle()

    print("\n== 6. server restart in the middle of a batch")
    b = await batch(10)
    for _ in range(15):
        await b.send(SUBJECTS[0])
    await b.settle()
    server.restart()
    await asyncio.wait_for(reconnected.wait(), 10)
    await b.settle(0.5)
    await b.send(SUBJECTS[0])
    await b.settle()
    await b.send(SUBJECTS[0], PING, payload=b"")
    await b.settle()

    print("\n== 7. a stream without allow_batched")
    b = await batch(10)
    await b.send("plain.x")
    await b.settle()
    print(f"  PLAIN stream: {await stream_state(nc, 'PLAIN')}")
    await nc.close()


# -- bench ---------------------------------------------------------------------------------


@dataclass
class Trial:
    mode: str  # "ack" or "fi<flow>"
    rate: int  # messages per second, 0 = flat out
    sent: int = 0
    stored: int = 0
    acks: int = 0  # replies the publisher handled
    cpu: float = 0.0  # publisher process CPU seconds
    server_cpu: float = 0.0
    seconds: float = 0.0


class Publisher:
    """Sends `PAYLOAD` alternately on the two subjects through the relay's outbox."""

    def __init__(self, nc: InboxClient, max_in_flight: int) -> None:
        self.nc = nc
        self.outbox = Outbox()
        self.outbox.bind(nc)
        self.max_in_flight = max_in_flight
        self.sent = 0
        self.acked = 0  # messages known stored
        self.replies = 0
        self.wake = asyncio.Event()
        self.failed = ""
        # Fresh ids each trial: the stream's duplicate window outlives a purge, and fast
        # ingest drops a duplicate without a word.
        self.epoch = time.monotonic_ns()

    def room(self) -> int:
        return self.max_in_flight - (self.sent - self.acked)

    def send(self, count: int) -> None:
        raise NotImplementedError

    async def finish(self) -> None:
        """Wait until every message sent is known stored."""
        while self.acked < self.sent and not self.failed:
            self.wake.clear()
            await asyncio.wait_for(self.wake.wait(), 10)


class PerMessageAcks(Publisher):
    """A reply inbox per message, acks decoded and matched to their message as the relay does."""

    async def start(self) -> None:
        self.inbox = self.nc.new_inbox() + "."
        self.prefix = self.inbox.encode()
        self.pending: dict[int, int] = {}
        self.nc.route_inbox(self.inbox, subscription_sid(await self.nc.subscribe(self.inbox + "*")),
                            self.on_ack)

    def send(self, count: int) -> None:
        for _ in range(count):
            token = self.sent
            subject = SUBJECTS[token % 2]
            headers = {"Nats-Msg-Id": f"1.{token % 2}.{self.epoch}.{token}",
                       "Kvrelay-Schema": "1"}
            self.pending[token] = token
            self.outbox.put(hpub(subject, f"{self.inbox}{token}", headers, PAYLOAD), PAYLOAD_SIZE)
            self.sent += 1

    def on_ack(self, subject: bytes, data: bytes) -> None:
        self.replies += 1
        ack = _PUBACK.decode(data)
        if ack.error is not None:
            self.failed = str(ack.error)
        elif self.pending.pop(int(subject[len(self.prefix):]), None) is not None:
            self.acked += 1
        self.wake.set()


class FastIngest(Publisher):
    """One fast-ingest batch for the whole trial; the window is flow * `outstanding` messages."""

    def __init__(self, nc: InboxClient, flow: int, outstanding: int) -> None:
        super().__init__(nc, flow * outstanding)
        self.flow = flow
        self.outstanding = outstanding
        self.final: FlowFrame | None = None

    async def start(self) -> None:
        self.inbox = self.nc.new_inbox()
        self.reply_prefix = f"{self.inbox}.{self.flow}.fail."
        self.nc.route_inbox(self.inbox + ".",
                            subscription_sid(await self.nc.subscribe(self.inbox + ".>")),
                            self.on_frame)

    def send(self, count: int) -> None:
        for _ in range(count):
            seq = self.sent + 1
            op = START if seq == 1 else APPEND
            headers = {"Nats-Msg-Id": f"1.{seq % 2}.{self.epoch}.{seq}", "Kvrelay-Schema": "1"}
            self.outbox.put(hpub(SUBJECTS[seq % 2], f"{self.reply_prefix}{seq}.{op}.$FI",
                                 headers, PAYLOAD), PAYLOAD_SIZE)
            self.sent = seq

    def on_frame(self, subject: bytes, data: bytes) -> None:
        self.replies += 1
        frame = _FRAME.decode(data)
        if frame.type == "ack":
            self.acked = max(self.acked, frame.seq)
            self.max_in_flight = max(1, frame.msgs) * self.outstanding
        elif frame.type or frame.error is not None:
            self.failed = data.decode()
        else:
            self.final = frame
            self.acked = self.sent
        self.wake.set()

    async def first_answered(self) -> None:
        """Wait for the answer to the batch's first message (its flow ack with seq 0)."""
        while self.replies == 0:
            self.wake.clear()
            await asyncio.wait_for(self.wake.wait(), 5)
        if self.failed:
            raise RuntimeError(f"fast ingest refused: {self.failed}")

    async def finish(self) -> None:
        # The tail since the last flow ack is only confirmed by ending the batch.
        seq = self.sent + 1
        self.outbox.put(hpub(SUBJECTS[0], f"{self.reply_prefix}{seq}.{COMMIT_EOB}.$FI", {}, b""), 0)
        while self.final is None and not self.failed:
            self.wake.clear()
            await asyncio.wait_for(self.wake.wait(), 10)
        if self.final is None or self.final.count != self.sent:
            self.failed = self.failed or f"final ack {self.final}"


async def run_trial(server: NatsServer, trial: Trial, seconds: float, outstanding: int) -> None:
    nc = InboxClient()
    await nc.connect(server.url)
    await nc.request(f"$JS.API.STREAM.PURGE.{STREAM}", b"", timeout=5)
    before = await stream_state(nc, STREAM)
    publisher: PerMessageAcks | FastIngest
    if trial.mode == "ack":
        publisher = PerMessageAcks(nc, WINDOW)
    else:
        publisher = FastIngest(nc, int(trial.mode[2:]), outstanding)
    await publisher.start()
    assert server.pid is not None
    server_cpu0, cpu0, t0 = cpu_seconds(server.pid), time.process_time(), time.monotonic()
    if isinstance(publisher, FastIngest):  # the batch exists once the server answered op 0
        publisher.send(1)
        await publisher.first_answered()
    end = t0 + seconds
    while (now := time.monotonic()) < end and not publisher.failed:
        due = (int((now - t0) * trial.rate) if trial.rate else publisher.sent + 500) \
            - publisher.sent
        count = min(due, publisher.room())
        if count > 0 and publisher.outbox.writable():
            publisher.send(count)
        if trial.rate:
            await asyncio.sleep(0.001)
        elif count <= 0:
            publisher.wake.clear()
            await publisher.wake.wait()
        else:
            await asyncio.sleep(0)
    await publisher.finish()
    trial.seconds = time.monotonic() - t0
    trial.cpu = time.process_time() - cpu0
    trial.server_cpu = cpu_seconds(server.pid) - server_cpu0
    after = await stream_state(nc, STREAM)
    trial.sent, trial.acks = publisher.sent, publisher.replies
    trial.stored = after["last_seq"] - before["last_seq"]
    if publisher.failed or trial.stored != trial.sent:
        raise RuntimeError(f"{trial.mode} at {trial.rate}/s: sent {trial.sent}, stored "
                           f"{trial.stored}: {publisher.failed}")
    await nc.close()


async def bench(modes: list[str], rates: list[int], seconds: float, repeats: int,
                outstanding: int) -> list[Trial]:
    trials: list[Trial] = []
    with tempfile.TemporaryDirectory() as store, NatsServer(Path(store)) as server:
        nc = Client()
        await nc.connect(server.url)
        await create_stream(nc, STREAM, ["kv.>"], batched=True)
        await nc.close()
        for repeat in range(repeats):
            for rate in rates:
                for mode in modes:
                    trial = Trial(mode, rate)
                    await run_trial(server, trial, seconds, outstanding)
                    trials.append(trial)
                    print(f"  [{repeat + 1}/{repeats}] {mode:>5} {rate or 'max':>6}: "
                          f"{trial.stored / trial.seconds:8.0f} msg/s  "
                          f"{1000 * trial.cpu / trial.stored:6.3f} cpu-s/1k  "
                          f"server {1000 * trial.server_cpu / trial.stored:6.3f}  "
                          f"replies {trial.acks}", flush=True)
    return trials


def report(trials: list[Trial], modes: list[str], rates: list[int]) -> None:
    print("\n| mode | rate | msg/s stored | publisher CPU s / 1k msgs | server CPU s / 1k msgs "
          "| replies / 1k msgs |")
    print("|---|---|---|---|---|---|")
    for rate in rates:
        for mode in modes:
            runs = [t for t in trials if t.mode == mode and t.rate == rate]

            def med(f: Callable[[Trial], float], runs: list[Trial] = runs) -> float:
                return statistics.median(f(t) for t in runs)

            print(f"| {'per-message acks' if mode == 'ack' else 'fast ingest flow ' + mode[2:]} "
                  f"| {rate or 'flat out'} | {med(lambda t: t.stored / t.seconds):,.0f} "
                  f"| {med(lambda t: 1000 * t.cpu / t.stored):.3f} "
                  f"| {med(lambda t: 1000 * t.server_cpu / t.stored):.3f} "
                  f"| {med(lambda t: 1000 * t.acks / t.stored):.1f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fastingest_probe",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe", help="print the server's replies to fast-ingest scenarios")
    p.add_argument("--server-bin", help="another nats-server binary (an older version)")
    p.add_argument("--idle", type=float, default=11.0, help="seconds a batch is left idle")
    b = sub.add_parser("bench", help="per-message acks against fast ingest, CPU per message")
    b.add_argument("--seconds", type=float, default=8.0)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--rates", default="2000,10000,0", help="msgs/s, 0 = flat out")
    b.add_argument("--flows", default="10,100")
    b.add_argument("--outstanding", type=int, default=2,
                   help="fast ingest: flow acks outstanding before the publisher stalls")
    args = parser.parse_args(argv)
    run: Callable[[], Awaitable[None]]
    if args.command == "probe":
        async def run() -> None:
            await probe(args.server_bin, args.idle)
    else:
        modes = ["ack", *(f"fi{flow}" for flow in args.flows.split(","))]
        rates = [int(r) for r in args.rates.split(",")]

        async def run() -> None:
            report(await bench(modes, rates, args.seconds, args.repeats, args.outstanding),
                   modes, rates)
    uvloop.run(run())


if __name__ == "__main__":
    main()
