"""`kvrelay score`: for a request's token ids, how many leading cached blocks each worker holds;
`kvrelay index --http PORT`: the same as a service, over an index kept live from the stream.

    kvrelay score --nats URL --namespace NS --component C --tokens 1,2,3 [--json]
    kvrelay index --nats URL --namespace NS --component C --http 8080

Catches up on the component's stream the way a router does (the workers' snapshots first, then
the stream after them), then scores every worker with
`KvIndex.overlap_tokens`: whole blocks only, and never the block holding the last token, which
vLLM always computes. `--json` prints one object, `{"<instance_id>.<dp_rank>": blocks}`, with
every worker the stream names (0 for those holding none of the prefix). The service also
writes the workers' snapshots (`--snapshot-interval`, `--snapshot-events`), for the routers and
`score` runs that start after it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import uvloop
from prometheus_client import CollectorRegistry

from kvrelay.config import ConfigError, NatsSettings
from kvrelay.ops.connect import (
    Errors,
    add_connection_arguments,
    connection_failure,
    connection_options,
    connection_settings,
    refused,
)
from kvrelay.router.consumer import KvConsumer, StreamNotFound
from kvrelay.router.scoring import ScoringService
from kvrelay.router.snapwriter import SnapshotWriter
from kvrelay.wire.names import NAME_RULE, SNAPSHOT_BUCKET, SUBJECT_PREFIX


def _add_stream_arguments(parser: argparse.ArgumentParser, stream_default: str) -> None:
    """`run`'s NATS connection flags, the stream, the subjects and the workers' names."""
    add_connection_arguments(parser)
    parser.add_argument("--stream", default=stream_default, help="JetStream stream")
    parser.add_argument("--subject-prefix",
                        default=os.environ.get("KVRELAY_SUBJECT_PREFIX", SUBJECT_PREFIX),
                        help="the relays' --subject-prefix (default: %(default)s)")
    parser.add_argument("--namespace", default=os.environ.get("DYN_NAMESPACE", "dynamo"),
                        help="the workers' namespace (default: %(default)s)")
    parser.add_argument("--component", default=os.environ.get("DYN_COMPONENT", "backend"),
                        help="the workers' component (default: %(default)s)")
    parser.add_argument("--snapshot-bucket", default=SNAPSHOT_BUCKET,
                        help="KV bucket of the workers' snapshots (default: %(default)s)")


def add_parser(commands: Any, stream_default: str) -> None:
    """The `score` and `index` subcommands' options, on the CLI's subparsers."""
    index = commands.add_parser(
        "index", help="a scoring service: POST /score over an index kept live from the stream",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_stream_arguments(index, stream_default)
    index.add_argument("--http", type=int, required=True, metavar="PORT",
                       help="port of the service (0: any free one, logged)")
    index.add_argument("--host", default="0.0.0.0", help="address to bind (default: all)")
    index.add_argument("--snapshot-interval", type=_not_negative(float), default=30.0,
                       metavar="SECONDS",
                       help="write the workers' snapshots to --snapshot-bucket every SECONDS "
                            "when they changed (0: none on a timer; default: %(default)s)")
    index.add_argument("--snapshot-events", type=_not_negative(int), default=50_000,
                       metavar="N",
                       help="also write them once N events were applied since the last "
                            "(0: never on a count; with --snapshot-interval 0 too, no "
                            "snapshots; default: %(default)s)")
    score = commands.add_parser(
        "score", help="each worker's leading cached blocks for a request's token ids",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_stream_arguments(score, stream_default)
    tokens = score.add_mutually_exclusive_group(required=True)
    tokens.add_argument("--tokens", help="the request's token ids, comma-separated")
    tokens.add_argument("--tokens-file", type=Path, metavar="FILE",
                        help="a file of token ids: a JSON array, or ids separated by commas "
                             "or white space ('-': standard input)")
    score.add_argument("--lora-name", default=None, help="the request's LoRA adapter")
    score.add_argument("--cache-salt", default=None, help="the request's cache salt")
    score.add_argument("--json", action="store_true", help="print one JSON object")
    score.add_argument("--connect-wait", type=float, default=5.0, metavar="SECONDS",
                       help="give up when NATS cannot be reached within this (default: 5)")


def _not_negative(kind: type[float] | type[int]) -> Callable[[str], float | int]:
    """An argparse type: a number of `kind`, 0 or more."""
    def parse(text: str) -> float | int:
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
        return value
    return parse


def parse_tokens(text: str) -> list[int]:
    """Token ids from a JSON array or a list separated by commas or white space; ValueError
    naming the first one that is not an id."""
    text = text.strip()
    items: list[Any] = (json.loads(text) if text.startswith("[")
                        else [t for t in re.split(r"[\s,]+", text) if t])
    tokens = []
    for item in items:
        try:
            value = int(item) if not isinstance(item, bool) else -1
        except (TypeError, ValueError):
            raise ValueError(f"not a token id: {item!r}") from None
        if not 0 <= value < 2**32:
            raise ValueError(f"not a token id: {item!r} (ids are 0 .. 2**32-1)")
        tokens.append(value)
    if not tokens:
        raise ValueError("no token ids given")
    return tokens


async def score_async(nats: NatsSettings | str, namespace: str, component: str,
                      tokens: Sequence[int], *, lora_name: str | None = None,
                      cache_salt: str | None = None, stream: str = "KV_EVENTS",
                      subject_prefix: str = SUBJECT_PREFIX,
                      snapshot_bucket: str = SNAPSHOT_BUCKET, connect_wait: float = 5.0,
                      as_json: bool = False, out: TextIO = sys.stdout) -> int:
    """Catch up, score, print; returns the exit code (1: NATS or the stream is missing, 2:
    NATS refused the credentials or the TLS settings)."""
    config = NatsSettings(servers=nats) if isinstance(nats, str) else nats
    errors = Errors()
    consumer = KvConsumer(config.servers, namespace, component, stream=stream,
                          bootstrap="snapshot", snapshot_bucket=snapshot_bucket,
                          wait_for_stream=False, subject_prefix=subject_prefix,
                          connect_options={**connection_options(config),
                                           "error_cb": errors.record})
    async with consumer:
        deadline = time.monotonic() + connect_wait
        while not consumer.connected:
            if time.monotonic() > deadline or not consumer.running:
                print(connection_failure(config, errors, "score"), file=sys.stderr)
                return 2 if refused(config, errors, "score") else 1
            await asyncio.sleep(0.05)
        try:
            await consumer.ready()
        except StreamNotFound as exc:
            print(f"kvrelay score: {exc} on {config.redacted_servers()}", file=sys.stderr)
            return 1
        index = consumer.index
        held = index.overlap_tokens(tokens, lora_name=lora_name, cache_salt=cache_salt)
        scores = {worker: held.get(worker, 0) for worker in index.workers()}
    ranked = sorted(scores.items(), key=lambda item: (-item[1], item[0]))
    if as_json:
        print(json.dumps({f"{i}.{r}": blocks for (i, r), blocks in ranked}), file=out)
    else:
        print(f"{len(tokens)} tokens, {len(scores)} workers on {consumer.subject}", file=out)
        for (instance, rank), blocks in ranked:
            print(f"{instance}.{rank}\t{blocks}", file=out)
    return 0


async def serve_index(nats: NatsSettings, namespace: str, component: str, *, port: int,
                      host: str = "0.0.0.0", stream: str = "KV_EVENTS",
                      subject_prefix: str = SUBJECT_PREFIX,
                      snapshot_bucket: str = SNAPSHOT_BUCKET, snapshot_interval: float = 30.0,
                      snapshot_events: int = 50_000) -> int:
    """Follow the stream and serve scores until SIGTERM or SIGINT; NATS away at start is
    waited for (the service says so on /health), as the relay does. With a snapshot cadence
    the service also writes the workers' snapshots (kvrelay/router/snapwriter.py), a last
    time when it stops."""
    registry = CollectorRegistry()
    consumer = KvConsumer(nats.servers, namespace, component, stream=stream,
                          bootstrap="snapshot", snapshot_bucket=snapshot_bucket,
                          registry=registry, subject_prefix=subject_prefix,
                          connect_options=connection_options(nats))
    service = ScoringService(consumer.index, lambda: consumer.is_ready and consumer.connected,
                             registry, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await service.start()
    except OSError as exc:
        print(f"kvrelay index: cannot serve on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    writer = (SnapshotWriter(consumer, interval=snapshot_interval, events=snapshot_events)
              if snapshot_interval > 0 or snapshot_events > 0 else None)
    try:
        async with consumer:
            if writer is not None:
                writer.start()
            stopped = asyncio.ensure_future(stop.wait())
            caught_up = asyncio.ensure_future(consumer.ready())
            await asyncio.wait({stopped, caught_up}, return_when=asyncio.FIRST_COMPLETED)
            if caught_up.done() and caught_up.exception() is None:
                print(f"kvrelay index: caught up with {consumer.subject} "
                      f"({len(consumer.index.workers())} workers)", file=sys.stderr, flush=True)
            elif caught_up.done():
                print(f"kvrelay index: {caught_up.exception()}", file=sys.stderr)
                return 1
            caught_up.cancel()
            await stopped
            if writer is not None:
                await writer.close()
    finally:
        await service.stop()
    return 0


def _checked(args: argparse.Namespace, command: str) -> NatsSettings | None:
    """The NATS settings of the flags and variables, with the names checked; None (after
    saying why) when any is wrong."""
    for name in ("namespace", "component"):
        if not NAME_RULE.match(getattr(args, name)):
            print(f"kvrelay {command}: error: --{name} {getattr(args, name)!r} must match "
                  f"{NAME_RULE.pattern}", file=sys.stderr)
            return None
    try:
        return connection_settings(args)
    except ConfigError as exc:
        print(f"kvrelay {command}: error: {exc}", file=sys.stderr)
        return None


def run_index(args: argparse.Namespace) -> int:
    """The `index` command on a uvloop runner."""
    nats = _checked(args, "index")
    if nats is None:
        return 2
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve_index(
            nats, args.namespace, args.component, port=args.http, host=args.host,
            stream=args.stream, subject_prefix=args.subject_prefix,
            snapshot_bucket=args.snapshot_bucket, snapshot_interval=args.snapshot_interval,
            snapshot_events=args.snapshot_events))


def run(args: argparse.Namespace) -> int:
    """The command: read the tokens, check the names, score on a uvloop runner."""
    try:
        if args.tokens is not None:
            tokens = parse_tokens(args.tokens)
        else:
            path: Path = args.tokens_file
            text = sys.stdin.read() if str(path) == "-" else path.read_text()
            tokens = parse_tokens(text)
    except (OSError, ValueError) as exc:
        print(f"kvrelay score: error: {exc}", file=sys.stderr)
        return 2
    nats = _checked(args, "score")
    if nats is None:
        return 2
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            return runner.run(score_async(
                nats, args.namespace, args.component, tokens, lora_name=args.lora_name,
                cache_salt=args.cache_salt, stream=args.stream,
                subject_prefix=args.subject_prefix, snapshot_bucket=args.snapshot_bucket,
                connect_wait=args.connect_wait, as_json=args.json))
        except KeyboardInterrupt:
            return 130
