"""A trial folder -> ``report.md``, ``report.json``, ``trial.png`` and ``site_map.png``.

Reads only the files a trial leaves (see ``trials.trial``), so a report can be rebuilt at any
time, also from a trial that was interrupted. Each count has one source:

* what the nodes sent and what the link did with it: ``link.jsonl`` (and ``field.json`` for the
  outage buffer, which never reaches the link);
* what the aggregator made of it: ``results.sqlite3`` (tokens present in stored windows) and
  ``aggregator.json`` (late, duplicate, rejected messages);
* what was true: ``truth.jsonl``;
* placement events (nodes joining or moving): the events in ``config.json``, the stored windows'
  nodes, and the positions their tensors used (recorded in every stored result).

End-to-end latency is node sample time -> result stored: the true wall-clock time at which window
k was complete (trial start + (k + 1) x window / speed) to the row's ``created_ns``. Task metrics
compare the stored outputs with the simulator's truth (train.metrics; numpy only).
"""

from __future__ import annotations

import collections
import datetime
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from node_firmware_sim.placement_events import parse_event
from spar_wire.errors import WireError
from spar_wire.model_manifest import load_manifest
from spar_wire.site_layout import SiteLayout, load_site_layout
from testbed.latency_stats import percentile
from testbed.machine import describe_machine
from testbed.report_format import percent, short_number
from train import metrics as task_metrics
from trials.detections import (
    WindowDetections,
    detection_markdown,
    detection_predictions,
    window_detections,
)
from trials.errors import TrialError
from trials.event_report import EventOutcome, analyze_events, events_markdown
from trials.trial import AGGREGATOR_FILE, CONFIG_FILE, DATABASE, FIELD_FILE, LINK_LOG, TRUTH_LOG

LOSS_OUTCOMES = ("lost", "burst_lost", "queue_full")


@dataclass
class TrafficRow:
    """One node and modality: from the link log, and from the aggregator's stored windows."""

    node: str
    modality: str
    sent: int = 0  # frames handed to the link
    bytes: int = 0
    delivered: int = 0  # reached the broker at least once
    lost: int = 0  # independent + burst loss + full bandwidth queue
    duplicates: int = 0  # extra copies the link made
    observed: int = 0  # present in a stored window at the aggregator


@dataclass
class TrialReport:
    folder: Path
    config: dict[str, Any]
    machine: str
    model: str
    window_s: float
    speed: float
    interrupted: bool
    traffic: list[TrafficRow]
    node_counters: dict[str, dict[str, int]]  # field.json per node: messages, buffer_dropped, unsent, acked...
    aggregator: dict[str, Any]
    windows_sampled: int
    windows_stored: int
    windows_complete: int
    nodes_present: dict[int, int]  # nodes present -> stored windows
    latency_ms: list[float]
    stage_ms: dict[str, float]  # median assembly / queue / inference
    metrics: dict[str, float]
    metrics_complete: dict[str, float]  # the same on complete windows only
    positions: list[tuple[list[float], list[float]]] = field(default_factory=list)  # (true, estimated)
    layout: SiteLayout | None = None
    events: list[EventOutcome] = field(default_factory=list)  # placement events, in time order
    matched: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list, repr=False)  # (result, truth)
    results: list[dict[str, Any]] = field(default_factory=list, repr=False)  # stored results, in window order
    field_summary: dict[str, Any] | None = field(default=None, repr=False)  # field.json (None: interrupted)
    detections: list[WindowDetections] = field(default_factory=list, repr=False)  # a detector's per-window outcome
    manifest: Any = field(default=None, repr=False)

    # ------------------------------------------------------------------ headline numbers
    @property
    def hypocentres(self) -> bool:
        """Whether the model locates earthquakes (positions are hypocentres: x, y, depth in metres)."""
        return "quake/hypocentre_mean" in self.metrics or any("hypocentre" in r.get("outputs", {})
                                                               for r in self.results[:1])

    def unscored_estimates(self) -> list[list[float]]:
        """A replay's estimated positions (hypocentres or positions), for the map: nothing to join them to."""
        if not self.config.get("recordings"):
            return []
        out = []
        for result in self.results:
            outputs = result.get("outputs", {})
            value = outputs.get("hypocentre", outputs.get("position"))
            if value is not None:
                out.append([float(v) for v in value])
        return out

    @property
    def produced(self) -> int:
        """Frames the nodes made: those the link saw plus those lost in the outage buffer or unsent."""
        extra = sum(c.get("buffer_dropped", 0) + c.get("unsent", 0) for c in self.node_counters.values())
        return sum(r.sent for r in self.traffic) + extra

    @property
    def injected_lost(self) -> int:
        extra = sum(c.get("buffer_dropped", 0) + c.get("unsent", 0) for c in self.node_counters.values())
        return sum(r.lost for r in self.traffic) + extra

    @property
    def observed(self) -> int:
        return sum(r.observed for r in self.traffic)

    @property
    def late(self) -> int:
        return int(self.aggregator.get("assembler", {}).get("late", 0))

    @property
    def wire_bytes(self) -> int:
        return sum(r.bytes for r in self.traffic)

    def percentile(self, q: float) -> float:
        return percentile(self.latency_ms, q)

    def headline(self) -> dict[str, Any]:
        """The figures benchmarks and the closing line use."""
        produced = max(self.produced, 1)
        return {
            "windows_sampled": self.windows_sampled, "windows_stored": self.windows_stored,
            "windows_complete": self.windows_complete,
            "completeness": self.windows_complete / max(self.windows_sampled, 1),
            "token_completeness": self.observed / produced,
            "messages": self.produced, "bytes": self.wire_bytes,
            "bytes_per_window": self.wire_bytes / max(self.windows_sampled, 1),
            "injected_loss": self.injected_lost / produced, "observed_loss": 1 - self.observed / produced,
            "late": self.late, "latency_p50_ms": self.percentile(50), "latency_p99_ms": self.percentile(99),
            "closed_early": int(self.aggregator.get("assembler", {}).get("closed_early", 0)),
            **{f"metric/{k}": v for k, v in self.metrics.items()},
        }

    # ------------------------------------------------------------------ outputs
    def write_text_files(self) -> list[Path]:
        """report.md and report.json in the trial folder; returns their paths (the plots:
        ``trials.report_files.write_report``)."""
        paths = [self.folder / "report.md", self.folder / "report.json"]
        paths[0].write_text(self.to_markdown())
        paths[1].write_text(json.dumps({"config": self.config, "machine": self.machine, "model": self.model,
                                        "interrupted": self.interrupted, "headline": self.headline(),
                                        "metrics_complete": self.metrics_complete,
                                        "traffic": [vars(r) for r in self.traffic],
                                        "nodes_present": self.nodes_present, "stage_ms": self.stage_ms,
                                        "placement_events": [e.to_dict() for e in self.events],
                                        "detections": [{"window": w.window, "vehicles": len(w.truth),
                                                        "matched": w.matched, "missed": w.missed, "false": w.false}
                                                       for w in self.detections]},
                                       indent=2, default=_json_default) + "\n")
        return paths

    def summary_line(self) -> str:
        h = self.headline()
        metric = ", ".join(f"{k} {metric_text(k, v)}" for k, v in self.metrics.items() if k in HEADLINE_METRICS)
        return (f"{h['windows_stored']}/{h['windows_sampled']} windows stored ({percent(h['completeness'], digits=0)} "
                f"complete); injected loss {percent(h['injected_loss'])}, observed {percent(h['observed_loss'])}; "
                f"latency p50 {short_number(h['latency_p50_ms'])} ms, p99 {short_number(h['latency_p99_ms'])} ms"
                + (f"; {metric}" if metric else ""))

    def to_markdown(self) -> str:
        c = self.config
        link = c.get("link") or ("custom link" if c.get("link_config") else "perfect link")
        source = f"replay of {Path(c['recordings']).name}" if c.get("recordings") else c["scenario"]
        lines = [f"# Trial: {source} at site {Path(c['site']).stem}",
                 "",
                 f"{self.machine}",
                 "",
                 f"Model {self.model} ({self.aggregator.get('backend', '?')}); {link}; codec {c['codec']}; "
                 f"{c['duration_s']:g} s of trial time in {self.windows_sampled} windows of {self.window_s:g} s"
                 f"{'' if self.speed == 1 else f', timeline compressed {self.speed:g}x'}; seed {c['seed']}; "
                 f"broker {c['broker']}." + (" **Interrupted**: counts cover the part that ran." if self.interrupted
                                             else ""),
                 "",
                 f"**{self.summary_line()}**",
                 "", "![trial](trial.png) ![site map](site_map.png)", ""]
        lines += self._traffic_section() + self._windows_section() + self._latency_section() + self._metric_section()
        lines += detection_markdown(self.detections, tuple(self.manifest.class_names) if self.manifest else ())
        lines += events_markdown(self.events, tuple(m for m in HEADLINE_METRICS if m in self.metrics), self.window_s)
        events = " (and the placement events recorded in config.json, as an --events file)" if self.events else ""
        lines += ["", f"Reproduce: `{reproduce_command(c)}`{events}", ""]
        return "\n".join(lines)

    def _traffic_section(self) -> list[str]:
        seconds = max(self.windows_sampled * self.window_s, 1e-9)
        lines = ["## Traffic and loss", "",
                 "Per node and modality: frames the node handed to its link, bytes on the wire (MQTT payload), "
                 "what the link lost (independent, burst, full queue), and how many arrived in a stored window.",
                 "", "| node | modality | sent | kB | kB/s | link lost | duplicates | in stored windows "
                 "| observed loss |",
                 "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in self.traffic:
            lines.append(f"| {r.node} | {r.modality} | {r.sent} | {r.bytes / 1e3:.1f} | "
                         f"{r.bytes / 1e3 / seconds:.2f} | {r.lost} | {r.duplicates} | {r.observed} | "
                         f"{percent(1 - r.observed / max(r.sent, 1))} |")
        produced = max(self.produced, 1)
        buffer = sum(c.get("buffer_dropped", 0) for c in self.node_counters.values())
        unsent = sum(c.get("unsent", 0) for c in self.node_counters.values())
        processor = self.aggregator.get("processor", {})
        rejected = {k.split(".", 1)[1]: v for k, v in processor.items() if k.startswith("rejected.")}
        assembler = self.aggregator.get("assembler", {})
        lines += ["", f"- Frames produced: {self.produced} ({self.wire_bytes / 1e3:.1f} kB sent to the link, "
                  f"{self.wire_bytes / max(self.windows_sampled, 1) / 1e3:.2f} kB per window).",
                  f"- Injected loss: {self.injected_lost} ({percent(self.injected_lost / produced)}): link "
                  f"{sum(r.lost for r in self.traffic)}, outage buffer overflow {buffer}, unsent at the end {unsent}.",
                  f"- Observed at the aggregator: {self.observed} frames in stored windows "
                  f"({percent(self.observed / produced)}); late {self.late}, duplicates ignored "
                  f"{assembler.get('duplicate', 0)}, rejected {sum(rejected.values())}"
                  + (f" ({', '.join(f'{k} {v}' for k, v in sorted(rejected.items()))})" if rejected else "") + ".",
                  f"- Balance: produced {self.produced} = observed {self.observed} + injected loss {self.injected_lost}"
                  f" + late {self.late} + other {self.produced - self.observed - self.injected_lost - self.late} "
                  "(other: in windows dropped before inference, or still in flight when the trial ended).", ""]
        return lines

    def _windows_section(self) -> list[str]:
        worker = self.aggregator.get("worker", {})
        lines = ["## Windows", "",
                 f"{self.windows_sampled} windows sampled, {self.windows_stored} stored "
                 f"({self.windows_complete} complete, {self.windows_stored - self.windows_complete} partial, "
                 f"{self.windows_sampled - self.windows_stored} without a result); duplicate results "
                 f"{worker.get('results_duplicate_window', 0)}, failed inferences {worker.get('windows_failed', 0)}.",
                 "", "Closed by: " + ", ".join(
                     f"{by} {self.aggregator.get('assembler', {}).get(f'closed_{by}', 0)}"
                     for by in ("complete", "early", "deadline", "forced", "shutdown"))
                 + " (early: every missing message lost or overdue by its learned arrival lag).",
                 "", "| nodes present | windows |", "|---:|---:|"]
        lines += [f"| {n} | {count} |" for n, count in sorted(self.nodes_present.items(), reverse=True)]
        return [*lines, ""]

    def _latency_section(self) -> list[str]:
        if not self.latency_ms:
            return ["## End-to-end latency", "", "No results.", ""]
        note = "" if self.speed == 1 else f" (wall clock of a timeline compressed {self.speed:g}x)"
        return ["## End-to-end latency", "",
                f"Node sample time (window complete) -> result stored and published{note}, over "
                f"{len(self.latency_ms)} windows: p50 {self.percentile(50):.0f} ms, p90 {self.percentile(90):.0f} ms, "
                f"p99 {self.percentile(99):.0f} ms, max {max(self.latency_ms):.0f} ms. Median per aggregator stage: "
                + ", ".join(f"{k} {v:.1f} ms" for k, v in self.stage_ms.items())
                + ". Assembly waits for the window's last message, until nothing more will come "
                + ("(early close) " if self.config.get("early_close", True) else "")
                + f"or its deadline ({self.config['deadline_fraction']:g} x window after its first message).", ""]

    def _metric_section(self) -> list[str]:
        if self.config.get("recordings"):
            return self._replay_section()
        if not self.metrics:
            return ["## Task metric", "", "The model's outputs have no metric against this scenario's truth.", ""]
        lines = ["## Task metric against the simulator's truth", "",
                 "| metric | all stored windows | complete windows only |", "|---|---:|---:|"]
        lines += [f"| {k} | {metric_text(k, v)} | {metric_text(k, self.metrics_complete.get(k, math.nan))} |"
                  for k, v in self.metrics.items()]
        return [*lines, ""]


    def _replay_section(self) -> list[str]:
        """A replay has no truth: the model's answer per stored window, as the field box published it."""
        lines = ["## Model outputs (replay: no ground truth)", "",
                 f"Recordings: `{self.config['recordings']}`."]
        notes = (self.field_summary or {}).get("source_notes") or []
        lines += [f"- {note}" for note in notes] + (["", "Nodes without a recording sent nothing (missing traces)."]
                                                    if notes else [])
        lines += ["", f"The first {MAX_REPLAY_ROWS} stored windows:", "",
                 "| window start (UTC) | nodes present | output |", "|---|---:|---|"]
        for result in self.results[:MAX_REPLAY_ROWS]:
            start = datetime.datetime.fromtimestamp(result["window_start_ns"] / 1e9, datetime.timezone.utc)
            lines.append(f"| {start:%H:%M:%S} | {result.get('nodes_present', 0)}/{len(result.get('nodes', ()))} | "
                         f"{output_text(result)} |")
        return [*lines, ""]


MAX_REPLAY_ROWS = 20


def output_text(result: dict[str, Any]) -> str:
    """A stored result's main answer in words: a hypocentre in km, a position in m, or a class."""
    outputs = result.get("outputs", {})
    if "hypocentre" in outputs:
        x, y, depth = (float(v) / 1000 for v in outputs["hypocentre"][:3])
        return f"hypocentre ({x:.1f}, {y:.1f}) km, {depth:.1f} km deep"
    if "position" in outputs:
        return f"{result.get('class') or '?'} at (" + ", ".join(f"{float(v):.1f}" for v in outputs["position"]) + \
            ") m"
    return str(result.get("class") or "-")


# The one metric per task that summaries, series tables and their targets use.
HEADLINE_METRICS = ("classify/accuracy", "localize/mean_distance", "detect/mAP@4", "quake/hypocentre_median")


def analyze_trial(folder: str | Path) -> TrialReport:
    """Read a trial folder into a report (nothing is written)."""
    folder = Path(folder)
    config = _read_json(folder / CONFIG_FILE)
    if config is None:
        raise TrialError(f"{folder} is not a trial folder (no {CONFIG_FILE})")
    try:
        layout = load_site_layout(config["site"])
        manifest = load_manifest(config["model"])
    except WireError as exc:
        raise TrialError(f"cannot read the trial's site or model: {exc}") from None
    field_data = _read_json(folder / FIELD_FILE)
    aggregator = _read_json(folder / AGGREGATOR_FILE) or {}
    truth = _read_jsonl(folder / TRUTH_LOG)
    results = _read_results(folder / DATABASE)
    window_s = float(aggregator.get("window_s") or (field_data or {}).get("window_s") or _window_s(layout))
    speed = float(config.get("speed", 1.0))
    matched = _match(results, truth, window_s)
    traffic = _traffic(folder / LINK_LOG, results, layout)
    latency, stages = _latency(matched, truth, window_s, speed)
    replay = bool(config.get("recordings"))  # recordings have no ground truth to score against
    scored = _Scored({}, []) if replay else _scores(manifest, matched)
    complete = [] if replay else [(r, t) for r, t in matched if r.get("complete")]
    events = analyze_events([parse_event(e, "config.json events") for e in config.get("events") or []], matched,
                            window_s, lambda pairs: _headline_scores(manifest, pairs))
    return TrialReport(
        folder=folder, config=config, machine=describe_machine(), model=f"{manifest.name}@{manifest.version}",
        window_s=window_s, speed=speed, interrupted=field_data is None, traffic=traffic,
        node_counters={n: {k: v for k, v in c.items() if isinstance(v, int)}
                       for n, c in (field_data or {}).get("nodes", {}).items()},
        aggregator=aggregator, windows_sampled=len(truth), windows_stored=len(results),
        windows_complete=sum(1 for r in results if r.get("complete")),
        nodes_present=dict(collections.Counter(int(r.get("nodes_present", 0)) for r in results)),
        latency_ms=latency, stage_ms=stages, metrics=scored.metrics,
        metrics_complete=_scores(manifest, complete).metrics, positions=scored.positions, layout=layout,
        events=events, matched=matched, manifest=manifest, results=results, field_summary=field_data,
        detections=[] if replay else window_detections(matched))


def scores_of_windows(report: TrialReport, first: int, stop: int | None) -> tuple[int, dict[str, float]]:
    """(stored windows, headline metrics) of trial windows first..stop-1 (to the end when stop is None)."""
    pairs = [(r, t) for r, t in report.matched if first <= t["window"] and (stop is None or t["window"] < stop)]
    return len(pairs), _headline_scores(report.manifest, pairs)


# --------------------------------------------------------------------------- reading
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise TrialError(f"cannot read {path}: {exc}") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines log; a torn last line (a killed trial) is skipped."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines):
                raise TrialError(f"{path}:{number}: not JSON") from None
    return records


def _read_results(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    from edge_runtime.result_store import ResultStore

    with ResultStore(path, readonly=True) as store:
        return store.query(limit=None, newest_first=False)


def _window_s(layout: SiteLayout) -> float:
    return max(layout.window_s((m,)) for m in layout.modalities)


def _match(results: list[dict[str, Any]], truth: list[dict[str, Any]], window_s: float
           ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(result, truth) pairs: each result with the truth window whose start is nearest (within W/2)."""
    if not truth:
        return []
    starts = np.array([t["window_start_ns"] for t in truth], dtype=np.int64)
    half = int(window_s * 1e9 / 2)
    pairs = []
    for result in results:
        i = int(np.argmin(np.abs(starts - int(result["window_start_ns"]))))
        if abs(int(starts[i]) - int(result["window_start_ns"])) <= half:
            pairs.append((result, truth[i]))
    return pairs


def _traffic(link_log: Path, results: list[dict[str, Any]], layout: SiteLayout) -> list[TrafficRow]:
    rows = {(n.id, m): TrafficRow(n.id, m) for n in layout.nodes for m in n.modalities}
    for event in _read_jsonl(link_log):
        row = rows.setdefault((event["node"], event["modality"]), TrafficRow(event["node"], event["modality"]))
        row.sent += 1
        row.bytes += int(event["nbytes"])
        deliveries = len(event.get("deliveries_s", []))
        row.delivered += deliveries > 0
        row.duplicates += max(0, deliveries - 1)
        row.lost += event["outcome"] in LOSS_OUTCOMES
    for result in results:
        for modality, nodes in result.get("present", {}).items():
            for node in nodes:
                rows.setdefault((node, modality), TrafficRow(node, modality)).observed += 1
    return list(rows.values())


def _latency(matched: list[tuple[dict[str, Any], dict[str, Any]]], truth: list[dict[str, Any]], window_s: float,
             speed: float) -> tuple[list[float], dict[str, float]]:
    """End-to-end ms per stored window (see the module docstring) and the median of each stage."""
    if not matched:
        return [], {}
    # Window 0 of the truth log starts at the trial's wall-clock start (trials do not shift the epoch).
    start_ns = int(truth[0]["window_start_ns"]) - int(round(truth[0]["window"] * window_s * 1e9))
    latency = []
    for result, record in matched:
        complete_ns = start_ns + (record["window"] + 1) * window_s / speed * 1e9
        latency.append((int(result["created_ns"]) - complete_ns) / 1e6)
    stages = {}
    for stage in ("assembly", "queue", "inference"):
        values = [r["latency_ms"][stage] for r, _ in matched if r.get("latency_ms", {}).get(stage) is not None]
        if values:
            stages[stage] = float(np.median(values))
    return latency, stages


@dataclass
class _Scored:
    metrics: dict[str, float]
    positions: list[tuple[list[float], list[float]]]


def _scores(manifest: Any, matched: list[tuple[dict[str, Any], dict[str, Any]]]) -> _Scored:
    """Task metrics of the stored outputs against the truth, by the deploy graph's output names."""
    names = {spec.name for spec in manifest.outputs}
    out: dict[str, float] = {}
    positions: list[tuple[list[float], list[float]]] = []
    if not matched:
        return _Scored(out, positions)
    labels = np.array([t["label"] for _, t in matched], dtype=np.int64)
    slots = max(1, max(len(t["targets"]) for _, t in matched))
    dims = max([len(x["position"]) for _, t in matched for x in t["targets"]] or [manifest.position_dim])
    true_class = np.full((len(matched), slots), -1, dtype=np.int64)
    true_pos = np.full((len(matched), slots, dims), np.nan)
    for i, (_, t) in enumerate(matched):
        for j, target in enumerate(t["targets"]):
            true_class[i, j] = target["class_id"]
            true_pos[i, j, : len(target["position"])] = target["position"]
    outputs = [r["outputs"] for r, _ in matched]
    if "logits" in names:
        pred = np.array([int(np.argmax(o["logits"])) for o in outputs])
        out.update({f"classify/{k}": v for k, v in task_metrics.summarize(
            "classify", {"label": pred}, {"label": labels}).items()})
    for name, task in (("position", "localize"), ("hypocentre", "quake")):
        if name in names:
            pred = np.array([o[name] for o in outputs], dtype=np.float64)
            truth = {"target_position": true_pos[:, :, : pred.shape[1]]}
            out.update({f"{task}/{k}": v for k, v in task_metrics.summarize(task, {"position": pred}, truth).items()})
            positions = [(list(true_pos[i, 0, : pred.shape[1]]), list(pred[i])) for i in range(len(matched))
                         if np.isfinite(true_pos[i, 0, 0])]
    if {"detection_logits", "detection_positions"} <= names:
        predictions = detection_predictions(np.array([o["detection_logits"] for o in outputs]),
                                            np.array([o["detection_positions"] for o in outputs]))
        truth = {"label": labels, "target_class": true_class, "target_position": true_pos}
        out.update({f"detect/{k}": v for k, v in task_metrics.summarize("detect", predictions, truth).items()})
    return _Scored(out, positions)


def _headline_scores(manifest: Any, matched: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, float]:
    metrics = _scores(manifest, matched).metrics
    return {k: v for k, v in metrics.items() if k in HEADLINE_METRICS}


# --------------------------------------------------------------------------- formatting
def reproduce_command(config: dict[str, Any]) -> str:
    parts = ["spar-trial run", f"--site {config['site']}", f"--scenario {config['scenario']}",
             f"--model {config['model']}", f"--duration {config['duration_s']:g}", f"--codec {config['codec']}",
             f"--seed {config['seed']}"]
    if config.get("link"):
        parts.append(f"--link {config['link']}")
    if config.get("speed", 1) != 1:
        parts.append(f"--speed {config['speed']:g}")
    if config.get("recordings"):
        parts.append(f"--recordings {config['recordings']}")
    parts += [f"--param {k}={json.dumps(v)}" for k, v in (config.get("scenario_params") or {}).items()]
    return " ".join(parts)


def metric_text(name: str, value: float) -> str:
    """A task metric for people: earthquake distances in km (the site frame is in metres)."""
    if name.startswith("quake/") and value is not None and math.isfinite(value):
        return f"{value / 1e6:.1f} km²" if name.endswith("/mse") else f"{value / 1000:.2f} km"
    return short_number(value)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
