"""The JetStream publisher's window as pure bookkeeping: acks in any order, recovery's verdicts."""

from __future__ import annotations

from kvrelay.ingest.sequencer import Frame
from kvrelay.jetstream.window import Window
from kvrelay.wire.schema import ResumePoint

SUBJECT = "kv.ns.comp.7.0"


def fill(window: Window, seqs: range) -> list[int]:
    """Put one batch per seq in the window; returns their tokens."""
    return [window.add(Frame(0, 0, seq, b"p", 0.0, ()), SUBJECT, f"7.0.0.{seq}",
                       str(seq).encode(), 0.0, 2)[0] for seq in seqs]


def test_acks_out_of_order_are_reported_in_stream_order_once() -> None:
    """A later batch's ack does not report it before an earlier one is settled; each is
    reported once, with its stream sequence, and the settled point follows."""
    heard: list[tuple[int, int]] = []
    window = Window(lambda rank, payload, stream_seq: heard.append((int(payload), stream_seq)))
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
                         bytes(100 * (seq + 1)), 0.0, 1)[0] for seq in range(5)]
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


def test_on_stored_hears_the_payload_as_stored_and_it_is_let_go() -> None:
    """What on_stored hears of a batch is its rank, the very payload JetStream stored and its
    stream sequence; the window keeps no copy after, and a window nobody listens to keeps no
    payload past the ack."""
    heard: list[tuple[int, bytes, int]] = []
    window = Window(lambda rank, payload, stream_seq: heard.append((rank, payload, stream_seq)))
    token, pending = window.add(Frame(3, 0, 0, b"raw", 0.0, ()), SUBJECT, "7.3.0.0",
                                b"encoded batch", 0.0, 2)
    window.stored(token, 42)
    assert heard == [(3, b"encoded batch", 42)]
    assert (pending.payload, pending.kept) == (b"", b"")
    quiet = Window()
    token, pending = quiet.add(Frame(0, 0, 0, b"raw", 0.0, ()), SUBJECT, "7.0.0.0", b"x", 0.0, 1)
    quiet.stored(token, 1)
    assert (pending.payload, pending.kept) == (b"", b"")
