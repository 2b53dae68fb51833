"""The system port: /live, /health (readiness, saying which part is not ready) and /metrics.

A deliberately small HTTP/1.1 server on asyncio: three GET routes for probes and scrapers, no
dependency to keep current, and it shares the relay's loop so it sees the relay's real state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvrelay.system.metrics import Metrics

log = logging.getLogger("kvrelay.health")

Readiness = Callable[[], dict[str, str]]  # part -> "ok" or what is wrong with it
Details = Callable[[], dict[str, object]]  # more of /health's body, not part of readiness


class SystemServer:
    """Serves the probes and metrics of one relay."""

    def __init__(self, host: str, port: int, metrics: Metrics, readiness: Readiness,
                 details: Details | None = None) -> None:
        self._host = host
        self._details = details
        self._port = port
        self._metrics = metrics
        self._readiness = readiness
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._host, self._port)
        log.info("system server on http://%s:%d (/live, /health, /metrics)",
                 self._host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def ready(self) -> tuple[bool, dict[str, str]]:
        parts = self._readiness()
        ok = all(state == "ok" for state in parts.values())
        self._metrics.ready.set(1 if ok else 0)
        return ok, parts

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            method, _, rest = request.partition(b" ")
            path = rest.split(b" ", 1)[0].split(b"?", 1)[0].decode("latin-1")
            if method not in (b"GET", b"HEAD"):
                status, ctype, body = 405, "text/plain", b"method not allowed\n"
            elif path == "/live":
                status, ctype, body = 200, "application/json", b'{"status":"live"}'
            elif path in ("/health", "/ready"):
                ok, parts = self.ready()
                body = msgspec.json.encode({"status": "ready" if ok else "not ready",
                                            "parts": parts,
                                            **(self._details() if self._details else {})})
                status, ctype = (200 if ok else 503), "application/json"
            elif path == "/metrics":
                self.ready()
                status, ctype, body = 200, CONTENT_TYPE_LATEST, generate_latest(
                    self._metrics.registry)
            else:
                status, ctype, body = 404, "text/plain", b"not found\n"
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed",
                      503: "Service Unavailable"}[status]
            head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
            writer.write(head.encode() + (b"" if method == b"HEAD" else body))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
