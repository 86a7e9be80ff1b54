"""Synthetic sites of any size and the random-weight model the load benchmarks feed them to.

``spar-bench latency`` sweeps site sizes and ``spar-bench overload`` drives one large site; both
need the same two things, made the same way so their figures compare: a site layout of N nodes with
the parking lot's modalities and feature configs (:func:`synthetic_site`), and a model of the
shipped student's architecture with random weights and a node table large enough for every N
(:func:`ensure_model`, cached, with the tiny test model as fallback).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.util
import json
import math
import multiprocessing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.errors import BenchError
from spar_wire.errors import WireError
from spar_wire.site_layout import SiteLayout, load_site_layout
from spar_wire.toml_file import read_toml

# The shape of the shipped parking-lot student (models/parking_lot, 0.4.0): the `spar-export distill`
# flags recorded in models/parking_lot/TRAINING.md (a test compares them), over SparConfig defaults.
SHIPPED_STUDENT = {"dim": 64, "heads": 4, "modality_depth": 1, "joint_depth": 1, "mlp_ratio": 2.0, "token_merge": 4}
MODEL_KINDS = ("student", "tiny")
_MODEL_SOURCES = ("export.distill", "export.deploy_model", "export.onnx_export", "export.manifests",
                  "train.models.config", "train.models.spar", "train.models.transformer",
                  "train.models.positions", "train.heads")


@dataclass
class ModelInfo:
    """The model a load benchmark runs: where its manifest is, what it is, and whether it came from the cache."""

    manifest: Path
    kind: str  # "student" (random weights, the shipped student's architecture) | "tiny"
    description: str
    parameters: int | None
    cached: bool
    note: str = ""  # why the tiny fallback was used


def synthetic_site(base: str | Path, n_nodes: int, out_dir: str | Path, seed: int = 0) -> Path:
    """Write ``parking_lot_n{N}.toml``: the base site's modalities and feature configs, ``n_nodes`` nodes
    (ids n001..) on a jittered grid over a lot of the base lot's aspect ratio whose area grows with N
    (the base lot's extent at the base node count). Returns the path; BenchError if it does not load
    back with the base site's feature hashes."""
    base = Path(base)
    layout = load_layout(base)
    raw = read_toml(base, "bad_layout")
    if n_nodes < 1:
        raise BenchError(f"a site needs at least one node, got {n_nodes}")
    extent = np.ptp(layout.positions()[:, :2], axis=0)
    width, height = (float(v) if v > 0 else 30.0 for v in extent)
    scale = math.sqrt(n_nodes / len(layout.nodes))
    width, height = width * scale, height * scale
    cols = max(1, math.ceil(math.sqrt(n_nodes * width / height)))
    rows = math.ceil(n_nodes / cols)
    dx, dy = width / max(cols - 1, 1), height / max(rows - 1, 1)
    rng = np.random.default_rng(seed + n_nodes)
    modalities = list(layout.modalities)
    site_id = f"{layout.site_id}_n{n_nodes}"[:64]
    lines = [f"# Synthetic {n_nodes}-node variant of {base.name} for spar-bench latency (generated).",
             "[site]", f"id = {json.dumps(site_id)}", f"frame = {json.dumps(layout.frame)}",
             f"description = {json.dumps(f'{width:.0f} m x {height:.0f} m lot, {n_nodes} nodes on a jittered grid')}",
             ""]
    for name, table in raw["modalities"].items():
        lines.append(f"[modalities.{name}]")
        lines += [f"{key} = {_toml_value(value, f'modalities.{name}.{key}')}" for key, value in table.items()]
        lines.append("")
    for i in range(n_nodes):
        r, c = divmod(i, cols)
        x = c * dx + rng.uniform(-0.25, 0.25) * dx
        y = r * dy + rng.uniform(-0.25, 0.25) * dy
        lines += ["[[nodes]]", f'id = "n{i + 1:03d}"', f"position = [{x:.2f}, {y:.2f}]",
                  f"modalities = {json.dumps(modalities)}", ""]
    out = Path(out_dir) / f"{site_id}.toml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    made = load_layout(out)
    if made.feature_hashes() != layout.feature_hashes():
        raise BenchError(f"{out}: feature hashes {made.feature_hashes()} differ from {base}'s "
                         f"{layout.feature_hashes()}")
    return out


def ensure_model(base_site: str | Path, out_dir: str | Path, *, max_nodes: int = 64, kind: str = "student",
                 seed: int = 0, progress: Callable[[str], None] = lambda text: None) -> ModelInfo:
    """The model every N runs: ``model.onnx`` + ``manifest.json`` under ``out_dir``, node range 1..max_nodes.

    "student": random weights in the architecture of the shipped student (``SHIPPED_STUDENT`` over
    SparConfig defaults; classify + localize heads), exported with a dynamic node axis in a separate
    process (torch stays out of the aggregator's process) and cached under a key of its settings and
    the model code's source; falls back to "tiny" when it cannot be built.
    """
    from export.errors import ExportError  # export/errors.py alone: no torch here

    if kind not in MODEL_KINDS:
        raise BenchError(f"model must be one of {', '.join(MODEL_KINDS)}, got {kind!r}")
    out_dir = Path(out_dir)
    layout = load_layout(base_site)
    note = ""
    if kind == "student":
        key = _model_key(layout, max_nodes, seed)
        target = out_dir / f"student-{max_nodes}-{key}"
        info_path = target / "info.json"
        if info_path.exists() and (target / "manifest.json").exists() and (target / "model.onnx").exists():
            info = json.loads(info_path.read_text())
            return ModelInfo(target / "manifest.json", "student", info["description"], info["parameters"], True)
        progress("exporting a random-weight student (torch, in a separate process)")
        try:
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
                info = pool.submit(_export_student, str(base_site), str(target), max_nodes, seed).result(timeout=900)
        except (ExportError, ImportError, RuntimeError, ValueError, OSError, concurrent.futures.TimeoutError,
                concurrent.futures.process.BrokenProcessPool) as exc:
            note = f"student export failed ({type(exc).__name__}: {exc}); tiny fallback"
            progress(note)
        else:
            info_path.write_text(json.dumps(info, indent=2) + "\n")
            return ModelInfo(target / "manifest.json", "student", info["description"], info["parameters"], False)
    from testbed.tiny_onnx_model import build_tiny_model

    target = out_dir / f"tiny-{max_nodes}"
    manifest = build_tiny_model(layout, target, seed=seed, max_nodes=max_nodes)
    return ModelInfo(target / "manifest.json", "tiny", f"tiny test model {manifest.name} (random weights), node range "
                     f"1..{max_nodes}", None, False, note)


def _export_student(base_site: str, out_dir: str, max_nodes: int, seed: int) -> dict[str, Any]:
    """Child process: build, export and check the random-weight student; returns its description."""
    import torch

    from export.distill import build_student
    from export.manifests import manifest_for, manifest_path_for
    from export.onnx_export import export_onnx
    from node_firmware_sim.scenarios import make_scenario
    from train.models.config import ModalitySpec as TokenSpec
    from train.models.config import SparConfig

    layout = load_site_layout(base_site)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    specs = tuple(TokenSpec(name, spec.features.n_tokens, spec.features.token_dim)
                  for name, spec in layout.modalities.items())
    cfg = SparConfig(modalities=specs, max_nodes=max_nodes, position_dims=layout.position_dim, **SHIPPED_STUDENT)
    class_names = make_scenario("parking_lot", layout, seed).class_names
    model = build_student(cfg, ["classify", "localize"], len(class_names), layout.position_dim, {})
    # Token statistics of dB spectrogram tokens (their values change no compute, only the numbers).
    model.encoder.set_token_statistics({name: (-60.0, 12.0) for name in layout.modalities})
    onnx_path = export_onnx(model.eval(), Path(out_dir) / "model.onnx", check_nodes=(1, 8, max_nodes))
    manifest = manifest_for(model, {"feature_hashes": layout.feature_hashes(), "class_names": list(class_names)},
                            onnx_path, name="spar-latency-student", version=f"random-{seed}",
                            node_range=(1, max_nodes))
    manifest.write(manifest_path_for(onnx_path))
    parameters = sum(p.numel() for p in model.parameters())
    shape = ", ".join(f"{k} {v}" for k, v in SHIPPED_STUDENT.items())
    return {"parameters": parameters,
            "description": f"random-weight student of the shipped architecture ({shape}; node table {max_nodes}; "
                           f"classify + localize heads; {parameters:,} parameters), ONNX with a dynamic node axis"}


def _model_key(layout: SiteLayout, max_nodes: int, seed: int) -> str:
    key = {"max_nodes": max_nodes, "seed": seed, "hashes": layout.feature_hashes(),
           "position_dim": layout.position_dim, "shape": SHIPPED_STUDENT}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
    for module in _MODEL_SOURCES:
        spec = importlib.util.find_spec(module)
        origin = Path(spec.origin) if spec and spec.origin else None
        files = sorted(origin.parent.glob("*.py")) if origin and origin.name == "__init__.py" else [origin]
        for path in files:
            if path is not None and path.exists():
                digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def load_layout(path: str | Path) -> SiteLayout:
    """The site layout at ``path``; BenchError (the benchmarks' one error type) when it does not load."""
    try:
        return load_site_layout(path)
    except WireError as exc:
        raise BenchError(str(exc)) from None


def _toml_value(value: Any, where: str) -> str:
    """``value`` from the base site's TOML written back as TOML (the synthetic site copies its modality tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v, where) for v in value) + "]"
    raise BenchError(f"{where}: cannot copy a {type(value).__name__} into the synthetic site")
