"""kvrelay's Grafana dashboard, built with Grafana's own typed builders (grafana-foundation-sdk),
written to deploy/grafana/kvrelay.json.

    python deploy/grafana/dashboard.py            rewrite kvrelay.json
    python deploy/grafana/dashboard.py --check    exit 1 when kvrelay.json differs from this

deploy/validate.py checks the file too: it must read back through the SDK's dashboard model
without losing a field, and every query must parse (promtool) and name metrics the relay
exports.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef

OUTPUT = Path(__file__).resolve().parent / "kvrelay.json"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
SELECTOR = '{namespace=~"$namespace", pod=~"$pod"}'


def query(expr: str, legend: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr.replace("{SEL}", SELECTOR)).legend_format(legend)


def series(title: str, description: str, unit: str, *targets: prometheus.Dataquery,
           width: int = 12) -> timeseries.Panel:
    panel = (timeseries.Panel().title(title).description(description).unit(unit)
             .datasource(DATASOURCE).height(8).span(width))
    for target in targets:
        panel = panel.with_target(target)
    return panel


def build() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model."""
    board = (
        dashboard.Dashboard("kvrelay")
        .uid("kvrelay")
        .description("vLLM KV-cache events relayed to NATS JetStream: readiness, flow, loss, "
                     "lag and buffering per relay (docs/operations.md)")
        .tags(["kvrelay", "vllm", "nats"])
        .time("now-1h", "now")
        .refresh("30s")
        .with_variable(dashboard.DatasourceVariable("datasource").label("Data source")
                       .type("prometheus"))
        .with_variable(dashboard.QueryVariable("namespace").label("Namespace")
                       .datasource(DATASOURCE)
                       .query("label_values(kvrelay_ready, namespace)")
                       .include_all(True).multi(True))
        .with_variable(dashboard.QueryVariable("pod").label("Pod").datasource(DATASOURCE)
                       .query('label_values(kvrelay_ready{namespace=~"$namespace"}, pod)')
                       .include_all(True).multi(True))
        .with_row(dashboard.Row("Health"))
        .with_panel(stat.Panel().title("Relays ready").description(
            "Relays whose /health passes (kvrelay_ready), of all scraped")
            .datasource(DATASOURCE).height(4).span(8)
            .with_target(query("sum(kvrelay_ready{SEL})", "ready"))
            .with_target(query("count(kvrelay_ready{SEL})", "relays")))
        .with_panel(stat.Panel().title("Batches dropped (1h)").description(
            "vLLM batches not delivered, all reasons (kvrelay_batches_dropped_total)")
            .datasource(DATASOURCE).height(4).span(8)
            .with_target(query("sum(increase(kvrelay_batches_dropped_total{SEL}[1h]))",
                               "dropped")))
        .with_panel(stat.Panel().title("Resyncs (1h)").description(
            "resync events announced to routers, all reasons (kvrelay_resyncs_total)")
            .datasource(DATASOURCE).height(4).span(8)
            .with_target(query("sum(increase(kvrelay_resyncs_total{SEL}[1h]))", "resyncs")))
        .with_row(dashboard.Row("Flow"))
        .with_panel(series(
            "Batches", "Read from vLLM and acknowledged by JetStream, per second", "ops",
            query("sum by (pod) (rate(kvrelay_batches_received_total{SEL}[$__rate_interval]))",
                  "{{pod}} received"),
            query("sum by (pod) (rate(kvrelay_batches_published_total{SEL}[$__rate_interval]))",
                  "{{pod}} published")))
        .with_panel(series(
            "Events", "KV events read from vLLM and acknowledged by JetStream, per second",
            "ops",
            query("sum by (pod) (rate(kvrelay_events_received_total{SEL}[$__rate_interval]))",
                  "{{pod}} received"),
            query("sum by (pod) (rate(kvrelay_events_published_total{SEL}[$__rate_interval]))",
                  "{{pod}} published")))
        .with_row(dashboard.Row("Loss"))
        .with_panel(series(
            "Drops by reason", "Batches the relay could not deliver, per second", "ops",
            query("sum by (pod, reason) (rate(kvrelay_batches_dropped_total{SEL}"
                  "[$__rate_interval]))", "{{pod}} {{reason}}")))
        .with_panel(series(
            "Resyncs and gaps", "resync events by reason, and sequence gaps seen, per second",
            "ops",
            query("sum by (pod, reason) (rate(kvrelay_resyncs_total{SEL}[$__rate_interval]))",
                  "{{pod}} resync {{reason}}"),
            query("sum by (pod) (rate(kvrelay_gaps_total{SEL}[$__rate_interval]))",
                  "{{pod}} gaps")))
        .with_row(dashboard.Row("Latency and buffering"))
        .with_panel(series(
            "Lag p50 / p99", "From vLLM's batch timestamp to the relay's publish", "s",
            query("histogram_quantile(0.5, sum by (pod, le) (rate(kvrelay_lag_seconds_bucket"
                  "{SEL}[$__rate_interval])))", "{{pod}} p50"),
            query("histogram_quantile(0.99, sum by (pod, le) (rate(kvrelay_lag_seconds_bucket"
                  "{SEL}[$__rate_interval])))", "{{pod}} p99")))
        .with_panel(series(
            "Publish buffer", "Payload bytes waiting for JetStream (alert at 80% of "
            "--buffer-bytes)", "bytes",
            query("max by (pod) (kvrelay_buffer_bytes{SEL})", "{{pod}} buffered")))
        .with_panel(series(
            "Batches waiting", "Batches buffered for publishing (alert at 80% of "
            "--buffer-batches) and publishes awaiting JetStream's ack", "short",
            query("max by (pod) (kvrelay_buffer_batches{SEL})", "{{pod}} buffered"),
            query("max by (pod) (kvrelay_publish_in_flight{SEL})", "{{pod}} in flight")))
    )
    model: dict[str, Any] = json.loads(json.dumps(board.build(), cls=JSONEncoder))
    for number, panel in enumerate(model["panels"], start=1):
        panel["id"] = number  # unique, stable ids: links and embeds refer to them
        for key in [k for k, v in panel.items() if v is None]:
            del panel[key]  # Grafana's defaults apply
        for index, target in enumerate(panel.get("targets", [])):
            target["refId"] = chr(ord("A") + index)
    return model


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="fail when kvrelay.json drifts")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUTPUT.is_file() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} differs from deploy/grafana/dashboard.py: run it to rewrite")
            return 1
        print(f"ok   {OUTPUT.name} is what deploy/grafana/dashboard.py builds")
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
