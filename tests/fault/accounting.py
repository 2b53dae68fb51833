"""What a fault did to one worker's subject, counted from what JetStream stored.

Every fault test reads its subject back whole and asserts on a Tally: offered (batches vLLM
sent), delivered (distinct batches stored), lost (offered, not stored), announced (lost batches a
`resync` range names), duplicates (a batch stored more than once), order violations (a batch
stored after one that follows it) and resyncs (resync events stored).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from itertools import pairwise
from typing import Any, NamedTuple

import harness
import nats.errors
import nats.js.errors
from harness import STREAM, Received
from nats.js.api import DeliverPolicy

from kvrelay.wire.schema import Resync

Key = tuple[int, int]  # (epoch, seq): a batch's name on the wire


class Tally(NamedTuple):
    fault: str
    offered: int
    delivered: int
    lost: int
    announced: int
    duplicates: int
    order_violations: int
    resyncs: int

    @property
    def silent_losses(self) -> int:
        """Lost batches no `resync` announced: must always be 0."""
        return self.lost - self.announced


async def read_subject(nc: Any, subject: str, stream: str = STREAM) -> list[Received]:
    """Everything stored on `subject` right now, in stream order."""
    js = nc.jetstream()
    try:
        last = await js.get_last_msg(stream, subject)
    except nats.js.errors.NotFoundError:
        return []
    deadline = time.monotonic() + 30
    while True:  # a cluster that just lost or regained a node may take a while to answer
        try:
            sub = await js.subscribe(subject, stream=stream, ordered_consumer=True,
                                     deliver_policy=DeliverPolicy.ALL)
            break
        except nats.errors.TimeoutError:
            assert time.monotonic() < deadline, f"cannot read {subject} back"
    out: list[Received] = []
    try:
        while True:
            msg = await sub.next_msg(timeout=10)
            out.extend(harness.received(msg))
            if msg.metadata.sequence.stream >= last.seq:
                return out
    finally:
        await sub.unsubscribe()


def tally(fault: str, got: list[Received], offered: Iterable[Key]) -> Tally:
    """Count what `got` (a subject read back whole) holds of the batches `offered`."""
    keys = [(r.batch.epoch, r.batch.seq) for r in got]
    stored = set(keys)
    wanted = set(offered)
    lost = wanted - stored
    announced: set[Key] = set()
    resyncs = 0
    for received in got:
        for event in received.batch.events:
            if not isinstance(event, Resync):
                continue
            resyncs += 1
            if isinstance(event.missed_from, int) and isinstance(event.missed_to, int):
                epoch = received.batch.epoch
                announced.update((epoch, s) for s in range(event.missed_from, event.missed_to + 1))
    return Tally(
        fault=fault,
        offered=len(wanted),
        delivered=len(stored & wanted),
        lost=len(lost),
        announced=len(lost & announced),
        duplicates=len(keys) - len(stored),
        order_violations=sum(b <= a for a, b in pairwise(keys)),
        resyncs=resyncs,
    )


def offered_keys(epoch: int, count: int, first: int = 0) -> list[Key]:
    """The keys of `count` batches of one engine run, from seq `first`."""
    return [(epoch, s) for s in range(first, first + count)]
