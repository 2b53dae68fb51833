"""The JetStream side both the relay and operator commands share: connection options, the
stream (created or verified), and the last batch published on a subject.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from relay.codec import decode_resume_point
from relay.config import Config
from relay.schema import ResumePoint

log = logging.getLogger("kvrelay.stream")

STREAM_SUBJECTS = "kv.>"


def worker_subjects(namespace: str, component: str, instance_id: int | None = None) -> str:
    """What a router subscribes to: every worker of a component, or every DP rank of one."""
    return f"kv.{namespace}.{component}.{'>' if instance_id is None else f'{instance_id}.*'}"


class StreamMismatch(Exception):
    """The configured stream exists but does not take the relay's subjects."""


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard match: `*` one token, `>` one or more trailing tokens."""
    p_tokens, s_tokens = pattern.split("."), subject.split(".")
    for i, token in enumerate(p_tokens):
        if token == ">":
            return len(s_tokens) > i
        if i >= len(s_tokens) or (token != "*" and token != s_tokens[i]):
            return False
    return len(p_tokens) == len(s_tokens)


def nats_options(config: Config) -> dict[str, Any]:
    """Connection options shared by the relay and the operator commands."""
    options: dict[str, Any] = {
        "servers": [s.strip() for s in config.nats.split(",") if s.strip()],
        "name": "kvrelay",
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": config.reconnect_wait_max,
        "connect_timeout": 2,
        # Find a dead or frozen server in seconds, not nats-py's default two minutes.
        "ping_interval": 5,
        "max_outstanding_pings": 3,
    }
    if config.nats_user:
        options["user"] = config.nats_user
        options["password"] = config.nats_password or ""
    if config.nats_token:
        options["token"] = config.nats_token
    if config.nats_nkey_seed:
        options["nkeys_seed"] = config.nats_nkey_seed
    if config.nats_creds:
        options["user_credentials"] = config.nats_creds
    if config.nats_tls_ca or config.nats_tls_cert:
        context = ssl.create_default_context(cafile=config.nats_tls_ca)
        if config.nats_tls_cert:
            context.load_cert_chain(config.nats_tls_cert, config.nats_tls_key)
        options["tls"] = context
    return options


async def ensure_stream(js: JetStreamContext, config: Config, subjects: list[str]) -> str:
    """Create the stream, or check an existing one covers `subjects`; says which it did."""
    try:
        info = await js.stream_info(config.stream)
    except nats.js.errors.NotFoundError:
        await js.add_stream(StreamConfig(
            name=config.stream, subjects=[STREAM_SUBJECTS], storage=StorageType.FILE,
            num_replicas=config.stream_replicas, max_age=config.stream_max_age,
            max_bytes=config.stream_max_bytes, duplicate_window=config.stream_duplicate_window,
        ))
        return f"created JetStream stream {config.stream} (subjects {STREAM_SUBJECTS})"
    patterns = info.config.subjects or []
    missing = [s for s in subjects if not any(subject_matches(p, s) for p in patterns)]
    if missing:
        raise StreamMismatch(
            f"stream {config.stream} has subjects {patterns}, which do not cover "
            f"{', '.join(missing)}; add {STREAM_SUBJECTS} to it or choose another --stream")
    return f"using JetStream stream {config.stream} (subjects {patterns})"


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
