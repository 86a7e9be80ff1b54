"""``Aggregator.stats()``: the one snapshot metrics, /healthz and the dashboard read; and the shape of
the pipeline (no import circles, metrics and health never reach into the service)."""

from __future__ import annotations

import ast
import dataclasses
import time
from pathlib import Path
from types import MappingProxyType

import pytest

from edge_runtime import service_health
from edge_runtime.aggregator_stats import AggregatorStats, frozen_counts
from edge_runtime.config import AggregatorConfig
from edge_runtime.service import Aggregator
from edge_runtime.service_metrics import ServiceMetrics
from node_firmware_sim.field_runner import FieldConfig, SourceSpec, run_field
from spar_wire.mqtt_settings import MqttSettings

REPO = Path(__file__).resolve().parents[2]
SITE = REPO / "configs/sites/parking_lot.toml"
EPOCH = (time.time_ns() // (2 * 10**9) - 10) * 2 * 10**9  # a grid point 20 s ago (see test_aggregator_service)


def wait_for(predicate, timeout_s=15.0):
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


@pytest.mark.mosquitto
def test_stats_move_as_windows_are_processed_and_a_snapshot_stays_as_taken(mosquitto, parking_lot, model_dir,
                                                                           tmp_path):
    config = AggregatorConfig(site=SITE, model=model_dir / "manifest.json", database=tmp_path / "r.sqlite3",
                              metrics_port=None, deadline_fraction=0.5,
                              mqtt=MqttSettings(host=mosquitto.host, port=mosquitto.port))
    with Aggregator(config) as agg:
        before = agg.stats()
        assert before.site == "parking_lot" and before.model == f"{agg.manifest.name}@{agg.manifest.version}"
        assert before.inference.get("results", 0) == 0 and before.messages.get("accepted", 0) == 0
        # Only lifecycle traffic so far (the aggregator's own retained state may already be back).
        assert before.received_messages <= 2 and before.last_stored_s is None and before.connected
        with pytest.raises(dataclasses.FrozenInstanceError):
            before.open_windows = 1  # type: ignore[misc]
        with pytest.raises(TypeError):
            before.messages["accepted"] = 1  # type: ignore[index]
        run_field(FieldConfig(layout=parking_lot, source=SourceSpec("sine", 1), duration_s=6.0,
                              mqtt=MqttSettings(host=mosquitto.host, port=mosquitto.port),
                              start_epoch_ns=EPOCH))
        assert wait_for(lambda: agg.stats().inference.get("results", 0) == 3)
        after = agg.stats()
    assert after.messages["accepted"] == 48 and after.windows["windows_complete"] == 3
    assert after.windows["closed_complete"] == 3 and after.inference["batches"] >= 1
    # Every token message was acknowledged with its stored window; births and states once handled.
    assert after.acknowledgements["acked.window_stored"] == 48
    assert after.acknowledgements.get("acked.message_handled", 0) >= 8
    assert after.broker_acks["sent"] == sum(v for k, v in after.acknowledgements.items() if k.startswith("acked."))
    assert after.received_messages >= before.received_messages + 48 + 8  # tokens, births and states
    assert after.received_bytes > before.received_bytes
    assert after.last_stored_s is not None and after.last_accepted_s is not None
    assert after.taken_s > before.taken_s and set(after.nodes) == set(parking_lot.node_ids)
    assert after.open_windows == 0 and after.queued_windows == 0 and after.dead_threads == {}
    assert service_health.problems(after) == {}
    # The earlier snapshot did not move with the service.
    assert before.inference.get("results", 0) == 0 and before.messages.get("accepted", 0) == 0


def snapshot(**changes) -> AggregatorStats:
    """A hand-made snapshot: all quiet, then ``changes``."""
    empty = MappingProxyType({})
    fields = dict(site="s", model="m@1", taken_s=1000.0, window_ns=2 * 10**9, stall_windows=5, messages=empty,
                  windows=empty, inference=empty, registry=empty, acknowledgements=empty, broker_acks=empty,
                  received_messages=0, received_bytes=0, sessions_lost=0, connected=True, refused_subscriptions=(),
                  session_lost_s=None, dead_threads=empty, storage_failing_since_s=None, last_stored_s=None,
                  last_accepted_s=None, accepting_since_s=None, clock_off_nodes=empty, site_clock_offset_s=None,
                  open_windows=0, queued_windows=0, queued_window_messages=0, queued_messages=0,
                  nodes=MappingProxyType({"n01": True, "n02": False}), refused_nodes=empty)
    fields.update(changes)
    return AggregatorStats(**fields)


def test_metrics_are_read_from_the_snapshot_alone():
    """ServiceMetrics needs no aggregator: whatever ``stats()`` returns is what a scrape shows."""
    current = {"stats": snapshot()}
    metrics = ServiceMetrics()
    metrics.bind(lambda: current["stats"])
    metrics.sync()
    assert metrics.registry.value("spar_results_total") == 0
    current["stats"] = snapshot(
        messages=frozen_counts({"accepted": 16, "rejected.bad_crc": 2, "shed": 1}),
        windows=frozen_counts({"windows_complete": 1, "closed_complete": 1, "late": 3}),
        inference=frozen_counts({"results": 1, "store_failures": 2}),
        registry=frozen_counts({"node_store_failed": 1}), sessions_lost=1, session_lost_s=990.0,
        queued_windows=2, queued_window_messages=7, queued_messages=4, open_windows=1,
        clock_off_nodes=MappingProxyType({"n02": MappingProxyType({"offset_s": 3600.0, "refused": 2})}))
    metrics.sync()
    r = metrics.registry
    assert r.value("spar_results_total") == 1 and r.value("spar_messages_total", outcome="accepted") == 16
    assert r.value("spar_messages_rejected_total", reason="bad_crc") == 2
    assert r.value("spar_windows_total", outcome="complete") == 1
    assert r.value("spar_window_messages_total", kind="late") == 3
    assert r.value("spar_store_failures_total") == 2 and r.value("spar_node_store_failures_total") == 1
    assert r.value("spar_broker_sessions_lost_total") == 1
    assert r.value("spar_queue_depth", queue="window_messages") == 7 and r.value("spar_open_windows") == 1
    assert r.value("spar_nodes", state="online") == 1 and r.value("spar_nodes", state="offline") == 1
    assert r.value("spar_node_clock_off", node="n02") == 1
    assert r.value("spar_health_problem", problem="session_lost") == 1
    assert r.value("spar_health_problem", problem="node_clocks") == 1
    assert r.value("spar_health_problem", problem="disconnected") == 0


def test_health_is_judged_from_the_snapshot():
    quiet = snapshot()
    assert service_health.problems(quiet) == {} and service_health.health_report(quiet)["status"] == "ok"
    stalled = snapshot(last_accepted_s=999.0, accepting_since_s=900.0, last_stored_s=950.0)
    assert set(service_health.problems(stalled)) == {"stalled"}  # 50 s > 5 windows of 2 s
    report = service_health.health_report(snapshot(connected=False, storage_failing_since_s=990.0))
    assert report["status"] == "failing" and set(report["problems"]) == {"disconnected", "storage_failing"}
    assert report["nodes"] == {"n01": "online", "n02": "offline"}


# --------------------------------------------------------------------------- the pipeline's shape
def module_level_imports(path: Path, package: str) -> set[str]:
    """Modules of ``package`` imported when ``path`` is imported, or by a type checker: every import
    outside function bodies, ``if TYPE_CHECKING:`` blocks included."""
    name = module_name(path)
    found, stack = set(), list(ast.parse(path.read_text()).body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")[: None if path.name == "__init__.py" else -1]
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        for field in ("body", "orelse", "handlers", "finalbody"):
            stack.extend(getattr(node, field, None) or [])
    return {m for m in found if m == package or m.startswith(package + ".")} - {name}


def module_name(path: Path) -> str:
    inside = path.is_relative_to(REPO)
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__") if inside else path.stem


def import_graph(package: str) -> dict[str, set[str]]:
    files = {module_name(p): p for p in (REPO / package).rglob("*.py")}
    return {name: module_level_imports(path, package) & set(files) for name, path in files.items()}


def test_edge_runtime_has_no_import_circles():
    graph = import_graph("edge_runtime")
    assert {"edge_runtime.service_metrics", "edge_runtime.acknowledgements"} <= graph["edge_runtime.service"]
    state: dict[str, int] = {}
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                circles.append(" -> ".join(path[path.index(dep):] + [module, dep]) if dep in path
                               else f"{module} -> {dep}")
            elif dep not in state:
                visit(dep, path + [module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not circles, "\n".join(circles)


def test_the_checker_sees_type_checking_imports(tmp_path):
    sample = REPO / "edge_runtime" / "service_metrics.py"
    assert "edge_runtime.aggregator_stats" in module_level_imports(sample, "edge_runtime")
    fake = tmp_path / "x.py"
    fake.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from edge_runtime.service import A\n"
                    "def f():\n    from edge_runtime import cli\n")
    found = module_level_imports(fake, "edge_runtime")
    assert "edge_runtime.service" in found and "edge_runtime.cli" not in found


@pytest.mark.parametrize("module", ["service_metrics", "service_health"])
def test_metrics_and_health_never_reach_into_the_service(module):
    """They read an ``AggregatorStats`` only: no import of the service, no private attribute of anything
    but their own ``self``."""
    path = REPO / "edge_runtime" / f"{module}.py"
    assert not {"edge_runtime.service"} & module_level_imports(path, "edge_runtime")
    private = [f"line {node.lineno}: {ast.unparse(node)}" for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
               and not (isinstance(node.value, ast.Name) and node.value.id == "self")]
    assert not private, "\n".join(private)
