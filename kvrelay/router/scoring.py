"""A scoring service for routers that are not written in Python: HTTP over a live KvIndex.

    POST /score  {"token_ids": [1, 2, 3], "lora_name": null, "cache_salt": null}
             ->  {"<instance_id>.<dp_rank>": leading blocks held, ...}   (every known worker)
    GET  /live, /health (200 once caught up with the stream), /metrics

A request with `Content-Type: application/msgpack` carries the same map in msgpack and is
answered in msgpack. Instead of `token_ids`, `token_bytes` may carry the ids packed as uint32
little-endian (msgpack bin, base64 in JSON): the service then makes no object per token, which
is most of the cost of a long request.

HTTP/1.1 with keep-alive on asyncio's protocol layer, sharing the loop of the KvConsumer that
keeps the index live, so an answer always reflects every batch applied before it. Replicas
scale out by each following the stream. A malformed request is answered 400 (413 when larger
than `max_body`) and counted, never a crash.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from itertools import repeat
from typing import Final, cast

import msgspec
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from kvrelay.router.index import KvIndex

log = logging.getLogger("kvrelay.scoring")

MAX_BODY: Final = 4 << 20
_REASONS: Final = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                   413: "Content Too Large", 503: "Service Unavailable"}


class ScoreRequest(msgspec.Struct, forbid_unknown_fields=True):
    token_ids: list[int] | None = None  # overlap_tokens refuses ids outside uint32
    token_bytes: bytes | None = None  # or the ids packed as uint32 little-endian
    lora_name: str | None = None
    cache_salt: str | None = None


_decode_request: Final = msgspec.json.Decoder(ScoreRequest).decode
_decode_msgpack_request: Final = msgspec.msgpack.Decoder(ScoreRequest).decode
_encode: Final = msgspec.json.Encoder().encode
_encode_msgpack: Final = msgspec.msgpack.Encoder().encode
MSGPACK: Final = "application/msgpack"


class ScorerMetrics:
    """The service's own series, beside the consumer's `kvrelay_consumer_*` in one registry."""

    def __init__(self, registry: CollectorRegistry, index: KvIndex) -> None:
        self.requests = Counter("kvrelay_scorer_requests", "score requests by outcome",
                                ["outcome"], registry=registry)
        self.latency = Histogram(
            "kvrelay_scorer_score_seconds", "time to decode, score and encode one request",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
            registry=registry)
        blocks = Gauge("kvrelay_scorer_index_blocks", "blocks the index holds, all workers",
                       registry=registry)
        blocks.set_function(lambda: sum(index.block_count(w) for w in index.workers()))
        workers = Gauge("kvrelay_scorer_workers", "workers the index knows", registry=registry)
        workers.set_function(lambda: len(index.workers()))
        age = Gauge("kvrelay_scorer_last_batch_age_seconds",
                    "seconds since the relay received the newest batch applied (the lag "
                    "behind the workers while they are active)", registry=registry)
        age.set_function(lambda: _newest_age(index))


def _newest_age(index: KvIndex) -> float:
    newest = max((index.status(w).last_relay_ts for w in index.workers()), default=0.0)
    return max(0.0, time.time() - newest) if newest else 0.0


class ScoringService:
    """Serves `index` on host:port; `ready()` says whether the index has caught up."""

    def __init__(self, index: KvIndex, ready: Callable[[], bool], registry: CollectorRegistry,
                 host: str = "0.0.0.0", port: int = 8080, max_body: int = MAX_BODY) -> None:
        self.index = index
        self.ready = ready
        self.registry = registry
        self.metrics = ScorerMetrics(registry, index)
        self.max_body = max_body
        self._host, self._port = host, port
        self._server: asyncio.Server | None = None
        self._labels: tuple[int, list[tuple[int, int]], list[str]] = (-1, [], [])

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Http(self), self._host, self._port)
        log.info("scoring service on http://%s:%d (POST /score, /live, /health, /metrics)",
                 self._host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def respond(self, method: bytes, path: bytes, body: bytes, msgpack: bool = False
                ) -> tuple[int, str, bytes]:
        """(status, content type, body) for one request; `msgpack`: its body is msgpack."""
        if path == b"/score":
            if method != b"POST":
                return 405, "text/plain", b"POST a JSON body to /score\n"
            return self.score(body, msgpack)
        if method not in (b"GET", b"HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        if path == b"/live":
            return 200, "application/json", b'{"status":"live"}'
        if path in (b"/health", b"/ready"):
            ok = self.ready()
            return (200 if ok else 503), "application/json", _encode(
                {"status": "ready" if ok else "catching up", "workers": len(self.index.workers())})
        if path == b"/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        return 404, "text/plain", b"not found\n"

    def score(self, body: bytes, msgpack: bool = False) -> tuple[int, str, bytes]:
        started = time.perf_counter()
        try:
            request = (_decode_msgpack_request if msgpack else _decode_request)(body)
            tokens = request.token_ids if request.token_ids is not None else request.token_bytes
            if tokens is None or (request.token_ids is not None
                                  and request.token_bytes is not None):
                raise ValueError("give either token_ids or token_bytes")
            held = self.index.overlap_tokens(tokens, lora_name=request.lora_name,
                                             cache_salt=request.cache_salt)
        except (msgspec.DecodeError, OverflowError, ValueError) as exc:
            self.metrics.requests.labels("bad_request").inc()
            return 400, "application/json", _encode({"error": str(exc)})
        workers, labels = self._worker_labels()
        answer = dict(zip(labels, map(held.get, workers, repeat(0)), strict=True))
        self.metrics.latency.observe(time.perf_counter() - started)
        self.metrics.requests.labels("ok").inc()
        if msgpack:
            return 200, MSGPACK, _encode_msgpack(answer)
        return 200, "application/json", _encode(answer)

    def _worker_labels(self) -> tuple[list[tuple[int, int]], list[str]]:
        """The index's workers and their `<instance_id>.<dp_rank>`, made again only when a
        worker came or went."""
        membership, workers, labels = self._labels
        if membership != self.index.membership:
            workers = self.index.workers()
            labels = [f"{i}.{r}" for i, r in workers]
            self._labels = (self.index.membership, workers, labels)
        return workers, labels


class _Http(asyncio.Protocol):
    """One connection: requests parsed as they arrive, answered in order, kept alive."""

    def __init__(self, service: ScoringService) -> None:
        self._service = service
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while self._transport is not None and self._one():
            pass

    def _one(self) -> bool:
        """Answer the first complete request in the buffer; False when there is none."""
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > 65536:
                self._reply(400, "text/plain", b"headers too large\n", close=True)
            return False
        head = bytes(self._buffer[:end]).split(b"\r\n")
        parts = head[0].split(b" ")
        if len(parts) != 3:
            self._reply(400, "text/plain", b"bad request line\n", close=True)
            return False
        method, target, version = parts
        length, close, msgpack = 0, version == b"HTTP/1.0", False
        for line in head[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = -1
            elif name == b"content-type":
                msgpack = value.strip().lower().startswith(MSGPACK.encode())
            elif name == b"connection":
                close = value.strip().lower() == b"close"
            elif name == b"transfer-encoding":
                length = -1  # chunked bodies are not supported
        if length < 0 or length > self._service.max_body:
            self._service.metrics.requests.labels("bad_request").inc()
            status = 413 if length > 0 else 400
            self._reply(status, "text/plain", b"a body needs a valid Content-Length\n"
                        if status == 400 else b"request body too large\n", close=True)
            return False
        if len(self._buffer) < end + 4 + length:
            return False
        body = bytes(self._buffer[end + 4:end + 4 + length])
        del self._buffer[:end + 4 + length]
        path = target.split(b"?", 1)[0]
        status, ctype, payload = self._service.respond(method, path, body, msgpack)
        self._reply(status, ctype, b"" if method == b"HEAD" else payload, close=close,
                    length=len(payload))
        return not close

    def _reply(self, status: int, ctype: str, body: bytes, *, close: bool,
               length: int | None = None) -> None:
        transport = self._transport
        if transport is None:
            return
        head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body) if length is None else length}\r\n"
                f"{'Connection: close' if close else 'Connection: keep-alive'}\r\n\r\n")
        transport.write(head.encode() + body)
        if close:
            transport.close()
            self._transport = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
