"""The shipped Grafana board: the file is what ``edge_runtime.grafana_board`` writes, and every metric
it queries exists in a live aggregator's /metrics (a renamed metric would leave a panel empty)."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import pytest

from edge_runtime.config import AggregatorConfig
from edge_runtime.grafana_board import board
from edge_runtime.service import Aggregator
from node_firmware_sim.field_runner import FieldConfig, SourceSpec, run_field
from spar_wire.mqtt_settings import MqttSettings

REPO = Path(__file__).resolve().parents[2]
BOARD = REPO / "configs" / "grafana" / "spar-aggregator.json"
SITE = REPO / "configs/sites/parking_lot.toml"


def queried_metrics(dashboard: dict) -> set[str]:
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    names = {name for expr in exprs for name in re.findall(r"\bspar_[a-z0-9_]+", expr)}
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def test_the_shipped_board_is_the_generated_one():
    shipped = json.loads(BOARD.read_text())
    assert shipped == board(), "regenerate: python -m edge_runtime.grafana_board configs/grafana/spar-aggregator.json"
    assert len(queried_metrics(shipped)) >= 15


@pytest.mark.mosquitto
def test_every_metric_the_board_queries_is_served(mosquitto, parking_lot, model_dir, tmp_path):
    settings = MqttSettings(host=mosquitto.host, port=mosquitto.port)
    config = AggregatorConfig(site=SITE, model=model_dir / "manifest.json", database=tmp_path / "r.sqlite3",
                              metrics_port=0, mqtt=settings)
    with Aggregator(config) as agg:
        run_field(FieldConfig(layout=parking_lot, source=SourceSpec("sine", 1), duration_s=4.0, mqtt=settings))
        deadline = time.monotonic() + 15
        while agg.store.count("parking_lot") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        text = urllib.request.urlopen(f"http://127.0.0.1:{agg.metrics.port}/metrics", timeout=5).read().decode()
    served = set(re.findall(r"^# TYPE (\S+) ", text, flags=re.MULTILINE))
    missing = queried_metrics(board()) - served
    assert not missing, f"the board queries metrics /metrics does not have: {sorted(missing)}"
    histograms = set(re.findall(r"^# TYPE (\S+) histogram", text, flags=re.MULTILINE))
    assert "spar_end_to_end_latency_seconds" in histograms and "spar_end_to_end_latency_seconds_bucket{" in text
