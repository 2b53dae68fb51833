"""The JetStream side both the relay and operator commands share: the stream (created or
verified) and the last batch published on a subject.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import NamedTuple

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from kvrelay.config import StreamSettings
from kvrelay.wire.names import stream_subjects, subject_matches
from kvrelay.wire.relaybatch import decode_resume_point
from kvrelay.wire.schema import ResumePoint

log = logging.getLogger("kvrelay.stream")


class StreamMismatch(Exception):
    """The configured stream exists but does not take the relay's subjects."""


async def ensure_stream(js: JetStreamContext, config: StreamSettings,
                        subjects: list[str]) -> str:
    """Create the stream, or check an existing one covers `subjects`; says which it did."""
    ours = stream_subjects(config.subject_prefix)
    try:
        info = await js.stream_info(config.name)
    except nats.js.errors.NotFoundError:
        await js.add_stream(StreamConfig(
            name=config.name, subjects=[ours], storage=StorageType.FILE,
            num_replicas=config.stream_replicas, max_age=config.stream_max_age,
            max_bytes=config.stream_max_bytes, duplicate_window=config.stream_duplicate_window,
        ))
        return (f"created JetStream stream {config.name} (subjects {ours}, "
                f"{config.stream_replicas} replicas)")
    patterns = info.config.subjects or []
    missing = [s for s in subjects if not any(subject_matches(p, s) for p in patterns)]
    if missing:
        raise StreamMismatch(
            f"stream {config.name} has subjects {patterns}, which do not cover "
            f"{', '.join(missing)}; add {ours} to it or choose another --stream")
    return f"using JetStream stream {config.name} (subjects {patterns})"


SUBJECTS_OVERLAP = 10065  # JetStream: another stream already takes some of these subjects


def stream_refusal(config: StreamSettings, exc: BaseException) -> str:
    """Why the stream could not be created or verified, in JetStream's own words (its
    description and err_code) when it answered, with what to do about an overlap."""
    if not isinstance(exc, nats.js.errors.APIError):
        return f"stream {config.name} not usable: {exc!r}"
    reason = (f"JetStream refused stream {config.name} (subjects "
              f"{stream_subjects(config.subject_prefix)}): {exc.description or type(exc).__name__}"
              f" (err_code {exc.err_code}, code {exc.code})")
    if exc.err_code == SUBJECTS_OVERLAP:
        reason += ("; another stream already takes these subjects: give its name with "
                   "--stream, or choose another --subject-prefix (kvrelay check names it)")
    return reason


class Stored(NamedTuple):
    """A message of the stream: its stream sequence and the batch it holds (None: not ours)."""

    stream_seq: int
    point: ResumePoint | None


def _stored(seq: int | None, data: bytes | None) -> Stored:
    try:
        return Stored(seq or 0, decode_resume_point(data or b""))
    except ValueError:
        return Stored(seq or 0, None)


async def last_stored(js: JetStreamContext, stream: str, subject: str) -> Stored | None:
    """The last message on `subject`, None when the subject has none."""
    try:
        msg = await js.get_last_msg(stream, subject)
    except nats.js.errors.NotFoundError:
        return None
    return _stored(msg.seq, msg.data)


async def stored_from(js: JetStreamContext, stream: str, subject: str,
                      first: int) -> AsyncIterator[Stored]:
    """Every message on `subject` from stream sequence `first` on, in stream order.

    Reads go to the stream leader (not direct gets), so they see what is committed.
    """
    seq = max(first, 1)
    while True:
        try:
            msg = await js.get_msg(stream, seq=seq, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            return
        stored = _stored(msg.seq, msg.data)
        yield stored
        seq = stored.stream_seq + 1


async def last_published(js: JetStreamContext, stream: str, subject: str) -> Stored | None:
    """The last message on `subject` (its (epoch, seq) to resume after), None if it has none."""
    stored = await last_stored(js, stream, subject)
    if stored is not None and stored.point is None:
        log.error("last message on %s is not a RelayBatch; starting a new epoch", subject)
    return stored
