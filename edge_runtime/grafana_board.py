"""The Grafana board for the aggregator's Prometheus metrics, written from one table of panels.

``python -m edge_runtime.grafana_board configs/grafana/spar-aggregator.json`` rewrites the shipped
board; ``tests/edge_runtime/test_grafana_board.py`` checks that the shipped file is what this table
gives and that every metric it queries exists in a live aggregator's ``/metrics``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RATE = "5m"
# (title, unit, [(PromQL, legend)]): one panel per line, two panels per row of the board.
PANELS: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    ("Results stored per second", "ops", ((f"rate(spar_results_total[{RATE}])", "results"),)),
    ("Windows by outcome", "ops", ((f"sum by (outcome) (rate(spar_windows_total[{RATE}]))", "{{outcome}}"),)),
    ("End-to-end latency (window end to result)", "s", (
        (f"histogram_quantile(0.5, sum by (le) (rate(spar_end_to_end_latency_seconds_bucket[{RATE}])))", "p50"),
        (f"histogram_quantile(0.95, sum by (le) (rate(spar_end_to_end_latency_seconds_bucket[{RATE}])))", "p95"))),
    ("Inference time per call", "s", (
        (f"histogram_quantile(0.5, sum by (le) (rate(spar_inference_seconds_bucket[{RATE}])))", "p50"),
        (f"histogram_quantile(0.95, sum by (le) (rate(spar_inference_seconds_bucket[{RATE}])))", "p95"))),
    ("Messages by outcome", "ops", ((f"sum by (outcome) (rate(spar_messages_total[{RATE}]))", "{{outcome}}"),)),
    ("Rejected messages by reason", "ops",
     ((f"sum by (reason) (rate(spar_messages_rejected_total[{RATE}]))", "{{reason}}"),)),
    ("Late, duplicate and out-of-order messages", "ops",
     ((f"sum by (kind) (rate(spar_window_messages_total[{RATE}]))", "{{kind}}"),)),
    ("Windows closed by", "ops", ((f"sum by (by) (rate(spar_windows_closed_total[{RATE}]))", "{{by}}"),)),
    ("Nodes", "short", (("sum by (state) (spar_nodes)", "{{state}}"),)),
    ("Nodes with a wrong clock", "short", (("spar_node_clock_off > 0", "{{node}}"),)),
    ("Queues", "short", (("spar_queue_depth", "{{queue}}"), ("spar_open_windows", "open windows"))),
    ("Overload: work dropped", "ops", ((f"sum by (item) (rate(spar_overload_dropped_total[{RATE}]))", "{{item}}"),)),
    ("Health problems (1 = reported by /healthz)", "short", (("spar_health_problem > 0", "{{problem}}"),)),
    ("Storage and broker trouble", "ops", (
        (f"rate(spar_store_failures_total[{RATE}])", "result stores failed"),
        (f"rate(spar_node_store_failures_total[{RATE}])", "node stores failed"),
        (f"rate(spar_broker_sessions_lost_total[{RATE}])", "broker sessions lost"))),
    ("Time in the pipeline", "s", (
        (f"histogram_quantile(0.95, sum by (le) (rate(spar_window_wait_seconds_bucket[{RATE}])))",
         "p95 last message to inference"),
        (f"histogram_quantile(0.95, sum by (le) (rate(spar_added_latency_seconds_bucket[{RATE}])))",
         "p95 added by the aggregator"),
        (f"histogram_quantile(0.95, sum by (le) (rate(spar_store_seconds_bucket[{RATE}])))", "p95 SQLite commit"))),
)


def board() -> dict:
    """The Grafana dashboard JSON (schema 39), datasource chosen when imported (``${DS}``)."""
    source = {"type": "prometheus", "uid": "${DS}"}
    panels = []
    for i, (title, unit, queries) in enumerate(PANELS):
        targets = [{"refId": chr(65 + k), "expr": expr, "legendFormat": legend, "datasource": source}
                   for k, (expr, legend) in enumerate(queries)]
        panels.append({"id": i + 1, "type": "timeseries", "title": title,
                       "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)}, "datasource": source,
                       "fieldConfig": {"defaults": {"unit": unit}, "overrides": []}, "targets": targets})
    return {
        "title": "spar-edge aggregator", "uid": "spar-aggregator", "schemaVersion": 39, "version": 1,
        "tags": ["spar-edge"], "time": {"from": "now-6h", "to": "now"}, "refresh": "30s",
        "templating": {"list": [{"name": "DS", "label": "Prometheus", "type": "datasource", "query": "prometheus"}]},
        "panels": panels,
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m edge_runtime.grafana_board OUT.json", file=sys.stderr)
        return 2
    Path(args[0]).write_text(json.dumps(board(), indent=2) + "\n")
    print(f"wrote {args[0]} ({len(PANELS)} panels)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
