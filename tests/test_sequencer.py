"""What a seq below the expected one means: a duplicate (dropped, counted, logged) or an engine
restart (a new epoch announced once), and that every loss is announced by exactly one resync."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from strategies import EngineStep, engine_scripts

from kvrelay.ingest.sequencer import Frame, Sequencer, is_restart
from kvrelay.system.metrics import Metrics
from kvrelay.wire.schema import ResumePoint, Resync, ResyncReason

REASONS: tuple[ResyncReason, ...] = ("gap", "restart", "overflow", "start")


class Run:
    """A Sequencer (dp_rank 0) with what it hands on, the replays it asks for and its metrics.
    With a replay socket, the start-up replay is answered at once (vLLM holds nothing yet)."""

    def __init__(self, *, replay: bool, resume: ResumePoint | None = None) -> None:
        self.frames: list[Frame] = []
        self.requested: list[int] = []
        self.metrics = Metrics()
        self.sequencer = Sequencer(0, self.frames.append, self.metrics,
                                   request_replay=self.requested.append if replay else None)
        self.sequencer.resume(resume)
        self._copies: dict[int, int] = {}
        if replay:
            self.answer([])

    def live(self, *seqs: int) -> None:
        """Live batches as vLLM's PUB sends them; each copy of a seq gets its own payload."""
        for seq in seqs:
            copy = self._copies[seq] = self._copies.get(seq, 0) + 1
            assert self.sequencer.offer_message(
                [b"kv", seq.to_bytes(8, "big"), b"%d live %d" % (seq, copy)], 0.0)

    def answer(self, held_by_vllm: Iterable[int]) -> None:
        """Answer the oldest replay asked for as vLLM's ROUTER does: every batch it holds from
        the seq asked for."""
        start = self.requested.pop(0)
        self.sequencer.replayed(
            start, [(seq, b"%d replayed" % seq) for seq in held_by_vllm if seq >= start], 0.0)

    def seqs(self) -> list[tuple[int, int]]:
        return [(f.epoch, f.seq) for f in self.frames]

    def resyncs(self) -> list[tuple[int, int, Resync]]:
        return [(f.epoch, f.seq, r) for f in self.frames for r in f.resyncs]

    def count(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def duplicates(self) -> float:
        return self.count("kvrelay_batches_dropped_total", reason="duplicate")

    def resyncs_counted(self) -> dict[str, float]:
        return {reason: self.count("kvrelay_resyncs_total", reason=reason) for reason in REASONS}


NO_RESYNCS = dict.fromkeys(REASONS, 0.0)
replay_or_not = pytest.mark.parametrize("replay", [False, True], ids=["no-replay", "replay"])


@replay_or_not
def test_a_repeat_of_the_last_seq_is_a_duplicate(
        replay: bool, caplog: pytest.LogCaptureFixture) -> None:
    """The last batch sent again is dropped, counted and logged naming the source, the seq and
    the seq expected; the stream goes on in epoch 0, no resync, no replay asked for."""
    run = Run(replay=replay)
    with caplog.at_level(logging.WARNING, "kvrelay.ingest"):
        run.live(*range(10), 9, 10, 11)
    assert run.seqs() == [(0, seq) for seq in range(12)]
    assert run.frames[9].payload == b"9 live 1"
    assert run.resyncs() == []
    assert run.duplicates() == 1
    assert run.count("kvrelay_engine_restarts_total") == 0
    assert run.count("kvrelay_missed_batches_total") == 0
    assert run.resyncs_counted() == NO_RESYNCS
    assert run.requested == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["dropped a batch from dp_rank 0 repeating seq 9 (expected 10): a "
                        "duplicate, not a restart"]


@replay_or_not
def test_repeats_a_few_behind_are_duplicates(replay: bool) -> None:
    """Batches repeated a few behind the last one, down to half of the seq expected, are
    duplicates too: dropped and counted, nothing announced."""
    run = Run(replay=replay)
    run.live(*range(20), 17, 12, 10, 20)
    assert run.seqs() == [(0, seq) for seq in range(21)]
    assert run.resyncs() == []
    assert run.duplicates() == 3
    assert run.count("kvrelay_engine_restarts_total") == 0
    assert run.requested == []


def test_duplicates_are_logged_at_a_bounded_rate(caplog: pytest.LogCaptureFixture) -> None:
    """A publisher repeating every batch is logged once for the lot (rate-limited), and every
    repeat is counted."""
    run = Run(replay=False)
    run.live(0)  # seq 0 again would be a restart (see below)
    with caplog.at_level(logging.WARNING, "kvrelay.ingest"):
        for seq in range(1, 500):
            run.live(seq, seq)
    assert run.seqs() == [(0, seq) for seq in range(500)]
    assert run.duplicates() == 499
    assert len([r for r in caplog.records if "duplicate" in r.getMessage()]) == 1


@pytest.mark.parametrize("passed", [1, 10, 1000])
@replay_or_not
def test_seq_0_again_is_a_restart(replay: bool, passed: int) -> None:
    """Seq 0 after anything passed, even after seq 0 alone, is a restart: a new epoch led by
    `resync` restart, counted once."""
    run = Run(replay=replay)
    run.live(*range(passed), 0, 1)
    assert run.seqs() == [(0, seq) for seq in range(passed)] + [(1, 0), (1, 1)]
    assert run.resyncs() == [(1, 0, Resync("restart"))]
    assert run.count("kvrelay_engine_restarts_total") == 1
    assert run.resyncs_counted() == {**NO_RESYNCS, "restart": 1.0}
    assert run.duplicates() == 0
    assert run.requested == []  # nothing of the new epoch is missing


def test_a_seq_far_below_is_a_restart_with_what_it_missed() -> None:
    """A seq under half of the one expected is a restarted engine seen a few batches in:
    without replay, the new epoch's first batch announces what it missed."""
    run = Run(replay=False)
    run.live(*range(100), 49, 50)
    assert run.seqs()[100:] == [(1, 49), (1, 50)]
    assert run.resyncs() == [(1, 49, Resync("restart", 0, 48))]
    assert run.count("kvrelay_engine_restarts_total") == 1
    assert run.count("kvrelay_missed_batches_total") == 49
    assert run.resyncs_counted() == {**NO_RESYNCS, "restart": 1.0}


def test_a_restart_far_below_is_replayed_from_0() -> None:
    """With a replay socket a restart seen a few batches in is replayed from seq 0: the new
    epoch complete, one `resync` restart, nothing missed."""
    run = Run(replay=True)
    run.live(*range(100), 49, 50)
    assert run.requested == [0]
    run.answer(range(52))  # the new engine has sent 0..51 by now
    run.live(52)
    assert run.seqs()[100:] == [(1, seq) for seq in range(53)]
    assert run.resyncs() == [(1, 0, Resync("restart"))]
    assert run.count("kvrelay_missed_batches_total") == 0
    assert run.resyncs_counted() == {**NO_RESYNCS, "restart": 1.0}


@pytest.mark.parametrize(("seq", "restart"), [(0, True), (1, True), (4, True), (5, False),
                                              (9, False)])
def test_half_of_the_expected_seq_divides_restarts_from_duplicates(seq: int, restart: bool
                                                                   ) -> None:
    """With seq 10 expected, 0 to 4 are restarts and 5 to 9 duplicates."""
    assert is_restart(seq, 10) is restart
    run = Run(replay=False)
    run.live(*range(10), seq)
    assert run.count("kvrelay_engine_restarts_total") == (1 if restart else 0)
    assert run.duplicates() == (0 if restart else 1)


def test_a_seq_below_the_resume_point_is_a_restart_before_anything_is_read() -> None:
    """A relay that resumes after seq 99 and first reads seq 60 finds an engine that restarted
    while it was away (a duplicate repeats a batch this relay read): a new epoch, announced."""
    run = Run(replay=False, resume=ResumePoint(3, 99))
    run.live(60, 61, 61)
    assert run.seqs() == [(4, 60), (4, 61)]
    assert run.resyncs() == [(4, 60, Resync("restart", 0, 59))]
    assert run.duplicates() == 1  # 61 again: read here before, a duplicate


@replay_or_not
def test_the_first_batch_after_the_publisher_went_away_below_the_expected_is_a_restart(
        replay: bool) -> None:
    """Once the publisher's connection went away, the next batch below the one expected is a
    restarted engine's, however far it has counted; a repeat after that is a duplicate again."""
    run = Run(replay=replay)
    run.live(*range(20))
    run.sequencer.publisher_lost()
    run.live(15)  # the new engine sent 0..14 before the relay connected again
    if replay:
        assert run.requested == [0]
        run.answer(range(16))
    run.live(16, 16)
    first = [(1, seq) for seq in range(16)] if replay else [(1, 15)]
    assert run.seqs() == [(0, seq) for seq in range(20)] + first + [(1, 16)]
    assert run.resyncs() == [(1, 0, Resync("restart"))] if replay else [
        (1, 15, Resync("restart", 0, 14))]
    assert run.duplicates() == 1


def test_a_restart_while_holding_for_a_replay() -> None:
    """The engine restarts while the relay holds live batches for a gap's replay, and is first
    seen a few batches in: the old epoch is completed by the replay, the new one replayed from
    0 and led by one `resync` restart."""
    run = Run(replay=True)
    run.live(*range(10), 12)  # 10 and 11 missing: asked for, live batches held meanwhile
    assert run.requested == [10]
    run.live(13, 3, 4)  # the engine restarted after 13; its 0..2 went by unseen
    run.answer(range(14))  # the old engine answered before it went
    assert run.requested == [0]
    run.live(5)
    run.answer(range(6))  # the new engine's ROUTER
    assert run.seqs() == [(0, seq) for seq in range(14)] + [(1, seq) for seq in range(6)]
    assert run.resyncs() == [(1, 0, Resync("restart"))]
    assert run.count("kvrelay_engine_restarts_total") == 1
    assert run.resyncs_counted() == {**NO_RESYNCS, "restart": 1.0}
    assert run.duplicates() == 0
    assert run.sequencer.held == 0


def test_a_restart_while_holding_answered_by_the_new_engine() -> None:
    """A gap's replay answered by the engine that replaced the one asked (it holds nothing from
    the gap on) is not asked for again: the gap is announced, then the restart, once each."""
    run = Run(replay=True)
    run.live(*range(10), 12)
    run.live(13, 0, 1)  # the engine restarted after 13
    run.answer([0, 1])  # its ROUTER holds nothing from seq 10
    assert run.requested == []
    assert run.seqs() == [(0, seq) for seq in (*range(10), 12, 13)] + [(1, 0), (1, 1)]
    assert run.resyncs() == [(0, 12, Resync("gap", 10, 11)), (1, 0, Resync("restart"))]
    assert run.resyncs_counted() == {**NO_RESYNCS, "gap": 1.0, "restart": 1.0}
    assert run.count("kvrelay_gaps_total") == 1
    assert run.count("kvrelay_missed_batches_total") == 2


def test_duplicates_arriving_while_holding_are_dropped() -> None:
    """Repeats among the live batches held during a replay, of a held batch or of one passed
    before, are dropped and counted when the batches held are handed on; nothing announced."""
    run = Run(replay=True)
    run.live(*range(10), 12)
    run.live(13, 12, 9, 14)
    run.answer(range(15))
    assert run.seqs() == [(0, seq) for seq in range(15)]
    assert [f.payload for f in run.frames[12:]] == [b"12 replayed", b"13 replayed",
                                                    b"14 replayed"]
    assert run.resyncs() == []
    assert run.duplicates() == 2
    assert run.count("kvrelay_engine_restarts_total") == 0
    assert run.requested == []


def test_replayed_batches_below_what_was_passed_are_duplicates() -> None:
    """A replay answering batches already passed (a ROUTER that ignores the start asked for)
    has them dropped as duplicates, never taken for a restart."""
    run = Run(replay=True)
    run.live(*range(10), 12)
    run.sequencer.replayed(10, [(seq, b"again") for seq in range(13)], 0.0)
    run.requested.clear()
    assert run.seqs() == [(0, seq) for seq in range(13)]
    assert run.duplicates() == 10
    assert run.count("kvrelay_engine_restarts_total") == 0


@replay_or_not
def test_one_resync_per_loss(replay: bool) -> None:
    """Repeats of the last seq, a restart from 0 and a gap after it: the repeats announce
    nothing, the restart one `resync` restart, the gap one `resync` gap (none with replay,
    which fills it), and the counter agrees with what the frames carry."""
    run = Run(replay=replay)
    run.live(*range(10), 9, 9, 10, 0, 1, 3)
    if replay:
        assert run.requested == [2]
        run.answer(range(4))
    run.live(4)
    assert run.seqs() == [(0, seq) for seq in range(11)] + [
        (1, seq) for seq in ((0, 1, 2, 3, 4) if replay else (0, 1, 3, 4))]
    announced = [(1, 0, Resync("restart"))] + ([] if replay else [(1, 3, Resync("gap", 2, 2))])
    assert run.resyncs() == announced
    assert max(len(f.resyncs) for f in run.frames) == 1
    assert sum(run.resyncs_counted().values()) == len(announced)
    assert run.count("kvrelay_engine_restarts_total") == 1
    assert run.duplicates() == 2


@settings(max_examples=300, deadline=None)
@given(script=engine_scripts(), replay=st.booleans())
# A gap at the same seq in the next epoch is a gap of its own, counted.
@example(script=[("send", 1), ("skip", 1), ("send", 1), ("restart", 0), ("send", 1),
                 ("skip", 1), ("send", 1)], replay=False)
# The connection went away before anything was read: the batches read since make a later
# restart one seen over a connection no longer new.
@example(script=[("restart", 1), ("send", 1), ("send", 1), ("restart", 0), ("skip", 1),
                 ("send", 1)], replay=False)
def test_every_loss_is_announced_once_whatever_the_publisher_does(
        script: list[EngineStep], replay: bool) -> None:
    """Any mix of batches in order, lost, repeated, and restarts (seen far below, or after the
    connection went away): every batch read is handed on once in its engine's epoch, repeats
    are dropped, and each loss carries exactly one resync (a restart one `restart`, a gap one
    `gap`, none with replay, which fills gaps), counted once."""
    run = Run(replay=replay)
    expected: list[tuple[int, int, tuple[Resync, ...]]] = []
    sent = 0  # the engine's next seq
    read: list[int] = []  # the seqs of this engine the relay read
    position: int | None = None  # the seq the relay expects next
    epoch = restarts = gaps = missed = duplicates = 0
    restarted = went_away = False

    def receive(seq: int) -> None:
        nonlocal position, epoch, restarts, gaps, missed, restarted, went_away
        reason: ResyncReason = "gap" if position is not None else "start"
        first = 0 if position is None else position
        if restarted:
            assert position is not None
            # Past these, a restart cannot be told from a gap, a duplicate or the next batch.
            assume(seq < position and (went_away or is_restart(seq, position)))
            epoch, restarts, reason, first = epoch + 1, restarts + 1, "restart", 0
            restarted = went_away = False
        elif position is not None and seq > position:
            gaps += 1
        if replay:
            expected.extend((epoch, s, (Resync("restart"),) if reason == "restart" and s == 0
                             else ()) for s in range(first, seq + 1))
        else:
            resync = (Resync(reason, first, seq - 1),) if seq > first else \
                (Resync("restart"),) if reason == "restart" else ()
            missed += seq - first
            expected.append((epoch, seq, resync))
        position = seq + 1
        read.append(seq)
        went_away = False  # the relay read a batch since: the connection is no longer new

    for kind, n in script:
        if kind == "send":
            for _ in range(n):
                receive(sent)
                run.live(sent)
                sent += 1
        elif kind == "skip":
            sent += n
        elif kind == "repeat":
            if len(read) >= n and position is not None and not is_restart(read[-n], position):
                run.live(read[-n])
                duplicates += 1
        else:
            sent, read = 0, []
            restarted = position is not None
            if n:
                went_away = True
                run.sequencer.publisher_lost()
        for _ in range(10):
            if not run.requested:
                break
            run.answer(range(sent))
        assert run.requested == []
    assert [(f.epoch, f.seq, f.resyncs) for f in run.frames] == expected
    assert run.sequencer.held == 0
    assert run.duplicates() == duplicates
    assert run.count("kvrelay_engine_restarts_total") == restarts
    assert run.count("kvrelay_gaps_total") == gaps
    assert run.count("kvrelay_missed_batches_total") == missed
    carried = [r.reason for f in run.frames for r in f.resyncs]
    assert run.resyncs_counted() == {reason: float(carried.count(reason)) for reason in REASONS}


@pytest.mark.parametrize("resume", [None, ResumePoint(0, 99)], ids=["start", "resumed"])
def test_live_copies_of_what_the_start_replay_delivered_are_duplicates(
        resume: ResumePoint | None) -> None:
    """The start-up replay is answered before the live copies of the same batches are read (two
    sockets): those copies, byte for byte the replayed ones, are duplicates, not a restart, even
    as the first live batches this relay reads."""
    first = 0 if resume is None else resume.seq + 1
    frames: list[Frame] = []
    requested: list[int] = []
    metrics = Metrics()
    sequencer = Sequencer(0, frames.append, metrics, request_replay=requested.append)
    sequencer.resume(resume)
    assert requested == [first]
    sent = {seq: b"batch %d" % seq for seq in range(first, first + 4)}
    sequencer.replayed(first, [(seq, sent[seq]) for seq in range(first, first + 3)], 0.0)
    for seq in sent:
        assert sequencer.offer_message([b"kv", seq.to_bytes(8, "big"), sent[seq]], 0.0)
    assert [(f.epoch, f.seq) for f in frames] == [(0, seq) for seq in sent]
    assert [f.payload for f in frames] == list(sent.values())
    assert metrics.registry.get_sample_value("kvrelay_engine_restarts_total") == 0
    assert metrics.registry.get_sample_value(
        "kvrelay_batches_dropped_total", {"reason": "duplicate"}) == 3
    assert [r for f in frames for r in f.resyncs] == []


def test_a_new_batch_0_after_the_start_replay_is_still_a_restart() -> None:
    """A live seq the replay delivered, with other bytes (a restarted engine's batch 0), is a
    restart: only a byte-for-byte copy is taken for a duplicate."""
    run = Run(replay=True)
    run.live(1)  # seq 0 went by unseen: replayed
    run.answer(range(2))
    run.live(0)  # other bytes than the replayed seq 0: a new engine's
    assert run.seqs() == [(0, 0), (0, 1), (1, 0)]
    assert run.resyncs() == [(1, 0, Resync("restart"))]
    assert run.count("kvrelay_engine_restarts_total") == 1
    assert run.duplicates() == 0
