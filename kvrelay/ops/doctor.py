"""`kvrelay check` and `kvrelay discover`: what an operator asks before (or beside) a relay.

`check` tries each thing the relay depends on and prints one line per finding, `ok`, `warn`
or `FAIL` with what was tried and how to fix it; any FAIL makes the exit code 1. It changes
nothing: it creates no stream and leaves a running relay alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import sys
import time
from collections.abc import Mapping
from typing import NamedTuple, TextIO
from urllib.parse import urlsplit

import httpx
import nats.errors
import nats.js.errors
import uvloop
import zmq
import zmq.asyncio
from nats.aio.client import Client

from kvrelay.config import Config, SourceSpec
from kvrelay.discovery import DiscoveryError, InstanceId, select_source
from kvrelay.natsio.options import nats_options
from kvrelay.wire.names import Worker, stream_subjects, subject_matches

EXIT_OK, EXIT_FAILED = 0, 1
NATS_PORT = 4222
REPLAY_PROBE = (2**63 - 1).to_bytes(8, "big")  # later than any batch: only the end marker comes


class Finding(NamedTuple):
    level: str  # "ok" | "warn" | "FAIL" | "skip"
    what: str
    detail: str

    def line(self) -> str:
        return f"{self.level:<4} {self.what}: {self.detail}"


# -- NATS -----------------------------------------------------------------------------------------


def nats_addresses(config: Config) -> list[tuple[str, int]]:
    """(host, port) of each configured server URL."""
    out = []
    for url in (u.strip() for u in config.nats.servers.split(",") if u.strip()):
        parts = urlsplit(url if "://" in url else f"nats://{url}")
        out.append((parts.hostname or "localhost", parts.port or NATS_PORT))
    return out


async def check_tcp(host: str, port: int, within: float) -> Finding:
    """TCP connect, then NATS's INFO greeting: says which of the usual causes it is."""
    what = f"NATS {host}:{port}"
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), within)
    except TimeoutError:
        return Finding("FAIL", what, (
            f"TCP connect timed out after {within:g}s: nothing answered, so packets are dropped "
            f"on the way; the usual cause is a firewall or security group blocking port {port}: "
            f"allow TCP {port} from this host to {host}"))
    except ConnectionRefusedError:
        return Finding("FAIL", what, (
            f"connection refused: {host} is up but nothing listens on port {port}; start "
            "nats-server there or correct the port in --nats"))
    except socket.gaierror as exc:
        return Finding("FAIL", what, f"cannot resolve {host} ({exc.strerror}); check --nats")
    except OSError as exc:
        return Finding("FAIL", what, f"{exc.strerror or exc!r}; check the address and the route")
    try:
        greeting = await asyncio.wait_for(reader.readline(), within)
    except (TimeoutError, ConnectionError):
        greeting = b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    if not greeting.startswith(b"INFO"):
        return Finding("FAIL", what, (
            "TCP connects but no NATS greeting came: something else listens there; check the "
            "port in --nats"))
    return Finding("ok", what, "reachable (TCP connect and NATS greeting)")


async def check_jetstream(config: Config, subjects: list[str], within: float) -> list[Finding]:
    """JetStream enabled, and the stream usable: present and covering, or creatable."""
    options = {**nats_options(config.nats), "allow_reconnect": False, "max_reconnect_attempts": 0,
               "connect_timeout": within}
    nc = Client()
    try:
        await asyncio.wait_for(nc.connect(**options), within + 1)
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        with contextlib.suppress(Exception):  # a refused connect leaves its socket open
            await asyncio.wait_for(nc.close(), within)
        return [Finding("FAIL", "NATS connect", f"{exc!r}; check --nats and the credentials")]
    try:
        js = nc.jetstream(timeout=within)
        try:
            account = await js.account_info()
        except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError):
            return [Finding("FAIL", "JetStream", (
                "not enabled on the server: start nats-server with -js (or a jetstream block "
                "in its configuration)")), Finding("skip", f"stream {config.stream.name}",
                                                   "needs JetStream")]
        except (nats.errors.Error, TimeoutError) as exc:
            return [Finding("FAIL", "JetStream", f"account info failed: {exc!r}")]
        found = [Finding("ok", "JetStream", f"enabled ({account.streams} streams)")]
        return [*found, await _check_stream(js, account, config, subjects)]
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), within)


async def _check_stream(js: nats.js.JetStreamContext, account: nats.js.api.AccountInfo,
                        config: Config, subjects: list[str]) -> Finding:
    what = f"stream {config.stream.name}"
    ours = stream_subjects(config.stream.subject_prefix)
    try:
        info = await js.stream_info(config.stream.name)
    except nats.js.errors.NotFoundError:
        limit = account.limits.max_streams
        if limit is not None and 0 <= limit <= account.streams:
            return Finding("FAIL", what, (
                f"absent, and the account is at its limit of {limit} streams: JetStream will "
                "refuse to create it; raise the limit or use an existing --stream"))
        for other in await js.streams_info():
            clash = [p for p in other.config.subjects or [] if _overlap(p, ours)]
            if clash:
                return Finding("FAIL", what, (
                    f"absent, and stream {other.config.name} already takes {clash}, which "
                    f"overlaps {ours}: JetStream will refuse to create it; use "
                    f"--stream {other.config.name} if it covers the relay's subjects"))
        return Finding("ok", what, f"absent; the relay will create it ({ours})")
    except (nats.errors.Error, TimeoutError) as exc:
        return Finding("FAIL", what, f"stream info failed: {exc!r}")
    patterns = info.config.subjects or []
    missing = [s for s in subjects if not any(subject_matches(p, s) for p in patterns)]
    if missing:
        return Finding("FAIL", what, (
            f"exists with subjects {patterns}, which do not cover {', '.join(missing)}; add "
            f"{ours} to it or choose another --stream"))
    return Finding("ok", what, f"exists and covers {', '.join(subjects)}")


def _overlap(a: str, b: str) -> bool:
    """Whether two NATS subject patterns can match a common subject."""
    ta, tb = a.split("."), b.split(".")
    for x, y in zip(ta, tb, strict=False):
        if ">" in (x, y):
            return True
        if x != y and "*" not in (x, y):
            return False
    return len(ta) == len(tb)


# -- ZMQ ------------------------------------------------------------------------------------------


async def check_zmq(ctx: zmq.asyncio.Context, spec: SourceSpec, topic: bytes,
                    within: float) -> Finding:
    """Subscribe as the relay would and wait (bounded) for one frame."""
    what = f"ZMQ {spec.endpoint}"
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    started = time.monotonic()
    try:
        try:
            if spec.bind:
                sub.bind(spec.endpoint)
            else:
                sub.connect(spec.endpoint)
        except zmq.ZMQError as exc:
            hint = " (is a relay already bound there?)" if exc.errno == errno.EADDRINUSE else ""
            return Finding("FAIL", what, f"cannot {'bind' if spec.bind else 'connect'}: "
                                         f"{zmq.strerror(exc.errno or 0)}{hint}")
        try:
            frames = await asyncio.wait_for(sub.recv_multipart(), within)
        except TimeoutError:
            return await _silent(ctx, spec, what, within)
    finally:
        sub.close(linger=0)
    waited = time.monotonic() - started
    if len(frames) != 3 or len(frames[1]) != 8:
        return Finding("FAIL", what, (
            f"a message of {len(frames)} frames arrived, not vLLM's [topic, seq, payload]; "
            "is something else publishing there?"))
    seq = int.from_bytes(frames[1], "big")
    return Finding("ok", what, f"vLLM is publishing (batch seq {seq} after {waited:.1f}s)")


async def _silent(ctx: zmq.asyncio.Context, spec: SourceSpec, what: str,
                  within: float) -> Finding:
    """No frame: ask vLLM's replay socket, if any, whether the engine is up but idle."""
    side = ("vLLM connecting to it (--zmq-bind)" if spec.bind
            else "vLLM binding it (--zmq)")
    advice = (f"check that vLLM runs with --kv-events-config publisher zmq, {side}")
    if spec.replay is None:
        return Finding("FAIL", what, (
            f"no frame in {within:g}s; {advice}; an idle engine publishes nothing, so send it "
            "a request and check again"))
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        dealer.connect(spec.replay)
        await dealer.send_multipart([b"", REPLAY_PROBE])
        await asyncio.wait_for(dealer.recv_multipart(), within)
    except (TimeoutError, zmq.ZMQError):
        return Finding("FAIL", what, (
            f"no frame in {within:g}s and no answer from the replay socket {spec.replay}; "
            f"{advice}"))
    finally:
        dealer.close(linger=0)
    return Finding("warn", what, (
        f"no frame in {within:g}s, but vLLM's replay socket {spec.replay} answers: the engine "
        "is up and idle (it publishes when its cache changes); send a request to see events"))


# -- discovery and the system port ----------------------------------------------------------------


async def check_discovery(config: Config, env: Mapping[str, str],
                          within: float) -> tuple[Finding, InstanceId | None]:
    source = select_source(config.discovery, env, own_lease=config.own_lease)
    try:
        found = await asyncio.wait_for(source.resolve(), within)
    except TimeoutError:
        return Finding("FAIL", "discovery", f"still {source.status} after {within:g}s"), None
    except DiscoveryError as exc:
        return Finding("FAIL", "discovery", f"{source.name}: {exc}"), None
    return Finding("ok", "discovery", (
        f"instance ID {found.value} ({found.source}: {found.detail})")), found


async def check_system_port(config: Config, within: float) -> Finding:
    """A relay answering /live here, or nothing (a warning: the normal case before start)."""
    port = config.system.system_port
    if port == 0:
        return Finding("skip", "system port", "0 (any free port): nothing to check")
    host = config.system.system_host
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    what = f"system port {address}"
    async with httpx.AsyncClient(base_url=f"http://{address}", timeout=within) as client:
        try:
            live = await client.get("/live")
            health = await client.get("/health") if live.status_code == 200 else None
        except httpx.ConnectError:
            return Finding("warn", what, (
                "nothing listens: no relay is running here (fine before it starts; the relay "
                "needs this port free)"))
        except httpx.TransportError as exc:
            return Finding("FAIL", what, f"no HTTP answer in {within:g}s ({exc!r})")
    if health is None or b'"live"' not in live.content:
        return Finding("FAIL", what, (
            f"something other than a relay answers (HTTP {live.status_code} for /live): a relay "
            "could not bind it; choose another --system-port"))
    state = health.json() if health.headers.get("content-type") == "application/json" else {}
    parts = {k: v for k, v in state.get("parts", {}).items() if v != "ok"}
    summary = "ready" if health.status_code == 200 else f"not ready: {parts}"
    return Finding("ok", what, f"a relay answers /live ({summary})")


# -- commands -------------------------------------------------------------------------------------


async def run_checks(config: Config, env: Mapping[str, str], within: float) -> list[Finding]:
    """Every check, in the order the relay meets them at start."""
    findings = [await check_tcp(host, port, within) for host, port in nats_addresses(config)]
    discovered, identity = await check_discovery(config, env, within)
    specs = config.zmq.sources()
    if any(f.level == "ok" for f in findings):
        instance = identity.value if identity is not None else 0
        worker = Worker(config.discovery.namespace, config.discovery.component, instance,
                        config.stream.subject_prefix)
        subjects = [worker.subject(s.dp_rank) for s in specs]
        findings += await check_jetstream(config, subjects, within)
    else:
        findings.append(Finding("skip", "JetStream", "NATS is not reachable"))
    ctx = zmq.asyncio.Context()
    try:
        zmq_checks = [check_zmq(ctx, spec, config.zmq.topic.encode(), within) for spec in specs]
        findings += await asyncio.gather(*zmq_checks)
    finally:
        ctx.destroy(linger=0)
    return [*findings, discovered, await check_system_port(config, within)]


def check(config: Config, env: Mapping[str, str], within: float,
          out: TextIO = sys.stdout) -> int:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        findings = runner.run(run_checks(config, env, within))
    for finding in findings:
        print(finding.line(), file=out)
    failed = sum(f.level == "FAIL" for f in findings)
    print(f"{failed} check(s) failed" if failed else "all checks passed", file=out)
    return EXIT_FAILED if failed else EXIT_OK


def discover(config: Config, env: Mapping[str, str], out: TextIO = sys.stdout,
             err: TextIO = sys.stderr) -> int:
    """Print the ID the relay would use and how it was found."""
    source = select_source(config.discovery, env, own_lease=config.own_lease)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            found = runner.run(source.resolve())
    except DiscoveryError as exc:
        print(f"kvrelay discover: {source.name}: {exc}", file=err)
        return EXIT_FAILED
    print(found.value, file=out)
    print(f"source: {found.source} ({found.detail})", file=out)
    return EXIT_OK
