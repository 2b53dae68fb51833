"""`kvrelay`: parse the command line and hand over. Every default lives in kvrelay/config/."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from kvrelay import __version__, build
from kvrelay.config import Config, ConfigError, NatsSettings, env_var, settings
from kvrelay.ops.connect import add_connection_arguments, connection_settings
from kvrelay.wire.names import SUBJECT_PREFIX, stream_subjects

EXIT_USAGE = 2


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, with its default and environment variable in the help."""
    for s in settings():
        default = s.default if s.default not in (None, ()) else "-"
        help_text = f"{s.help} [default: {default}; env: {', '.join(s.env_vars)}]"
        kwargs: dict[str, object] = {"dest": s.key, "default": None,
                                     "help": help_text.replace("%", "%%")}
        if s.many:
            kwargs["action"] = "append"
        if s.choices:
            kwargs["choices"] = s.choices
        if s.metavar:
            kwargs["metavar"] = s.metavar
        parser.add_argument(s.flag, **kwargs)  # type: ignore[arg-type]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvrelay",
        description="Relay vLLM KV-cache events from ZMQ to NATS JetStream.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kvrelay {__version__} ({build()})")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="relay a vLLM worker's KV events into JetStream",
                              description="Relay a vLLM worker's KV events into JetStream.")
    _add_config_flags(run)

    discover = commands.add_parser(
        "discover", help="print the instance ID the relay would use and how it was found",
        description="Print the instance ID the relay would use and how it was found; exit 1 "
                    "when the configured discovery backend fails.")
    _add_config_flags(discover)

    check = commands.add_parser(
        "check", help="check NATS, JetStream, ZMQ, discovery and the system port",
        description="Check what the relay depends on, one line each (ok, warn or FAIL with how "
                    "to fix it); exit 1 on any FAIL. Changes nothing.")
    check.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                       help="bound of each check, e.g. the wait for a ZMQ frame")
    _add_config_flags(check)

    demo = commands.add_parser(
        "demo", help="local nats-server + synthetic vLLM + relay + consumer, then stop",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--batches", type=int, default=20, help="batches the synthetic vLLM sends")
    demo.add_argument("--format", choices=("msgpack", "json"), default="msgpack",
                      help="payload encoding")

    tail = commands.add_parser(
        "tail", help="print RelayBatches from JetStream as they arrive",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_stream_flags(tail)
    tail.add_argument("--from-start", action="store_true",
                      help="from the stream's first message instead of new ones")
    tail.add_argument("--count", type=int, default=0, help="stop after N batches (0: never)")
    tail.add_argument("--json", action="store_true",
                      help="one JSON object per batch and line (the RelayBatch with its "
                           "subject and stream_seq; bytes as lowercase hex), for jq")
    tail.add_argument("--index", action="store_true",
                      help="instead of batches, each worker's blocks as a router's index holds "
                           "them, refreshed every --interval seconds (reads the whole stream)")
    _add_watch_flags(tail, stats=False)

    stats = commands.add_parser(
        "stats", help="per-worker events/s, lag, last (epoch, seq), resyncs and gaps",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_stream_flags(stats)
    stats.add_argument("--window", type=float, default=10.0,
                       help="seconds of relay timestamps events/s is averaged over")
    _add_watch_flags(stats, stats=True)

    from kvrelay.ops import score

    score.add_parser(commands, os.environ.get(env_var("stream"), "KV_EVENTS"))
    return parser


def _add_stream_flags(parser: argparse.ArgumentParser) -> None:
    """Where the batches are: `run`'s NATS connection flags, the stream and the subjects."""
    add_connection_arguments(parser)
    parser.add_argument("--stream", default=os.environ.get(env_var("stream"), "KV_EVENTS"),
                        help="JetStream stream")
    parser.add_argument("--subject-prefix",
                        default=os.environ.get(env_var("subject_prefix"), SUBJECT_PREFIX),
                        help="the relays' --subject-prefix")
    parser.add_argument("--subject", default=argparse.SUPPRESS,
                        help="subject filter (default: every relay's, <subject-prefix>.>)")


def _add_watch_flags(parser: argparse.ArgumentParser, *, stats: bool) -> None:
    """Refresh options of the views that follow the stream (`stats`, `tail --index`)."""
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between frames")
    parser.add_argument("--once", action="store_true",
                        help="print one frame once caught up with the stream, then exit"
                        if stats else "with --index: one frame once caught up, then exit")
    parser.add_argument("--duration", type=float, default=None,
                        help="exit after this many seconds; without it, run until Ctrl-C")


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        config = _load_config(args)
        _setup_logging(config.system.log_level, config.system.log_format)
        from kvrelay.app import run

        sys.exit(run(config))
    elif args.command == "discover":
        config = _load_config(args)
        _setup_logging(config.system.log_level, config.system.log_format)
        from kvrelay.ops.doctor import discover

        sys.exit(discover(config, os.environ))
    elif args.command == "check":
        config = _load_config(args)
        _setup_logging("error")
        from kvrelay.ops.doctor import check

        sys.exit(check(config, os.environ, args.timeout))
    elif args.command == "demo":
        _setup_logging("warning")
        from kvrelay.ops.demo import demo

        sys.exit(demo(batches=args.batches, fmt=args.format))
    elif args.command == "score":
        _setup_logging("error")
        from kvrelay.ops.score import run as score

        sys.exit(score(args))
    elif args.command == "index":
        _setup_logging("info")
        from kvrelay.ops.score import run_index

        sys.exit(run_index(args))
    elif args.command in ("tail", "stats"):
        _setup_logging("warning" if args.command == "tail" and not args.index else "error")
        nats_config = _load_nats(args)
        subject = getattr(args, "subject", None) or stream_subjects(args.subject_prefix)
        if args.command == "tail" and not args.index:
            from kvrelay.ops.tail import tail

            sys.exit(tail(nats_config, args.stream, subject, from_start=args.from_start,
                          count=args.count, as_json=args.json))
        from kvrelay.ops.stats import run as watch

        sys.exit(watch(nats_config, args.stream, subject,
                       mode="index" if args.command == "tail" else "stats",
                       interval=args.interval, once=args.once, duration=args.duration,
                       window=getattr(args, "window", 10.0)))


def _load_nats(args: argparse.Namespace) -> NatsSettings:
    try:
        return connection_settings(args)
    except ConfigError as exc:
        print(f"kvrelay: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _load_config(args: argparse.Namespace) -> Config:
    flags = {s.key: getattr(args, s.key) for s in settings()}
    try:
        return Config.load(flags, os.environ)
    except ConfigError as exc:
        print(f"kvrelay: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _setup_logging(level: str, fmt: str = "text") -> None:
    from kvrelay.system.logs import setup_logging

    setup_logging(level, fmt)
