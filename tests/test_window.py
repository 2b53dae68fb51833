"""The JetStream publisher's window as pure bookkeeping: acks in any order, recovery's verdicts."""

from __future__ import annotations

from array import array

import msgspec

from kvrelay.ingest.sequencer import Frame
from kvrelay.jetstream.window import SLIM_FROM, Window
from kvrelay.router.index import KvIndex, encode_snapshot
from kvrelay.wire.schema import RelayBatch, Removed, ResumePoint, Stored

SUBJECT = "kv.ns.comp.7.0"


def batch(seq: int) -> RelayBatch:
    return RelayBatch(instance_id=7, dp_rank=0, epoch=0, seq=seq, ts=0.0, relay_ts=0.0, events=[])


def fill(window: Window, seqs: range) -> list[int]:
    """Put one batch per seq in the window; returns their tokens."""
    return [window.add(Frame(0, 0, seq, b"p", 0.0, ()), SUBJECT, f"7.0.0.{seq}", b"p", 0.0, 2,
                       batch(seq))[0] for seq in seqs]


def test_acks_out_of_order_are_reported_in_stream_order_once() -> None:
    """A later batch's ack does not report it before an earlier one is settled; each is
    reported once, with its stream sequence, and the settled point follows."""
    heard: list[tuple[int, int]] = []
    window = Window(lambda b, stream_seq: heard.append((b.seq, stream_seq)))
    tokens = fill(window, range(3))
    assert window.stored(tokens[1], 11) is not None
    assert heard == []  # seq 0 is not settled yet
    assert window.settled_at(SUBJECT) == 0
    window.stored(tokens[0], 10)
    assert heard == [(0, 10), (1, 11)]
    assert window.stored(tokens[0], 10) is None  # a second ack of the same batch
    window.dropped(tokens[2])
    assert heard == [(0, 10), (1, 11)]
    assert (len(window), window.acked_at(SUBJECT), window.settled_at(SUBJECT)) == (0, 11, 11)


def test_found_settles_what_the_stream_holds_and_lets_late_batches_go() -> None:
    """Recovery's reading of the stream: batches found stored leave the window as stored; one
    older than a batch found stored can no longer go in order and leaves as late."""
    window = Window()
    window.resumed(SUBJECT, 4)
    tokens = fill(window, range(4))
    messages = [(5, ResumePoint(0, 0)), (6, None), (7, ResumePoint(0, 2))]
    stored, late = window.found(SUBJECT, messages)
    assert [(p.seq, p.stored_at) for p in stored] == [(0, 5), (2, 7)]
    assert [p.seq for p in late] == [1]
    assert [t for t, _ in window.pending()] == [tokens[3]]  # seq 3 is resent
    assert (window.acked_at(SUBJECT), window.settled_at(SUBJECT)) == (7, 7)


def test_found_nothing_of_ours_keeps_the_window() -> None:
    """A stream with none of the window's batches keeps all of them for the resend, and
    the last message seen is where the next resend expects to follow."""
    window = Window()
    fill(window, range(2))
    stored, late = window.found(SUBJECT, [(3, None)])
    assert (stored, late, len(window), window.acked_at(SUBJECT)) == ([], [], 2, 3)


def test_clear_counts_what_was_in_flight() -> None:
    """Shutdown empties the window and says how many batches and events it held."""
    window = Window()
    fill(window, range(3))
    assert window.clear() == (3, 6)
    assert len(window) == 0
    assert window.oldest() is None


def test_the_window_counts_its_payload_bytes() -> None:
    """What is in flight is counted in payload bytes: up with each publish, down as each
    leaves the window, stored, dropped, found by recovery or cleared."""
    window = Window()
    tokens = [window.add(Frame(0, 0, seq, b"p", 0.0, ()), SUBJECT, f"7.0.0.{seq}",
                         bytes(100 * (seq + 1)), 0.0, 1, None)[0] for seq in range(5)]
    assert window.nbytes == 1500
    window.stored(tokens[0], 1)
    window.stored(tokens[0], 1)  # a second ack of the same batch
    assert window.nbytes == 1400
    window.dropped(tokens[1])
    assert window.nbytes == 1200
    stored, late = window.found(SUBJECT, [(2, ResumePoint(0, 3))])  # seq 3 stored, 2 late
    assert ([p.seq for p in stored], [p.seq for p in late], window.nbytes) == ([3], [2], 500)
    window.clear()
    assert window.nbytes == 0


def test_a_large_batch_waits_for_its_ack_with_its_token_ids_packed() -> None:
    """A batch kept for on_stored whose payload reaches SLIM_FROM bytes waits with its token ids
    packed as uint32 and without lookahead tokens (a list of Python ints is most of its memory),
    blocks and extra keys intact; a smaller one is kept as it is."""
    heard: list[RelayBatch] = []
    window = Window(lambda b, stream_seq: heard.append(b))
    stored = Stored([1, 2], None, list(range(32)), 16, medium="GPU",
                    extra_keys=[["mm", 0], None], lookahead_token_ids=[5])
    removed = Removed([9], medium="GPU")
    for seq, size in enumerate((SLIM_FROM - 1, SLIM_FROM)):
        relay_batch = RelayBatch(instance_id=7, dp_rank=0, epoch=0, seq=seq, ts=0.0,
                                 relay_ts=0.0, events=[stored, removed])
        token, _ = window.add(Frame(0, 0, seq, b"p", 0.0, ()), SUBJECT, f"7.0.0.{seq}",
                              bytes(size), 0.0, 2, relay_batch)
        window.stored(token, seq + 1)
    assert heard[0].events == [stored, removed]
    assert heard[1].events == [msgspec.structs.replace(
        stored, token_ids=array("I", range(32)), lookahead_token_ids=None), removed]
    assert heard[1].seq == 1


def test_a_large_batch_keeps_its_token_keys_in_the_snapshot_index() -> None:
    """The snapshot index gets the same blocks and token keys from a large batch that waited
    for its ack packed as from the batch itself (a prefill of many blocks is where a router's
    hits are), and their children are keyed too; ids past 32 bits get no key either way."""
    chain: list[int | bytes] = list(range(100, 164))
    prefill = Stored(chain, None, list(range(64 * 16)), 16, medium="GPU",
                     extra_keys=[["img", 3]] + [None] * 63)
    child = Stored([999], chain[-1], list(range(16)), 16, medium="GPU")
    wide = Stored([500, 501], None, [2**40] * 32, 16, medium="GPU")
    heard: list[RelayBatch] = []
    window = Window(lambda b, stream_seq: heard.append(b))
    batches = [RelayBatch(instance_id=7, dp_rank=0, epoch=0, seq=seq, ts=0.0, relay_ts=0.0,
                          events=[event]) for seq, event in enumerate((prefill, child, wide))]
    for seq, relay_batch in enumerate(batches):
        token, _ = window.add(Frame(0, 0, seq, b"p", 0.0, ()), SUBJECT, f"7.0.0.{seq}",
                              bytes(SLIM_FROM), 0.0, 1, relay_batch)
        window.stored(token, seq + 1)
    assert [type(e.token_ids) for b in heard for e in b.events
            if isinstance(e, Stored)] == [array, array, list]
    direct, relayed = KvIndex(queries=False), KvIndex(queries=False)
    for seq, (original, kept) in enumerate(zip(batches, heard, strict=True), 1):
        direct.apply(original, seq)
        relayed.apply(kept, seq)
    worker = (7, 0)
    assert relayed.status(worker).unkeyed_blocks == direct.status(worker).unkeyed_blocks == 2
    assert encode_snapshot(relayed.snapshot(worker)) == encode_snapshot(direct.snapshot(worker))
    assert relayed.snapshot(worker) == direct.snapshot(worker)
