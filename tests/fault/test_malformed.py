"""Malformed input fuzzed through a real ZMQ socket into a running relay process: it never
stops, and every bad message is counted under its decode-error kind."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import (
    ANY_PORT,
    COMP,
    NS,
    Received,
    RelayProcess,
    nats_client,
    new_instance_id,
    subject_of,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from strategies import zmq_messages

from fault.accounting import offered_keys, read_subject, tally
from fault.conftest import rows
from kvrelay.codec import Codec, MalformedPayload
from kvrelay.system.metrics import DECODE_ERROR_KINDS, Metrics
from kvrelay.testing.natsserver import NatsServer
from kvrelay.testing.synthetic import SyntheticVllm, encode_batch

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


class Target:
    """A relay process fed by a PUB socket, and what its counters must say."""

    def __init__(self, vllm: SyntheticVllm, proc: RelayProcess) -> None:
        self.vllm = vllm
        self.proc = proc
        self.seq = 0
        self.metrics = Metrics()
        self.codec = Codec("msgpack", self.metrics)
        self.expected: Counter[str] = Counter()
        self.published = 0
        self.malformed = 0

    def samples(self) -> dict[tuple[str, str], float]:
        """(name, label value) -> value of the relay's decode and publish counters."""
        url = f"http://127.0.0.1:{self.proc.system_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        out: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in ("kvrelay_decode_errors_total",
                                   "kvrelay_batches_published_total",
                                   "kvrelay_batches_dropped_total"):
                    label = sample.labels.get("kind", sample.labels.get("reason", ""))
                    out[(sample.name, label)] = sample.value
        return out

    def send(self, frames: list[bytes]) -> None:
        """Send one message and add what it must count to the expectation."""
        if len(frames) != 3:
            self.expected["frame_count"] += 1
        elif len(frames[1]) != 8:
            self.expected["seq_length"] += 1
        else:
            frames = [frames[0], self.seq.to_bytes(8, "big"), frames[2]]
            self.seq += 1
            try:
                self.codec.decode(frames[2])
                self.published += 1
            except MalformedPayload as exc:
                self.expected[exc.kind] += 1
                self.malformed += 1
        self.vllm.send_raw(frames)

    def wanted(self) -> dict[tuple[str, str], float]:
        invalid = self.metrics.registry.get_sample_value("kvrelay_decode_errors_total",
                                                         {"kind": "invalid_event"}) or 0.0
        want = {("kvrelay_decode_errors_total", kind): float(self.expected[kind])
                for kind in DECODE_ERROR_KINDS}
        want[("kvrelay_decode_errors_total", "invalid_event")] = invalid
        want[("kvrelay_batches_published_total", "")] = float(self.published)
        want[("kvrelay_batches_dropped_total", "malformed")] = float(self.malformed)
        return want

    def settled(self, within: float = 20.0) -> None:
        """Wait until the relay's counters match the expectation exactly."""
        want = self.wanted()
        deadline = time.monotonic() + within
        while True:
            assert self.proc.proc.poll() is None, self.proc.output()[-3000:]
            got = {key: value for key, value in self.samples().items() if key in want}
            if got == want:
                return
            assert time.monotonic() < deadline, f"counters {got} != {want}"
            time.sleep(0.01)


async def read_back(url: str, subject: str) -> list[Received]:
    async with nats_client(url) as nc:
        return await read_subject(nc, subject)


@pytest.fixture(scope="module")
def target(request: pytest.FixtureRequest, nats_server: NatsServer,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """One relay process and its PUB socket for every example of the fuzz run; afterwards its
    subject is accounted for: only the malformed batches missing, each announced."""
    log = Path(tmp_path_factory.mktemp("fuzz")) / "relay.log"
    instance = new_instance_id()
    with SyntheticVllm(ANY_PORT) as vllm:
        proc = RelayProcess(["--nats", nats_server.url, "--zmq", vllm.address, "--instance-id",
                             str(instance), "--namespace", NS, "--component", COMP], log)
        try:
            fuzz = Target(vllm, proc)
            deadline = time.monotonic() + 15
            while True:  # ZMQ's slow joiner: probe until one message is counted
                try:
                    if fuzz.samples().get(("kvrelay_decode_errors_total", "frame_count")):
                        break
                except (OSError, LookupError):
                    pass
                assert time.monotonic() < deadline, proc.output()
                vllm.send_raw([b"probe"])
                time.sleep(0.05)
            time.sleep(0.3)
            fuzz.expected["frame_count"] = int(
                fuzz.samples()[("kvrelay_decode_errors_total", "frame_count")])
            yield fuzz
            fuzz.send([b"", bytes(8), encode_batch([], time.time())])  # carries what is owed
            fuzz.settled()
            got = asyncio.run(read_back(nats_server.url, subject_of(instance)))
        finally:
            proc.stop()
    row = tally("malformed input fuzzed through ZMQ", got, offered_keys(0, fuzz.seq))
    rows(request.config).append(row)
    assert (row.lost, row.announced) == (fuzz.malformed, fuzz.malformed)
    assert (row.duplicates, row.order_violations) == (0, 0)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(zmq_messages(), min_size=1, max_size=25))
def test_fuzzed_frames_are_counted_and_never_stop_the_relay(
        target: Target, messages: list[list[bytes]]) -> None:
    """Any mix of malformed and valid messages: valid ones are published, every bad one is
    counted under its kind, and the relay keeps running."""
    for frames in messages:
        target.send(frames)
    target.settled()
