"""`python -m bench`: parse the command line, run the benchmark, print and save the report."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import NoReturn

from bench.report import build_report, plot
from bench.run import BenchSpec, SearchSpec, run_bench
from bench.table import render_table
from bench.targets import DEFAULT_TARGETS, INSTALL, TARGETS
from bench.workload import WorkloadSpec

EPILOG = """examples:
  python -m bench                  # kvrelay, kvrelay-dynamo and dynamo at 100,2000,10000/s
  python -m bench --targets kvrelay,dynamo,naive --rates 2000,10000 --search --plot out.png
  python -m bench --targets kvrelay,kvrelay-relaysnap --rates 10000 --live-blocks 250000
  python -m bench --idle 60                # idle CPU per hour of the default targets only
  python -m bench --targets kvrelay --rates max --duration 5 --json -
"""


def _rates(text: str) -> list[float | None]:
    rates: list[float | None] = []
    for item in text.split(","):
        item = item.strip()
        if item == "max":
            rates.append(None)
            continue
        try:
            rate = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a rate: {item!r}") from None
        if rate <= 0:
            raise argparse.ArgumentTypeError(f"a rate must be positive: {item!r}")
        rates.append(rate)
    return rates


def _blocks(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        return int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"blocks is N or MIN-MAX, not {text!r}") from None


def _targets(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown target(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench", epilog=EPILOG,
        description="Throughput and lag of vLLM KV-event relays: real relay processes fed by "
                    "synthetic vLLM publishers, checked by a consumer, beside the raw limits "
                    "of the parts.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--targets", type=_targets, default=list(DEFAULT_TARGETS),
      help=f"comma-separated, of: {', '.join(TARGETS)} (default: {','.join(DEFAULT_TARGETS)}; "
           "unavailable ones are reported, with the pip command that installs them, and "
           "skipped)")
    a("--list-targets", action="store_true", help="list the targets and whether they can run")
    a("--rates", type=_rates, default=[100.0, 2000.0, 10000.0],
      help="offered rates in vLLM batches/s over all publishers, comma-separated; 'max' sends "
           "as fast as possible (default: 100,2000,10000; 100/s is what a sidecar sees)")
    a("--duration", type=float, default=10.0, help="seconds per offered rate (default: 10)")
    a("--min-batches", type=int, default=3000,
      help="a fixed rate runs at least this many batches, longer than --duration if need be "
           "(default: 3000, so 100/s runs 30 s)")
    a("--workers", type=int, default=1, help="vLLM workers, one relay process each (default: 1)")
    a("--dp-ranks", type=int, default=2, help="DP ranks per worker (default: 2)")
    a("--blocks", type=_blocks, default=(4, 4),
      help="blocks per BlockStored, N or MIN-MAX uniform, block size 16 (default: 4)")
    a("--remove-probability", type=float, default=0.5,
      help="chance a batch also removes an earlier block (default: 0.5)")
    a("--clear-probability", type=float, default=0.0005,
      help="chance a batch is AllBlocksCleared (default: 0.0005; every pool cycle ends with one)")
    a("--event-form", choices=("map", "array"), default="map",
      help="vLLM event encoding: map (vLLM >= 0.24) or legacy array (default: map)")
    a("--batch-form", choices=("array", "map"), default="array",
      help="vLLM batch encoding (default: array, what vLLM sends; dynamo rejects map)")
    a("--live-blocks", type=int, default=0, metavar="N",
      help="each worker's cache holds about N blocks: a pre-fill stores them before the timed "
           "phase (untimed), then every batch removes the --blocks oldest and stores as many "
           "new ones (--remove-probability and --clear-probability do not apply); the relay's "
           "snapshots then work on an index that size (default: 0, the mix above)")
    a("--pool", type=int, default=2048,
      help="pre-encoded batches per publisher; with --live-blocks at least what keeps N live "
           "(default: 2048)")
    a("--seed", type=int, default=0)
    a("--search", action="store_true",
      help="also search the maximum sustained rate with zero loss per target")
    a("--search-start", type=float, default=2000.0, help="first offered rate (default: 2000)")
    a("--search-factor", type=float, default=1.5, help="rate step factor (default: 1.5)")
    a("--search-ceiling", type=float, default=200_000.0, help="highest rate tried")
    a("--step-duration", type=float, default=5.0, help="seconds per search step (default: 5)")
    a("--lag-limit-ms", type=float, default=500.0,
      help="a search step whose p99 lag exceeds this fails (default: 500)")
    a("--repeat", type=int, default=1,
      help="runs of everything, interleaved across targets; medians reported (default: 1)")
    a("--together-below", type=float, default=1000.0, metavar="RATE",
      help="fixed rates up to this run every target at the same time, each with its own "
           "server, feeder and consumer, so that what else the machine runs weighs on all of "
           "them alike: at a low rate it moves a relay's CPU per batch by a fifth or more from "
           "one trial to the next (default: 1000; 0: one after another)")
    a("--no-limits", action="store_true", help="skip measuring the raw limits of the parts")
    a("--limits-duration", type=float, default=2.0, help="seconds per raw limit (default: 2)")
    a("--tick", type=float, default=0.001, help="feeder burst interval in seconds")
    a("--pub-heartbeat", type=int, default=0, metavar="MS",
      help="the vLLM PUBs' ZMQ_HEARTBEAT_IVL in ms (timeout 3x, TTL 5x), so relays answer "
           "PINGs while measured (default: 0, none)")
    a("--idle-window", type=float, default=60.0, metavar="SECONDS",
      help="each round also measures each target's idle CPU (publishers connected, nothing "
           "sent) over this many seconds, reported per hour (default: 60; 0: skip)")
    a("--idle", type=float, metavar="SECONDS",
      help="measure only the idle CPU, over this many seconds per target (no rates, search "
           "or limits)")
    a("--json", metavar="PATH", help="write the JSON report here ('-': stdout, no table)")
    a("--plot", metavar="PNG", help="draw lag percentiles and CPU against offered rate")
    return p


def _interrupt(signum: int, _frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_targets:
        width = max(map(len, TARGETS))
        for name, target in TARGETS.items():
            default = "default, " if name in DEFAULT_TARGETS else ""
            print(f"{name:{width}} {target.summary}; "
                  f"{default}{target.unavailable() or 'available'}")
        return
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error(f"--plot needs matplotlib: {INSTALL}")
    try:
        workload = WorkloadSpec(
            blocks_min=args.blocks[0], blocks_max=args.blocks[1],
            remove_probability=args.remove_probability,
            clear_probability=args.clear_probability, pool_batches=args.pool,
            event_form=args.event_form, batch_form=args.batch_form, seed=args.seed,
            live_blocks=args.live_blocks)
    except ValueError as exc:
        parser.error(str(exc))
    if 0 < args.live_blocks < args.dp_ranks:
        parser.error("--live-blocks must be 0 or at least one block per DP rank")
    if args.pub_heartbeat < 0:
        parser.error("--pub-heartbeat must be 0 (none) or a number of milliseconds")
    if args.workers < 1 or args.dp_ranks < 1 or args.repeat < 1 or args.duration <= 0:
        parser.error("--workers, --dp-ranks, --repeat and --duration must be positive")
    if args.min_batches < 0:
        parser.error("--min-batches must be 0 or more")
    if args.together_below < 0:
        parser.error("--together-below must be 0 (never) or a rate")
    if args.idle_window < 0 or (args.idle is not None and args.idle <= 0):
        parser.error("--idle must be positive and --idle-window 0 (skip) or positive")
    if args.batch_form == "map" and "dynamo" in args.targets:
        parser.error("dynamo rejects map-shaped batches; drop it or use --batch-form array")
    search = None
    if args.search:
        search = SearchSpec(args.search_start, args.search_factor, args.search_ceiling,
                            args.step_duration, args.lag_limit_ms)
    spec = BenchSpec(targets=args.targets, rates=args.rates, duration=args.duration,
                     min_batches=args.min_batches, workers=args.workers,
                     dp_ranks=args.dp_ranks, workload=workload,
                     search=search, repeat=args.repeat,
                     limits_duration=None if args.no_limits else args.limits_duration,
                     tick=args.tick, pub_heartbeat_ms=args.pub_heartbeat,
                     idle_window=args.idle if args.idle is not None else args.idle_window,
                     idle_only=args.idle is not None, together_below=args.together_below)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run = run_bench(spec)
    except KeyboardInterrupt:
        print("interrupted; everything started has been stopped", file=sys.stderr)
        sys.exit(130)
    except FileNotFoundError as exc:  # no nats-server: the message says how to get one
        print(f"python -m bench: {exc}", file=sys.stderr)
        sys.exit(1)
    report = build_report(run)
    if args.json == "-":
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        print(render_table(report), end="")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    if args.plot:
        plot(report, args.plot)
    sys.exit(1 if run.errors else 0)
