"""A synthetic vLLM KV-event publisher that speaks vLLM's exact ZMQ wire format.

It stands in for a real engine in `kvrelay demo`, the integration tests and the benchmark, so
the relay can be driven through gaps, replays and malformed frames without a GPU. Frames,
replay protocol, bind rule and event shapes follow vLLM's `ZmqEventPublisher` (see
docs/contract.md section 1 and the captured vLLM 0.32 vectors).
"""

from __future__ import annotations

import enum
import random
import threading
import time
from collections import deque
from itertools import islice
from types import TracebackType
from typing import Any, Final, Literal

import msgspec
import zmq

BatchForm = Literal["array", "map"]
EventForm = Literal["map", "array"]
HashKind = Literal["uint64", "int64", "bytes"]
BlockHash = int | bytes

END_SEQ: Final = (-1).to_bytes(8, "big", signed=True)
"""Seq of the replay end marker: -1 as 8-byte big-endian signed, all 0xff."""

_ENCODER: Final = msgspec.msgpack.Encoder()
_POLL_MS: Final = 50  # replay thread wake-up, bounds how long close() waits
_PUB_HWM: Final = 100_000  # vLLM's default high-water mark
_VOCAB: Final = 32_000


class _Auto(enum.Enum):
    """Marks an argument that takes the value vLLM 0.32 sends."""

    AUTO = enum.auto()


def is_bind_endpoint(endpoint: str) -> bool:
    """vLLM's rule: a PUB binds on wildcard, IPv6 or ipc/inproc endpoints and connects otherwise."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def block_stored(
    block_hashes: list[Any],
    parent_block_hash: BlockHash | None,
    token_ids: list[int],
    *,
    block_size: int = 16,
    lora_id: int | None = None,
    medium: str | None = "GPU",
    lora_name: str | None = None,
    extra_keys: list[Any] | _Auto | None = _Auto.AUTO,
    group_idx: int | None = 0,
    kv_cache_spec_kind: str | None = "full_attention",
    kv_cache_spec_sliding_window: int | None = None,
    form: EventForm = "map",
    **newer: Any,
) -> Any:
    """A BlockStored event as vLLM sends it; defaults match vLLM 0.32 on a plain model.

    Map form (vLLM >= 0.24) always carries lora_id, medium and lora_name and omits the other
    fields when None, as msgspec's omit_defaults does. `newer` adds later keys (locality,
    ownership, session_id, lookahead_token_ids, cache_salt), which only map form can carry.
    """
    keys = [None] * len(block_hashes) if extra_keys is _Auto.AUTO else extra_keys
    if form == "array":
        if newer:
            raise ValueError(f"array-form events have no field(s) {sorted(newer)}")
        return [
            "BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id,
            medium, lora_name, keys, group_idx, kv_cache_spec_kind, kv_cache_spec_sliding_window,
        ]  # fmt: skip
    event: dict[str, Any] = {
        "type": "BlockStored",
        "block_hashes": block_hashes,
        "parent_block_hash": parent_block_hash,
        "token_ids": token_ids,
        "block_size": block_size,
        "lora_id": lora_id,
        "medium": medium,
        "lora_name": lora_name,
    }
    optional = {
        "extra_keys": keys,
        "group_idx": group_idx,
        "kv_cache_spec_kind": kv_cache_spec_kind,
        "kv_cache_spec_sliding_window": kv_cache_spec_sliding_window,
        **newer,
    }
    event.update((k, v) for k, v in optional.items() if v is not None)
    return event


def block_removed(
    block_hashes: list[Any],
    *,
    medium: str | None = "GPU",
    group_idx: int | None = 0,
    form: EventForm = "map",
) -> Any:
    """A BlockRemoved event as vLLM sends it (medium always present, group_idx omitted if None)."""
    if form == "array":
        return ["BlockRemoved", block_hashes, medium, group_idx]
    event: dict[str, Any] = {"type": "BlockRemoved", "block_hashes": block_hashes, "medium": medium}
    if group_idx is not None:
        event["group_idx"] = group_idx
    return event


def all_blocks_cleared(*, form: EventForm = "map") -> Any:
    """An AllBlocksCleared event, sent by vLLM when its prefix cache is reset."""
    return ["AllBlocksCleared"] if form == "array" else {"type": "AllBlocksCleared"}


def encode_batch(
    events: list[Any], ts: float, dp_rank: int = 0, form: BatchForm = "array"
) -> bytes:
    """Msgpack of an EventBatch: the array every released vLLM sends, or the newer map form."""
    if form == "map":
        return _ENCODER.encode({"ts": ts, "events": events, "data_parallel_rank": dp_rank})
    return _ENCODER.encode([ts, events, dp_rank])


class WorkloadFactory:
    """Deterministic, realistic batches plus the ground truth of which blocks are stored.

    Each batch stores `blocks` new blocks chained to the previous batch's last block, and may
    remove an earlier block (and the oldest ones beyond `capacity`, like an evicting cache) or,
    rarely, clear everything. Tests compare a consumer's view with `stored_blocks`.
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        blocks: int = 4,
        block_size: int = 16,
        hash_kind: HashKind = "uint64",
        event_form: EventForm = "map",
        remove_probability: float = 0.5,
        clear_probability: float = 0.0,
        capacity: int = 4096,
        medium: str = "GPU",
    ) -> None:
        self.blocks = blocks
        self.block_size = block_size
        self.hash_kind: HashKind = hash_kind
        self.event_form: EventForm = event_form
        self.remove_probability = remove_probability
        self.clear_probability = clear_probability
        self.capacity = capacity
        self.medium = medium
        self._rng = random.Random(seed)
        self._stored: dict[BlockHash, None] = {}  # insertion order is age, for eviction
        self._parent: BlockHash | None = None

    @property
    def stored_blocks(self) -> frozenset[BlockHash]:
        """Hashes a correct consumer must hold after applying every batch so far."""
        return frozenset(self._stored)

    def _new_hash(self, taken: list[BlockHash]) -> BlockHash:
        while True:
            h: BlockHash
            if self.hash_kind == "bytes":
                h = self._rng.randbytes(32)
            else:
                h = self._rng.getrandbits(64)
                if self.hash_kind == "int64" and h >= 1 << 63:
                    h -= 1 << 64
            if h not in self._stored and h not in taken:
                return h

    def next_events(self) -> list[Any]:
        """The events of the next batch, in the configured event form."""
        rng, form = self._rng, self.event_form
        if self.clear_probability > 0 and rng.random() < self.clear_probability:
            self._stored.clear()
            self._parent = None
            return [all_blocks_cleared(form=form)]
        n_earlier = len(self._stored)
        hashes: list[BlockHash] = []
        for _ in range(self.blocks):
            hashes.append(self._new_hash(hashes))
        tokens = [rng.randrange(_VOCAB) for _ in range(self.blocks * self.block_size)]
        events = [
            block_stored(
                hashes, self._parent, tokens,
                block_size=self.block_size, medium=self.medium, form=form,
            )
        ]  # fmt: skip
        self._stored.update(dict.fromkeys(hashes))
        self._parent = hashes[-1] if hashes else self._parent
        removed: list[BlockHash] = []
        if n_earlier and rng.random() < self.remove_probability:
            removed.append(next(islice(self._stored, rng.randrange(n_earlier), None)))
        excess = len(self._stored) - len(removed) - self.capacity
        for h in self._stored:
            if excess <= 0:
                break
            if h not in removed:
                removed.append(h)
                excess -= 1
        for h in removed:
            del self._stored[h]
        if self._parent is not None and self._parent not in self._stored:
            self._parent = None
        if removed:
            events.append(block_removed(removed, medium=self.medium, form=form))
        return events


class SyntheticVllm:
    """Stand-in for vLLM's ZmqEventPublisher: same sockets, frames, bind rule and replay."""

    def __init__(
        self,
        endpoint: str,
        *,
        replay_endpoint: str | None = None,
        topic: bytes = b"kv-events",
        dp_rank: int = 0,
        batch_form: BatchForm = "array",
        event_form: EventForm = "map",
        replay_with_topic: bool = True,
        buffer_batches: int = 10_000,
        factory: WorkloadFactory | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic
        self.dp_rank = dp_rank
        self.batch_form: BatchForm = batch_form
        self.replay_with_topic = replay_with_topic
        self.factory = factory if factory is not None else WorkloadFactory(event_form=event_form)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_batches)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._seq = 0
        self._replay_requests = 0
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._pub: zmq.Socket[bytes] | None = None
        self._router: zmq.Socket[bytes] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> SyntheticVllm:
        """Open the PUB (and replay ROUTER) sockets; bind errors surface here, not in a thread."""
        if self._ctx is not None:
            raise RuntimeError("SyntheticVllm already started")
        self._stop.clear()
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.SNDHWM, _PUB_HWM)
        try:
            if is_bind_endpoint(self.endpoint):
                self._pub.bind(self.endpoint)
            else:
                self._pub.connect(self.endpoint)
            if self.replay_endpoint is not None:
                self._router = self._ctx.socket(zmq.ROUTER)
                self._router.setsockopt(zmq.LINGER, 0)
                self._router.setsockopt(zmq.SNDHWM, 0)  # a full replay must never be dropped
                self._router.bind(self.replay_endpoint)
                self._thread = threading.Thread(
                    target=self._serve_replay, args=(self._router,), name="synthetic-replay",
                    daemon=True,
                )  # fmt: skip
                self._thread.start()
        except BaseException:
            self.close()
            raise
        return self

    @property
    def seq(self) -> int:
        """The seq the next batch will get."""
        return self._seq

    @property
    def address(self) -> str:
        """Where a subscriber reaches the PUB (the resolved port when bound to `*`)."""
        if self._pub is not None and is_bind_endpoint(self.endpoint):
            return self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        return self.endpoint

    @property
    def replay_address(self) -> str | None:
        """Where a DEALER reaches the replay ROUTER, or None without replay."""
        if self._router is None:
            return None
        return self._router.getsockopt_string(zmq.LAST_ENDPOINT)

    @property
    def replay_requests(self) -> int:
        """How many well-formed replay requests were served."""
        with self._lock:
            return self._replay_requests

    def _store(self, payload: bytes) -> int:
        with self._lock:
            seq = self._seq
            self._seq += 1
            self._buffer.append((seq, payload))
        return seq

    def _encode(self, events: list[Any], ts: float | None) -> bytes:
        return encode_batch(
            events, time.time() if ts is None else ts, self.dp_rank, self.batch_form
        )

    def publish(self, events: list[Any], ts: float | None = None) -> int:
        """Send one batch and keep it for replay; returns its seq."""
        return self.publish_payload(self._encode(events, ts))

    def publish_next(self, ts: float | None = None) -> int:
        """Publish the factory's next batch; returns its seq."""
        return self.publish(self.factory.next_events(), ts)

    def publish_payload(self, payload: bytes) -> int:
        """Send pre-encoded payload bytes with the next seq and keep them for replay."""
        if self._pub is None:
            raise RuntimeError("SyntheticVllm not started")
        seq = self._store(payload)
        self._pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])
        return seq

    def skip(self, n: int = 1, *, events_per_batch: list[list[Any]] | None = None) -> list[int]:
        """Buffer batches without sending them, so a subscriber sees a gap that replay can fill.

        The batches' events come from `events_per_batch` (one batch per entry, `n` ignored) or,
        when it is None, from the factory.
        """
        batches = events_per_batch
        if batches is None:
            batches = [self.factory.next_events() for _ in range(n)]
        return [self._store(self._encode(events, None)) for events in batches]

    def resend(self, back: int = 1) -> int:
        """Send a batch already sent once more, its seq and payload unchanged, as a publisher
        repeating itself would (1: the last batch, 2: the one before, ...); the seq of the next
        batch and the replay buffer are untouched. Returns the seq sent."""
        if self._pub is None:
            raise RuntimeError("SyntheticVllm not started")
        with self._lock:
            if not 1 <= back <= len(self._buffer):
                raise ValueError(f"{back} back: {len(self._buffer)} batches are kept")
            seq, payload = self._buffer[-back]
        self._pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])
        return seq

    def send_raw(self, frames: list[bytes]) -> None:
        """Send arbitrary frames on the PUB, for malformed-input tests; seq is untouched."""
        if self._pub is None:
            raise RuntimeError("SyntheticVllm not started")
        self._pub.send_multipart(frames)

    def _serve_replay(self, router: zmq.Socket[bytes]) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(_POLL_MS):
                continue
            frames = router.recv_multipart()
            if len(frames) != 3:  # vLLM drops malformed requests without answering
                continue
            identity, _, start_bytes = frames
            start = int.from_bytes(start_bytes, "big")
            with self._lock:
                self._replay_requests += 1
                batches = [(s, p) for s, p in self._buffer if s >= start]
            head = [identity, b"", self.topic] if self.replay_with_topic else [identity, b""]
            for seq, payload in batches:
                router.send_multipart([*head, seq.to_bytes(8, "big"), payload])
            router.send_multipart([*head, END_SEQ, b""])

    def close(self) -> None:
        """Stop the replay thread and close the sockets; idempotent and never blocks on peers."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for sock in (self._pub, self._router):
            if sock is not None:
                sock.close(linger=0)
        self._pub = self._router = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def __enter__(self) -> SyntheticVllm:
        return self if self._ctx is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
