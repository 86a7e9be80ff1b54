"""Section 6 of ``spar-bench runtime``: the result store's commit cost, synchronous FULL against NORMAL.

``ResultStore.insert_new`` timed on real SQLite files in a folder on the disk the results would live
on, both modes interleaved in one run so machine noise hits both (:func:`run_store_benchmark`); its
markdown section, and the splice that replaces that section in an existing report
(``spar-bench runtime --store-only``). Apart from the runtime benchmark because it needs no broker,
model run or aggregator: only a site, a manifest to shape the results after, and a disk.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.errors import BenchError
from benchmarks.experiment_ledger import versions
from edge_runtime.config import AggregatorConfig
from edge_runtime.result_store import ResultStore
from edge_runtime.results import Timing, build_result
from edge_runtime.window_assembler import AssembledWindow
from spar_wire.errors import WireError
from spar_wire.model_manifest import POSITIONS_INPUT, ModelManifest, load_manifest
from spar_wire.site_layout import SiteLayout, load_site_layout
from testbed.latency_stats import percentile
from testbed.machine import describe_machine
from testbed.tiny_onnx_model import build_tiny_model

STORE_HEADING = "## Result store commit cost: synchronous FULL vs NORMAL"
#: The model the result dicts are shaped after: the shipped one (class logits + position).
SHIPPED_MANIFEST = Path(__file__).resolve().parents[1] / "models" / "parking_lot" / "manifest.json"
SYNC_MODES = ("FULL", "NORMAL")


@dataclass
class StoreCommitStats:
    """Commit latencies of one (synchronous mode, batch size) pair: one entry per ``insert_new`` call."""

    synchronous: str
    batch_size: int
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return percentile(self.latencies_ms, 50)

    @property
    def p99_ms(self) -> float:
        return percentile(self.latencies_ms, 99)

    @property
    def windows_per_s(self) -> float:
        """Windows stored per second of commit time: the store alone, batches back to back."""
        total_s = sum(self.latencies_ms) / 1e3
        return self.batch_size * len(self.latencies_ms) / total_s if total_s > 0 else float("nan")


@dataclass
class StoreCommitReport:
    """``ResultStore.insert_new`` with synchronous FULL and NORMAL, measured side by side in one run."""

    machine: str
    directory: str
    filesystem: str  # device and file system type of the directory's mount
    result_bytes: int  # compact JSON of one stored result
    batches: int  # timed batches per (mode, batch size)
    block: int  # consecutive batches of one (mode, batch size) before switching
    window_s: float  # the site's window length: one site stores 1 / window_s windows/s
    stats: list[StoreCommitStats]
    seconds: float

    def get(self, synchronous: str, batch_size: int) -> StoreCommitStats:
        return next(s for s in self.stats if s.synchronous == synchronous and s.batch_size == batch_size)

    @property
    def batch_sizes(self) -> list[int]:
        return sorted({s.batch_size for s in self.stats})

    def ratio(self, batch_size: int, q: float = 50) -> float:
        """FULL / NORMAL commit latency at percentile ``q`` for one batch size (> 1: FULL is slower)."""
        normal = percentile(self.get("NORMAL", batch_size).latencies_ms, q)
        return percentile(self.get("FULL", batch_size).latencies_ms, q) / normal if normal > 0 else float("nan")

    def to_markdown(self) -> str:
        lines = [
            STORE_HEADING, "",
            f"machine: {self.machine}", "",
            f"A fresh SQLite file per mode (WAL, the aggregator's retention settings) in `{self.directory}` on "
            f"{self.filesystem}; {self.batches} timed batches per mode and batch size through "
            f"`ResultStore.insert_new(results, window_ns=...)` with `grid_start_ns` set, as the aggregator stores; "
            f"each result {self.result_bytes:,} bytes of JSON (`build_result` for the shipped model's outputs); "
            f"the modes interleaved in blocks of {self.block} batches, the order reversed every round, so machine "
            f"noise hits both; {self.seconds:.1f} s in all. Latency = one `insert_new` call (one committed "
            f"transaction); p99 includes WAL checkpoints, which fsync in both modes.", "",
            "| batch | FULL median ms | FULL p99 ms | FULL windows/s | NORMAL median ms | NORMAL p99 ms | "
            "NORMAL windows/s | FULL / NORMAL median | FULL / NORMAL p99 |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for size in self.batch_sizes:
            full, normal = self.get("FULL", size), self.get("NORMAL", size)
            lines.append(f"| {size} | {full.median_ms:.3f} | {full.p99_ms:.3f} | {full.windows_per_s:,.0f} | "
                         f"{normal.median_ms:.3f} | {normal.p99_ms:.3f} | {normal.windows_per_s:,.0f} | "
                         f"{self.ratio(size):.2f}x | {self.ratio(size, 99):.2f}x |")
        lines += ["", self._tradeoff(), ""]
        return "\n".join(lines)

    def _tradeoff(self) -> str:
        """The paragraph on what FULL buys and what it costs, with this run's figures."""
        one = min(self.batch_sizes)
        full, normal = self.get("FULL", one), self.get("NORMAL", one)
        site_rate = 1 / self.window_s
        headroom = full.windows_per_s / site_rate
        others = "; ".join(f"batches of {size}: {self.get('FULL', size).median_ms:.2f} vs "
                           f"{self.get('NORMAL', size).median_ms:.2f} ms, {self.ratio(size):.1f}x"
                           for size in self.batch_sizes if size != one)
        verdict = ("so on this disk FULL costs latency, not capacity" if headroom >= 10 else
                   "so on this disk FULL's fsync takes a real share of the box's time per window")
        return (
            "**Trade-off.** With `synchronous = \"FULL\"` (the default; set in `[aggregator]`) every commit "
            "fsyncs the WAL before the aggregator acknowledges the window's messages to the broker, so an "
            "acknowledged window survives a power cut. With `\"NORMAL\"` the WAL is fsynced only at checkpoints: a "
            "crash of the aggregator process still loses nothing committed (the pages are in the OS page cache), "
            "but a power loss or OS crash can roll back the windows committed since the last checkpoint, windows "
            "the broker has already forgotten; the database itself stays consistent. "
            f"Measured here: FULL takes {full.median_ms:.2f} ms per batch of {one} (median; p99 "
            f"{full.p99_ms:.2f} ms) against {normal.median_ms:.2f} ms (p99 {normal.p99_ms:.2f} ms) with NORMAL, "
            f"{self.ratio(one):.1f}x" + (f" ({others})" if others else "") + ". "
            f"Even FULL stores {full.windows_per_s:,.0f} windows/s back to back, {headroom:,.0f}x the "
            f"{site_rate:g} windows/s of one site with {self.window_s:g} s windows, {verdict}. "
            "SD cards and eMMC, a Jetson's usual storage, are much slower to fsync than this machine's disk: "
            "re-measure on the box, with the store on the disk its results will live on: "
            "`spar-bench runtime --store-only --store-dir <folder of the aggregator's database> "
            "--out <report.md>`.")


def run_store_benchmark(site: str | Path, directory: str | Path, *, batches: int = 1000,
                        batch_sizes: tuple[int, ...] = (1, 8), block: int = 20, seed: int = 0,
                        manifest: str | Path | None = None,
                        progress: Callable[[str], None] = lambda text: None) -> StoreCommitReport:
    """Time ``ResultStore.insert_new`` with synchronous FULL and NORMAL on real SQLite files.

    The files go into a fresh temporary folder inside ``directory`` (created if missing, removed
    afterwards), so the fsyncs hit the disk that ``directory`` lives on: point it at where the
    aggregator's database lives. ``batches`` timed batches per mode and batch size, taken in blocks
    of ``block`` that alternate between the modes.

    Raises:
        BenchError: bad arguments, or a store did not take a window as new (the figures would then
            time a duplicate probe instead of an insert).
    """
    if batches < 1 or block < 1 or not batch_sizes or min(batch_sizes) < 1:
        raise BenchError(f"store benchmark: batches, block and batch sizes must be >= 1 "
                         f"(got {batches}, {block}, {batch_sizes})")
    layout = load_site_layout(site)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    defaults = AggregatorConfig(site=Path(site), model=Path("unused"), database=Path("unused"))
    with tempfile.TemporaryDirectory(prefix=".spar-store-bench-", dir=directory) as tmp:
        tmp_path = Path(tmp)
        template = _sample_result(layout, _store_manifest(manifest, layout, tmp_path, seed), seed)
        try:
            window_s = layout.window_s()  # the aggregator refuses sites whose modalities disagree
        except WireError as exc:
            raise BenchError(f"store benchmark: {exc}") from None
        window_ns = int(round(window_s * 1e9))
        stats = {(mode, size): StoreCommitStats(mode, size) for mode in SYNC_MODES for size in batch_sizes}
        next_window = dict.fromkeys(SYNC_MODES, 0)
        base_ns = time.time_ns() // window_ns * window_ns

        def batch(mode: str, size: int) -> list[dict[str, Any]]:
            """``size`` new windows of this mode's store, consecutive on the site's grid."""
            first = next_window[mode]
            next_window[mode] += size
            return [dict(template, window_index=k, grid_start_ns=base_ns + k * window_ns,
                         window_start_ns=base_ns + k * window_ns + 1_000_000)  # a node clock 1 ms late
                    for k in range(first, first + size)]

        def timed(store: ResultStore, mode: str, size: int) -> float:
            results = batch(mode, size)  # built outside the timing: only the store is under test
            started = time.perf_counter()
            new = store.insert_new(results, window_ns=window_ns)
            elapsed = time.perf_counter() - started
            if not all(new):
                raise BenchError(f"store benchmark: synchronous={mode} took {new.count(False)} of {size} windows "
                                 "as already stored")
            return elapsed * 1e3

        started = time.perf_counter()
        with contextlib.ExitStack() as stack:
            stores = {mode: stack.enter_context(ResultStore(
                tmp_path / f"results-{mode.lower()}.sqlite3", retention_rows=defaults.retention_rows,
                retention_days=defaults.retention_days, synchronous=mode)) for mode in SYNC_MODES}
            for mode, store in stores.items():
                if store.journal_mode != "wal":
                    raise BenchError(f"store benchmark: {directory} gives journal_mode={store.journal_mode}, not "
                                     "WAL; the store forces FULL there, so there is nothing to compare")
                # Warm-up, untimed: creates the WAL and runs the first retention sweep.
                for _ in range(block):
                    timed(store, mode, 1)
            order = [(mode, size) for size in batch_sizes for mode in SYNC_MODES]
            progress(f"result store: {batches} commits per synchronous mode and batch size {batch_sizes} in "
                     f"{directory}")
            for round_index in range(math.ceil(batches / block)):
                for mode, size in order if round_index % 2 == 0 else order[::-1]:
                    entry = stats[(mode, size)]
                    for _ in range(min(block, batches - len(entry.latencies_ms))):
                        entry.latencies_ms.append(timed(stores[mode], mode, size))
        seconds = time.perf_counter() - started
        result_bytes = len(json.dumps(batch("FULL", 1)[0], separators=(",", ":")).encode())
    machine = describe_machine(versions("onnxruntime", "SQLite", "numpy"))
    return StoreCommitReport(machine, str(directory.resolve()), _filesystem(directory),
                             result_bytes, batches, block, window_s, list(stats.values()), seconds)


def splice_store_section(report: str, section: str) -> str:
    """``report`` (a runtime report's markdown) with its store section replaced by ``section``, or
    ``section`` appended; the other sections are kept as they are (``--store-only``)."""
    start = report.find(STORE_HEADING)
    if start < 0:
        return report.rstrip("\n") + "\n\n" + section if report.strip() else section
    following = report.find("\n## ", start + len(STORE_HEADING))
    rest = report[following + 1:] if following >= 0 else ""
    return report[:start] + section + ("\n" + rest if rest else "")


def _store_manifest(path: str | Path | None, layout: SiteLayout, tmp: Path, seed: int) -> ModelManifest:
    """The manifest the results are shaped after: ``path``, else the shipped model, else a tiny model
    built for the site (an install without models/ can still measure its disk)."""
    if path is not None:
        return load_manifest(path)
    if SHIPPED_MANIFEST.is_file():
        return load_manifest(SHIPPED_MANIFEST)
    return build_tiny_model(layout, tmp / "model", seed=seed)


def _sample_result(layout: SiteLayout, manifest: ModelManifest, seed: int) -> dict[str, Any]:
    """One complete window's result as the aggregator builds it (``build_result``), with random outputs."""
    rng = np.random.default_rng(seed)
    node_ids = tuple(node.id for node in layout.nodes)
    present = {m: tuple(n.id for n in layout.nodes if m in n.modalities) for m in manifest.modalities}
    pairs = sum(len(nodes) for nodes in present.values())
    window = AssembledWindow(window_index=0, window_start_ns=0, grid_start_ns=0, node_ids=node_ids,
                             inputs={POSITIONS_INPUT: layout.positions().astype(np.float32)}, present=present,
                             expected=pairs, received=pairs, complete=True, reason="complete",
                             first_arrival_s=0.0, closed_s=0.0, message_count=pairs)
    outputs = {spec.name: rng.standard_normal([len(node_ids) if d == "nodes" else int(d) for d in spec.shape[1:]])
               .astype(np.float32) for spec in manifest.outputs}
    timing = Timing(assembly_s=0.0123, queue_s=0.0004, inference_s=0.0031, end_to_end_s=1.0456)
    return build_result(layout.site_id, window, outputs, manifest, timing, batch_size=1)


def _filesystem(path: Path) -> str:
    """Device and file system of the mount holding ``path`` (longest mount point in /proc/mounts)."""
    try:
        mounts = [line.split()[:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "an unknown file system"  # not Linux: the report still names the folder
    resolved = str(path.resolve())
    candidates = [m for m in mounts if len(m) == 3
                  and (resolved == m[1] or resolved.startswith(m[1].rstrip("/") + "/"))]
    if not candidates:
        return "an unknown file system"
    device, mount_point, fs_type = max(candidates, key=lambda m: len(m[1]))
    return f"{device} ({fs_type}, mounted at {mount_point})"
