"""What both publishers share: reading a frame's batch, dropping one that cannot be read, telling
a refusal from an outage, and the drain wait of shutdown."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

import nats.errors

from kvrelay.codec import DecodedBatch, InputBatch, MalformedPayload
from kvrelay.config import NatsSettings
from kvrelay.ingest.buffer import Buffer
from kvrelay.ingest.sequencer import Frame
from kvrelay.ingest.zmtpwire import REFUSED
from kvrelay.ratelimit import RateLimitedLog
from kvrelay.system.metrics import Metrics


class NatsRefused(Exception):
    """NATS refused the relay's credentials or TLS settings at start: retrying cannot help."""


_AUTH_FLAGS = (("nats_user", "--nats-user"), ("nats_password", "--nats-password"),
               ("nats_token", "--nats-token"), ("nats_nkey_seed", "--nats-nkey-seed"),
               ("nats_creds", "--nats-creds"))


def refusal(exc: BaseException, config: NatsSettings, who: str = "the relay") -> str | None:
    """What the operator must fix when `exc` says NATS refused `who`'s settings, else None.

    An unreachable server is retried forever; a server that answers "not with these
    credentials" or a TLS handshake that cannot succeed will answer the same way next time.
    """
    text = str(exc).lower()
    if isinstance(exc, nats.errors.AuthorizationError) or "authorization violation" in text \
            or "authentication" in text:
        given = [flag for name, flag in _AUTH_FLAGS if getattr(config, name)]
        if "@" in config.servers:
            given.append("the user in the --nats URL")
        advice = (f"check {', '.join(given)}" if given else
                  f"{who} sent none: set --nats-user and --nats-password, --nats-token, "
                  "--nats-nkey-seed or --nats-creds")
        return f"NATS refused {who}'s credentials ({exc}); {advice}"
    if isinstance(exc, ssl.SSLError):
        return (f"TLS with NATS failed ({exc}); check --nats-tls-ca, --nats-tls-cert and "
                "--nats-tls-key")
    if "tls" in text or "secure connection" in text:
        return f"TLS with NATS failed ({exc}); check the --nats-tls-* settings and the URL"
    return None


async def wait_until_sent(unsent: Callable[[], bool], wake: asyncio.Event,
                          within: float) -> bool:
    """Keep a publisher's loop awake until `unsent()` is False; False if `within` seconds pass
    first. The drain phase of shutdown, shared by both publishers."""
    deadline = time.monotonic() + within
    while unsent():
        if time.monotonic() >= deadline:
            return False
        wake.set()
        await asyncio.sleep(0.01)
    return True


SEND_SLICE = 256  # batches the publish loop sends from a backlog before letting others run


def drop_malformed(frame: Frame, exc: MalformedPayload, buffer: Buffer, metrics: Metrics,
                   warn: RateLimitedLog) -> None:
    """Count and log a batch that cannot be read or written; what it had to announce, and its
    own loss, go with its rank's next batch (`Buffer.lose`)."""
    metrics.decode_errors.labels(exc.kind).inc()
    warn.warning(exc.kind, "dropped a batch (dp_rank %d seq %d): %s", frame.dp_rank, frame.seq,
                 exc)
    buffer.lose("malformed", frame.dp_rank, (frame.seq,), carried=frame.resyncs)


Decoded = TypeVar("Decoded", DecodedBatch, InputBatch)


def read_frame(decode: Callable[[bytes], Decoded], frame: Frame, buffer: Buffer,
               metrics: Metrics, warn: RateLimitedLog) -> Decoded | None:
    """A frame's vLLM batch, decoded (`Codec.decode` or `decode_input`) for either publisher;
    None if it is malformed (dropped through `drop_malformed`) or was refused unread for its
    size (`REFUSED`, which no decoder takes: dropped as `too_large`, announced as a gap)."""
    try:
        decoded = decode(frame.payload)
    except MalformedPayload as exc:
        # Checked only here (nothing on the way of a good batch), and by identity: a payload
        # from the wire with the same bytes is another object, malformed like any other.
        if frame.payload is REFUSED:
            buffer.lose("too_large", frame.dp_rank, (frame.seq,), carried=frame.resyncs)
        else:
            drop_malformed(frame, exc, buffer, metrics, warn)
        return None
    if decoded.dp_rank is not None and decoded.dp_rank != frame.dp_rank:
        warn.warning("rank", "batch says data_parallel_rank %d but arrived on the endpoint of "
                     "dp_rank %d; publishing under %d", decoded.dp_rank, frame.dp_rank,
                     frame.dp_rank)
    return decoded


def group_frames(frames: Iterable[Frame], max_batches: int, max_bytes: int) -> list[list[Frame]]:
    """Frames in hand as the messages they make: each rank's in their order, a message at most
    `max_batches` of them and, past its first, `max_bytes` of their payloads. Ranks are separate
    Dynamo publishers: the order between them is nobody's concern."""
    groups: list[list[Frame]] = []
    filling: dict[int, list[Frame]] = {}  # dp_rank -> its open group
    sizes: dict[int, int] = {}  # dp_rank -> payload bytes in its open group
    for frame in frames:
        rank, size = frame.dp_rank, len(frame.payload)
        group = filling.get(rank)
        if group is not None and len(group) < max_batches and sizes[rank] + size <= max_bytes:
            group.append(frame)
            sizes[rank] += size
        else:
            filling[rank] = group = [frame]
            groups.append(group)
            sizes[rank] = size
    return groups
