"""The JSON report (bench/report.py) as the text table `python -m bench` prints."""

from __future__ import annotations

from typing import Any

# -- the table ------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _table(header: list[str], rows: list[list[str]], left: tuple[int, ...] = (0,)
           ) -> list[str]:
    """Aligned columns: numbers to the right, the columns in `left` to the left."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return [line(header), *(line(row) for row in rows)]


def _header(report: dict[str, Any]) -> list[str]:
    """What was offered and how it was measured."""
    config = report["config"]
    workload = config["workload"]
    runs = config["repeat"]
    live = workload.get("live_blocks")
    head = (f"{config['workers']} worker(s) x {config['dp_ranks']} DP rank(s), "
            f"{workload['blocks_min']}-{workload['blocks_max']} blocks per BlockStored, "
            f"{workload['event_form']} events in {workload['batch_form']} batches; ")
    if live:
        head += (f"{live:,} live blocks per worker (pre-filled untimed; each batch removes the "
                 f"{workload['blocks_min']} oldest, stores as many); ")
    head += (f"{config['duration']:g} s per rate (at least {config['min_batches']} batches); "
             f"{runs} run(s){' (medians; loss summed)' if runs > 1 else ''}")
    if config.get("pub_heartbeat_ms"):
        head += f"; vLLM PUBs heartbeat every {config['pub_heartbeat_ms']} ms"
    how = report["measurement"]
    return [head, f"relay CPU: {how['relay_cpu']}", f"  window: {how['window']}",
            f"  CPU per batch: {how['cpu_per_batch']}", ""]


def _summary(report: dict[str, Any]) -> list[str]:
    """One line per target and offered rate."""
    rows = [[r["target"], r["build"], "max" if r["offered_batches_per_s"] is None
             else _fmt(r["offered_batches_per_s"]), _fmt(r["duration_s"]), _fmt(r["runs"]),
             _fmt(r["batches_per_s"]), _fmt(r["events_per_s"]), _fmt(r["lag_p50_ms"], 1),
             _fmt(r["lag_p99_ms"], 1), _fmt(r["lag_p999_ms"], 1),
             _fmt(r["relay_cpu_us_per_batch"]), _fmt(r["cpu_per_batch_vs_dynamo"], 2),
             _fmt(r["relay_cpu_percent"], 1), _fmt(r["relay_peak_rss_mib"], 1),
             _fmt(r["lost_events"])]
            for r in report["summary"]]
    return [*_table(["target", "build", "offered/s", "s", "runs", "batches/s", "events/s",
                     "lag p50 ms", "p99 ms", "p99.9 ms", "CPU us/batch", "vs dynamo",
                     "CPU %", "RSS MiB", "lost"], rows, left=(0, 1)),
            "build: what the relay processes loaded (kvrelay python or compiled, Dynamo's "
            "runtime version); s: seconds at the rate; runs: repeats, medians shown",
            "vs dynamo: CPU per batch over dynamo's at the same rate; CPU %: of one core", ""]


def _idle(report: dict[str, Any]) -> list[str]:
    """Idle CPU per target."""
    rows = [[r["target"], r["build"], _fmt(r["window_s"]), _fmt(r["runs"]),
             _fmt(r["relay_cpu_s"], 3), _fmt(r["relay_cpu_s_per_hour"], 1),
             _fmt(r["cpu_per_hour_vs_dynamo"], 2), _fmt(r["relay_peak_rss_mib"], 1)]
            for r in report["idle"]["summary"]]
    return [f"idle: {report['measurement']['idle']}",
            *_table(["target", "build", "s", "runs", "CPU s", "CPU s/hour", "vs dynamo",
                     "RSS MiB"], rows, left=(0, 1)), ""]


def render_table(report: dict[str, Any]) -> str:
    """The report as text: per-rate summary, idle CPU, search, raw limits, ratios."""
    config = report["config"]
    lines = _header(report) if report["summary"] else []
    for name, reason in report["unavailable"].items():
        lines.append(f"{name}: {reason}")
    if report["summary"]:
        lines += _summary(report)
    if report["idle"]["summary"]:
        lines += _idle(report)
    if report["search"]:
        step = config["search"]["step_duration"]
        lines.append(f"maximum sustained rate with zero loss ({step:g} s steps):")
        lines += _table(["target", "batches/s", "events/s", "stopped by (the step above)"],
                        [[s["target"], _fmt(s["max_batches_per_s"]),
                          _fmt(s["max_events_per_s"]), "; ".join(s["stopped_by"])]
                         for s in report["search"]], left=(0, 3))
        lines.append("")
    if report["limits"]["median"]:
        lines.append("raw limits of the parts, msg/s: " + ", ".join(
            f"{k} {_fmt(v)}" for k, v in report["limits"]["median"].items()))
    path_lag = report["path_lag"]
    if path_lag["median"]:
        lines.append("lag of the NATS path alone (no relay), p50/p99 ms: " + "; ".join(
            f"@{rate}/s core {_fmt(v['core_p50_ms'], 1)}/{_fmt(v['core_p99_ms'], 1)}, "
            f"JetStream {_fmt(v['jetstream_p50_ms'], 1)}/{_fmt(v['jetstream_p99_ms'], 1)}"
            for rate, v in path_lag["median"].items()))
        for target, per_rate in path_lag["p99_over_path"].items():
            lines.append(f"{target} lag p99 over its path's: " + ", ".join(
                f"@{rate}/s {_fmt(v, 2)}" for rate, v in per_rate.items()))
    for name, ratio in report["ratios"].items():
        if name.endswith("/raw"):
            if ratio:
                lines.append(f"{name} (max sustained batches/s over each limit): " + ", ".join(
                    f"{k} {_fmt(v, 2)}" for k, v in ratio.items()))
            continue
        parts = []
        if ratio["max_sustained_batches_per_s"] is not None:
            parts.append(f"max sustained {_fmt(ratio['max_sustained_batches_per_s'], 2)}")
        for rate, fields in ratio["at_offered_rate"].items():
            parts.append(f"@{rate}/s: events/s {_fmt(fields['events_per_s'], 2)}, CPU/batch "
                         f"{_fmt(fields.get('relay_cpu_us_per_batch'), 2)}, lag p99 "
                         f"{_fmt(fields['lag_p99_ms'], 2)}, RSS "
                         f"{_fmt(fields['relay_peak_rss_mib'], 2)}")
        lines.append(f"{name}: " + "; ".join(parts))
    for error in report["errors"]:
        lines.append(f"error: {error.splitlines()[0]} (details in the JSON report)")
    return "\n".join(lines).rstrip() + "\n"
